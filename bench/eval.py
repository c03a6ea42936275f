"""Benchmark: the stochastic evaluation on random features (N_t = N_v = N, F = 12, D = 512, M = 20).

    (a) upstream   a faithful re-implementation of the upstream procedure (its _valid_epoch_step and t2v
                   ranks): the pooled videos V [N_v, N_t, D] for every pair; a loop over videos that
                   calls the stochastic module once per trial (R made again each time, as upstream does) and
                   keeps each text's best trial with a loop over texts, in a second [N_v, N_t, D] tensor; both
                   regrouped per video id through Python dicts; the (leaky) similarity as one batched product
                   [N_v, N_t, N_v] of which the diagonal is kept; one process
    (b) tmass 1    tmass.evaluate.rank_all (scores + both directions' ranks) on 1 process
    (c) tmass 2    the same on 2 processes (gloo), each scoring half of the texts
The floor of (b) and (c): tmass's scoring FLOPs (scoring_flops) at the machine's fp32 matmul rate, measured
in the same run; x floor is the time over it. Each runs in fresh processes, so the peak RSS is its own (the
largest of the ranks for (c)); time is wall time of the scoring and ranking, features already in memory. Both
--trial_noise modes for (b) and (c).

    python bench/eval.py                          # N = 1000 (with (a)) and N = 10000 (b and c only)
    python bench/eval.py --sizes 10000 --noises per_text   # per_pair at 10k draws 10^11 random numbers
    python bench/eval.py --sizes 40 --upstream_max 40 --trials 3 --json r.json   # what the tests run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

import torch  # noqa: E402

F_FRAMES, DIM = 12, 512


class Head(torch.nn.Module):
    """The parts of TMASS that scoring uses (pooling, radius, config): no CLIP towers to build."""

    def __init__(self):
        super().__init__()
        from tmass.config import ModelConfig
        from tmass.model.pooling import TextConditionedPool
        from tmass.model.stochastic import SimilarityRadius

        torch.manual_seed(0)
        self.cfg = ModelConfig(num_frames=F_FRAMES, transformer_dropout=0.0)
        self.pool_frames = TextConditionedPool(DIM, 0.0)
        self.radius = SimilarityRadius(F_FRAMES, DIM)
        with torch.no_grad():
            for p in self.parameters():
                p.add_(0.02 * torch.randn_like(p))
        self.eval()


def scoring_flops(n_t: int, n_v: int, trials: int, frames: int = F_FRAMES, dim: int = DIM) -> float:
    """The products of tmass's scoring, 2 FLOPs per multiply-add (docs of tmass/model/pooling.py and noise.py):
    per pair the attention logits k.q (F D), the coefficients' quadratic forms (F^2 + (F+1)^2 + (F+2)^2),
    psi = c B ((F+2) D), the radius's cosines and its map S -> W S + b (F D + (F+1) D), t.psi (D) and per trial the
    three products of the text mass ((t R).eps, (R psi).eps, (R R).(eps eps): 3 M D); per video its keys, values
    through W_v and W_o, and W_l rows (4 F D^2) and its three Grams; per text its query (D^2). Elementwise work
    and the noise's hashing are not counted: the floor is what the products alone take at the machine's matmul
    rate."""
    f, d, m = frames, dim, trials
    pair = d * (4 * f + 4 + 3 * m) + f * f + (f + 1) ** 2 + (f + 2) ** 2
    video = 4 * f * d * d + (f * f + (f + 1) ** 2 + (f + 2) ** 2) * d
    return 2.0 * (n_t * n_v * pair + n_v * video + n_t * d * d)


def matmul_rate(threads: int, size: int = 2048, repeats: int = 5) -> float:
    """This machine's fp32 matmul rate (FLOP/s) with `threads` threads: the best of `repeats` products of two
    size x size matrices."""
    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2.0 * size**3 / best


def features(n: int):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, DIM, generator=g).mul_(5), torch.randn(n, F_FRAMES, DIM, generator=g).mul_(5)


def upstream_pool(pool, t: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
    """Upstream's pooling as upstream computes it: the attended values, W_o and W_l for every (video, text) pair."""
    import math

    ca = pool.cross_attn
    q = ca.q_proj(pool.layer_norm1(t))  # [N_t, D]
    f = pool.layer_norm1(frames)
    k, u = ca.k_proj(f), ca.v_proj(f)  # [N_v, F, D]
    attn = (torch.einsum("vfd,td->vtf", k, q) / math.sqrt(q.shape[-1])).softmax(dim=-1)
    h = pool.layer_norm2(ca.out_proj(torch.einsum("vtf,vfd->vtd", attn, u)))  # [N_v, N_t, D]
    return pool.layer_norm3(h + pool.linear_proj(h))


