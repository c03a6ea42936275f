"""Scoring a block of texts against every video with a trained T-MASS: the kernels that evaluation
(tmass/evaluate.py) runs on each rank's rows, in chunks of at most --eval_chunk (text, video) pairs.

    score(j, i) = max_m cos(t_j + R(t_j, v_i) * eps_{j,i,m}, psi(v_i | t_j))      [c_t, c_v] per chunk
    deterministic (X-Pool): cos(t_j, psi(v_i | t_j));  --eval_protocol upstream (leaky): the trial chosen against
    psi(v_i | t_j) is scored against psi(v_i | t_i), the candidate pooled with its own caption

The noise modes (per_text, per_pair) are tmass/model/noise.py's PerTextTrials and PerPairTrials.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..config import EvalConfig
from ..errors import ConfigError
from .noise import NOISE_MODES, noise_table, per_pair_best
from .pooling import VideoSide
from .stochastic import all_cosines, inverse_norms

if TYPE_CHECKING:
    from .noise import PerPairTrials, PerTextTrials
    from .tmass import TMASS

AUTO_COMPILE_PAIRS = 10**5  # --eval_compile auto compiles per_pair from ~300 x 300 pairs (a cold compile: ~10 s)


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


def pooled(model: TMASS, q: torch.Tensor, side: VideoSide, ws: Workspace | None = None) -> torch.Tensor:
    """psi(v_i | t_j) / |psi| [c_t, c_v, D] (a view of [c_v, c_t, D]), fp32, for the texts' pooling queries
    q = pool_frames.text_side(t) [c_t, D] and a chunk of videos; written into `ws` where given."""
    out = ws("psi", len(side.keys), len(q), q.shape[1]) if ws is not None else None
    return model.pool_frames.pool(q, side, text_major=True, unit=True, out=out).float()


def pair_terms(
    model: TMASS,
    t: torch.Tensor,
    q: torch.Tensor,
    side: VideoSide,
    f: torch.Tensor,
    f_inv: torch.Tensor,
    ws: Workspace | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For texts t [c_t, D] (their pooling queries q) and a chunk of videos (frames f, their inverse norms f_inv
    [c_v, F], pooling half `side`): t, R(t_j, v_i) and psi(v_i | t_j) / |psi|, the last two [c_t, c_v, D], and
    t.psi / |psi| [c_t, c_v], all fp32 (written into `ws` if given). With psi / |psi| = c B (the unit coefficients
    c [c_v, c_t, F+2], the basis B [c_v, F+2, D]), t.psi / |psi| = sum_k c_k (B t)_k: one matrix product over
    the chunk instead of a pass over psi's c_t c_v D numbers per text."""
    t = t.float()
    out = ws("radius", len(t), len(f), t.shape[1]) if ws is not None else None
    radius = model.radius(all_cosines(t, f, f_inv), out=out)
    if side.gram3 is None:  # a model in training mode: no basis
        p = pooled(model, q, side, ws)
        return t, radius, p, torch.bmm(p, t[:, :, None]).squeeze(-1)
    c = model.pool_frames.unit_coefficients(q, side)  # [c_v, c_t, F+2]
    buf = ws("psi", len(f), len(t), t.shape[1]) if ws is not None else None
    p = model.pool_frames.combine(c, side, text_major=True, out=buf).float()  # [c_t, c_v, D], a view
    bt = (side.rows.reshape(-1, t.shape[1]) @ t.T.to(side.rows.dtype)).view(len(f), -1, len(t))  # B t [c_v, F+2, c_t]
    return t, radius, p, (c * bt.transpose(1, 2)).sum(-1).T.float()


def leaky_scores(
    model: TMASS,
    t: torch.Tensor,
    q: torch.Tensor,
    side: VideoSide,
    f: torch.Tensor,
    f_inv: torch.Tensor,
    trials: PerTextTrials | PerPairTrials,
    own_hat: torch.Tensor,
) -> torch.Tensor:
    """--eval_protocol upstream (leaky): the trial is chosen against psi(v_i | t_j), then scored against the
    candidate pooled with its own caption, psi(v_i | t_i) (own_hat [c_v, D], normalised)."""
    t, radius, p, base = pair_terms(model, t, q, side, f, f_inv)
    best = trials.cosines(t, radius, p, base).argmax(dim=-1)  # [c_t, c_v]
    chosen = F.normalize(t[:, None] + radius * trials.chosen(best), dim=-1)
    return torch.einsum("tvd,vd->tv", chosen, own_hat)


