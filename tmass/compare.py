"""T-MASS against the X-Pool baseline over seeds, as `launch/demo.sh --compare --seeds K` runs them: per corpus
the mean ± standard deviation over seeds of t2v and v2t R@1, R@5 and MdR, the paired difference T-MASS - X-Pool
with its spread, the ablations, and two pictures (validation curves of both methods; the learned radius against
the text-video similarity over training).

    python -m tmass.compare OUT --seeds 3 [--corpora full,partial] [--data full=DIR,partial=DIR]

Runs are read from OUT/cmp_{corpus}_s{seed}_{method}: method `tmass` and `xpool` (test_results.json), and for
the ablations `nosupport` (trained without the support loss) and the T-MASS run's extra evaluations
test_{deterministic,trials1,per_pair}.json. The spread is the sample standard deviation (0 for one seed).
--data adds each synthetic corpus's ceiling: the expected metrics of an oracle that knows every test video's
events and ranks the candidates that fit the query (a caption whose events occur, in order, among a video's;
for v2t, the captions that fit the video) first, in random order (oracle()).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics

from .files import write_json_atomic
from .logs import read_scalars

METRICS = (("t2v", "R@1"), ("t2v", "R@5"), ("t2v", "MdR"), ("v2t", "R@1"), ("v2t", "R@5"), ("v2t", "MdR"))
ABLATIONS = (  # (label, run method, results file in that run)
    ("T-MASS (support loss 0.8, 20 trials, per_text)", "tmass", "test_results.json"),
    ("no support loss", "nosupport", "test_results.json"),
    ("T-MASS model, deterministic evaluation", "tmass", "test_deterministic.json"),
    ("T-MASS model, 1 trial", "tmass", "test_trials1.json"),
    ("T-MASS model, per_pair noise", "tmass", "test_per_pair.json"),
    ("X-Pool baseline", "xpool", "test_results.json"),
)


def run_dir(out: str, corpus: str, seed: int, method: str) -> str:
    return os.path.join(out, f"cmp_{corpus}_s{seed}_{method}")


def metrics_of(path: str) -> list[float]:
    with open(path) as f:
        r = json.load(f)
    return [float(r[d][m]) for d, m in METRICS]


def spread(values: list[float]) -> tuple[float, float]:
    """(mean, sample standard deviation; 0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(out: str, corpus: str, seeds: list[int], rows: tuple = ABLATIONS[:1] + ABLATIONS[-1:]) -> dict:
    """{label: [(mean, std) per metric]} and the paired difference of the first row against the last."""
    per_row = {}
    for label, method, name in rows:
        files = [os.path.join(run_dir(out, corpus, s, method), name) for s in seeds]
        if all(os.path.exists(f) for f in files):
            per_row[label] = [metrics_of(f) for f in files]
    table = {label: [spread(list(col)) for col in zip(*vals)] for label, vals in per_row.items()}
    first, last = rows[0][0], rows[-1][0]
    if first in per_row and last in per_row:
        diffs = [[a - b for a, b in zip(x, y)] for x, y in zip(per_row[first], per_row[last])]
        table["T-MASS - X-Pool (paired)"] = [spread(list(col)) for col in zip(*diffs)]
    return table


ORACLE = "oracle: knows every video's events (ceiling)"


def fits(named: tuple, events: tuple) -> bool:
    """Do the events `named` occur, in this order, among `events` (an ordered subsequence)?"""
    it = iter(events)
    return all(any(e == x for x in it) for e in named)


def corpus_events(data: str) -> tuple[list[tuple], list[tuple]]:
    """(each test video's events, each test caption's (video index, the events it names)) of a synthetic corpus,
    made again from its test split's manifest options and checked against the captions in its shards."""
    import webdataset as wds

    from .errors import DataError
    from .shards.sources.synthetic import make_videos

    with open(os.path.join(data, "test.json")) as f:
        manifest = json.load(f)
    opts = manifest["options"]["source_opts"]
    n = manifest["totals"]["samples"]
    videos = make_videos("test", n, opts["seed"], opts.get("synthetic_captions") or "full")
    named = [v.named_captions(opts["captions_per_video"]) for v in videos]
    urls = [os.path.join(data, s["shard"]) for s in manifest["shards"]]
    for s in wds.WebDataset(urls, shardshuffle=False, nodesplitter=lambda x: x):
        i = int(s["__key__"].rsplit("_", 1)[1])
        if json.loads(s["json"])["captions"] != [t for t, _ in named[i]]:
            raise DataError(f"{data}: {s['__key__']}'s captions are not those its manifest's options make")
    events = [v.events for v in videos]
    return events, [(i, tuple(events[i][k] for k in idx)) for i, caps in enumerate(named) for _, idx in caps]


def oracle(data: str) -> list[tuple[float, float]]:
    """The ceiling's [(value, 0)] per METRICS: the right answer's rank is uniform among the C candidates that fit,
    so t2v R@k = mean min(1, k / C); for v2t, the first of a video's o own captions among its C fitting ones is
    within k with 1 - comb(C - o, k) / comb(C, k); MdR is the median of the expected ranks, (C + 1) / (o + 1)."""
    events, captions = corpus_events(data)
    c_t = [sum(fits(named, ev) for ev in events) for _, named in captions]
    own = [sum(i == v for i, _ in captions) for v in range(len(events))]
    c_v = [sum(fits(named, ev) for _, named in captions) for ev in events]

    def at(k: int, c: int, o: int) -> float:
        return 1.0 if k >= c else 1.0 - math.comb(c - o, k) / math.comb(c, k)

    t2v = [100 * statistics.fmean(at(k, c, 1) for c in c_t) for k in (1, 5)] + [
        statistics.median((c + 1) / 2 for c in c_t)
    ]
    v2t = [100 * statistics.fmean(at(k, c, o) for c, o in zip(c_v, own)) for k in (1, 5)] + [
        statistics.median((c + 1) / (o + 1) for c, o in zip(c_v, own))
    ]
    return [(x, 0.0) for x in t2v + v2t]


def format_table(title: str, table: dict) -> str:
    head = f"{title:48}" + "".join(f"{d + ' ' + m:>16}" for d, m in METRICS)
    lines = [head]
    for label, cells in table.items():
        lines.append(f"{label:48}" + "".join(f"{f'{m:.2f} ± {s:.2f}':>16}" for m, s in cells))
    return "\n".join(lines)


def plot(out: str, corpora: list[str], seeds: list[int], curves_png: str, radius_png: str) -> None:
    """Validation t2v R@1 against the step, per corpus and method (one thin line per seed); and for T-MASS the
    mean radius (sum over D of R) against the mean cosine of each text with its own video pooled by it, one line
    per run, from its first log step (o) to its last (x)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(corpora), figsize=(5.5 * len(corpora), 4), squeeze=False)
    fig2, ax_r = plt.subplots(figsize=(6, 4.5))
    for ax, corpus in zip(axes[0], corpora):
        for method, colour in (("tmass", "tab:red"), ("xpool", "tab:blue")):
            for k, seed in enumerate(seeds):
                s = read_scalars(run_dir(out, corpus, seed, method))
                if "val/t2v_R@1" in s:
                    ax.plot(*zip(*s["val/t2v_R@1"]), color=colour, alpha=0.7, label=method if k == 0 else None)
                if method == "tmass" and "train/radius_l1" in s and "train/pos_cosine" in s:
                    xs, ys = [v for _, v in s["train/pos_cosine"]], [v for _, v in s["train/radius_l1"]]
                    line = ax_r.plot(xs, ys, alpha=0.8, label=f"{corpus} seed {seed}")[0]
                    ax_r.plot(xs[:1], ys[:1], "o", xs[-1:], ys[-1:], "x", color=line.get_color())
        ax.set(title=f"{corpus} captions: validation t2v R@1", xlabel="step", ylabel="R@1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax_r.set(
        title="T-MASS: learned radius over training",
        xlabel="cos(t, psi(v | t)) of the batch's pairs",
        ylabel="mean radius, sum over D of R",
    )
    ax_r.grid(alpha=0.3)
    ax_r.legend(fontsize=7)
    for f, path in ((fig, curves_png), (fig2, radius_png)):
        f.tight_layout()
        f.savefig(path, dpi=110)
        plt.close(f)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="the folder holding the runs (demo.sh's OUT)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--corpora", default="full,partial")
    p.add_argument("--data", default="", help="corpus=DIR,...: the synthetic corpora's shards, for their ceiling")
    a = p.parse_args(argv)
    seeds, corpora = list(range(1, a.seeds + 1)), a.corpora.split(",")
    data = dict(item.split("=", 1) for item in a.data.split(",") if item)
    report = {}
    for corpus in corpora:
        report[corpus] = summarise(a.out, corpus, seeds)
        if corpus in data:
            report[corpus][ORACLE] = oracle(data[corpus])
        print("\n" + format_table(f"{corpus} captions, {len(seeds)} seed(s), held-out test", report[corpus]))
    if "partial" in corpora:
        report["ablations"] = summarise(a.out, "partial", seeds, ABLATIONS)
        print("\n" + format_table("ablations, partial captions", report["ablations"]))
    curves, radius = os.path.join(a.out, "compare_curves.png"), os.path.join(a.out, "compare_radius.png")
    plot(a.out, corpora, seeds, curves, radius)
    write_json_atomic(os.path.join(a.out, "compare.json"), report)
    print(f"\ncurves: {curves}   radius: {radius}   table: {os.path.join(a.out, 'compare.json')}")


if __name__ == "__main__":
    main()
