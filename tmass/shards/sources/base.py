"""What every source adapter returns, and the helpers they share to read annotation files strictly."""

from __future__ import annotations

import csv
import functools
import json
import os
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..transcode import VideoError


class AnnotationError(Exception):
    """An annotation file is missing or not in the expected format. The message names the file and the format."""


class Renderable(Protocol):
    def render(self) -> bytes: ...


@dataclass
class VideoItem:
    """One video and all its captions, before decoding. Cheap to pickle: the bytes are read in the worker."""

    video_id: str
    captions: list[str]
    path: str | None = None  # a file to read ...
    synth: Renderable | None = None  # ... or a generator that renders the bytes
    meta: dict[str, Any] = field(default_factory=dict)  # extra fields for the sample's json

    def read(self) -> bytes:
        if self.synth is not None:
            return self.synth.render()
        try:
            with open(self.path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise VideoError("missing file", self.path) from None
        except IsADirectoryError:
            raise VideoError("missing file", f"{self.path} is a directory") from None


@dataclass
class SourceOptions:
    """The options of every source; each adapter reads the ones it needs."""

    anno_dir: str | None = None  # folder with the dataset's annotation files, under their usual names
    anno: str | None = None  # one annotation file, overriding the usual name (a single split)
    videos_dir: str | None = None
    msrvtt_train_file: str = "9k"
    val_count: int = 0  # msrvtt: hold out this many train videos as a validation split
    charades_text: str = "script"
    video_ext: str = "mp4"
    num_videos: dict[str, int] = field(default_factory=dict)  # synthetic: videos per split
    captions_per_video: int = 5  # synthetic
    synthetic_captions: str = "full"  # synthetic: "full" (every event) or "partial" (one or two of three)
    seed: int = 0  # synthetic


class Source(Protocol):
    name: str
    splits: tuple[str, ...]  # the splits built when --splits is not given
    files: dict[str, str]  # split -> usual annotation file name (may be empty)

    def items(self, split: str, opts: SourceOptions) -> list[VideoItem]: ...


def anno_path(source: Source, split: str, opts: SourceOptions) -> str:
    """The annotation file of `split`: --anno if given, else --anno_dir / the usual file name."""
    if opts.anno:
        return opts.anno
    if split not in source.files:
        raise AnnotationError(
            f"source {source.name!r} has no split {split!r}; its splits are {', '.join(source.files)}"
        )
    if not opts.anno_dir:
        raise AnnotationError(
            f"source {source.name!r} needs --anno_dir (the folder holding {source.files[split]}) or --anno FILE"
        )
    return os.path.join(opts.anno_dir, source.files[split])


def need_videos_dir(source_name: str, opts: SourceOptions) -> str:
    if not opts.videos_dir:
        raise AnnotationError(f"source {source_name!r} needs --videos_dir (the folder holding the videos)")
    return opts.videos_dir


def _exists(path: str, expected: str) -> None:
    if not os.path.isfile(path):
        raise AnnotationError(f"{path}: file not found. Expected {expected}")


def read_csv(path: str, required: list[str], expected: str, delimiter: str = ",") -> list[dict[str, str]]:
    """Rows of a csv with a header; fail fast, naming the file, when a required column is missing."""
    _exists(path, expected)
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        header = reader.fieldnames or []
        missing = [c for c in required if c not in header]
        if missing:
            raise AnnotationError(
                f"{path}: missing column(s) {', '.join(missing)} (header: "
                f"{', '.join(header) or 'none'}). Expected {expected}"
            )
        return list(reader)


def read_json(path: str, expected: str) -> Any:
    _exists(path, expected)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise AnnotationError(f"{path}: not valid JSON ({e}). Expected {expected}") from None


def require_keys(path: str, record: Any, keys: list[str], where: str, expected: str) -> None:
    if not isinstance(record, dict) or any(k not in record for k in keys):
        have = ", ".join(record) if isinstance(record, dict) else type(record).__name__
        missing = ", ".join(k for k in keys if not isinstance(record, dict) or k not in record)
        raise AnnotationError(f"{path}: {where} lacks {missing} (has: {have}). Expected {expected}")


def group_captions(pairs: list[tuple[str, str]]) -> dict[str, list[str]]:
    """(video_id, caption) pairs -> video_id -> captions, keeping first-seen order and every caption."""
    out: dict[str, list[str]] = {}
    for vid, cap in pairs:
        out.setdefault(vid, []).append(cap)
    return out


@functools.lru_cache(maxsize=8)
def _stems(videos_dir: str) -> dict[str, str]:
    """stem -> file name, for the files of a folder (first in sorted order wins)."""
    out: dict[str, str] = {}
    try:
        for entry in sorted(os.listdir(videos_dir)):
            out.setdefault(os.path.splitext(entry)[0], entry)
    except FileNotFoundError:
        pass
    return out


def find_video(videos_dir: str, name: str, exts: tuple[str, ...] = ()) -> str:
    """`videos_dir/name` if it exists; else the file with the same stem and one of `exts` (any extension
    when `exts` is empty). When nothing matches it returns the plain path: reading it then fails as
    'missing file', which the builder counts."""
    path = os.path.join(videos_dir, name)
    if os.path.isfile(path):
        return path
    stem = os.path.splitext(name)[0] if not name.endswith(".") else name[:-1]
    for ext in exts:
        cand = os.path.join(videos_dir, f"{stem}.{ext}")
        if os.path.isfile(cand):
            return cand
    if not exts and stem in _stems(videos_dir):
        return os.path.join(videos_dir, _stems(videos_dir)[stem])
    return path
