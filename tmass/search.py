"""Search a video collection with a trained T-MASS (docs/search.md): an index of frame features, and a two-stage
query. Used by launch/index.py (tmass-index) and launch/search.py (tmass-search).

    index:   f [N_v, F, D] frame features (float16 or float32 .npy parts, memory-mapped at query time)
             m_i = mean_f f_if / |mean_f f_if|  [N_v, D], each video's mean-pooled frames
    stage 1: s1(q, i) = cos(t_q, m_i)  [Q, N_v], an exact matmul over the means, block by block; the best K
    stage 2: s2(q, i) = max_m cos(t_q + R(t_q, v_i) eps_qm, psi(v_i | t_q))  [Q, K] for those K: evaluation's
             score (tmass/model/scoring.py's score_rows), with its noise keyed by the same (text, video) ids
An index is a folder: manifest.json (the model's checkpoint and weight fingerprint, the frame settings, the
shards), then per part of --shards_per_part shards part-KKKKK.frames.npy, .mean.npy and .json (the videos: key,
shard, position, first caption), the .json written last. A part is done when its .json is there, so a killed
tmass-index resumes at the first part without one.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from . import dist
from .errors import ConfigError, DataError
from .files import save_npy_atomic, write_json_atomic

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from .config import Config
    from .evaluate import Encoded
    from .model.tmass import TMASS

FORMAT = "tmass-index/1"
DTYPES = {"float16": np.float16, "float32": np.float32}  # numpy has no bfloat16, and .npy is what mmap reads
# What makes two indexes of the same collection the same: a rerun with another of these is refused.
IDENTITY = (
    "format",
    "fingerprint",
    "num_frames",
    "dim",
    "input_res",
    "video_sample_type",
    "dtype",
    "shards",
    "shards_per_part",
)
STAGE1_BLOCK = 1 << 16  # videos per stage-1 matmul block


class BadIndex(DataError):
    """An index folder that is not whole, or not what its manifest says."""


def fingerprint(model: TMASS) -> str:
    """sha256 over every weight's name, dtype, shape and bytes: the index's model, checked by tmass-search."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def mean_features(frames: torch.Tensor) -> torch.Tensor:
    """m = mean_f f_f / |mean_f f_f|: frames [N, F, D] -> [N, D], in float32."""
    return F.normalize(frames.float().mean(dim=1), dim=-1)


def parts_of(n_shards: int, per_part: int) -> list[tuple[int, int]]:
    return [(a, min(n_shards, a + per_part)) for a in range(0, n_shards, per_part)]


def part_path(out: str, k: int, what: str) -> str:
    return os.path.join(out, f"part-{k:05d}.{what}")


# ------------------------------------------------------------------------------------------------ building
@dataclass(frozen=True)
class IndexOptions:
    out: str
    shards: str
    dtype: str = "float16"
    shards_per_part: int = 16
    overwrite: bool = False


def start_manifest(opts: IndexOptions, manifest: dict) -> list[int]:
    """Write the manifest of a new index, or check a rerun against the one there: the parts still to do."""
    path = os.path.join(opts.out, "manifest.json")
    if os.path.exists(path) and not opts.overwrite:
        old = read_json(path)
        changed = [k for k in IDENTITY if old.get(k) != manifest.get(k)]
        if changed:
            raise ConfigError(
                f"{opts.out} holds an index made with other settings ({', '.join(changed)} differ): pass "
                f"--overwrite to rebuild it, or another --index"
            )
    elif dist.rank() == 0:
        if opts.overwrite and os.path.isdir(opts.out):
            for name in os.listdir(opts.out):
                if name.startswith("part-") or name == "manifest.json":
                    os.remove(os.path.join(opts.out, name))
        os.makedirs(opts.out, exist_ok=True)
        write_json_atomic(path, manifest)
    dist.barrier()
    return [k for k in range(len(manifest["parts"])) if not os.path.exists(part_path(opts.out, k, "json"))]


