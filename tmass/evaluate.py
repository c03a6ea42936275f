"""The sharded, leak-free stochastic evaluation (docs/evaluation.md), used by launch/eval.py and by validation
during training.

1. Encode: each rank encodes its share of the test set once (EvalStream); the shares are gathered, so every
   rank holds all text features t [N_t, D] and frame features f [N_v, F, D], in one global order.
2. Score: each rank takes the texts of a contiguous block of videos and scores them against all videos, in
   chunks of at most --eval_chunk (text, video) pairs:
       score(j, i) = max_m cos(t_j + R(t_j, v_i) * eps_{j,i,m}, psi(v_i | t_j))
   eps is a hash of (seed, text[, video], trial, dim) (model/stochastic.py, counter_noise): the scores do not
   depend on the world size or the chunk size. --trial_noise per_text draws eps_{j,m} once per text and trial
   (common random numbers) and turns the trials into three batched products:
       cos(t + R*eps, p) = (t.p + (R*p).eps) / sqrt(|t|^2 + 2 (t*R).eps + (R*R).(eps*eps))   (|p| = 1)
   per_pair draws an independent eps for every (text, video, trial), as upstream; compiled (--eval_compile),
   one kernel hashes each eps where the sums over D use it, so the M x D draws per pair never reach memory.
3. Rank: t2v ranks where the scores are; v2t from each video's best caption, with only O(N_v) numbers
   (the right-pair scores, then counts) crossing ranks; --DSL needs only per-video log-sum-exps.
--eval_protocol upstream reproduces upstream's leaky score (the chosen trial scored against the candidate
pooled with its *own* caption), only to compare with published numbers.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from . import dist
from .config import EvalConfig
from .data.transforms import normalize
from .files import write_json_atomic
from .metrics import best_caption_scores, metrics_from_ranks, t2v_ranks
from .model.pooling import VideoSide
from .model.stochastic import all_cosines, counter_noise, inverse_norms, keyed_noise, noise_table, row_keys

DSL_TEMPERATURE = 100.0


@dataclass
class Encoded:
    text: torch.Tensor  # [N_t, D]
    frames: torch.Tensor  # [N_v, F, D]
    text_video: torch.Tensor  # [N_t] global video index of each text
    keys: list[str]  # video keys in global order
    skipped: dict  # bad samples met while encoding, summed over ranks and workers


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None and dtype != torch.float32)


@torch.no_grad()
def encode(model, batches, device: torch.device, autocast_dtype: torch.dtype | None = None,
           progress: bool = False) -> Encoded:
    """Encode this rank's share, then gather every share into one order (sorted by shard and position).
    progress: a bar of this rank's videos per second."""
    from tqdm import tqdm

    from .data.stream import SkipStats

    texts, frames, vid_order, text_order, keys, stats = [], [], [], [], [], {}
    bar = tqdm(desc="encode (rank 0)", unit="video", disable=not progress, mininterval=2, dynamic_ncols=True)
    for b in batches:
        bar.update(len(b["keys"]))
        stats[b["reader"]] = b["stats"]  # cumulative per reader: keep the last
        if len(b["keys"]) == 0:
            continue
        with _autocast(device, autocast_dtype):
            frames.append(model.encode_frames(normalize(b["video"].to(device, non_blocking=True))))
            texts.append(model.encode_text(b["input_ids"].to(device), b["attention_mask"].to(device)))
        order = b["shard"].long() * 2**31 + b["pos"].long()  # a global order that any world size agrees on
        vid_order.append(order)
        text_order.append(torch.stack([order[b["text_video"]], b["caption_index"].long()], dim=1))
        keys += b["keys"]
    bar.close()
    dim, nf = model.dim, model.cfg.num_frames
    frames_t = (torch.cat(frames) if frames else torch.empty(0, nf, dim, device=device)).contiguous()
    texts_t = (torch.cat(texts) if texts else torch.empty(0, dim, device=device)).to(frames_t.dtype)
    vid_order_t = torch.cat(vid_order).to(device) if vid_order else torch.empty(0, dtype=torch.long, device=device)
    text_order_t = torch.cat(text_order).to(device) if text_order else torch.empty(0, 2, dtype=torch.long,
                                                                                   device=device)
    frames_t, texts_t = dist.gather_rows(frames_t), dist.gather_rows(texts_t)
    vid_order_t, text_order_t = dist.gather_rows(vid_order_t), dist.gather_rows(text_order_t)
    keys = dist.gather_objects(keys)
    vsort = torch.argsort(vid_order_t)  # global video index = place in the sorted order
    text_video = torch.searchsorted(vid_order_t[vsort].contiguous(), text_order_t[:, 0].contiguous())
    tsort = torch.argsort(text_video * 2**20 + text_order_t[:, 1])
    total = SkipStats.total(dist.gather_objects(list(stats.values())))
    skipped = {"seen": total["seen"], "ok": total["ok"], "reasons": dict(total["reasons"]),
               "shards": dict(total["shards"])}
    return Encoded(texts_t[tsort], frames_t[vsort], text_video[tsort], [keys[i] for i in vsort.tolist()], skipped)


