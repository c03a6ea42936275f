"""The sharded, leak-free stochastic evaluation (method notes b.3), used by launch/eval.py and by validation
during training.

1. Encode: each rank encodes its share of the test set once (EvalStream); the shares are gathered, so every
   rank holds all text features t [N_t, D] and frame features f [N_v, F, D], in one global order.
2. Score: each rank takes the texts of a contiguous block of videos and scores them against all videos, in
   chunks of at most --eval_chunk (text, video) pairs:
       score(j, i) = max_m cos(t_j + R(t_j, v_i) * eps_{j,i,m}, psi(v_i | t_j))
   eps comes from counter-based streams keyed by (seed, text[, video], trial): the scores do not depend on
   the world size or the chunk size. --trial_noise per_text draws eps_{j,m} once per text and trial (common
   random numbers) and turns the trials into three batched products:
       cos(t + R*eps, p) = (t.p + (R*p).eps) / sqrt(|t|^2 + 2 (t*R).eps + (R*R).(eps*eps))   (|p| = 1)
   per_pair draws an independent eps for every (text, video, trial), as upstream.
3. Rank: t2v ranks where the scores are; v2t from each video's best caption, with only O(N_v) numbers
   (the right-pair scores, then counts) crossing ranks; --DSL needs only per-video log-sum-exps.
--eval_protocol upstream reproduces upstream's leaky score (the chosen trial scored against the candidate
pooled with its *own* caption), only to compare with published numbers.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from . import dist
from .config import EvalConfig
from .data.transforms import normalize
from .metrics import best_caption_scores, metrics_from_ranks, t2v_ranks
from .model.pooling import VideoSide
from .model.stochastic import all_cosines, keyed_noise

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
def encode(model, batches, device: torch.device, autocast_dtype: torch.dtype | None = None) -> Encoded:
    """Encode this rank's share, then gather every share into one order (sorted by shard and position)."""
    from .data.stream import SkipStats

    texts, frames, vid_order, text_order, keys, stats = [], [], [], [], [], {}
    for b in batches:
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
    total = SkipStats.total([s | {"shards": {}} for s in dist.gather_objects(list(stats.values()))])
    skipped = {"seen": total["seen"], "ok": total["ok"], "reasons": dict(total["reasons"])}
    return Encoded(texts_t[tsort], frames_t[vsort], text_video[tsort], [keys[i] for i in vsort.tolist()], skipped)


