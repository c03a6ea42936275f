"""Training curves as a picture: the loss and the validation R@1 of a run, read back from its TensorBoard
events and drawn to PNG (`python -m tmass.logs RUN [RUN ...] [--out curves.png]`)."""
from __future__ import annotations

import argparse
import os


def read_scalars(run_dir: str) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(run_dir, "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def plot_curves(run_dirs: list[str], out_png: str) -> str:
    """Two panels: training loss and validation t2v / v2t R@1 against the step, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_r1) = plt.subplots(1, 2, figsize=(11, 4))
    for run in run_dirs:
        name = os.path.basename(os.path.normpath(run))
        s = read_scalars(run)
        if "train/loss" in s:
            ax_loss.plot(*zip(*s["train/loss"]), label=name)
        for tag, style in (("val/t2v_R@1", "-"), ("val/v2t_R@1", "--")):
            if tag in s:
                ax_r1.plot(*zip(*s[tag]), style, marker="o", ms=3, label=f"{name} {tag[4:7]}")
    ax_loss.set(title="training loss", xlabel="step", ylabel="loss")
    ax_r1.set(title="validation R@1", xlabel="step", ylabel="R@1 (%)")
    for ax in (ax_loss, ax_r1):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("runs", nargs="+", help="run directories (outputs/EXP)")
    p.add_argument("--out", help="the PNG (default: RUN/curves.png of the first run)")
    a = p.parse_args()
    print(plot_curves(a.runs, a.out or os.path.join(a.runs[0], "curves.png")))


if __name__ == "__main__":
    main()
