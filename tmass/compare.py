"""T-MASS against the X-Pool baseline over seeds, as `launch/demo.sh --compare --seeds K` runs them: per corpus
the mean ± standard deviation over seeds of t2v and v2t R@1, R@5 and MdR, the paired difference T-MASS - X-Pool
with its spread, the ablations, and two pictures (validation curves of both methods; the learned radius against
the text-video similarity over training).

    python -m tmass.compare OUT --seeds 3 [--corpora full,partial]

Runs are read from OUT/cmp_{corpus}_s{seed}_{method}: method `tmass` and `xpool` (test_results.json), and for
the ablations `nosupport` (trained without the support loss) and the T-MASS run's extra evaluations
test_{deterministic,trials1,per_pair}.json. The spread is the sample standard deviation (0 for one seed).
"""

from __future__ import annotations

import argparse
import json
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
    a = p.parse_args(argv)
    seeds, corpora = list(range(1, a.seeds + 1)), a.corpora.split(",")
    report = {}
    for corpus in corpora:
        report[corpus] = summarise(a.out, corpus, seeds)
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