def upstream_stochastic(radius, t: torch.Tensor, frames_rep: torch.Tensor) -> torch.Tensor:
    """One call of upstream's stochastic module (docs/method.md), as upstream makes it, once per trial:
    t and the video's frames (tiled over the texts) normalised again, t repeated over the frames, the F x F
    cosines averaged over the repeated axis, R = exp(W S + b), fresh uniform noise.
    t [N_t, D], frames_rep [N_t, F, D] -> t + u R [N_t, D]."""
    t_unit = (t / t.norm(dim=-1, keepdim=True)).unsqueeze(1).repeat(1, F_FRAMES, 1)  # [N_t, F, D]
    f_unit = frames_rep / frames_rep.norm(dim=-1, keepdim=True)
    sims = torch.matmul(t_unit, f_unit.permute(0, 2, 1)).mean(dim=1)  # [N_t, F]
    r = torch.exp(radius.linear_proj(sims))
    return t + torch.rand_like(t) * r


def upstream_select(head: Head, t: torch.Tensor, frames: torch.Tensor, v: torch.Tensor, trials: int) -> torch.Tensor:
    """Step 3, a sequential loop over videos: for video i, M calls of the stochastic module on all texts, the trial
    with the best cosine to V[i, j] kept for each text j by a Python loop. -> chosen [N_v, N_t, D]."""
    n_v, n_t = len(frames), len(t)
    chosen = torch.zeros(n_v, n_t, DIM)  # the second N_v x N_t x D tensor
    for i in range(n_v):
        frames_rep = frames[i].unsqueeze(0).tile((n_t, 1, 1))  # video i for every text [N_t, F, D]
        samples = torch.stack([upstream_stochastic(head.radius, t, frames_rep) for _ in range(trials)])
        samples = samples / samples.norm(dim=-1, keepdim=True)  # [M, N_t, D]
        v_i = v[i] / v[i].norm(dim=-1, keepdim=True)
        best = torch.sum(samples * v_i, dim=-1).argmax(dim=0)  # [N_t]
        plane = torch.ones(n_t, DIM)
        for j in range(n_t):  # the gather is a Python loop over texts
            plane[j, :] = samples[best[j], j, :]
        chosen[i] = plane
    return chosen


def per_video_id(x: torch.Tensor, vid_ids: list) -> torch.Tensor:
    """Step 4 for one of its two tensors: for every row i, x[i, j] grouped by the video id of text j in dicts of
    lists, each group stacked and padded with -inf to the largest group. [N_v, N_t, D] -> [N_v, N_ids, M', D]."""
    grouped = []
    for i in range(x.shape[0]):
        groups: dict = {}
        for j, vid in enumerate(vid_ids):
            groups.setdefault(vid, []).append(x[i, j, :])
        groups = {vid: torch.stack(rows) for vid, rows in groups.items()}
        longest = max(g.shape[0] for g in groups.values())
        grouped.append(
            torch.stack(
                [
                    torch.cat([g, torch.full((longest - g.shape[0], x.shape[-1]), float("-inf"))])
                    for g in groups.values()
                ]
            )
        )
    return torch.stack(grouped)


def upstream_sims(text_per_id: torch.Tensor, vid_per_id: torch.Tensor) -> torch.Tensor:
    """Step 5 (sim_matrix_inference_stochastic): both [N_v, N_ids, M', D] (N_ids = N_v) normalised, the videos'
    axes permuted to [N_v M', D, N_v], one batched product [N_v M', N_ids, N_v] of which the diagonal blocks are
    kept. -> sims [N_ids, M', N_v] with sims[b, m, i] = <t(b, m | i), V[i, (i, m)]>: video i pooled with its own
    m-th caption (the leak: docs/method.md)."""
    text_per_id = text_per_id / text_per_id.norm(dim=-1, keepdim=True)
    vid_per_id = vid_per_id / vid_per_id.norm(dim=-1, keepdim=True)
    n_v, n_ids, m, dim = text_per_id.shape
    vids = vid_per_id.permute(1, 2, 3, 0).reshape(n_v * m, dim, n_v)
    texts = text_per_id.permute(0, 2, 1, 3).reshape(n_v * m, n_ids, dim)
    sims = torch.bmm(texts, vids).view(n_v, m, n_ids, n_v)
    return torch.stack([sims[i, :, :, i] for i in range(n_v)], dim=-1).permute(1, 0, 2)


def upstream_t2v_ranks(sims: torch.Tensor) -> torch.Tensor:
    """Upstream's t2v: a double argsort of [M', N_t, N_v], each query's rank read off the diagonal."""
    order = torch.argsort(torch.argsort(sims.permute(1, 0, 2), dim=-1, descending=True), dim=-1)
    return torch.flatten(torch.diagonal(order, dim1=1, dim2=2))