# --------------------------------------------------------------------------------------------- scoring
AUTO_COMPILE_PAIRS = 10**5  # --eval_compile auto compiles per_pair from ~300 x 300 pairs (a cold compile: ~10 s)


class TextTrials(NamedTuple):
    """per_text noise of a block of texts t [c_t, D], with the products that every chunk of videos reuses."""
    eps: torch.Tensor  # [c_t, M, D]
    eps_t: torch.Tensor  # eps^T [c_t, D, M]
    t_eps: torch.Tensor  # (t * eps)^T [c_t, D, M]
    eps2: torch.Tensor  # (eps * eps)^T [c_t, D, M]

    @classmethod
    def make(cls, t: torch.Tensor, eps: torch.Tensor) -> "TextTrials":
        return cls(eps, eps.transpose(1, 2), (t.float()[:, None, :] * eps).transpose(1, 2),
                   (eps * eps).transpose(1, 2))


def per_text_cosines(t: torch.Tensor, radius: torch.Tensor, p: torch.Tensor, trials: TextTrials,
                     in_place: bool = False) -> torch.Tensor:
    """cos(t_j + R_ji * eps_jm, p_ji) for all m, as batched products (nothing of size [pairs, M, D] is made):
        (t.p + (R*p).eps) / sqrt(|t|^2 + 2 R.(t*eps) + (R*R).(eps*eps))      (|p| = 1)
    t [c_t, D], radius and unit p [c_t, c_v, D], the texts' trials (eps [c_t, M, D]) -> [c_t, c_v, M].
    in_place: radius and p are scratch (a Workspace's), overwritten with R*R and R*p, and the [c_t, c_v, M] terms
    are summed into two tensors instead of ten (fewer fresh blocks for the allocator to scatter over the heap)."""
    base = torch.bmm(p, t[:, :, None])  # t.p [c_t, c_v, 1]
    t2 = (t * t).sum(-1)[:, None, None]  # |t|^2 [c_t, 1, 1]
    if not in_place:
        b = torch.bmm(radius, trials.t_eps)  # (t*R).eps [c_t, c_v, M]
        a = torch.bmm(p * radius, trials.eps_t)  # (R*p).eps
        c = torch.bmm(radius * radius, trials.eps2)  # (R*R).(eps*eps)
        return (base + a) * (t2 + 2 * b + c).clamp_min(1e-12).rsqrt()
    norm2 = torch.bmm(radius, trials.t_eps)  # (t*R).eps
    a = torch.baddbmm(base, p.mul_(radius), trials.eps_t)  # t.p + (R*p).eps
    norm2.baddbmm_(radius.square_(), trials.eps2, beta=2).add_(t2)  # |t|^2 + 2 (t*R).eps + (R*R).(eps*eps)
    return a.mul_(norm2.clamp_min_(1e-12).rsqrt_())


