"""LSMDC16 (the CLIP4Clip / upstream split files; they need MPII's permission).

Tab-separated lines with 6 fields: clip id in field 0 (a leading '"' is stripped), caption in field 5.
Every caption of a repeated clip id is kept (upstream collapses them into one).
Path rule: {videos_dir}/{clip_id.split('.')[0][:-3]}/{clip_id}.avi, e.g.
    0001_American_Beauty_00.00.51.926-00.00.54.129
    -> 0001_American_Beauty/0001_American_Beauty_00.00.51.926-00.00.54.129.avi
"""

from __future__ import annotations

import os

from .base import AnnotationError, SourceOptions, VideoItem, anno_path, group_captions, need_videos_dir

FORMAT = "LSMDC16 tab-separated lines of 6 fields: clip_id, start, end, start_aligned, end_aligned, caption"


def clip_path(videos_dir: str, clip_id: str) -> str:
    return os.path.join(videos_dir, clip_id.split(".")[0][:-3], f"{clip_id}.avi")


class LSMDC:
    name = "lsmdc"
    splits = ("train", "val", "test")
    files = {
        "train": "LSMDC16_annos_training.csv",
        "val": "LSMDC16_annos_val.csv",
        "test": "LSMDC16_challenge_1000_publictect.csv",
    }

    def items(self, split: str, opts: SourceOptions) -> list[VideoItem]:
        videos_dir = need_videos_dir(self.name, opts)
        path = anno_path(self, split, opts)
        if not os.path.isfile(path):
            raise AnnotationError(f"{path}: file not found. Expected {FORMAT}")
        pairs = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                fields = line.rstrip("\n").split("\t")
                if len(fields) < 6:
                    raise AnnotationError(
                        f"{path}:{n}: {len(fields)} tab-separated field(s), expected 6. Expected {FORMAT}"
                    )
                pairs.append((fields[0].lstrip('"'), fields[5]))
        return [VideoItem(cid, caps, path=clip_path(videos_dir, cid)) for cid, caps in group_captions(pairs).items()]
