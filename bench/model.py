"""Benchmark: T-MASS forward + backward time and peak memory.

Default: ViT-B/16, 12 frames at 224x224, batch 8, random weights, the support loss on, for
{fp32, bf16 autocast} x {without, with activation checkpointing}. Each configuration runs in a fresh process
so that its peak memory is its own (peak RSS on the CPU; peak allocated GPU memory on a GPU, where it runs
unchanged). Prints a table; --json writes it.

    python bench/model.py                      # ViT-B/16 on this machine's CPU
    python bench/model.py --tiny --steps 1     # the tiny model (what the tests run)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def run_one(arch: str, batch: int, frames: int, precision: str, ckpt: bool, steps: int) -> dict:
    import torch

    from tmass.config import ModelConfig
    from tmass.model.tmass import TMASS

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = (
        TMASS(ModelConfig(clip_arch=arch, num_frames=frames, support_loss_weight=0.8, grad_checkpointing=ckpt))
        .to(device)
        .train()
    )
    res = model.clip.config.vision_config.image_size
    ids = torch.randint(0, 49000, (batch, 32), device=device)
    ids[:, -1] = 49407
    video = torch.randn(batch, frames, 3, res, res, device=device)
    eps = torch.rand(batch, model.dim, device=device)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(ids, None, video, eps)["loss"]
        loss.backward()
        model.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up
    t = time.perf_counter()
    for _ in range(steps):
        step()
    dt = (time.perf_counter() - t) / steps
    out = {
        "device": device,
        "arch": arch,
        "batch": batch,
        "frames": frames,
        "precision": precision,
        "checkpointing": ckpt,
        "step_s": round(dt, 3),
        "clips_per_s": round(batch / dt, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "rss_before_mb": round(rss_before),
    }
    if device == "cuda":
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
        out["gpu"] = torch.cuda.get_device_name()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="ViT-B/16")
    p.add_argument("--tiny", action="store_true", help="the tiny CLIP (32x32 frames) instead of --arch")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--steps", type=int, default=1, help="timed steps after one warm-up step")
    p.add_argument("--json")
    p.add_argument("--one", help=argparse.SUPPRESS)  # "precision,ckpt": run one configuration in this process
    a = p.parse_args()
    arch = "tiny" if a.tiny else a.arch
    if a.one:
        precision, ckpt = a.one.split(",")
        print(json.dumps(run_one(arch, a.batch, a.frames, precision, ckpt == "1", a.steps)))
        return
    rows = []
    for precision in ("fp32", "bf16"):
        for ckpt in ("0", "1"):
            cmd = [
                sys.executable,
                os.path.abspath(__file__),
                "--one",
                f"{precision},{ckpt}",
                "--arch",
                arch,
                "--batch",
                str(a.batch),
                "--frames",
                str(a.frames),
                "--steps",
                str(a.steps),
            ]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr}")
            rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
            print(f"  {precision} checkpointing={ckpt}: {rows[-1]['step_s']} s/step", file=sys.stderr)
    gpu = rows[0]["device"] == "cuda"
    mem = "peak GPU MB" if gpu else "peak RSS MB"
    print(f"\nT-MASS {arch}, batch {a.batch} x {a.frames} frames, forward+backward on {rows[0]['device']}")
    print(f"{'precision':>9} {'ckpt':>5} {'s/step':>8} {'clips/s':>8} {mem:>12} {'vs fp32':>8}")
    base = rows[0]["step_s"]
    for r in rows:
        print(
            f"{r['precision']:>9} {str(r['checkpointing']):>5} {r['step_s']:>8.3f} {r['clips_per_s']:>8.2f} "
            f"{r['peak_gpu_mb'] if gpu else r['peak_rss_mb']:>12} {base / r['step_s']:>7.2f}x"
        )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
