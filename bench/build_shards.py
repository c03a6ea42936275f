"""Benchmark: shard-builder transcoding throughput for 1 and 2 workers.

Generates N clips of 640x360 at 30 fps (default 10 s, textured and moving, so that the H.264 bitrate is
close to real footage), then builds shards from them with the default normalisation (224 short side,
3 fps) and prints videos/s in all and per worker.

    python bench/build_shards.py                 # 12 clips of 10 s, workers 1 and 2
    python bench/build_shards.py --num 4 --seconds 1 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from fractions import Fraction

import av
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tmass.shards.build import BuildConfig, build  # noqa: E402
from tmass.shards.sources import SourceOptions  # noqa: E402


def make_clip(path: str, seed: int, width: int, height: int, fps: int, seconds: float) -> None:
    """A panning textured background with a moving bright box, libx264 crf 23: a realistic bitrate."""
    rng = np.random.default_rng(seed)
    cells = rng.integers(0, 255, size=(height // 16 + 2, (width + 2 * fps * int(seconds + 1)) // 16 + 2, 3))
    texture = np.kron(cells, np.ones((16, 16, 1))).astype(np.float32)
    for axis in (0, 1):  # a box blur: smooth, image-like texture rather than white noise
        c = np.cumsum(texture, axis=axis)
        n = c.shape[axis]
        texture = (np.take(c, range(16, n), axis=axis) - np.take(c, range(0, n - 16), axis=axis)) / 16
    texture = texture.astype(np.uint8)
    with av.open(path, mode="w") as out:
        s = out.add_stream("libx264", rate=Fraction(fps))
        s.width, s.height, s.pix_fmt = width, height, "yuv420p"
        s.options = {"crf": "23", "preset": "veryfast"}
        for i in range(int(fps * seconds)):
            img = texture[:height, i * 2 : i * 2 + width].copy()
            x = int((width - 60) * i / (fps * seconds))
            img[height // 3 : height // 3 + 60, x : x + 60] = (250, 40, 40)
            out.mux(s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        out.mux(s.encode(None))


def clip_corpus(root: str, seconds, caption: str = "clip {i}") -> tuple[str, str, list[str]]:
    """make_clip for each entry of `seconds` (clip i lasts seconds[i]) into root/videos, and root/list.csv for
    the csv source: (videos dir, csv path, names)."""
    vids = os.path.join(root, "videos")
    os.makedirs(vids, exist_ok=True)
    names = [f"clip{i:04d}.mp4" for i in range(len(seconds))]
    for i, (name, secs) in enumerate(zip(names, seconds)):
        make_clip(os.path.join(vids, name), i, 640, 360, 30, secs)
    csv = os.path.join(root, "list.csv")
    with open(csv, "w") as f:
        f.write("video,caption\n" + "".join(f"{n},{caption.format(i=i)}\n" for i, n in enumerate(names)))
    return vids, csv, names


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num", type=int, default=12)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--workers", default="1,2")
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t = time.time()
        vids, csv, _ = clip_corpus(tmp, [a.seconds] * a.num)
        src_mb = sum(os.path.getsize(os.path.join(vids, f)) for f in os.listdir(vids)) / 1e6
        print(
            f"generated {a.num} clips of 640x360, 30 fps, {a.seconds:g} s ({src_mb:.1f} MB) in {time.time() - t:.1f} s"
        )
        rows = []
        for w in map(int, a.workers.split(",")):
            cfg = BuildConfig(
                source="csv",
                out=os.path.join(tmp, f"out{w}"),
                splits=["train"],
                workers=w,
                source_opts=SourceOptions(anno=csv, videos_dir=vids),
                progress=False,
            )
            t = time.time()
            (m,) = build(cfg)
            dt = time.time() - t
            assert m["totals"]["samples"] == a.num, m["failures"]
            rows.append(
                {
                    "workers": w,
                    "videos": a.num,
                    "seconds": round(dt, 2),
                    "videos_per_s": round(a.num / dt, 2),
                    "videos_per_s_per_worker": round(a.num / dt / w, 2),
                    "out_mb": round(m["totals"]["bytes"] / 1e6, 2),
                }
            )
    print(f"\n{'workers':>7} {'videos':>6} {'time s':>7} {'videos/s':>9} {'per worker':>10} {'out MB':>7}")
    for r in rows:
        print(
            f"{r['workers']:>7} {r['videos']:>6} {r['seconds']:>7.2f} {r['videos_per_s']:>9.2f} "
            f"{r['videos_per_s_per_worker']:>10.2f} {r['out_mb']:>7.2f}"
        )
    if len(rows) > 1:
        print(
            f"speed-up {rows[-1]['workers']} vs {rows[0]['workers']} workers: "
            f"{rows[-1]['videos_per_s'] / rows[0]['videos_per_s']:.2f}x"
        )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(
                {"clip": {"width": 640, "height": 360, "fps": 30, "seconds": a.seconds}, "results": rows}, f, indent=1
            )


if __name__ == "__main__":
    main()
