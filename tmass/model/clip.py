"""The CLIP towers (HF transformers `CLIPModel`): build from a local checkpoint or from a config.

    text feature   t = W_text · LN(h_EOS)          [N_t, D]   (the projected EOS state; not normalised)
    frame feature  f = W_vis · LN(h_CLS(frame))    [B, F, D]  (the projected CLS state of every frame)

We call the sub-models and projections directly rather than `get_*_features`, whose return type changed in
transformers 5 (`.pooler_output` where there was a tensor).
"""

from __future__ import annotations

import os
import typing

import torch
from torch import nn
from transformers import CLIPConfig, CLIPModel

from ..config import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ModelConfig, channel_triple
from ..errors import ConfigError, DataError

_HUB_HINT = (
    "--clip_path takes a local directory holding a HF CLIP checkpoint (config.json and model.safetensors "
    "or pytorch_model.bin), or a hub name already in the HF cache; nothing is downloaded at run time. On a "
    "machine with network, fetch it once, e.g. `huggingface-cli download openai/clip-vit-base-patch16` (into "
    "the cache that HF_HOME or HF_HUB_CACHE names) or with `--local-dir /shared/clip-vit-base-patch16`."
)


def resolve_clip_path(clip_path: str) -> str:
    """A local checkpoint directory as it is; a hub name (`openai/clip-vit-base-patch16`) as its snapshot in
    the HF cache (HF_HUB_CACHE, else HF_HOME/hub), offline. Raises ConfigError with the fix."""
    if os.path.isdir(clip_path):
        return clip_path
    parts = clip_path.split("/")
    if len(parts) == 2 and all(parts) and not clip_path.startswith((".", "~")):
        from huggingface_hub import snapshot_download

        cache = os.environ.get("HF_HUB_CACHE") or (
            os.path.join(os.environ["HF_HOME"], "hub") if os.environ.get("HF_HOME") else None
        )
        try:
            return snapshot_download(clip_path, cache_dir=cache, local_files_only=True)
        except Exception as e:  # noqa: BLE001 (LocalEntryNotFoundError, a broken cache, ...)
            raise ConfigError(
                f"--clip_path {clip_path}: not in the HF cache {cache or '(the default)'} "
                f"({type(e).__name__}). {_HUB_HINT}"
            ) from None
    raise ConfigError(f"--clip_path {clip_path!r} is not a directory. {_HUB_HINT}")


def pixel_stats_of(cfg: ModelConfig) -> tuple[str, str]:
    """The frames' normalisation of a model, as 'R,G,B' settings (--image_mean, --image_std): those given, else
    the CLIP checkpoint's own, from --clip_path's preprocessor_config.json (read as JSON: `image_mean`,
    `image_std`, and `do_normalize` false meaning none), else OpenAI CLIP's."""
    mean, std = cfg.pixel_stats()
    if cfg.clip_path and not (cfg.image_mean and cfg.image_std):
        try:
            root = resolve_clip_path(cfg.clip_path)
        except ConfigError:  # gone since training: a trained model's weights do not need it
            root = ""
        path = os.path.join(root, "preprocessor_config.json")
        own = _preprocessor_stats(path) if root and os.path.isfile(path) else None
        if own is not None:
            mean, std = (mean if cfg.image_mean else own[0]), (std if cfg.image_std else own[1])
    return ",".join(map(repr, mean)), ",".join(map(repr, std))


def _preprocessor_stats(path: str) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """(mean, std) of a HF image processor's JSON; None if it names neither. A malformed file is a DataError."""
    import json

    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable JSON file ({type(e).__name__}: {e})") from None
    if not isinstance(d, dict):
        raise DataError(f"{path}: not a JSON object")
    if d.get("do_normalize") is False:
        return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    if "image_mean" not in d and "image_std" not in d:
        return None
    try:
        return tuple(
            channel_triple(_joined(d.get(k, v)), k, k == "image_std")
            for k, v in (("image_mean", OPENAI_CLIP_MEAN), ("image_std", OPENAI_CLIP_STD))
        )
    except ConfigError as e:
        raise DataError(f"{path}: {e}") from None


def _joined(value: typing.Sequence[float]) -> str:
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


