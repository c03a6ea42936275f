"""The sharded, leak-free stochastic evaluation (docs/evaluation.md), used by launch/eval.py and by validation
during training.

1. Encode: each rank encodes its share of the test set once (EvalStream); the shares are gathered, so every
   rank holds all text features t [N_t, D] and frame features f [N_v, F, D], in one global order.
2. Score: each rank takes the texts of a contiguous block of videos and scores them against all videos, in
   chunks of at most --eval_chunk (text, video) pairs:
       score(j, i) = max_m cos(t_j + R(t_j, v_i) * eps_{j,i,m}, psi(v_i | t_j))
   (the kernels: tmass/model/scoring.py). eps is a hash of (seed, text[, video], trial, dim)
   (tmass/model/noise.py): the scores do not depend on the world size or the chunk size. --trial_noise per_text
   draws eps_{j,m} once per text and trial (common random numbers) and turns the trials into three batched
   products; per_pair draws an independent eps for every (text, video, trial), as upstream; compiled
   (--eval_compile), one kernel hashes each eps where the sums over D use it.
3. Rank: t2v ranks where the scores are; v2t from each video's best caption, with only O(N_v) numbers
   (the right-pair scores, then counts) crossing ranks; --DSL needs only per-video log-sum-exps.
--eval_protocol upstream reproduces upstream's leaky score (the chosen trial scored against the candidate
pooled with its *own* caption), only to compare with published numbers.
"""

from __future__ import annotations

import json
import os
import sys
import dataclasses
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

import numpy as np
import torch

from . import dist
from .config import EvalConfig
from .data.transforms import normalize
from .errors import ConfigError, DataError
from .files import write_json_atomic
from .metrics import best_caption_scores, metrics_from_ranks, t2v_ranks
from .model.scoring import own_caption_pooled, score_rows

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from .config import Config
    from .model.tmass import TMASS

DSL_TEMPERATURE = 100.0
ORDER_BASE = 2**31  # a video's place in the global order: shard * ORDER_BASE + position in the shard


@dataclass
class Encoded:
    text: torch.Tensor  # [N_t, D]
    frames: torch.Tensor  # [N_v, F, D]
    text_video: torch.Tensor  # [N_t] global video index of each text
    keys: list[str]  # video keys in global order
    skipped: dict  # bad samples met while encoding, summed over ranks and workers
    order: torch.Tensor | None = None  # [N_v] shard * ORDER_BASE + position of each video
    first_captions: list | None = None  # [N_v] each video's first caption, or None

    def shards_and_positions(self) -> list[tuple[int, int]]:
        """(shard index, position in the shard) of each video, in the global order."""
        return [divmod(o, ORDER_BASE) for o in self.order.cpu().tolist()]


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None and dtype != torch.float32)


@torch.no_grad()
def encode(
    model: TMASS,
    batches: Iterable[dict],
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
    texts: bool = True,
) -> Encoded:
    """Encode this rank's share, then gather every share into one order (sorted by shard and position).
    progress: a bar of this rank's videos per second; texts False: the frames only (an index), no captions."""
    from tqdm import tqdm

    from .data.stream import SkipStats

    text_feats, frames, vid_order, text_order, keys, firsts, stats = [], [], [], [], [], [], {}
    bar = tqdm(desc="encode (rank 0)", unit="video", disable=not progress, mininterval=2, dynamic_ncols=True)
    pixel_stats = model.cfg.pixel_stats()
    for b in batches:
        bar.update(len(b["keys"]))
        stats[b["reader"]] = b["stats"]  # cumulative per reader: keep the last
        if len(b["keys"]) == 0:
            continue
        with _autocast(device, autocast_dtype):
            video = normalize(b["video"].to(device, non_blocking=True), pixel_stats)
            frames.append(model.encode_frames(video))
            if texts:
                text_feats.append(model.encode_text(b["input_ids"].to(device), b["attention_mask"].to(device)))
        order = b["shard"].long() * ORDER_BASE + b["pos"].long()  # a global order that any world size agrees on
        vid_order.append(order)
        if texts:
            text_order.append(torch.stack([order[b["text_video"]], b["caption_index"].long()], dim=1))
        keys += b["keys"]
        firsts += b["first_captions"]
    bar.close()
    dim, nf = model.dim, model.cfg.num_frames
    frames_t = (torch.cat(frames) if frames else torch.empty(0, nf, dim, device=device)).contiguous()
    texts_t = (torch.cat(text_feats) if text_feats else torch.empty(0, dim, device=device)).to(frames_t.dtype)
    vid_order_t = torch.cat(vid_order).to(device) if vid_order else torch.empty(0, dtype=torch.long, device=device)
    text_order_t = (
        torch.cat(text_order).to(device) if text_order else torch.empty(0, 2, dtype=torch.long, device=device)
    )
    total = SkipStats.total(dist.gather_objects(list(stats.values())))
    skipped = {k: total[k] if k in ("seen", "ok") else dict(total[k]) for k in ("seen", "ok", "reasons", "shards")}
    return _in_global_order(frames_t, texts_t, vid_order_t, text_order_t, keys, firsts, skipped)


