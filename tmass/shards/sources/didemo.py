"""DiDeMo in the CLIP4Clip / upstream csv format (didemo_{train,val,test}_label.csv).

Columns: success, video_path, starts, ends, text, formatted_data. One row per video; `text` is the
video's paragraph (all its captions joined). The file is videos_dir/basename(video_path); extensions
are mixed (mov, avi, mp4, mpg, m4v, wmv, 3gp, or none), and a file with the same stem is accepted.
The video id comes from formatted_data (test_data_id_7.pth -> test_data_id_00007), as upstream.
starts/ends (strings such as 'tensor([[0]])') are kept in the sample's json; every row spans 0-31 s.
"""

from __future__ import annotations

import os
import re

from .base import SourceOptions, VideoItem, anno_path, find_video, need_videos_dir, read_csv

FORMAT = "a csv with columns success, video_path, starts, ends, text, formatted_data"
_INT = re.compile(r"-?\d+")


def _video_id(formatted: str) -> str:
    stem = os.path.splitext(os.path.basename(formatted))[0]
    head, _, num = stem.rpartition("_")
    return f"{head}_{int(num):05d}" if num.isdigit() and head else stem


def _ints(s: str) -> list[int]:
    return [int(x) for x in _INT.findall(s)]


class DiDeMo:
    name = "didemo"
    splits = ("train", "val", "test")
    files = {s: f"didemo_{s}_label.csv" for s in splits}

    def items(self, split: str, opts: SourceOptions) -> list[VideoItem]:
        videos_dir = need_videos_dir(self.name, opts)
        rows = read_csv(
            anno_path(self, split, opts), ["video_path", "starts", "ends", "text", "formatted_data"], FORMAT
        )
        return [
            VideoItem(
                _video_id(r["formatted_data"]),
                [r["text"]],
                path=find_video(videos_dir, os.path.basename(r["video_path"])),
                meta={"starts": _ints(r["starts"]), "ends": _ints(r["ends"])},
            )
            for r in rows
        ]
