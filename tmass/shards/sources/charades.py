"""Charades: Charades_v1_{train,test}.csv (id, subject, scene, quality, relevance, verified, script,
objects, descriptions, actions, length). Text = `script`, or `descriptions` with --charades_text.
Videos at {videos_dir}/{id}.{--video_ext} (Charades ships mp4)."""

from __future__ import annotations

from .base import AnnotationError, SourceOptions, VideoItem, anno_path, find_video, need_videos_dir, read_csv

FORMAT = "Charades_v1_{train,test}.csv with columns id, script, descriptions (and the others)"


class Charades:
    name = "charades"
    splits = ("train", "test")
    files = {"train": "Charades_v1_train.csv", "test": "Charades_v1_test.csv"}

    def items(self, split: str, opts: SourceOptions) -> list[VideoItem]:
        if opts.charades_text not in ("script", "descriptions"):
            raise AnnotationError(f"--charades_text must be script or descriptions, not {opts.charades_text!r}")
        videos_dir = need_videos_dir(self.name, opts)
        rows = read_csv(anno_path(self, split, opts), ["id", opts.charades_text], FORMAT)
        return [
            VideoItem(
                r["id"],
                [r[opts.charades_text]],
                path=find_video(videos_dir, f"{r['id']}.{opts.video_ext}"),
                meta={"length_s": r.get("length")} if r.get("length") else {},
            )
            for r in rows
        ]
