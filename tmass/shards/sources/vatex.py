"""VATEX: a json list of {videoID, enCap: [10 English captions], chCap, ...}; the file is named by
videoID ({videos_dir}/{videoID}.{--video_ext}, or any file with that stem)."""

from __future__ import annotations

from .base import (
    SourceOptions,
    VideoItem,
    anno_path,
    find_video,
    need_videos_dir,
    read_json,
    require_keys,
    AnnotationError,
)

FORMAT = "the VATEX json: a list of {videoID, enCap: [English captions], ...}"


class VATEX:
    name = "vatex"
    splits = ("train", "val", "test")
    files = {
        "train": "vatex_training_v1.0.json",
        "val": "vatex_validation_v1.0.json",
        "test": "vatex_public_test_english_v1.1.json",
    }

    def items(self, split: str, opts: SourceOptions) -> list[VideoItem]:
        videos_dir = need_videos_dir(self.name, opts)
        path = anno_path(self, split, opts)
        data = read_json(path, FORMAT)
        if not isinstance(data, list):
            raise AnnotationError(f"{path}: top level is {type(data).__name__}, not a list. Expected {FORMAT}")
        out = []
        for i, rec in enumerate(data):
            require_keys(path, rec, ["videoID", "enCap"], f"entry {i}", FORMAT)
            out.append(
                VideoItem(
                    rec["videoID"],
                    list(rec["enCap"]),
                    path=find_video(videos_dir, f"{rec['videoID']}.{opts.video_ext}"),
                )
            )
        return out