def encode_part(model: TMASS, cfg: Config, urls: list[str], info: dist.DistInfo) -> Encoded:
    """Every rank encodes its share of one part's shards; every rank gets the whole part (evaluation's encode)."""
    from .data.stream import EvalStream, make_loader
    from .evaluate import check_skipped, encode

    stream = EvalStream(
        urls,
        cfg.data,
        None,
        cfg.eval.eval_batch_size,
        num_frames=model.cfg.num_frames,
        rank=info.rank,
        world=info.world,
        require_captions=False,
    )
    enc = encode(model, make_loader(stream, cfg.data.num_workers), info.device, texts=False)
    check_skipped(enc.skipped, cfg.data.max_bad_fraction)
    return enc


def write_part(out: str, k: int, frames: torch.Tensor, videos: list[dict], dtype: str, extra: dict) -> None:
    """A part's features and videos, each file atomic, the .json last (the mark that the part is done)."""
    save_npy_atomic(part_path(out, k, "frames.npy"), frames.float().cpu().numpy().astype(DTYPES[dtype]))
    save_npy_atomic(part_path(out, k, "mean.npy"), mean_features(frames).cpu().numpy().astype(DTYPES[dtype]))
    write_json_atomic(part_path(out, k, "json"), {"count": len(videos), "videos": videos} | extra)


def manifest_for(model: TMASS, source: dict, cfg: Config, path: str, urls: list[str], opts: IndexOptions) -> dict:
    """What an index is made of: the model (checkpoint, its fingerprint), the frame settings, the shards, parts."""
    return {
        "format": FORMAT,
        "checkpoint": os.path.abspath(path),
        "model": {k: v for k, v in source.items() if k != "eval_settings"},
        "eval_settings": source.get("eval_settings") or {},
        "fingerprint": fingerprint(model),
        "num_frames": model.cfg.num_frames,
        "dim": model.dim,
        "input_res": cfg.data.input_res,
        "video_sample_type": cfg.data.video_sample_type,
        "dtype": opts.dtype,
        "shards": urls,
        "shards_per_part": opts.shards_per_part,
        "parts": parts_of(len(urls), opts.shards_per_part),
    }


def build_index(cfg: Config, opts: IndexOptions) -> str:
    """`tmass-index`: encode the frames of `opts.shards` with the checkpoint's model, part by part, over all
    ranks; resumes a killed build. Returns the index folder."""
    from tqdm import tqdm

    from .data.shardlist import expand_shards, missing_shards
    from .evaluate import model_for, resolve_checkpoint

    urls = expand_shards(opts.shards)
    missing = missing_shards(urls)
    if missing:
        raise ConfigError(f"{len(missing)} of {len(urls)} shard(s) to index are missing, e.g. {missing[0]}")
    if cfg.eval.checkpoint is None:
        raise ConfigError("an index needs trained weights: pass --checkpoint RUN_DIR (or an export directory)")
    path, tag = resolve_checkpoint(cfg)
    info = dist.init()
    model, source, cfg = model_for(cfg, path, tag, info)
    model.eval()
    manifest = manifest_for(model, source, cfg, path, urls, opts)
    todo = start_manifest(opts, manifest)
    if info.is_main and len(todo) < len(manifest["parts"]):
        print(f"resuming: {len(manifest['parts']) - len(todo)} of {len(manifest['parts'])} parts done", file=sys.stderr)
    bar = tqdm(
        total=len(manifest["parts"]),
        initial=len(manifest["parts"]) - len(todo),
        desc="index",
        unit="part",
        disable=not info.is_main,
        dynamic_ncols=True,
    )
    for k in todo:
        a, b = manifest["parts"][k]
        enc = encode_part(model, cfg, urls[a:b], info)
        if info.is_main:
            write_part(opts.out, k, enc.frames, videos_of(enc, urls[a:b]), opts.dtype, {"skipped": enc.skipped})
        dist.barrier()
        bar.update(1)
    bar.close()
    return opts.out


