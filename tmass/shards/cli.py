"""`python shards/build.py` / `tmass-build-shards`: videos + captions -> WebDataset shards.

Examples:
    tmass-build-shards --source synthetic --out data/synthetic
    tmass-build-shards --source msrvtt --anno_dir data/MSRVTT --videos_dir data/MSRVTT/videos --out shards/msrvtt
    tmass-build-shards --source jsonl --anno my_train.jsonl --videos_dir clips --splits train --out shards/mine
"""

from __future__ import annotations

import argparse
import os
import sys

from .build import BuildConfig, TooManyFailures, build, summary_line, summary_table
from .sources import SOURCES, AnnotationError, SourceOptions
from .sources.synthetic import CAPTION_KINDS, DEFAULT_SIZES
from .transcode import TranscodeOptions
from .writer import BuildStateError


def _size(text: str) -> float:
    units = {"k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
    t = text.strip().lower().rstrip("b")
    return float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tmass-build-shards", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--source", required=True, choices=sorted(SOURCES))
    p.add_argument("--out", required=True, help="output folder for the shards and manifests")
    p.add_argument(
        "--splits", default=None, help="comma-separated splits (default: the source's usual ones, e.g. train,test)"
    )
    _input_flags(p.add_argument_group("inputs"))
    _synthetic_flags(p.add_argument_group("synthetic corpus"))
    _normalisation_flags(p.add_argument_group("normalisation"))
    _output_flags(p.add_argument_group("output"))
    return p


def _input_flags(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--anno_dir", help="folder holding the dataset's annotation files under their usual names")
    g.add_argument("--anno", help="one annotation file (for one split); required for csv and jsonl")
    g.add_argument("--videos_dir", help="folder holding the videos")
    g.add_argument("--msrvtt_train_file", default="9k", choices=["9k", "7k"], help="msrvtt: the train list (9k)")
    g.add_argument(
        "--val_count",
        type=int,
        default=0,
        help="msrvtt: hold out this many train videos as a val split for model selection (default 0)",
    )
    g.add_argument("--charades_text", default="script", choices=["script", "descriptions"])
    g.add_argument("--video_ext", default="mp4", help="extension of vatex/charades videos (default mp4)")


def _synthetic_flags(g: argparse._ArgumentGroup) -> None:
    for split, n in DEFAULT_SIZES.items():
        g.add_argument(f"--num_{split}", type=int, default=n, help=f"videos in {split} (default {n})")
    g.add_argument("--captions_per_video", type=int, default=5, help="synthetic: captions of each video (5)")
    g.add_argument(
        "--synthetic_captions",
        default="full",
        choices=CAPTION_KINDS,
        help="synthetic: full (each caption tells all of its video) or partial (three events per video, each "
        "caption names one or two)",
    )
    g.add_argument("--seed", type=int, default=0, help="synthetic videos, and msrvtt's held-out val videos (0)")


def _normalisation_flags(g: argparse._ArgumentGroup) -> None:
    d = TranscodeOptions()
    g.add_argument("--short_side", type=int, default=d.short_side, help="downscale to this short side")
    g.add_argument("--fps", type=float, default=d.fps, help="stored frames per second (at most the source's)")
    g.add_argument("--crf", type=int, default=d.crf)
    g.add_argument("--preset", default=d.preset, help="libx264 preset")
    g.add_argument(
        "--tune",
        default=d.tune,
        help="libx264 tune (default fastdecode: ~2x faster decoding in training, ~15%% larger; '' for none)",
    )
    g.add_argument(
        "--max_frames",
        type=int,
        default=d.max_frames,
        help="if > 0, lower the fps of long clips so that at most this many frames are stored",
    )
    g.add_argument(
        "--no_transcode",
        action="store_true",
        help="store the original bytes (still probed for decodability and frame count)",
    )


def _output_flags(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--workers",
        type=int,
        default=0,
        help="worker processes (default 0: one per CPU core); the shards do not depend on it",
    )
    g.add_argument("--max_count", type=int, default=200, help="samples per shard at most")
    g.add_argument("--max_size", type=_size, default=1e9, help="bytes per shard at most, e.g. 500MB, 1GB")
    g.add_argument(
        "--max_failures",
        type=int,
        default=None,
        help="stop with an error once more inputs than this have failed (default: never)",
    )
    g.add_argument(
        "--max_failed_fraction",
        type=float,
        default=0.2,
        help="exit with an error when more than this fraction of a split's inputs failed (default 0.2)",
    )
    g.add_argument("--overwrite", action="store_true", help="rebuild the splits from scratch")
    g.add_argument("--no_progress", action="store_true")


def config_from_args(a: argparse.Namespace) -> BuildConfig:
    if a.workers < 0:
        raise ValueError("--workers must be 0 (one per CPU core) or more")
    workers = a.workers or len(os.sched_getaffinity(0))
    if not 0 <= a.max_failed_fraction <= 1:
        raise ValueError("--max_failed_fraction must be in [0, 1]")
    if a.max_count < 1:
        raise ValueError("--max_count must be at least 1")
    sizes = {s: getattr(a, f"num_{s}") for s in DEFAULT_SIZES}
    return BuildConfig(
        source=a.source,
        out=a.out,
        splits=a.splits.split(",") if a.splits else None,
        source_opts=SourceOptions(
            anno_dir=a.anno_dir,
            anno=a.anno,
            videos_dir=a.videos_dir,
            msrvtt_train_file=a.msrvtt_train_file,
            val_count=a.val_count,
            charades_text=a.charades_text,
            video_ext=a.video_ext,
            num_videos=sizes if a.source == "synthetic" else {},
            captions_per_video=a.captions_per_video,
            synthetic_captions=a.synthetic_captions,
            seed=a.seed,
        ),
        transcode=TranscodeOptions(a.short_side, a.fps, a.crf, a.preset, a.tune, a.max_frames),
        no_transcode=a.no_transcode,
        workers=workers,
        max_count=a.max_count,
        max_size=a.max_size,
        max_failures=a.max_failures,
        max_failed_fraction=a.max_failed_fraction,
        overwrite=a.overwrite,
        progress=not a.no_progress,
    )


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if cfg.source in ("csv", "jsonl") and cfg.splits and len(cfg.splits) > 1:
        print(f"error: --source {cfg.source} reads one file, so give one split (--splits NAME)", file=sys.stderr)
        return 2
    try:
        manifests = build(cfg)
    except (AnnotationError, BuildStateError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TooManyFailures as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for m in manifests:
        print(summary_line(m))
    print(summary_table(manifests))
    empty = [m["split"] for m in manifests if m["totals"]["samples"] == 0]
    if empty:
        print(
            f"error: nothing was written for {', '.join(empty)}: see the failures in "
            f"{', '.join(os.path.join(cfg.out, s + '.json') for s in empty)}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