def per_pair_cosines(t: torch.Tensor, radius: torch.Tensor, p: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The same formula (|p| = 1) with an eps of its own for every pair: eps [c_t, c_v, M, D] -> [c_t, c_v, M]. As
    sums over D, which a compiled kernel fuses with the drawing of eps: nothing of size [pairs, M, D] is stored."""
    base = (p * t[:, None, :]).sum(-1)
    a = (eps * (radius * p)[:, :, None, :]).sum(-1)  # (R*p).eps
    b = (eps * (radius * t[:, None, :])[:, :, None, :]).sum(-1)  # (t*R).eps
    c = (eps * eps * (radius * radius)[:, :, None, :]).sum(-1)  # (R*R).(eps*eps)
    norm2 = (t * t).sum(-1)[:, None, None] + 2 * b + c
    return (base[..., None] + a) * norm2.clamp_min(1e-12).rsqrt()


class Workspace:
    """Flat fp32 buffers that every chunk reuses for its [c_t, c_v, D] terms (psi and R): fresh 17 MB tensors
    for every term of every chunk cost page faults and cold caches."""

    def __init__(self, device: torch.device):
        self.device, self.bufs = device, {}

    def __call__(self, name: str, *shape: int) -> torch.Tensor:
        n = math.prod(shape)
        if name not in self.bufs or self.bufs[name].numel() < n:
            self.bufs[name] = torch.empty(n, dtype=torch.float32, device=self.device)
        return self.bufs[name][:n].view(shape)


def pooled(model, q: torch.Tensor, side: VideoSide, ws: Workspace | None = None) -> torch.Tensor:
    """psi(v_i | t_j) / |psi| [c_t, c_v, D] (a view of [c_v, c_t, D]), fp32, for the texts' pooling queries
    q = pool_frames.text_side(t) [c_t, D] and a chunk of videos; written into `ws` where given."""
    out = ws("psi", len(side.keys), len(q), q.shape[1]) if ws is not None else None
    return model.pool_frames.pool(q, side, text_major=True, unit=True, out=out).float()


def pair_terms(model, t: torch.Tensor, q: torch.Tensor, side: VideoSide, f: torch.Tensor, f_inv: torch.Tensor,
               ws: Workspace | None = None):
    """For texts t [c_t, D] (their pooling queries q) and a chunk of videos (frames f, their inverse norms f_inv
    [c_v, F], pooling half `side`): t, R(t_j, v_i) and psi(v_i | t_j) / |psi|, the last two [c_t, c_v, D], all
    fp32 (written into `ws` if given)."""
    p = pooled(model, q, side, ws)
    t = t.float()
    out = ws("radius", len(t), len(f), t.shape[1]) if ws is not None else None
    return t, model.radius(all_cosines(t, f, f_inv), out=out), p


def draw_eps(noise, prior: str, std: float):
    """per_text: TextTrials as given; per_pair: (keys [c_t, c_v], table) -> eps [c_t, c_v, M, D]."""
    return noise if isinstance(noise, TextTrials) else counter_noise(*noise, prior, std)


def trial_cosines(t: torch.Tensor, radius: torch.Tensor, p: torch.Tensor, eps, in_place: bool = False):
    """cos [c_t, c_v, M] with per_text TextTrials or per_pair eps [c_t, c_v, M, D]; in_place: see per_text."""
    if isinstance(eps, TextTrials):
        return per_text_cosines(t, radius, p, eps, in_place)
    return per_pair_cosines(t, radius, p, eps)


def best_trial(t: torch.Tensor, radius: torch.Tensor, p: torch.Tensor, noise, prior: str, std: float,
               in_place: bool = False) -> torch.Tensor:
    """score(j, i) = max_m cos(t_j + R_ji * eps_jim, psi(v_i | t_j)) [c_t, c_v]. This is what --eval_compile
    compiles (per_pair): eps is then drawn inside the kernel that uses it."""
    return trial_cosines(t, radius, p, draw_eps(noise, prior, std), in_place).amax(dim=-1)


def leaky_scores(model, t: torch.Tensor, q: torch.Tensor, side: VideoSide, f: torch.Tensor, f_inv: torch.Tensor,
                 noise, prior: str, std: float, own_hat: torch.Tensor) -> torch.Tensor:
    """--eval_protocol upstream (leaky): the trial is chosen against psi(v_i | t_j), then scored against the
    candidate pooled with its own caption, psi(v_i | t_i) (own_hat [c_v, D], normalised)."""
    t, radius, p = pair_terms(model, t, q, side, f, f_inv)
    eps = draw_eps(noise, prior, std)
    c_t, c_v, dim = len(t), len(own_hat), t.shape[1]
    best = trial_cosines(t, radius, p, eps).argmax(dim=-1)  # [c_t, c_v]
    if isinstance(eps, TextTrials):
        eps_best = eps.eps.gather(1, best.reshape(c_t, -1, 1).expand(-1, -1, dim)).view(c_t, c_v, dim)
    else:
        eps_best = eps.gather(2, best[..., None, None].expand(-1, -1, 1, dim)).squeeze(2)
    chosen = F.normalize(t[:, None] + radius * eps_best, dim=-1)
    return torch.einsum("tvd,vd->tv", chosen, own_hat)


def deterministic_scores(model, t: torch.Tensor, q: torch.Tensor, side: VideoSide,
                         own_hat: torch.Tensor | None = None) -> torch.Tensor:
    """cos(t_j, psi(v_i | t_j)) [c_t, c_v]: the X-Pool baseline, no trials. With own_hat [c_v, D] (--eval_protocol
    upstream, leaky): cos(t_j, psi(v_i | t_i)), upstream's procedure with one trial of zero noise (the chosen text
    is t_j itself, scored against the candidate pooled with its own caption)."""
    t_hat = F.normalize(t.float(), dim=-1)
    if own_hat is not None:
        return t_hat @ own_hat.T
    return torch.bmm(pooled(model, q, side), t_hat[:, :, None]).squeeze(-1)


_compiled: dict = {}


def _scorer(cfg: EvalConfig, pairs: int):
    """best_trial, compiled (torch.compile: C++/OpenMP on CPU, Triton on GPU) for per_pair when --eval_compile
    asks or, for auto, when the test set has at least AUTO_COMPILE_PAIRS pairs. The kernel then draws each eps
    where it is used, instead of writing M x D numbers per pair to memory (1k x 1k on 2 CPU cores: 65 s -> 8 s,
    bench/eval.py). per_text is batched matrix products already, and compiling it gained nothing there, so it
    stays eager. Returns (function, compiled?)."""
    per_pair = cfg.trial_noise == "per_pair"
    if not per_pair or cfg.eval_compile == "no" or (cfg.eval_compile == "auto" and pairs < AUTO_COMPILE_PAIRS):
        return best_trial, False
    if "best_trial" not in _compiled:
        _compiled["best_trial"] = torch.compile(best_trial, dynamic=False)
    return _compiled["best_trial"], True


def _compile_failed(cfg: EvalConfig, e: Exception):
    """--eval_compile yes stops with the fix; auto warns and goes on with the eager scorer."""
    if cfg.eval_compile == "yes":
        first_line = (str(e).strip().splitlines() or [""])[0][:300]
        raise SystemExit(f"error: --eval_compile yes, but torch.compile failed ({type(e).__name__}: {first_line}); "
                         f"install a C++ compiler (g++) for CPU runs, or pass --eval_compile no") from e
    print(f"warning: torch.compile failed ({type(e).__name__}); scoring without it (--eval_compile no silences "
          f"this)", file=sys.stderr)


def _block(start: int, stop: int, size: int, pad: bool, device) -> slice | torch.Tensor:
    """Rows start..stop-1: a slice (views, no copies), or for a compiled scorer indices padded to `size` by
    repeating the last, so that every call has one shape."""
    if not pad:
        return slice(start, stop)
    return torch.arange(start, start + size, device=device).clamp_max(stop - 1)


@torch.no_grad()
def score_rows(model, enc: Encoded, rows: torch.Tensor, cfg: EvalConfig, seed: int,
               own_hat: torch.Tensor | None = None, timings: dict | None = None) -> torch.Tensor:
    """Scores [len(rows), N_v] of the texts `rows` (global ids) against every video, chunk by chunk. Noise:
    per_text eps_{j,m} from stream (seed, "text") keyed by j; per_pair eps_{j,i,m} from (seed, "pair") keyed by
    (j, i). `timings` receives the first chunk's time (compilation included) and whether it was compiled."""
    n_v, device = enc.frames.shape[0], enc.frames.device
    out = torch.empty(len(rows), n_v, dtype=torch.float32, device=device)
    if len(rows) == 0 or n_v == 0:
        return out
    stochastic = not cfg.deterministic_text
    per_pair = stochastic and cfg.trial_noise == "per_pair"
    score, compiled = _scorer(cfg, len(enc.text) * n_v) if stochastic and own_hat is None else (None, False)
    # eager per_pair holds M noise vectors per pair: fewer pairs per chunk, for the same memory
    pairs = cfg.eval_chunk // (cfg.stochastic_trials if per_pair and not compiled else 1)
    c_t = max(1, min(len(rows), math.isqrt(max(1, pairs))))
    c_v = max(1, min(n_v, pairs // c_t))
    pdtype = next(model.pool_frames.parameters()).dtype
    side = model.pool_frames.video_side(enc.frames.to(pdtype), block=64)  # once per video: O(N_v F D)
    f_inv = inverse_norms(enc.frames)  # 1 / |f| [N_v, F], once, for the radius's cosines
    m, dim = cfg.stochastic_trials, enc.text.shape[1]
    prior, std = model.cfg.stochastic_prior, model.cfg.stochastic_prior_std
    table = noise_table((seed, "pair"), m, dim, device) if per_pair else None
    ws = Workspace(device)
    t0, first = time.perf_counter(), True
    for a in range(0, len(rows), c_t):
        n_ids = min(c_t, len(rows) - a)
        ids = rows[_block(a, a + n_ids, c_t, compiled, device)]  # global text ids
        t = enc.text[ids]
        q = model.pool_frames.text_side(t.to(pdtype))  # the texts' half of the pooling, once per block
        eps = noise = None  # the last block's trials go before this block's are drawn
        eps = TextTrials.make(t, keyed_noise((seed, "text"), ids, m, dim, prior, std, device)) \
            if stochastic and not per_pair else None
        for v in range(0, n_v, c_v):
            n_vids = min(c_v, n_v - v)
            vids = _block(v, v + n_vids, c_v, compiled, device)
            if per_pair:
                video_ids = torch.arange(v, v + n_vids, device=device) if isinstance(vids, slice) else vids
                noise = (row_keys((seed, "pair"), ids[:, None], video_ids[None, :]), table)
            else:
                noise = eps
            if not stochastic:
                s = deterministic_scores(model, t, q, side[vids], None if own_hat is None else own_hat[vids])
            elif own_hat is not None:
                s = leaky_scores(model, t, q, side[vids], enc.frames[vids], f_inv[vids], noise, prior, std,
                                 own_hat[vids])
            else:
                try:  # the first compiled call compiles
                    terms = pair_terms(model, t, q, side[vids], enc.frames[vids], f_inv[vids], ws)
                    s = score(*terms, noise, prior, std, in_place=not compiled)  # terms: ws's scratch
                except Exception as e:  # noqa: BLE001 (no C++ compiler, an unsupported backend, ...)
                    if not (compiled and first):
                        raise
                    _compile_failed(cfg, e)  # stops for --eval_compile yes; else again, eager, with its chunks
                    return score_rows(model, enc, rows, dataclasses.replace(cfg, eval_compile="no"), seed, own_hat,
                                      timings)
            out[a:a + n_ids, v:v + n_vids] = s[:n_ids, :n_vids]
            if first and timings is not None:
                timings.update(first_chunk_s=round(time.perf_counter() - t0, 3), compiled=compiled)
            first = False
    return out


@torch.no_grad()
def own_caption_pooled(model, enc: Encoded) -> torch.Tensor:
    """psi(v_i | t_i) for every video i with its own (only) caption, normalised: upstream's leaky candidate."""
    n_t, n_v = len(enc.text_video), enc.frames.shape[0]
    if n_t != n_v or not torch.equal(enc.text_video, torch.arange(n_v, device=enc.text_video.device)):
        raise ValueError(f"--eval_protocol upstream needs one caption per video (N_t = N_v); this test set has "
                         f"N_t = {n_t} texts for N_v = {n_v} videos. Use the default leak-free protocol.")
    pdtype = next(model.pool_frames.parameters()).dtype
    out = []
    for v in range(0, n_v, 64):  # a block's videos with its texts [64, 64, D], of which the diagonal is kept
        psi = model.pool_frames(enc.text[v:v + 64].to(pdtype), enc.frames[v:v + 64].to(pdtype))
        out.append(F.normalize(psi.diagonal().T.float(), dim=-1))  # psi(v_i | t_i) [64, D]
    return torch.cat(out)


# --------------------------------------------------------------------------------------------- the whole thing
@torch.no_grad()
def evaluate(model, batches, cfg: EvalConfig, seed: int, device: torch.device,
             autocast_dtype: torch.dtype | None = None, max_bad_fraction: float = 0.0, progress: bool = False) -> dict:
    """Encode, score and rank on every rank; every rank returns the same results dict. An unreadable shard, or
    more skipped samples than `max_bad_fraction`, is an error (check_skipped)."""
    was_training = model.training
    model.eval()
    t0 = time.time()
    enc = encode(model, batches, device, autocast_dtype, progress)
    check_skipped(enc.skipped, max_bad_fraction)
    t1 = time.time()
    results = rank_all(model, enc, cfg, seed)
    model.train(was_training)
    results["skipped"] = enc.skipped
    results["time_s"] = {"encode": round(t1 - t0, 3), "score": round(time.time() - t1, 3)}
    return results


@torch.no_grad()
def rank_all(model, enc: Encoded, cfg: EvalConfig, seed: int) -> dict:
    """Score this rank's block of texts against every video, then rank both directions across ranks."""
    n_t, n_v = len(enc.text_video), enc.frames.shape[0]
    if n_v == 0:
        why = ", ".join(f"{r}: {n}" for r, n in enc.skipped.get("reasons", {}).items()) or "no samples"
        raise ValueError(f"the test shards gave no usable video ({why}); evaluation needs each sample's video "
                         f"bytes (mp4) and captions (json 'captions' or txt): build them with shards/build.py")
    own_hat = own_caption_pooled(model, enc) if cfg.eval_protocol == "upstream" else None
    rank, world = dist.rank(), dist.world()
    v0, v1 = rank * n_v // world, (rank + 1) * n_v // world  # this rank's owner videos
    rows = torch.nonzero((enc.text_video >= v0) & (enc.text_video < v1)).flatten()
    timings: dict = {}
    scores = score_rows(model, enc, rows, cfg, seed, own_hat, timings)  # [n_rows, N_v]
    if cfg.dsl:  # s <- s * softmax over all queries (texts) of 100 s, per video column
        lse = torch.logsumexp(DSL_TEMPERATURE * scores, dim=0) if len(rows) else torch.full(
            (n_v,), float("-inf"), device=scores.device)
        lse = torch.logsumexp(dist.gather_rows(lse[None]), dim=0)
        scores = scores * torch.exp(DSL_TEMPERATURE * scores - lse)
    right = enc.text_video[rows]
    t2v = dist.gather_rows(t2v_ranks(scores, right))
    owners = torch.arange(v0, v1, device=scores.device)
    best = best_caption_scores(scores, right, owners)  # [v1 - v0, N_v]
    diag = dist.gather_rows(best[torch.arange(v1 - v0), owners] if v1 > v0 else best[:0, 0])  # S'[i, i]
    v2t = dist.all_sum((best > diag[None, :]).sum(dim=0))  # for each query video, candidates above its own
    if cfg.save_sims:
        full = dist.gather_rows(scores)
        if rank == 0:
            np.save(cfg.save_sims, full.cpu().numpy())
    leaky = cfg.eval_protocol == "upstream"
    return {
        "t2v": metrics_from_ranks(t2v.cpu()), "v2t": metrics_from_ranks(v2t.cpu()),
        "protocol": cfg.eval_protocol + (" (LEAKY: candidates pooled with their own caption)" if leaky else ""),
        "leaky": leaky, "trials": 0 if cfg.deterministic_text else cfg.stochastic_trials,
        "trial_noise": cfg.trial_noise, "deterministic_text": cfg.deterministic_text, "dsl": cfg.dsl,
        "seed": seed, "num_texts": n_t, "num_videos": n_v, "world_size": world,
        "compiled": bool(timings.get("compiled")), "first_chunk_s": timings.get("first_chunk_s"),
    }


def format_table(results: dict) -> str:
    cols = ["R@1", "R@5", "R@10", "R@50", "MdR", "MnR"]
    head = f"{'':5}" + "".join(f"{c:>8}" for c in cols)
    lines = []
    if "model" in results:
        lines.append(f"model: {describe_model(results['model'])}")
    sk = results.get("skipped", {})
    bad = sum(sk.get("reasons", {}).values())
    lines.append(f"{results['protocol']}, {results['num_texts']} texts x {results['num_videos']} videos"
                 + (f" ({bad} of {sk.get('seen', 0)} samples skipped)" if sk else "")
                 + f", {results['trials']} trials ({results['trial_noise']}), seed {results['seed']}"
                 + (", DSL" if results["dsl"] else ""))
    lines.append(head)
    for d in ("t2v", "v2t"):
        lines.append(f"{d:5}" + "".join(f"{results[d][c]:>8.2f}" for c in cols))
    return "\n".join(lines)


def describe_model(info: dict) -> str:
    if info["kind"] == "random":
        return "RANDOM WEIGHTS (--random_init): not a trained model"
    where = info.get("checkpoint")
    parts = [p for p in (info.get("tag") and f"checkpoint {info['tag']}",
                         info.get("step") is not None and f"step {info['step']}",
                         info.get("epoch") is not None and f"epoch {info['epoch']}") if p]
    return f"{where} ({info['kind']}{', ' + ', '.join(parts) if parts else ''})"


def resolve_checkpoint(cfg) -> tuple[str | None, str | None]:
    """(path, tag) of the weights to evaluate: --checkpoint; or upstream's --exp_name E --load_epoch -1|N,
    the best checkpoint or the end of epoch N of the run {output_dir}/E; or None with --random_init."""
    from .checkpoint import checkpoints_dir, epoch_tag, is_run_dir, run_dir

    ev = cfg.eval
    path = ev.checkpoint
    if path is None and ev.load_epoch is not None:
        path = run_dir(cfg.train.output_dir, cfg.train.exp_name)
        if not is_run_dir(path):
            raise SystemExit(f"error: --exp_name {cfg.train.exp_name} --load_epoch {ev.load_epoch}: no tmass run at "
                             f"{path}; pass --output_dir where the run lives, or --checkpoint RUN_DIR")
    if path is None:
        if not ev.random_init:
            raise SystemExit("error: no trained weights to evaluate: pass --checkpoint RUN_DIR (or an export dir, "
                             "or an upstream .pth), or --exp_name NAME --load_epoch -1 for that run's best "
                             "checkpoint; --random_init scores a randomly initialised model on purpose")
        return None, None
    if ev.random_init:
        raise SystemExit("error: --random_init and a checkpoint contradict each other; drop one")
    if not os.path.exists(path):
        raise SystemExit(f"error: --checkpoint {path}: no such file or directory")
    if ev.load_epoch is None or ev.load_epoch == -1:
        return path, None
    if not is_run_dir(path):
        raise SystemExit(f"error: --load_epoch {ev.load_epoch} needs a tmass run directory, and {path} is not one")
    try:
        return path, epoch_tag(checkpoints_dir(path), ev.load_epoch)
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}") from None


def adopt_eval_settings(cfg, info: dict) -> list[str]:
    """The run's validation settings (trials, noise, protocol, DSL, deterministic text, seed) for every one of
    them not given explicitly; returns the `--flag value` notes of those taken."""
    taken = []
    for name, value in (info.get("eval_settings") or {}).items():
        section = cfg.data if name == "seed" else cfg.eval
        if name in cfg.explicit or getattr(section, name) == value:
            continue
        setattr(section, name, value)
        taken.append(f"--{name} {value}")
    return taken


def check_test_shards(urls: list[str]) -> None:
    from .data.shardlist import missing_shards

    missing = missing_shards(urls)
    if missing:
        raise SystemExit(f"error: {len(missing)} of {len(urls)} test shard(s) missing, e.g. {missing[0]}; a "
                         f"subset would give other numbers: fix --test_shards")


def check_skipped(skipped: dict, limit: float) -> None:
    """Scoring a subset of the test set silently is wrong: an unreadable shard, or more skipped samples than
    --max_bad_fraction allows, is an error."""
    from .data.stream import UNREADABLE, TooManyBadSamples, check_bad_fraction

    unreadable = {r: n for r, n in skipped.get("reasons", {}).items() if r.startswith(UNREADABLE)}
    if unreadable:
        shards = ", ".join(sorted(skipped.get("shards", {}))[:5])
        raise TooManyBadSamples(f"test shard(s) could not be read to the end ({', '.join(unreadable)}): {shards}; "
                                f"rebuild them with shards/build.py")
    check_bad_fraction(skipped, limit, min_seen=1)


def run(cfg) -> dict:
    """`launch/eval.py`: load the model, stream the test shards over all ranks, evaluate, report."""
    from .config import Config
    from .data.shardlist import expand_shards
    from .data.stream import EvalStream, make_loader

    assert isinstance(cfg, Config)
    if not cfg.eval.test_shards:
        raise SystemExit("error: --test_shards is required (build them with shards/build.py)")
    urls = expand_shards(cfg.eval.test_shards)
    check_test_shards(urls)
    path, tag = resolve_checkpoint(cfg)
    if cfg.model.clip_path:
        from .model.clip import resolve_clip_path

        try:
            cfg.model.clip_path = resolve_clip_path(cfg.model.clip_path)
        except FileNotFoundError as e:
            raise SystemExit(f"error: {e}") from None
    info = dist.init()
    model, source = model_for(cfg, path, tag, info)
    stream = EvalStream(urls, cfg.data, tokenizer_for(cfg, path), cfg.eval.eval_batch_size, rank=info.rank,
                        world=info.world)
    results = evaluate(model, make_loader(stream, cfg.data.num_workers), cfg.eval, cfg.data.seed, info.device,
                       max_bad_fraction=cfg.data.max_bad_fraction, progress=info.is_main)
    results["model"] = {k: v for k, v in source.items() if k != "eval_settings"}
    results["checkpoint"] = path
    results["test_shards"] = cfg.eval.test_shards
    if info.is_main:
        report(cfg, results, cfg.eval.results or default_results_path(path))
    return results


def model_for(cfg, path: str | None, tag: str | None, info) -> tuple:
    """The model on this rank's device and what it is; the flags that follow it (frames, image size, the run's
    validation settings unless given, the baseline's deterministic text) are set in `cfg`."""
    from .checkpoint import load_model

    model, source = load_model(cfg.model, path, tag)
    model = model.to(info.device)
    cfg.check_model(model.cfg, path or "the random model")
    taken = adopt_eval_settings(cfg, source)
    if taken and info.is_main:
        print(f"note: evaluating with the settings the run was validated with: {', '.join(taken)} "
              f"(give a flag to override)", file=sys.stderr)
    cfg.eval.deterministic_text |= model.cfg.deterministic_text  # a baseline trained without the mass
    cfg.data.num_frames = model.cfg.num_frames
    cfg.follow_image_size(model.clip.config.vision_config.image_size, f"the model ({path or 'random weights'})")
    return model, source


def tokenizer_for(cfg, path: str | None):
    """--tokenizer; else the one a run or export directory carries; else --clip_path's or the shards'."""
    from .data.tokenizer import load_tokenizer, resolve_tokenizer

    own = os.path.join(path or "", "tokenizer")
    return load_tokenizer(cfg.eval.tokenizer or (own if path and os.path.isdir(own) else
                                                 resolve_tokenizer(None, cfg.model.clip_path, cfg.eval.test_shards)))


def report(cfg, results: dict, out: str) -> None:
    """Rank 0: the results JSON, TensorBoard (--tensorboard_dir), the table."""
    write_json_atomic(out, results)
    if cfg.eval.tensorboard_dir:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(cfg.eval.tensorboard_dir) as tb:
            for d in ("t2v", "v2t"):
                for k, v in results[d].items():
                    tb.add_scalar(f"test/{d}_{k}", v, 0)
            tb.add_text("test/results", json.dumps(results, indent=1))
    print(format_table(results))
    print(f"results: {out}")


def default_results_path(checkpoint: str | None) -> str:
    """eval_results.json inside the run or export directory; beside an upstream .pth; for random weights,
    eval_results_random_init.json here."""
    if checkpoint is None:
        return "eval_results_random_init.json"
    if os.path.isdir(checkpoint):
        return os.path.join(checkpoint, "eval_results.json")
    return os.path.splitext(checkpoint)[0] + "_eval_results.json"