# --------------------------------------------------------------------------------------------- scoring
def per_text_cosines(t: torch.Tensor, radius: torch.Tensor, p: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """cos(t_j + R_ji * eps_jm, p_ji) for all m, as batched products (nothing of size [pairs, M, D] is made):
        (t.p + (R*p).eps) / (|p| sqrt(|t|^2 + 2 R.(t*eps) + (R*R).(eps*eps)))
    t [c_t, D], radius and p [c_t, c_v, D], eps [c_t, M, D] -> [c_t, c_v, M]."""
    inv_norm = torch.linalg.vector_norm(p, dim=-1).clamp_min(1e-12).reciprocal_()  # 1 / |p| [c_t, c_v]
    base = torch.bmm(p, t[:, :, None]).squeeze(-1)  # t.p [c_t, c_v]
    a = torch.bmm(radius * p, eps.transpose(1, 2))  # (R*p).eps [c_t, c_v, M]
    b = torch.bmm(radius, (t[:, None, :] * eps).transpose(1, 2))  # (t*R).eps, with t*eps made per text
    c = torch.bmm(radius * radius, (eps * eps).transpose(1, 2))
    norm2 = (t * t).sum(-1)[:, None, None] + 2 * b + c
    return (base[..., None] + a) * inv_norm[..., None] / norm2.clamp_min(1e-12).sqrt()


def per_pair_cosines(t: torch.Tensor, radius: torch.Tensor, p: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The same formula with an eps of its own for every pair: eps [c_t, c_v, M, D] -> [c_t, c_v, M], as
    batched matrix-vector products (the noisy texts are never materialised)."""
    ct, cv, m, d = eps.shape
    e = eps.reshape(ct * cv, m, d)
    inv_norm = torch.linalg.vector_norm(p, dim=-1).clamp_min(1e-12).reciprocal_()
    base = torch.bmm(p, t[:, :, None]).squeeze(-1)
    vecs = torch.stack([radius * p, radius * t[:, None, :]], dim=-1).reshape(ct * cv, d, 2)
    a, b = torch.bmm(e, vecs).unbind(-1)  # [c_t c_v, M] each
    c = torch.bmm(e * e, (radius * radius).reshape(ct * cv, d, 1)).squeeze(-1)
    norm2 = (t * t).sum(-1)[:, None, None] + (2 * b + c).view(ct, cv, m)
    return (base[..., None] + a.view(ct, cv, m)) * inv_norm[..., None] / norm2.clamp_min(1e-12).sqrt()


def text_trial_noise(text_ids: torch.Tensor, cfg: EvalConfig, seed: int, prior: str, std: float, dim: int,
                     device) -> torch.Tensor:
    """per_text noise eps_{j,m} [c_t, M, D]: drawn once per block of texts, reused for every video chunk."""
    return torch.stack([keyed_noise((seed, "text", int(j)), cfg.stochastic_trials, dim, prior, std)
                        for j in text_ids]).to(device)


def chunk_scores(model, t: torch.Tensor, f: torch.Tensor, side: VideoSide, text_ids: torch.Tensor, first_video: int,
                 cfg: EvalConfig, seed: int, own_hat: torch.Tensor | None = None,
                 text_noise: torch.Tensor | None = None) -> torch.Tensor:
    """Scores [c_t, c_v] of texts t (global ids text_ids) against videos f (global ids first_video, ...), whose
    pooling half is `side`. `text_noise`: the block's per_text noise [c_t, M, D] (drawn once per text block)."""
    pdtype = next(model.pool_frames.parameters()).dtype
    p = model.pool_frames.pool(t.to(pdtype), side, text_major=True).float()  # psi [c_t, c_v, D], not normalised
    t = t.float()
    if cfg.deterministic_text:
        return torch.bmm(F.normalize(p, dim=-1), F.normalize(t, dim=-1)[:, :, None]).squeeze(-1)
    radius = model.radius(all_cosines(t, f))  # [c_t, c_v, D], fp32
    m, dim, prior, std = cfg.stochastic_trials, t.shape[1], model.cfg.stochastic_prior, model.cfg.stochastic_prior_std
    c_v = f.shape[0]
    if cfg.trial_noise == "per_text":
        eps = text_noise
        cos = per_text_cosines(t, radius, p, eps)  # [c_t, c_v, M]
    else:
        eps = torch.empty(len(text_ids), c_v * m, dim)
        for row, j in enumerate(text_ids):
            eps[row] = keyed_noise((seed, "pair", int(j)), c_v * m, dim, prior, std, first=first_video * m)
        eps = eps.to(t.device).view(len(text_ids), c_v, m, dim)
        cos = per_pair_cosines(t, radius, p, eps)
    if own_hat is None:
        return cos.max(dim=-1).values
    # upstream (leaky): the trial is chosen against psi(v_i | t_j), then scored against psi(v_i | t_i)
    best = cos.argmax(dim=-1)  # [c_t, c_v]
    if cfg.trial_noise == "per_text":
        eps_best = eps.gather(1, best.reshape(len(text_ids), -1, 1).expand(-1, -1, dim)).view(len(text_ids), c_v, dim)
    else:
        eps_best = eps.gather(2, best[..., None, None].expand(-1, -1, 1, dim)).squeeze(2)
    chosen = F.normalize(t[:, None] + radius * eps_best, dim=-1)
    return torch.einsum("tvd,vd->tv", chosen, own_hat)


@torch.no_grad()
def score_rows(model, enc: Encoded, rows: torch.Tensor, cfg: EvalConfig, seed: int,
               own_hat: torch.Tensor | None = None) -> torch.Tensor:
    """Scores [len(rows), N_v] of the texts `rows` against every video, chunk by chunk."""
    n_v = enc.frames.shape[0]
    out = torch.empty(len(rows), n_v, dtype=torch.float32, device=enc.frames.device)
    if len(rows) == 0 or n_v == 0:
        return out
    # per_pair holds M noise vectors per pair: fewer pairs per chunk, for the same memory
    pairs = cfg.eval_chunk // (cfg.stochastic_trials if cfg.trial_noise == "per_pair" and not cfg.deterministic_text
                               else 1)
    c_t = max(1, min(len(rows), math.isqrt(max(1, pairs))))
    c_v = max(1, min(n_v, pairs // c_t))
    pdtype = next(model.pool_frames.parameters()).dtype
    side = model.pool_frames.video_side(enc.frames.to(pdtype))  # once per video: O(N_v F D), like the frames
    for a in range(0, len(rows), c_t):
        ids = rows[a:a + c_t]
        t = enc.text[ids]
        noise = None
        if cfg.trial_noise == "per_text" and not cfg.deterministic_text:
            noise = text_trial_noise(ids, cfg, seed, model.cfg.stochastic_prior, model.cfg.stochastic_prior_std,
                                     t.shape[1], t.device)
        for v in range(0, n_v, c_v):
            own = own_hat[v:v + c_v] if own_hat is not None else None
            out[a:a + len(ids), v:v + c_v] = chunk_scores(model, t, enc.frames[v:v + c_v], side[v:v + c_v], ids, v,
                                                          cfg, seed, own, noise)
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
    for v in range(0, n_v, 256):
        t, f = enc.text[v:v + 256].to(pdtype), enc.frames[v:v + 256].to(pdtype)
        pooled = torch.stack([model.pool_frames(t[k:k + 1], f[k:k + 1])[0, 0] for k in range(len(t))])
        out.append(F.normalize(pooled.float(), dim=-1))
    return torch.cat(out)


# --------------------------------------------------------------------------------------------- the whole thing
@torch.no_grad()
def evaluate(model, batches, cfg: EvalConfig, seed: int, device: torch.device,
             autocast_dtype: torch.dtype | None = None) -> dict:
    """Encode, score and rank on every rank; every rank returns the same results dict."""
    was_training = model.training
    model.eval()
    t0 = time.time()
    enc = encode(model, batches, device, autocast_dtype)
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
    scores = score_rows(model, enc, rows, cfg, seed, own_hat)  # [n_rows, N_v]
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
    }


def format_table(results: dict) -> str:
    cols = ["R@1", "R@5", "R@10", "R@50", "MdR", "MnR"]
    head = f"{'':5}" + "".join(f"{c:>8}" for c in cols)
    lines = [f"{results['protocol']}, {results['num_texts']} texts x {results['num_videos']} videos, "
             f"{results['trials']} trials ({results['trial_noise']}), seed {results['seed']}"
             + (", DSL" if results["dsl"] else ""), head]
    for d in ("t2v", "v2t"):
        lines.append(f"{d:5}" + "".join(f"{results[d][c]:>8.2f}" for c in cols))
    return "\n".join(lines)


def run(cfg) -> dict:
    """`launch/eval.py`: load the model, stream the test shards over all ranks, evaluate, report."""
    from .config import Config
    from .data.stream import EvalStream, expand_shards, make_loader
    from .data.tokenizer import load_tokenizer, resolve_tokenizer
    from .model.io import load_model

    assert isinstance(cfg, Config)
    if not cfg.eval.test_shards:
        raise SystemExit("error: --test_shards is required (build them with shards/build.py)")
    info = dist.init()
    model = load_model(cfg.model, cfg.eval.checkpoint).to(info.device)
    cfg.check_model(model.cfg, cfg.eval.checkpoint or "the random model")
    cfg.eval.deterministic_text |= model.cfg.deterministic_text  # a baseline trained without the mass
    cfg.data.num_frames = model.cfg.num_frames
    res = model.clip.config.vision_config.image_size  # the frames must come at the model's resolution
    if "input_res" in cfg.explicit and cfg.data.input_res != res:
        raise SystemExit(f"error: --input_res {cfg.data.input_res}, but the model's image size is {res}; "
                         f"drop --input_res (it is taken from the model)")
    cfg.data.input_res = res
    own = os.path.join(cfg.eval.checkpoint or "", "tokenizer")  # an exported dir or a run dir carries its own
    tok = load_tokenizer(cfg.eval.tokenizer or (own if cfg.eval.checkpoint and os.path.isdir(own) else
                                                resolve_tokenizer(None, cfg.model.clip_path, cfg.eval.test_shards)))
    stream = EvalStream(expand_shards(cfg.eval.test_shards), cfg.data, tok, cfg.eval.eval_batch_size,
                        rank=info.rank, world=info.world)
    results = evaluate(model, make_loader(stream, cfg.data.num_workers), cfg.eval, cfg.data.seed, info.device)
    results["checkpoint"] = cfg.eval.checkpoint
    results["test_shards"] = cfg.eval.test_shards
    if info.is_main:
        path = cfg.eval.results or (os.path.join(cfg.eval.checkpoint, "eval_results.json")
                                    if cfg.eval.checkpoint and os.path.isdir(cfg.eval.checkpoint)
                                    else "eval_results.json")
        with open(path, "w") as f:
            json.dump(results, f, indent=1, sort_keys=True)
        if cfg.eval.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            with SummaryWriter(cfg.eval.tensorboard_dir) as tb:
                for d in ("t2v", "v2t"):
                    for k, v in results[d].items():
                        tb.add_scalar(f"test/{d}_{k}", v, 0)
                tb.add_text("test/results", json.dumps(results, indent=1))
        print(format_table(results))
        print(f"results: {path}")
    return results