def deterministic_scores(
    model: TMASS, t: torch.Tensor, q: torch.Tensor, side: VideoSide, own_hat: torch.Tensor | None = None
) -> torch.Tensor:
    """cos(t_j, psi(v_i | t_j)) [c_t, c_v]: the X-Pool baseline, no trials. With own_hat [c_v, D] (--eval_protocol
    upstream, leaky): cos(t_j, psi(v_i | t_i)), upstream's procedure with one trial of zero noise (the chosen text
    is t_j itself, scored against the candidate pooled with its own caption)."""
    t_hat = F.normalize(t.float(), dim=-1)
    if own_hat is not None:
        return t_hat @ own_hat.T
    return torch.bmm(pooled(model, q, side), t_hat[:, :, None]).squeeze(-1)


_compiled: dict = {}


def _kernel(cfg: EvalConfig, pairs: int):
    """per_pair_best, compiled (torch.compile: C++/OpenMP on CPU, Triton on GPU) for per_pair when --eval_compile
    asks or, for auto, when the test set has at least AUTO_COMPILE_PAIRS pairs. The kernel then draws each eps
    where it is used, instead of writing M x D numbers per pair to memory (1k x 1k on 2 CPU cores: 65 s -> 8 s,
    bench/eval.py). per_text is batched matrix products already, and compiling it gained nothing there, so it
    stays eager. Returns (function, compiled?)."""
    per_pair = cfg.trial_noise == "per_pair"
    if not per_pair or cfg.eval_compile == "no" or (cfg.eval_compile == "auto" and pairs < AUTO_COMPILE_PAIRS):
        return per_pair_best, False
    if "per_pair_best" not in _compiled:
        _compiled["per_pair_best"] = torch.compile(per_pair_best, dynamic=False)
    return _compiled["per_pair_best"], True


def _compile_failed(cfg: EvalConfig, e: Exception) -> EvalConfig:
    """--eval_compile yes stops with the fix; auto warns and returns the settings of the eager scorer."""
    if cfg.eval_compile == "yes":
        first_line = (str(e).strip().splitlines() or [""])[0][:300]
        raise ConfigError(
            f"--eval_compile yes, but torch.compile failed ({type(e).__name__}: {first_line}); "
            f"install a C++ compiler (g++) for CPU runs, or pass --eval_compile no"
        ) from e
    print(
        f"warning: torch.compile failed ({type(e).__name__}); scoring without it (--eval_compile no silences this)",
        file=sys.stderr,
    )
    return dataclasses.replace(cfg, eval_compile="no")


def _block(start: int, stop: int, size: int, pad: bool, device) -> slice | torch.Tensor:
    """Rows start..stop-1: a slice (views, no copies), or for a compiled scorer indices padded to `size` by
    repeating the last, so that every call has one shape."""
    if not pad:
        return slice(start, stop)
    return torch.arange(start, start + size, device=device).clamp_max(stop - 1)


