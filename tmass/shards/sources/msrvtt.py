"""MSR-VTT in the CLIP4Clip layout: MSRVTT_data.json + MSRVTT_train.{9k,7k}.csv + MSRVTT_JSFUSION_test.csv.

train: every video of the train csv, carrying all its (usually 20) captions from the json.
val:   with --val_count N, N videos of the train csv held out of train (chosen by --seed), for model selection;
       MSR-VTT has no validation split of its own, and selecting on the test split leaks it.
test:  the 1k-A split, one row per (video, sentence) of MSRVTT_JSFUSION_test.csv.
Videos at {videos_dir}/{video_id}.mp4.
"""

from __future__ import annotations

import os
import random

from .base import (
    AnnotationError,
    SourceOptions,
    VideoItem,
    anno_path,
    group_captions,
    need_videos_dir,
    read_csv,
    read_json,
    require_keys,
)

JSON_FORMAT = (
    "MSRVTT_data.json in the CLIP4Clip format: an object with 'sentences': "
    "[{video_id, caption, sen_id}, ...] and 'videos': [...]"
)
TRAIN_FORMAT = "MSRVTT_train.9k.csv / MSRVTT_train.7k.csv with a header and a column video_id"
TEST_FORMAT = "MSRVTT_JSFUSION_test.csv with columns key, vid_key, video_id, sentence"


class MSRVTT:
    name = "msrvtt"
    splits = ("train", "test")
    files = {"train": "MSRVTT_train.9k.csv", "test": "MSRVTT_JSFUSION_test.csv"}

    def splits_for(self, opts: SourceOptions) -> tuple[str, ...]:
        return ("train", "val", "test") if opts.val_count > 0 else self.splits

    def items(self, split: str, opts: SourceOptions) -> list[VideoItem]:
        videos_dir = need_videos_dir(self.name, opts)
        if split == "val" and opts.val_count <= 0:
            raise AnnotationError(
                "msrvtt has no validation split of its own: pass --val_count N to hold out N "
                "train videos (e.g. --val_count 500)"
            )
        if split in ("train", "val"):
            if opts.msrvtt_train_file not in ("9k", "7k"):
                raise AnnotationError(f"--msrvtt_train_file must be 9k or 7k, not {opts.msrvtt_train_file!r}")
            train_csv = opts.anno or os.path.join(opts.anno_dir or ".", f"MSRVTT_train.{opts.msrvtt_train_file}.csv")
            ids = [r["video_id"] for r in read_csv(train_csv, ["video_id"], TRAIN_FORMAT)]
            data_json = os.path.join(opts.anno_dir or os.path.dirname(train_csv), "MSRVTT_data.json")
            data = read_json(data_json, JSON_FORMAT)
            require_keys(data_json, data, ["sentences"], "the top-level object", JSON_FORMAT)
            for i, s in enumerate(data["sentences"][:1]):
                require_keys(data_json, s, ["video_id", "caption"], f"sentences[{i}]", JSON_FORMAT)
            caps = group_captions([(s["video_id"], s["caption"]) for s in data["sentences"]])
            pairs = [(vid, caps.get(vid, [])) for vid in ids]
            if opts.val_count > 0:
                if opts.val_count >= len(ids):
                    raise AnnotationError(
                        f"--val_count {opts.val_count} leaves no training video ({len(ids)} in {train_csv})"
                    )
                held = set(random.Random(f"msrvtt-val-{opts.seed}").sample(sorted(ids), opts.val_count))
                pairs = [(v, c) for v, c in pairs if (v in held) == (split == "val")]
        else:
            rows = read_csv(anno_path(self, split, opts), ["video_id", "sentence"], TEST_FORMAT)
            pairs = list(group_captions([(r["video_id"], r["sentence"]) for r in rows]).items())
        return [VideoItem(vid, list(c), path=os.path.join(videos_dir, f"{vid}.mp4")) for vid, c in pairs]
