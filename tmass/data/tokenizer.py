"""Tokenizers, from local files only.

- A CLIP checkpoint directory (vocab.json + merges.txt, or tokenizer.json) -> its CLIP BPE tokenizer.
- For the synthetic corpus and the tests: a word-level tokenizer built from the corpus' own captions and saved
  beside the shards (`{shards}/tokenizer/`). Its ids do not match pretrained CLIP embeddings; the tiny random
  CLIP that trains on it takes its vocabulary size and special ids from it (`text_config_overrides`).
Texts become 77 tokens, padded and truncated (CLIP's context).
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Iterable

import torch

from ..errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

CONTEXT = 77
BOS, EOS, UNK = "<|startoftext|>", "<|endoftext|>", "<|unk|>"


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"tokenizer {path!r} is not a local directory. Pass the CLIP checkpoint directory (it holds vocab.json "
            f"and merges.txt) or the shards' tokenizer/ folder; nothing is downloaded.")
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def build_caption_tokenizer(captions: Iterable[str], out_dir: str | None = None) -> PreTrainedTokenizerBase:
    """A lower-case word-level tokenizer (words and punctuation) with CLIP's special tokens; eos = pad."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.BertPreTokenizer()
    words = sorted({w for c in captions for w, _ in pre.pre_tokenize_str(c.lower())})
    vocab = {w: i for i, w in enumerate(words)}
    for tok in (UNK, BOS, EOS):
        vocab[tok] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre
    tk.post_processor = processors.TemplateProcessing(single=f"{BOS} $A {EOS}",
                                                      special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=BOS, eos_token=EOS, pad_token=EOS,
                                   unk_token=UNK, model_max_length=CONTEXT)
    if out_dir:
        fast.save_pretrained(out_dir)
    return fast


def text_config_overrides(tokenizer: PreTrainedTokenizerBase) -> dict:
    """What a randomly initialised CLIP text tower needs to agree with `tokenizer`."""
    return {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}


def tokenize(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """-> input_ids, attention_mask, each [N, 77] (padded, truncated)."""
    enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=CONTEXT, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def trim(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the padding columns no text of the batch needs. Exact for CLIP: the causal mask keeps the EOS
    state blind to everything after it."""
    n = int(attention_mask.sum(dim=1).max()) if attention_mask.numel() else 1
    return input_ids[:, :n].contiguous(), attention_mask[:, :n].contiguous()


def resolve_tokenizer(explicit: str | None, clip_path: str | None, shards: str | None) -> str:
    """--tokenizer, else the CLIP checkpoint's, else the shards' own tokenizer/ folder."""
    if explicit:
        return explicit
    if clip_path:
        from ..model.clip import resolve_clip_path

        return resolve_clip_path(clip_path)
    if shards:
        from .shardlist import expand_shards

        folder = os.path.join(os.path.dirname(expand_shards(shards)[0]), "tokenizer")
        if os.path.isdir(folder):
            return folder
    raise ConfigError("no tokenizer: pass --tokenizer DIR (a CLIP checkpoint directory or a shards' "
                     "tokenizer/ folder) or --clip_path")
