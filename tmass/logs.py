"""Training logs: what a run writes while it trains (RunLog: a progress bar, log lines, TensorBoard, on rank 0),
the figures gathered between two log steps (Meter), and the curves drawn back from TensorBoard to PNG
(`python -m tmass.logs RUN [RUN ...] [--out curves.png]`)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field


@dataclass
class Meter:
    """What a log step reports of the steps since the last one. The loss is summed as a tensor, so the step
    itself never waits for the device; it is read once, at the log step."""

    t0: float = field(default_factory=time.perf_counter)
    wait: float = 0.0  # seconds spent waiting for the loader
    samples: int = 0  # this rank's samples
    loss: object = 0.0  # the summed loss (a tensor once a step has run)
    n: int = 0  # micro-steps
    last: dict = field(default_factory=dict)  # the last micro-step's outputs

    def add(self, out: dict, samples: int) -> None:
        self.loss = self.loss + out["loss"].detach().float()
        self.samples += samples
        self.n += 1
        self.last = out

    def scalars(self, world: int) -> dict[str, float]:
        elapsed = time.perf_counter() - self.t0
        last = self.last
        out = {
            "train/loss": float(self.loss) / max(1, self.n),
            "train/loss_stochastic": last["loss_stochastic"],
            "train/logit_scale": last["logit_scale"],
            "train/radius_l1": last["radius_l1"],
            "perf/samples_per_s": self.samples * world / elapsed,
            "perf/samples_per_s_per_rank": self.samples / elapsed,
            "perf/data_wait_fraction": self.wait / elapsed,
        }
        for key in ("loss_support", "pos_cosine"):
            if key in last:
                out[f"train/{key}"] = last[key]
        return {k: float(v) for k, v in out.items()}


class RunLog:
    """Rank 0's progress bar, log lines (stderr and {run}/train.log) and TensorBoard ({run}/tb); on the other
    ranks every call does nothing."""

    def __init__(self, run: str, active: bool, step: int, total_steps: int, config_json: str):
        self.active, self.tb, self.file, self.bar = active, None, None, None
        if not active:
            return
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        self.tb = SummaryWriter(os.path.join(run, "tb"), purge_step=step + 1 if step else None)
        self.tb.add_text("config", "```\n" + config_json + "\n```", step)
        self.file = open(os.path.join(run, "train.log"), "a")
        self.bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", dynamic_ncols=True, mininterval=2)

    def line(self, text: str) -> None:
        if self.active:
            print(text, file=sys.stderr, flush=True)
            self.file.write(text + "\n")
            self.file.flush()

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.active:
            for k, v in values.items():
                self.tb.add_scalar(k, float(v), step)

    def advance(self) -> None:
        if self.bar:
            self.bar.update(1)

    def close_bar(self) -> None:
        if self.bar:
            self.bar.close()
            self.bar = None

    def close(self) -> None:
        self.close_bar()
        if self.active:
            self.tb.close()
            self.file.close()


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