@torch.no_grad()
def upstream(head: Head, n: int, trials: int) -> None:
    """The upstream procedure, step by step, on the CPU as upstream runs it: what each step holds stays held while
    upstream's frame holds it."""
    t, frames = features(n)
    vid_ids = list(range(n))  # one caption per video
    v = upstream_pool(head.pool_frames, t, frames)  # step 2: [N_v, N_t, D], every video pooled with every text
    chosen = upstream_select(head, t, frames, v, trials)  # step 3
    del t, frames
    text_per_id, vid_per_id = per_video_id(chosen, vid_ids), per_video_id(v, vid_ids)  # step 4
    del chosen, v
    sims = upstream_sims(text_per_id, vid_per_id)  # step 5, while the caller still holds its inputs
    ranks = upstream_t2v_ranks(sims)
    assert ranks.numel() == n


def tmass_run(n: int, trials: int, noise: str, chunk: int, compile_: str) -> dict:
    from tmass.config import EvalConfig
    from tmass.evaluate import Encoded, rank_all

    t, frames = features(n)
    enc = Encoded(t, frames, torch.arange(n), [], {})
    cfg = EvalConfig(stochastic_trials=trials, trial_noise=noise, eval_chunk=chunk, eval_compile=compile_)
    r = rank_all(Head(), enc, cfg, 24)
    return {"compiled": r["compiled"], "first_chunk_s": r["first_chunk_s"]}