def videos_of(enc: Encoded, urls: list[str]) -> list[dict]:
    """Each encoded video's key, shard and position in it, and its first caption (None for a bare collection)."""
    return [
        {"key": k, "shard": urls[s], "pos": p, "caption": c}
        for k, (s, p), c in zip(enc.keys, enc.shards_and_positions(), enc.first_captions)
    ]


# ------------------------------------------------------------------------------------------------ reading
def read_json(path: str) -> dict:
    try:
        with open(path) as f:
            out = json.load(f)
    except (OSError, ValueError) as e:
        raise BadIndex(f"{path} cannot be read ({type(e).__name__}: {str(e)[:200]}); rebuild the index") from None
    if not isinstance(out, dict):
        raise BadIndex(f"{path} is not an index file (a JSON object); rebuild the index")
    return out


class Index:
    """A finished index, memory-mapped: means [N_v, D] part by part, frames gathered by global video id."""

    def __init__(self, folder: str):
        self.folder = folder
        if not os.path.exists(os.path.join(folder, "manifest.json")):
            raise ConfigError(f"--index {folder}: no index there (manifest.json); make one with tmass-index")
        self.manifest = m = read_json(os.path.join(folder, "manifest.json"))
        if m.get("format") != FORMAT or m.get("dtype") not in DTYPES:
            raise BadIndex(
                f"{folder}: index format {m.get('format')!r}, dtype {m.get('dtype')!r}; this tmass reads "
                f"{FORMAT}, {' or '.join(DTYPES)}"
            )
        self.means, self.frames, self.videos, self.offsets = [], [], [], [0]
        for k in range(len(m["parts"])):
            if not os.path.exists(part_path(folder, k, "json")):
                raise BadIndex(f"{folder}: part {k} of {len(m['parts'])} is missing; rerun tmass-index to finish it")
            part = read_json(part_path(folder, k, "json"))
            n = part.get("count")
            self.means.append(self._load(k, "mean.npy", (n, m["dim"])))
            self.frames.append(self._load(k, "frames.npy", (n, m["num_frames"], m["dim"])))
            self.videos += part["videos"]
            self.offsets.append(self.offsets[-1] + n)
        if len(self.videos) != self.offsets[-1]:
            raise BadIndex(f"{folder}: the parts list {len(self.videos)} videos for {self.offsets[-1]} features")

    def _load(self, k: int, what: str, shape: tuple) -> np.ndarray:
        path = part_path(self.folder, k, what)
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise BadIndex(f"{path} cannot be read ({type(e).__name__}); rebuild the index") from None
        want = np.dtype(DTYPES[self.manifest["dtype"]])
        if arr.shape != shape or arr.dtype != want:
            raise BadIndex(f"{path}: {arr.dtype}{list(arr.shape)}, the manifest says {want}{list(shape)}")
        return arr

    def __len__(self) -> int:
        return self.offsets[-1]

    def frames_of(self, ids: torch.Tensor) -> torch.Tensor:
        """Frame features [len(ids), F, D] float32 of the videos with global ids `ids`."""
        ids_np = ids.cpu().numpy()
        part = np.searchsorted(self.offsets, ids_np, side="right") - 1
        out = np.empty((len(ids_np), self.manifest["num_frames"], self.manifest["dim"]), dtype=np.float32)
        for k in np.unique(part):
            sel = part == k
            out[sel] = self.frames[k][ids_np[sel] - self.offsets[k]]
        return torch.from_numpy(out)