def _in_global_order(frames, texts, vid_order, text_order, keys, firsts, skipped) -> Encoded:
    """Every rank's share gathered, videos sorted by (shard, position), each text after its video's index."""
    frames, texts = dist.gather_rows(frames), dist.gather_rows(texts)
    vid_order, text_order = dist.gather_rows(vid_order), dist.gather_rows(text_order)
    keys, firsts = dist.gather_objects(keys), dist.gather_objects(firsts)
    vsort = torch.argsort(vid_order)  # global video index = place in the sorted order
    text_video = torch.searchsorted(vid_order[vsort].contiguous(), text_order[:, 0].contiguous())
    tsort = torch.argsort(text_video * 2**20 + text_order[:, 1])
    v = vsort.tolist()
    return Encoded(
        texts[tsort],
        frames[vsort],
        text_video[tsort],
        [keys[i] for i in v],
        skipped,
        vid_order[vsort],
        [firsts[i] for i in v],
    )


# --------------------------------------------------------------------------------------------- the whole thing
@torch.no_grad()
def evaluate(
    model: TMASS,
    batches: Iterable[dict],
    cfg: EvalConfig,
    seed: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
    max_bad_fraction: float = 0.0,
    progress: bool = False,
) -> dict:
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


def dual_softmax(scores: torch.Tensor, n_v: int) -> torch.Tensor:
    """DSL: s <- s * softmax over all queries (texts, on every rank) of 100 s, per video column.
    scores [n_rows, N_v] -> [n_rows, N_v]."""
    if len(scores):
        lse = torch.logsumexp(DSL_TEMPERATURE * scores, dim=0)
    else:
        lse = torch.full((n_v,), float("-inf"), device=scores.device)
    lse = torch.logsumexp(dist.gather_rows(lse[None]), dim=0)
    return scores * torch.exp(DSL_TEMPERATURE * scores - lse)


@torch.no_grad()
def rank_all(model: TMASS, enc: Encoded, cfg: EvalConfig, seed: int) -> dict:
    """Score this rank's block of texts against every video, then rank both directions across ranks."""
    n_t, n_v = len(enc.text_video), enc.frames.shape[0]
    if n_v == 0:
        why = ", ".join(f"{r}: {n}" for r, n in enc.skipped.get("reasons", {}).items()) or "no samples"
        raise DataError(
            f"the test shards gave no usable video ({why}); evaluation needs each sample's video "
            f"bytes (mp4) and captions (json 'captions' or txt): build them with shards/build.py"
        )
    leaky = cfg.eval_protocol == "upstream"
    own_hat = own_caption_pooled(model, enc.text, enc.frames, enc.text_video) if leaky else None
    rank, world = dist.rank(), dist.world()
    v0, v1 = rank * n_v // world, (rank + 1) * n_v // world  # this rank's owner videos
    rows = torch.nonzero((enc.text_video >= v0) & (enc.text_video < v1)).flatten()
    timings: dict = {}
    scores = score_rows(model, enc.text, enc.frames, rows, cfg, seed, own_hat, timings)  # [n_rows, N_v]
    if cfg.dsl:
        scores = dual_softmax(scores, n_v)
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
    return {
        "t2v": metrics_from_ranks(t2v.cpu()),
        "v2t": metrics_from_ranks(v2t.cpu()),
        "protocol": cfg.eval_protocol + (" (LEAKY: candidates pooled with their own caption)" if leaky else ""),
        "leaky": leaky,
        "trials": 0 if model.cfg.deterministic_text else cfg.stochastic_trials,
        "trial_noise": cfg.trial_noise,
        "deterministic_text": model.cfg.deterministic_text,
        "dsl": cfg.dsl,
        "seed": seed,
        "num_texts": n_t,
        "num_videos": n_v,
        "world_size": world,
        "compiled": bool(timings.get("compiled")),
        "first_chunk_s": timings.get("first_chunk_s"),
    }