# (width, MLP width, layers, heads) of each tower, the frame size and patch, and the projection dimension
_TOWERS = {  # name: (text tower, vision tower, image size, patch size, projection)
    "ViT-B/32": ((512, 2048, 12, 8), (768, 3072, 12, 12), 224, 32, 512),
    "ViT-B/16": ((512, 2048, 12, 8), (768, 3072, 12, 12), 224, 16, 512),
    "ViT-L/14": ((768, 3072, 12, 12), (1024, 4096, 24, 16), 224, 14, 768),
    "ViT-L/14-336": ((768, 3072, 12, 12), (1024, 4096, 24, 16), 336, 14, 768),
    "small": ((128, 256, 2, 4), (128, 256, 4, 4), 64, 8, 64),  # the demo's: 64x64 frames in 8x8 patches
    "tiny": ((64, 128, 2, 4), (64, 128, 2, 4), 32, 16, 32),  # the tests'
}


def clip_config(arch: str) -> CLIPConfig:
    """The architecture of OpenAI's CLIP ViT-B/32, ViT-B/16, ViT-L/14 or ViT-L/14-336 (for random weights; with
    --clip_path the checkpoint's own config.json decides); `small` (the demo's) or `tiny` (the tests')."""
    if arch not in _TOWERS:
        raise ValueError(f"unknown clip_arch {arch!r}")
    text, vision, image_size, patch_size, projection = _TOWERS[arch]

    def tower(width: int, mlp: int, layers: int, heads: int) -> dict:
        return dict(hidden_size=width, intermediate_size=mlp, num_hidden_layers=layers, num_attention_heads=heads)

    return CLIPConfig(
        text_config=tower(*text) | dict(max_position_embeddings=77, vocab_size=49408),
        vision_config=tower(*vision) | dict(image_size=image_size, patch_size=patch_size),
        projection_dim=projection,
    )


def build_clip(clip_path: str | None = None, arch: str = "ViT-B/32", config: CLIPConfig | None = None) -> CLIPModel:
    """From a local checkpoint directory, or with random weights from `config` (or the config of `arch`)."""
    if clip_path:
        clip_path = resolve_clip_path(clip_path)
        try:
            clip = CLIPModel.from_pretrained(clip_path, local_files_only=True)
        except OSError as e:
            raise DataError(f"{clip_path}: not a loadable CLIP checkpoint ({e}). {_HUB_HINT}") from None
    else:
        clip = CLIPModel(config or clip_config(arch))
    one_element_logit_scale(clip)
    return clip


def one_element_logit_scale(clip: CLIPModel) -> None:
    """CLIP's logit_scale is 0-dim, which DeepSpeed's parameter broadcast cannot view as bytes. Keep it as a
    1-element parameter inside tmass; export converts it back."""
    if clip.logit_scale.dim() == 0:
        clip.logit_scale = nn.Parameter(clip.logit_scale.detach().reshape(1))


def text_features(clip: CLIPModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """[N_t, L] token ids -> [N_t, D]."""
    pooled = clip.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
    return clip.text_projection(pooled)


def frame_features(clip: CLIPModel, video: torch.Tensor) -> torch.Tensor:
    """[B, F, 3, H, W] pixels (normalised) -> [B, F, D]."""
    b, f = video.shape[:2]
    pooled = clip.vision_model(pixel_values=video.flatten(0, 1)).pooler_output
    return clip.visual_projection(pooled).view(b, f, -1)


def enable_grad_checkpointing(clip: CLIPModel) -> None:
    """Recompute both towers' activations in backward (non-reentrant, so frozen inputs are fine)."""
    kwargs = {"use_reentrant": False}
    if hasattr(clip, "activation_checkpointing_enable"):  # transformers >= 5
        clip.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        clip.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def set_attention(clip: CLIPModel, implementation: str) -> None:
    """Both towers' attention: softmax(Q K^T / sqrt(d)) V [B, heads, L, d], by torch's SDPA, HF's eager matmuls or
    flash-attn. Raises ConfigError when the implementation cannot run here."""
    if clip.config._attn_implementation == implementation:
        return
    try:
        clip.set_attn_implementation(implementation)
    except (ImportError, ValueError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"--attn_implementation {implementation} cannot run here ({first_line}); pass --attn_implementation sdpa"
        ) from None


def compile_towers(clip: CLIPModel) -> None:
    """torch.compile each whole tower in place (one graph per tower, the embeddings and final norm included);
    parameter names and the state dict stay as they are."""
    clip.vision_model.compile()
    clip.text_model.compile()


def compile_layers(clip: CLIPModel) -> None:
    """torch.compile every encoder layer of both towers in place, as torchtitan compiles per block: parameter names
    and the state dict stay as they are, one compiled graph serves all layers of a tower, and activation
    checkpointing (which wraps each layer's call) composes with it."""
    for tower in (clip.vision_model, clip.text_model):
        for layer in tower.encoder.layers:
            layer.compile()