def _chunk(cfg: EvalConfig, n_rows: int, n_v: int, noise_per_pair: bool) -> tuple[int, int]:
    """(texts, videos) per chunk: about --eval_chunk pairs, square-ish; the eager per_pair scorer holds M noise
    vectors per pair, so it takes M times fewer pairs for the same memory."""
    pairs = cfg.eval_chunk // (cfg.stochastic_trials if noise_per_pair else 1)
    c_t = max(1, min(n_rows, math.isqrt(max(1, pairs))))
    return c_t, max(1, min(n_v, pairs // c_t))


def _noise_args(model: TMASS, m: int = 0, dim: int = 0, seed: int = 0, kernel=None, device=None) -> dict:
    """The trial noise's prior, and for per_pair noise the seed's table of M x D draws and the kernel."""
    noise = {"prior": model.cfg.stochastic_prior, "std": model.cfg.stochastic_prior_std}
    if m:
        noise |= {"table": noise_table((seed, "pair"), m, dim, device), "kernel": kernel}
    return noise


def _block_scores(model, t, q, side, frames, f_inv, chunk, own_hat, ws, compiled) -> torch.Tensor:
    """[c_t, c_v] scores of one block of texts against one block of videos: deterministic (chunk None), the
    leaky protocol (own_hat given), or the best of the chunk's trials."""
    if chunk is None:
        return deterministic_scores(model, t, q, side, own_hat)
    if own_hat is not None:
        return leaky_scores(model, t, q, side, frames, f_inv, chunk, own_hat)
    terms = pair_terms(model, t, q, side, frames, f_inv, ws)
    return chunk.best(*terms, in_place=not compiled)  # terms: ws's scratch


@torch.no_grad()
def score_rows(
    model: TMASS,
    text: torch.Tensor,
    frames: torch.Tensor,
    rows: torch.Tensor,
    cfg: EvalConfig,
    seed: int,
    own_hat: torch.Tensor | None = None,
    timings: dict | None = None,
    video_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scores [len(rows), N_v] of the texts `rows` (global ids into text [N_t, D]) against every video (frames
    [N_v, F, D]), chunk by chunk, with the text mass unless the model's cfg.deterministic_text (X-Pool).
    `timings` receives the first chunk's time (compilation included) and whether it was compiled. video_ids
    [N_v]: the videos' global ids, which per_pair noise is keyed by, where frames holds a subset (a search's
    candidates); default 0..N_v-1."""
    n_v, device = frames.shape[0], frames.device
    video_ids = torch.arange(n_v, device=device) if video_ids is None else video_ids
    out = torch.empty(len(rows), n_v, dtype=torch.float32, device=device)
    if len(rows) == 0 or n_v == 0:
        return out
    stochastic = not model.cfg.deterministic_text
    per_pair = stochastic and cfg.trial_noise == "per_pair"
    kernel, compiled = _kernel(cfg, len(text) * n_v) if stochastic and own_hat is None else (None, False)
    c_t, c_v = _chunk(cfg, len(rows), n_v, per_pair and not compiled)
    pdtype = next(model.pool_frames.parameters()).dtype
    side = model.pool_frames.video_side(frames.to(pdtype), block=64)  # once per video: O(N_v F D)
    f_inv = inverse_norms(frames)  # 1 / |f| [N_v, F], once, for the radius's cosines
    m, mode = cfg.stochastic_trials, NOISE_MODES[cfg.trial_noise]
    noise = _noise_args(model, m, text.shape[1], seed, kernel, device) if per_pair else _noise_args(model)
    ws, t0, first = Workspace(device), time.perf_counter(), True
    for a in range(0, len(rows), c_t):
        n_ids = min(c_t, len(rows) - a)
        ids = rows[_block(a, a + n_ids, c_t, compiled, device)]  # global text ids
        t = text[ids]
        q = model.pool_frames.text_side(t.to(pdtype))  # the texts' half of the pooling, once per block
        trials = None  # the last block's trials are freed before this block's are drawn
        trials = mode.for_texts(seed, ids, t, m, **noise) if stochastic else None
        for v in range(0, n_v, c_v):
            n_vids = min(c_v, n_v - v)
            vids = _block(v, v + n_vids, c_v, compiled, device)
            chunk = trials.for_videos(video_ids[vids]) if stochastic else None
            hat = None if own_hat is None else own_hat[vids]
            try:  # the first compiled call compiles
                s = _block_scores(model, t, q, side[vids], frames[vids], f_inv[vids], chunk, hat, ws, compiled)
            except Exception as e:  # noqa: BLE001 (no C++ compiler, an unsupported backend, ...)
                if not (compiled and first):
                    raise
                eager = _compile_failed(cfg, e)  # stops for --eval_compile yes; else again, eager, with its chunks
                return score_rows(model, text, frames, rows, eager, seed, own_hat, timings, video_ids)
            out[a : a + n_ids, v : v + n_vids] = s[:n_ids, :n_vids]
            if first and timings is not None:
                timings.update(first_chunk_s=round(time.perf_counter() - t0, 3), compiled=compiled)
            first = False
    return out


@torch.no_grad()
def own_caption_pooled(
    model: TMASS, text: torch.Tensor, frames: torch.Tensor, text_video: torch.Tensor
) -> torch.Tensor:
    """psi(v_i | t_i) for every video i with its own (only) caption, normalised: upstream's leaky candidate."""
    n_t, n_v = len(text_video), frames.shape[0]
    if n_t != n_v or not torch.equal(text_video, torch.arange(n_v, device=text_video.device)):
        raise ConfigError(
            f"--eval_protocol upstream needs one caption per video (N_t = N_v); this test set has "
            f"N_t = {n_t} texts for N_v = {n_v} videos. Use the default leak-free protocol."
        )
    pdtype = next(model.pool_frames.parameters()).dtype
    out = []
    for v in range(0, n_v, 64):  # a block's videos with its texts [64, 64, D], of which the diagonal is kept
        psi = model.pool_frames(text[v : v + 64].to(pdtype), frames[v : v + 64].to(pdtype))
        out.append(F.normalize(psi.diagonal().T.float(), dim=-1))  # psi(v_i | t_i) [64, D]
    return torch.cat(out)