def format_table(results: dict) -> str:
    cols = ["R@1", "R@5", "R@10", "R@50", "MdR", "MnR"]
    head = f"{'':5}" + "".join(f"{c:>8}" for c in cols)
    lines = []
    if "model" in results:
        lines.append(f"model: {describe_model(results['model'])}")
    sk = results.get("skipped", {})
    bad = sum(sk.get("reasons", {}).values())
    lines.append(
        f"{results['protocol']}, {results['num_texts']} texts x {results['num_videos']} videos"
        + (f" ({bad} of {sk.get('seen', 0)} samples skipped)" if sk else "")
        + f", {results['trials']} trials ({results['trial_noise']}), seed {results['seed']}"
        + (", DSL" if results["dsl"] else "")
    )
    lines.append(head)
    for d in ("t2v", "v2t"):
        lines.append(f"{d:5}" + "".join(f"{results[d][c]:>8.2f}" for c in cols))
    return "\n".join(lines)


def describe_model(info: dict) -> str:
    if info["kind"] == "random":
        return "RANDOM WEIGHTS (--random_init): not a trained model"
    where = info.get("checkpoint")
    parts = [
        p
        for p in (
            info.get("tag") and f"checkpoint {info['tag']}",
            info.get("step") is not None and f"step {info['step']}",
            info.get("epoch") is not None and f"epoch {info['epoch']}",
        )
        if p
    ]
    return f"{where} ({info['kind']}{', ' + ', '.join(parts) if parts else ''})"


def resolve_checkpoint(cfg: Config) -> tuple[str | None, str | None]:
    """(path, tag) of the weights to evaluate: --checkpoint; or upstream's --exp_name E --load_epoch -1|N,
    the best checkpoint or the end of epoch N of the run {output_dir}/E; or None with --random_init."""
    from .checkpoint import checkpoints_dir, epoch_tag, is_run_dir, run_dir

    ev = cfg.eval
    path = ev.checkpoint
    if path is None and ev.load_epoch is not None:
        path = run_dir(cfg.train.output_dir, cfg.train.exp_name)
        if not is_run_dir(path):
            raise ConfigError(
                f"--exp_name {cfg.train.exp_name} --load_epoch {ev.load_epoch}: no tmass run at "
                f"{path}; pass --output_dir where the run lives, or --checkpoint RUN_DIR"
            )
    if path is None:
        if not ev.random_init:
            raise ConfigError(
                "no trained weights to evaluate: pass --checkpoint RUN_DIR (or an export dir, "
                "or an upstream .pth), or --exp_name NAME --load_epoch -1 for that run's best "
                "checkpoint; --random_init scores a randomly initialised model on purpose"
            )
        return None, None
    if ev.random_init:
        raise ConfigError("--random_init and a checkpoint contradict each other; drop one")
    if not os.path.exists(path):
        raise ConfigError(f"--checkpoint {path}: no such file or directory")
    if ev.load_epoch is None or ev.load_epoch == -1:
        return path, None
    if not is_run_dir(path):
        raise ConfigError(f"--load_epoch {ev.load_epoch} needs a tmass run directory, and {path} is not one")
    return path, epoch_tag(checkpoints_dir(path), ev.load_epoch)


def adopt_eval_settings(cfg: Config, info: dict) -> tuple[Config, list[str]]:
    """(cfg with the run's validation settings - trials, noise, protocol, DSL, seed - for every one of them not
    given explicitly, the `--flag value` notes of those taken)."""
    from .checkpoint import EVAL_SETTINGS

    taken = {
        name: value
        for name, value in (info.get("eval_settings") or {}).items()
        if name in EVAL_SETTINGS + ("seed",)
        and name not in cfg.explicit
        and getattr(cfg if name == "seed" else cfg.eval, name) != value
    }
    notes = [f"--{name} {value}" for name, value in taken.items()]
    seed = taken.pop("seed", cfg.seed)
    return cfg.replace(eval=taken, seed=seed), notes


def check_test_shards(urls: list[str]) -> None:
    from .data.shardlist import missing_shards

    missing = missing_shards(urls)
    if missing:
        raise ConfigError(
            f"{len(missing)} of {len(urls)} test shard(s) missing, e.g. {missing[0]}; a "
            f"subset would give other numbers: fix --test_shards"
        )