def one(args: argparse.Namespace) -> None:
    """Run one measurement in this process (as rank RANK of WORLD_SIZE for tmass) and print a JSON line."""
    torch.set_num_threads(args.threads)
    if args.world > 1 or args.method == "tmass":
        from tmass import dist

        dist.init()
    base_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the interpreter, torch and gloo
    t = time.perf_counter()
    info = {}
    if args.method == "upstream":
        upstream(Head(), args.n, args.trials)
    else:
        info = tmass_run(args.n, args.trials, args.noise, args.chunk, args.compile)
    if args.world > 1:
        torch.distributed.barrier()
    print(
        json.dumps(
            {
                "seconds": time.perf_counter() - t,
                "base_rss_mb": base_mb,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
            | info
        ),
        flush=True,
    )
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # a clean exit: gloo's threads end before the interpreter


def measure(
    method: str, n: int, trials: int, noise: str, world: int, chunk: int, compile_: str, threads: int | None = None
) -> dict:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    threads = threads or max(1, (os.cpu_count() or 1) // world)  # the machine's cores shared by the ranks
    procs = []
    for rank in range(world):
        env = dict(
            os.environ,
            RANK=str(rank),
            WORLD_SIZE=str(world),
            LOCAL_RANK=str(rank),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            DS_ACCELERATOR="cpu",
        )
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--one",
            method,
            "--n",
            str(n),
            "--trials",
            str(trials),
            "--noise",
            noise,
            "--world",
            str(world),
            "--chunk",
            str(chunk),
            "--threads",
            str(threads),
            "--compile",
            compile_,
        ]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = []
    for p in procs:
        out, err = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"{method} N={n} failed:\n{err[-3000:]}")
        outs.append(json.loads(out.strip().splitlines()[-1]))
    return {
        "method": method,
        "n": n,
        "noise": noise if method == "tmass" else "per_pair (upstream)",
        "world": world,
        "threads": threads,
        "seconds": round(max(o["seconds"] for o in outs), 2),
        "peak_rss_mb": round(max(o["peak_rss_mb"] for o in outs)),
        "above_base_mb": round(max(o["peak_rss_mb"] - o["base_rss_mb"] for o in outs)),
        "compiled": outs[0].get("compiled", False),
        "first_chunk_s": outs[0].get("first_chunk_s"),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1000,10000")
    p.add_argument("--upstream_max", type=int, default=1000, help="run (a) only up to this N")
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--chunk", type=int, default=8192, help="--eval_chunk (the default of tmass)")
    p.add_argument("--compile", default="auto", help="--eval_compile for (b) and (c): auto, yes or no")
    p.add_argument("--noises", default="per_text,per_pair", help="the --trial_noise modes to run for (b) and (c)")
    p.add_argument("--json")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--noise", default="per_text", help=argparse.SUPPRESS)
    p.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        a.method = a.one
        one(a)
        return
    rate = matmul_rate(os.cpu_count() or 1)  # the floor's rate: the whole machine, as the runs share it
    rows = []
    for n in map(int, a.sizes.split(",")):
        if n <= a.upstream_max:
            rows.append(measure("upstream", n, a.trials, "per_pair", 1, a.chunk, a.compile))
            print(f"  (a) N={n}: {rows[-1]['seconds']} s", file=sys.stderr)
        for noise in a.noises.split(","):
            for world in (1, 2):
                rows.append(measure("tmass", n, a.trials, noise, world, a.chunk, a.compile))
                print(f"  tmass N={n} {noise} world {world}: {rows[-1]['seconds']} s", file=sys.stderr)
            half = max(1, (os.cpu_count() or 1) // 2)  # 1 rank with the threads of one of (c)'s ranks
            rows.append(measure("tmass", n, a.trials, noise, 1, a.chunk, a.compile, threads=half))
            print(f"  tmass N={n} {noise} world 1, {half} threads: {rows[-1]['seconds']} s", file=sys.stderr)
    for r in rows:  # the floor applies to tmass's algorithm; upstream's does other (and more) work
        tm = r["method"] == "tmass"
        r["gflop"] = round(scoring_flops(r["n"], r["n"], a.trials) / 1e9, 2) if tm else None
        r["floor_s"] = scoring_flops(r["n"], r["n"], a.trials) / rate if tm else None
        r["x_floor"] = round(r["seconds"] / r["floor_s"], 2) if tm else None
    print(f"\nstochastic evaluation, random features: F={F_FRAMES}, D={DIM}, M={a.trials}, {os.cpu_count()} CPU cores")
    print(
        f"floor: tmass's scoring FLOPs (bench/eval.py scoring_flops) at this machine's fp32 matmul rate, "
        f"{rate / 1e9:.1f} GFLOP/s\n(a 2048^2 product on {os.cpu_count()} threads, measured in this run); x floor: "
        f"time / floor"
    )
    print(
        "time: wall time of scoring and ranking, the first chunk included; 1st chunk: its time, which holds the "
        "compilation\n(or the load from torch's on-disk cache) where the scorer is compiled; RSS: per process, "
        "and above what the\nprocess held before the run (the interpreter, torch and gloo)"
    )
    print(
        f"{'':10} {'N':>6} {'noise':>20} {'ranks':>5} {'thr':>4} {'compiled':>8} {'time s':>8} {'1st chunk':>9} "
        f"{'vs (a)':>7} {'vs (b)':>7} {'peak RSS MB':>11} {'above':>6} {'(a)/RSS':>7} {'GFLOP':>7} {'floor s':>7} "
        f"{'x floor':>7}"
    )
    for r in rows:
        base_a = next((x for x in rows if x["method"] == "upstream" and x["n"] == r["n"]), None)
        base_b = (
            next(
                x
                for x in rows
                if x["method"] == "tmass" and x["n"] == r["n"] and x["world"] == 1 and x["noise"] == r["noise"]
            )
            if r["method"] == "tmass"
            else None
        )
        va = f"{base_a['seconds'] / r['seconds']:.1f}x" if base_a and r is not base_a else ""
        vb = f"{base_b['seconds'] / r['seconds']:.2f}x" if base_b and r is not base_b else ""
        vm = f"{base_a['peak_rss_mb'] / r['peak_rss_mb']:.1f}x" if base_a and r is not base_a else ""
        name = "(a) upstr" if r["method"] == "upstream" else f"({'b' if r['world'] == 1 else 'c'}) tmass"
        first = f"{r['first_chunk_s']:.2f}" if r.get("first_chunk_s") is not None else ""
        floor = f"{r['floor_s']:.3f}" if r["floor_s"] else ""
        x_floor = f"{r['x_floor']:.2f}x" if r["x_floor"] else ""
        print(
            f"{name:10} {r['n']:>6} {r['noise']:>20} {r['world']:>5} {r['threads']:>4} "
            f"{'yes' if r.get('compiled') else 'no':>8} {r['seconds']:>8.2f} {first:>9} {va:>7} {vb:>7} "
            f"{r['peak_rss_mb']:>11} {r['above_base_mb']:>6} {vm:>7} {r['gflop'] or '':>7} {floor:>7} {x_floor:>7}"
        )
    for r in rows:  # what the sharding alone gives: 2 ranks against 1 rank, with the same threads per rank
        single = next(
            (
                x
                for x in rows[::-1]
                if x["method"] == "tmass"
                and x["n"] == r["n"]
                and x["noise"] == r["noise"]
                and x["world"] == 1
                and x["threads"] == r["threads"]
            ),
            None,
        )
        if single and r["world"] == 2:
            speedup = single["seconds"] / r["seconds"]
            print(
                f"N={r['n']} {r['noise']}: 2 ranks x {r['threads']} threads = {speedup:.2f}x "
                f"1 rank x {r['threads']} threads"
            )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
