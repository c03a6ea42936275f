"""Benchmark: training clips per second per CPU core, shard pipeline against an upstream-style loader.

Setup: N generated clips of 640x360, 30 fps, 10-20 s, H.264 mp4 (textured and moving).
    shards       tmass's stream: decord from the bytes of shards built with the default normalisation
                 (224 short side, 3 fps), 12 uniform frames, RandomResizedCrop + flip in uint8, batches of 32
    upstream     OpenCV opens each file and seeks to each of the 12 frames, then float transforms
                 (RandomResizedCrop, flip, normalize), as the upstream loader does; run on
                   raw             the 640x360 30 fps files
                   precompressed   the same clips at 224 short side, 3 fps, plain libx264 (CLIP4Clip's prep)
Everything runs in one process with one thread (torch, OpenCV): the figures are per core.

    python bench/loader.py                        # 16 clips
    python bench/loader.py --num 2 --seconds 1 --clips 8 --json r.json   # what the tests run
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time


HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from tmass.data.stream import DataConfig, TrainStream, make_loader  # noqa: E402
from tmass.data.tokenizer import build_caption_tokenizer  # noqa: E402
from tmass.config import OPENAI_CLIP_MEAN as CLIP_MEAN, OPENAI_CLIP_STD as CLIP_STD  # noqa: E402
from tmass.data.transforms import crop_box  # noqa: E402
from tmass.data.video import frame_indices  # noqa: E402


def upstream_clip(path: str, num_frames: int, size: int, rng: random.Random) -> torch.Tensor:
    """The upstream recipe: OpenCV seek + read per frame, then float transforms on [F, 3, H, W]."""
    import cv2

    cap = cv2.VideoCapture(path)
    vlen = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    frames = []
    for idx in frame_indices(vlen, num_frames, "uniform"):
        cap.set(cv2.CAP_PROP_POS_FRAMES, idx)
        ok, frame = cap.read()
        if ok:
            frames.append(torch.from_numpy(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)).permute(2, 0, 1))
    cap.release()
    x = torch.stack(frames).float() / 255.0
    top, left, h, w = crop_box(x.shape[2], x.shape[3], rng)
    x = F.interpolate(x[:, :, top : top + h, left : left + w], size=(size, size), mode="bilinear", antialias=True)
    if rng.random() < 0.5:
        x = x.flip(-1)
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    return (x - mean) / std


def time_upstream(paths: list[str], clips: int, num_frames: int, size: int) -> float:
    rng = random.Random(0)
    upstream_clip(paths[0], num_frames, size, rng)  # warm-up
    t = time.perf_counter()
    for i in range(clips):
        upstream_clip(paths[i % len(paths)], num_frames, size, rng)
    return clips / (time.perf_counter() - t)


def time_shards(urls: list[str], tok, clips: int, batch: int, num_frames: int, size: int, workers: int = 0) -> float:
    """Clips/s of the training stream with `workers` loader processes (0: in this process)."""
    cfg = DataConfig(input_res=size, num_workers=workers, decode_timeout=0, shuffle_buffer=64, shuffle_initial=8)
    n_batches = max(1, clips // batch) + max(1, workers)
    stream = TrainStream(urls, cfg, tok, n_batches, batch_size=batch, num_frames=num_frames, seed=24)
    it = iter(make_loader(stream, workers))
    next(it)  # warm-up: imports, workers started, first decode
    t = time.perf_counter()
    got = sum(b["video"].shape[0] for b in it)
    return got / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num", type=int, default=16, help="generated clips")
    p.add_argument("--seconds", type=float, default=0, help="clip length (default: 10 to 20 s)")
    p.add_argument("--clips", type=int, default=128, help="clips timed for the shard pipeline")
    p.add_argument("--upstream_clips", type=int, default=16, help="clips timed for each upstream run")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--json")
    a = p.parse_args()
    # the encoder (PyAV) only here, so that gpu_train.py can import time_shards on a machine without it
    from build_shards import clip_corpus  # the textured test clips of the shard benchmark
    from tmass.shards.build import BuildConfig, build
    from tmass.shards.sources import SourceOptions
    from tmass.shards.transcode import TranscodeOptions, transcode

    torch.set_num_threads(1)
    import cv2

    cv2.setNumThreads(1)
    with tempfile.TemporaryDirectory() as tmp:
        raw, csv, names = clip_corpus(
            tmp, [a.seconds or 10 + 10 * i / max(1, a.num - 1) for i in range(a.num)], "a red box moves right"
        )
        pre = os.path.join(tmp, "pre")
        os.makedirs(pre)
        for n in names:
            with open(os.path.join(raw, n), "rb") as f:
                small, _ = transcode(f.read(), TranscodeOptions(short_side=224, fps=3, tune=""))  # as CLIP4Clip
            with open(os.path.join(pre, n), "wb") as f:
                f.write(small)
        (m,) = build(
            BuildConfig(
                source="csv",
                out=os.path.join(tmp, "shards"),
                splits=["train"],
                workers=2,
                max_count=4,
                progress=False,
                source_opts=SourceOptions(anno=csv, videos_dir=raw),
            )
        )
        urls = [os.path.join(tmp, "shards", s["shard"]) for s in m["shards"]]
        tok = build_caption_tokenizer(["a red box moves right"])
        rows = {
            "shards": time_shards(urls, tok, a.clips, a.batch, a.frames, a.size),
            "upstream raw": time_upstream([os.path.join(raw, n) for n in names], a.upstream_clips, a.frames, a.size),
            "upstream precompressed": time_upstream(
                [os.path.join(pre, n) for n in names], a.upstream_clips, a.frames, a.size
            ),
        }
    print(f"\nclips/s on one core: {a.frames} frames, {a.size}x{a.size}, training transforms, batches of {a.batch}")
    print(f"{'loader':>24} {'clips/s':>8} {'shards vs it':>13}")
    for name, v in rows.items():
        print(f"{name:>24} {v:>8.2f} {rows['shards'] / v:>12.2f}x")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(
                {"clips_per_s_per_core": {k: round(v, 3) for k, v in rows.items()}, "setup": vars(a)}, f, indent=1
            )


if __name__ == "__main__":
    main()
