"""Your own list of videos and captions, as csv or jsonl (one file per split, given with --anno).

csv:   a header with `video` (a path, relative to --videos_dir unless absolute) and `caption`;
       optional `video_id`. Rows of the same video are merged, so a video may have many captions.
jsonl: one object per line: {"video": path, "caption": str} or {"video": path, "captions": [str, ...]},
       optional "video_id". Lines of the same video are merged as in csv.
The video id defaults to the file name without its extension.
"""

from __future__ import annotations

import json
import os

from .base import AnnotationError, SourceOptions, VideoItem, read_csv

CSV_FORMAT = "a csv with a header and columns video, caption (optional video_id)"
JSONL_FORMAT = 'JSON lines such as {"video": "a.mp4", "caption": "..."} or {"video": ..., "captions": [...]}'


def _need_anno(name: str, opts: SourceOptions) -> str:
    if not opts.anno:
        raise AnnotationError(f"source {name!r} needs --anno FILE (one file per split, with --splits NAME)")
    return opts.anno


def _merge(records: list[tuple[str, str | None, list[str]]], videos_dir: str | None) -> list[VideoItem]:
    items: dict[str, VideoItem] = {}
    for video, vid, caps in records:
        path = video if os.path.isabs(video) or not videos_dir else os.path.join(videos_dir, video)
        vid = vid or os.path.splitext(os.path.basename(video))[0]
        if path in items:
            items[path].captions.extend(caps)
        else:
            items[path] = VideoItem(vid, list(caps), path=path)
    return list(items.values())


class CSVSource:
    name = "csv"
    splits = ("train",)
    files: dict[str, str] = {}

    def items(self, split: str, opts: SourceOptions) -> list[VideoItem]:
        rows = read_csv(_need_anno(self.name, opts), ["video", "caption"], CSV_FORMAT)
        return _merge([(r["video"], r.get("video_id") or None, [r["caption"]]) for r in rows], opts.videos_dir)


class JSONLSource:
    name = "jsonl"
    splits = ("train",)
    files: dict[str, str] = {}

    def items(self, split: str, opts: SourceOptions) -> list[VideoItem]:
        path = _need_anno(self.name, opts)
        if not os.path.isfile(path):
            raise AnnotationError(f"{path}: file not found. Expected {JSONL_FORMAT}")
        records = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise AnnotationError(f"{path}:{n}: not JSON ({e}). Expected {JSONL_FORMAT}") from None
                if not isinstance(rec, dict) or "video" not in rec or not ("caption" in rec or "captions" in rec):
                    raise AnnotationError(
                        f"{path}:{n}: needs 'video' and 'caption' or 'captions'. Expected {JSONL_FORMAT}"
                    )
                caps = rec["captions"] if "captions" in rec else [rec["caption"]]
                if isinstance(caps, str) or not isinstance(caps, list):
                    raise AnnotationError(f"{path}:{n}: 'captions' must be a list of strings. Expected {JSONL_FORMAT}")
                records.append((rec["video"], rec.get("video_id"), [str(c) for c in caps]))
        return _merge(records, opts.videos_dir)