def check_skipped(skipped: dict, limit: float) -> None:
    """Scoring a subset of the test set silently is wrong: an unreadable shard, or more skipped samples than
    --max_bad_fraction allows, is an error."""
    from .data.stream import UNREADABLE, TooManyBadSamples, check_bad_fraction

    unreadable = {r: n for r, n in skipped.get("reasons", {}).items() if r.startswith(UNREADABLE)}
    if unreadable:
        shards = ", ".join(sorted(skipped.get("shards", {}))[:5])
        raise TooManyBadSamples(
            f"test shard(s) could not be read to the end ({', '.join(unreadable)}): {shards}; "
            f"rebuild them with shards/build.py"
        )
    check_bad_fraction(skipped, limit, min_seen=1)


def run(cfg: Config) -> dict:
    """`launch/eval.py`: load the model, stream the test shards over all ranks, evaluate, report."""
    from .config import Config
    from .data.shardlist import expand_shards
    from .data.stream import EvalStream, make_loader

    assert isinstance(cfg, Config)
    if not cfg.eval.test_shards:
        raise ConfigError("--test_shards is required (build them with shards/build.py)")
    urls = expand_shards(cfg.eval.test_shards)
    check_test_shards(urls)
    path, tag = resolve_checkpoint(cfg)
    if cfg.model.clip_path:
        from .model.clip import resolve_clip_path

        cfg = cfg.replace(model={"clip_path": resolve_clip_path(cfg.model.clip_path)})
    info = dist.init()
    model, source, cfg = model_for(cfg, path, tag, info)
    stream = EvalStream(
        urls,
        cfg.data,
        tokenizer_for(cfg, path),
        cfg.eval.eval_batch_size,
        num_frames=model.cfg.num_frames,
        rank=info.rank,
        world=info.world,
    )
    results = evaluate(
        model,
        make_loader(stream, cfg.data.num_workers),
        cfg.eval,
        cfg.seed,
        info.device,
        max_bad_fraction=cfg.data.max_bad_fraction,
        progress=info.is_main,
    )
    results["model"] = {k: v for k, v in source.items() if k != "eval_settings"}
    results["checkpoint"] = path
    results["test_shards"] = cfg.eval.test_shards
    if info.is_main:
        report(cfg, results, cfg.eval.results or default_results_path(path))
    return results


def model_for(cfg: Config, path: str | None, tag: str | None, info: dist.DistInfo) -> tuple[TMASS, dict, Config]:
    """(the model on this rank's device, what it is, the config that follows it): the model's own settings
    (frames, the baseline's deterministic text; --deterministic_text scores a T-MASS model without its mass),
    its image size and pixel statistics, and the run's validation settings unless given."""
    from .checkpoint import load_model
    from .model.clip import pixel_stats_of

    model, source = load_model(cfg.model, path, tag)
    model = model.to(info.device)
    cfg.check_model(model.cfg, path or "the random model")
    if cfg.model.deterministic_text and not model.cfg.deterministic_text:
        model.cfg = dataclasses.replace(model.cfg, deterministic_text=True)
    given = {k: getattr(cfg.model, k) for k in ("image_mean", "image_std") if k in cfg.explicit}
    mean, std = pixel_stats_of(dataclasses.replace(model.cfg, **given))  # the run's, else the CLIP's own
    model.cfg = dataclasses.replace(model.cfg, image_mean=mean, image_std=std)
    cfg, taken = adopt_eval_settings(cfg.replace(model=model.cfg), source)
    if taken and info.is_main:
        print(
            f"note: evaluating with the settings the run was validated with: {', '.join(taken)} "
            f"(give a flag to override)",
            file=sys.stderr,
        )
    cfg = cfg.resolve(model.clip.config.vision_config.image_size, f"the model ({path or 'random weights'})")
    return model, source, cfg


def tokenizer_for(cfg: Config, path: str | None) -> PreTrainedTokenizerBase:
    """--tokenizer; else the one a run or export directory carries; else --clip_path's or the shards'."""
    from .data.tokenizer import load_tokenizer, resolve_tokenizer

    own = os.path.join(path or "", "tokenizer")
    return load_tokenizer(
        cfg.eval.tokenizer
        or (own if path and os.path.isdir(own) else resolve_tokenizer(None, cfg.model.clip_path, cfg.eval.test_shards))
    )


def report(cfg: Config, results: dict, out: str) -> None:
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