# ------------------------------------------------------------------------------------------------ querying
@torch.no_grad()
def stage1(index: Index, text: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best k videos of every query by s1 = cos(t_q, m_i): (scores [Q, k], global ids [Q, k]), best first.
    text [Q, D]; the means are read block by block, so memory is O(Q * STAGE1_BLOCK)."""
    t_hat = F.normalize(text.float(), dim=-1)
    k = min(k, len(index))
    best_s = torch.full((len(text), 0), float("-inf"))
    best_i = torch.zeros((len(text), 0), dtype=torch.long)
    for part, means in enumerate(index.means):
        for a in range(0, len(means), STAGE1_BLOCK):
            block = torch.from_numpy(np.array(means[a : a + STAGE1_BLOCK], dtype=np.float32))
            s = t_hat @ block.T  # [Q, block]
            ids = torch.arange(a, a + len(block)) + index.offsets[part]
            best_s = torch.cat([best_s, s], dim=1)
            best_i = torch.cat([best_i, ids.expand(len(text), -1)], dim=1)
            top = torch.topk(best_s, min(k, best_s.shape[1]), dim=1)
            best_s, best_i = top.values, best_i.gather(1, top.indices)
    return best_s, best_i


@torch.no_grad()
def stage2(
    model: TMASS, text: torch.Tensor, rows: torch.Tensor, frames: torch.Tensor, video_ids: torch.Tensor, cfg: Config
) -> torch.Tensor:
    """s2 [len(rows), K]: text row rows[q] (a global text id, which keys its noise) against its own candidates,
    frames [len(rows), K, F, D] with global ids video_ids [len(rows), K]: evaluation's score, pair for pair."""
    from .model.scoring import score_rows

    device = next(model.parameters()).device
    text, rows, video_ids = text.to(device), rows.to(device), video_ids.to(device)
    out = torch.empty(video_ids.shape, dtype=torch.float32)
    for q in range(len(rows)):
        s = score_rows(model, text, frames[q].to(device), rows[q : q + 1], cfg.eval, cfg.seed, video_ids=video_ids[q])
        out[q] = s[0].cpu()
    return out


@torch.no_grad()
def search(model: TMASS, index: Index, text: torch.Tensor, cfg: Config, top_k: int, candidates: int) -> list[list]:
    """For each query feature text [Q, D]: its top_k hits of the two stages, best first, as dicts (rank, score,
    stage1, id and the video's key, shard, pos, caption). The queries are texts 0..Q-1 of their own set."""
    s1, cand = stage1(index, text, max(candidates, top_k))
    frames = torch.stack([index.frames_of(c) for c in cand])
    s2 = stage2(model, text, torch.arange(len(text)), frames, cand, cfg)
    order = torch.argsort(s2, dim=1, descending=True, stable=True)[:, :top_k]
    return [
        [
            {"rank": r + 1, "score": float(s2[q, j]), "stage1": float(s1[q, j]), "id": int(cand[q, j])}
            | index.videos[int(cand[q, j])]
            for r, j in enumerate(order[q].tolist())
        ]
        for q in range(len(text))
    ]


def open_for_search(cfg: Config, folder: str) -> tuple[TMASS, Index, Config, PreTrainedTokenizerBase]:
    """(the index's model, the index, the config with the run's evaluation settings where not given, a
    tokenizer). The model is the manifest's checkpoint (or --checkpoint), and its weights must be the index's."""
    from .evaluate import model_for, tokenizer_for

    index = Index(folder)
    m = index.manifest
    path = cfg.eval.checkpoint or m["checkpoint"]
    if not os.path.exists(path):
        raise ConfigError(f"{folder} was made with {path}, which is not there: pass --checkpoint where it is now")
    same = os.path.abspath(path) == m["checkpoint"]
    info = dist.init()
    model, _, cfg = model_for(cfg, path, m["model"].get("tag") if same else None, info)
    model.eval()
    if fingerprint(model) != m["fingerprint"]:
        raise ConfigError(
            f"the model at {path} is not the one that made {folder} (the weights differ): pass the index's own "
            f"--checkpoint, or rebuild the index with tmass-index"
        )
    return model, index, cfg, tokenizer_for(cfg.replace(eval={"test_shards": m["shards"][0]}), path)


def encode_queries(model: TMASS, tokenizer: PreTrainedTokenizerBase, queries: list[str]) -> torch.Tensor:
    """The queries' text features [Q, D] float32, tokenized and encoded as evaluation encodes captions."""
    from .data.tokenizer import tokenize, trim

    ids, mask = trim(*tokenize(tokenizer, queries))
    device = next(model.parameters()).device
    with torch.no_grad():
        return model.encode_text(ids.to(device), mask.to(device)).float().cpu()
