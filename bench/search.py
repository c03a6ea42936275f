"""Benchmark: tmass-search's two stages (tmass/search.py).

(a) --run RUN --shards S   on a trained run and its test split: t2v R@1/5/10 of stage 1 alone, of the two
                           stages with K candidates, and of the exhaustive evaluation (score_rows over every
                           pair, the numbers tmass-eval prints); the index in float16, as tmass-index writes
                           it by default, and the run's evaluation settings (trials, noise, seed)
(b) --sizes N,...          random features (F = 12, D = 512, float16) written as an index of N videos: its
                           size on disk, the time to open it, and one query's latency (median of --repeats,
                           the files in the page cache): stage 1 over all N videos, stage 2 on K = 50 with
                           M = 20 trials (per_text), and the whole search

python bench/search.py --run outputs/demo --shards 'data/synthetic/test-*.tar'
python bench/search.py --sizes 10000,100000,1000000 --dir /tmp/search_bench
python bench/search.py --sizes 300 --candidates 10,50 --json r.json   # what the tests run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

import torch  # noqa: E402

F_FRAMES, DIM, PART = 12, 512, 1 << 16


def recall(ranks: torch.Tensor) -> dict:
    """R@1/5/10 (percent) of 1-based ranks; a rank of 0 or less is a miss (not among the candidates)."""
    ok = ranks > 0
    return {f"R@{k}": round(100.0 * float((ok & (ranks <= k)).float().mean()), 2) for k in (1, 5, 10)}


def two_stage_ranks(s1_order: torch.Tensor, s2: torch.Tensor, right: torch.Tensor, k: int) -> torch.Tensor:
    """The right video's 1-based rank among the first k candidates re-ranked by s2, or 0 when it is not one.
    s1_order [Q, K_max] candidate ids by stage 1; s2 [Q, K_max] their stage-2 scores; right [Q]."""
    cand, s = s1_order[:, :k], s2[:, :k]
    hit = cand == right[:, None]
    own = torch.where(hit, s, torch.full_like(s, float("-inf"))).max(dim=1).values
    rank = (s > own[:, None]).sum(dim=1) + 1
    return torch.where(hit.any(dim=1), rank, torch.zeros_like(rank))


def on_a_run(a: argparse.Namespace) -> list[dict]:
    from tmass import search as S
    from tmass.config import config_of
    from tmass.data.stream import EvalStream, make_loader
    from tmass.data.shardlist import expand_shards
    from tmass.evaluate import encode
    from tmass.metrics import t2v_ranks
    from tmass.model.scoring import score_rows

    folder = a.index or tempfile.mkdtemp(prefix="tmass_index_")
    S.build_index(config_of({"checkpoint": a.run, "num_workers": 1}), S.IndexOptions(out=folder, shards=a.shards))
    model, index, cfg, tok = S.open_for_search(config_of({}), folder)
    stream = EvalStream(expand_shards(a.shards), cfg.data, tok, 32, num_frames=model.cfg.num_frames)
    enc = encode(model, make_loader(stream, cfg.data.num_workers), torch.device("cpu"))
    rows = torch.arange(len(enc.text))
    full = score_rows(model, enc.text, enc.frames, rows, cfg.eval, cfg.seed)  # the evaluation's scores
    exhaustive = t2v_ranks(full, enc.text_video) + 1  # 1-based
    ks = sorted(k for k in map(int, a.candidates.split(",")) if k <= len(index)) or [len(index)]
    s1, cand = S.stage1(index, enc.text, max(ks))
    s2 = S.stage2(model, enc.text, rows, torch.stack([index.frames_of(c) for c in cand]), cand, cfg)
    out = [{"method": "exhaustive (tmass-eval)"} | recall(exhaustive)]
    out.append({"method": "stage 1 alone"} | recall(two_stage_ranks(cand, s1, enc.text_video, max(ks))))
    out += [{"method": f"two stages, K = {k}"} | recall(two_stage_ranks(cand, s2, enc.text_video, k)) for k in ks]
    print(
        f"{len(enc.text)} texts x {len(index)} videos, {cfg.eval.stochastic_trials} trials "
        f"({cfg.eval.trial_noise}), seed {cfg.seed}, index float16"
    )
    print(f"{'':28}{'R@1':>8}{'R@5':>8}{'R@10':>8}")
    for r in out:
        print(f"{r['method']:28}" + "".join(f"{r[c]:>8.2f}" for c in ("R@1", "R@5", "R@10")))
    if not a.index:
        shutil.rmtree(folder)
    return out


def synthetic_index(folder: str, n: int) -> None:
    """An index of n videos of random features, written part by part as tmass-index writes them."""
    from tmass import search as S
    from tmass.files import write_json_atomic

    os.makedirs(folder, exist_ok=True)
    parts = [(a, min(n, a + PART)) for a in range(0, n, PART)]
    g = torch.Generator().manual_seed(n)
    for k, (a, b) in enumerate(parts):
        frames = torch.randn(b - a, F_FRAMES, DIM, generator=g)
        videos = [{"key": f"v{i:07d}", "shard": "none", "pos": i - a, "caption": None} for i in range(a, b)]
        S.write_part(folder, k, frames, videos, "float16", {})
    write_json_atomic(
        os.path.join(folder, "manifest.json"),
        {"format": S.FORMAT, "dtype": "float16", "num_frames": F_FRAMES, "dim": DIM, "parts": parts},
    )


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def at_scale(a: argparse.Namespace) -> list[dict]:
    import importlib.util

    from tmass import search as S
    from tmass.config import config_of

    spec = importlib.util.spec_from_file_location("bench_eval", os.path.join(HERE, "eval.py"))
    bench_eval = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_eval)
    head = bench_eval.Head()  # the pooling and the radius at D = 512, no CLIP towers to build
    cfg = config_of({"stochastic_trials": 20, "trial_noise": "per_text"})
    q = torch.randn(1, DIM, generator=torch.Generator().manual_seed(1))
    k = int(a.candidates.split(",")[-1])
    rows = []
    for n in map(int, a.sizes.split(",")):
        folder = os.path.join(a.dir or tempfile.mkdtemp(prefix="tmass_search_bench_"), f"n{n}")
        t0 = time.perf_counter()
        synthetic_index(folder, n)
        write_s = time.perf_counter() - t0
        size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
        t0 = time.perf_counter()
        index = S.Index(folder)
        open_s = time.perf_counter() - t0
        _, cand = S.stage1(index, q, k)
        frames = index.frames_of(cand[0])[None]
        with torch.no_grad():
            s1 = median_time(lambda: S.stage1(index, q, k), a.repeats)
            s2 = median_time(lambda: S.stage2(head, q, torch.arange(1), frames, cand, cfg), a.repeats)
            whole = median_time(lambda: S.search(head, index, q, cfg, 10, k), a.repeats)
        rows.append(
            {
                "videos": n,
                "index_bytes": size,
                "index_GB": round(size / 1e9, 3),
                "write_s": round(write_s, 1),
                "open_s": round(open_s, 2),
                "stage1_ms": round(1e3 * s1, 1),
                "stage2_ms": round(1e3 * s2, 1),
                "search_ms": round(1e3 * whole, 1),
                "K": k,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        if not a.dir or a.clean:
            shutil.rmtree(folder)
    print(
        f"\none query, K = {k}, M = 20 trials, F = {F_FRAMES}, D = {DIM}, float16; {torch.get_num_threads()} "
        f"threads; median of {a.repeats}"
    )
    cols = ["videos", "index_GB", "open_s", "stage1_ms", "stage2_ms", "search_ms"]
    print("".join(f"{c:>12}" for c in cols))
    for r in rows:
        print("".join(f"{r[c]:>12}" for c in cols))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", help="(a): a trained run (or export) directory")
    p.add_argument("--shards", help="(a): the test split's shards")
    p.add_argument("--index", help="(a): keep the index in this folder (default: a temporary one)")
    p.add_argument("--candidates", default="1,5,10,20,50,100,200", help="the K values; (b) takes the last")
    p.add_argument("--sizes", help="(b): the index sizes, e.g. 10000,100000,1000000")
    p.add_argument("--dir", help="(b): where the synthetic indexes are written (default: a temporary folder)")
    p.add_argument("--clean", action="store_true", help="(b): remove each index in --dir after its row")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json")
    a = p.parse_args()
    if not a.sizes and not (a.run and a.shards):
        p.error("give --run and --shards (a), or --sizes (b)")
    out = {}
    if a.run:
        out["quality"] = on_a_run(a)
    if a.sizes:
        out["scale"] = at_scale(a)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
