"""Writing one split's shards: webdataset's ShardWriter, an atomic commit per shard, a journal for resume,
and the manifest.

Files in the output folder, for a split `S`:
    S-000000.tar ...        complete shards (written as S-000000.tar.partial, renamed when closed)
    S.journal.jsonl         while building: a header with the build options, then one line per committed
                            shard (name, count, bytes, keys, the index of the next input, failures so far)
    S.json                  the manifest, written last; the journal is removed then

Resume: the committed shards listed in the journal are kept, everything else is removed, and the build
goes on from the next input of the last committed shard. Since inputs are processed in a fixed order and
rollover depends only on the samples, the result equals an uninterrupted build.
"""

from __future__ import annotations

import glob
import json
import os
import time
from dataclasses import dataclass, field

import webdataset as wds

from ..files import write_json_atomic


class BuildStateError(Exception):
    """The output folder holds a build of this split with other options."""


def _fsync_append(path: str, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


@dataclass
class Progress:
    """What is committed so far: the shards, the failures, and where to go on."""

    shards: list[dict] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)
    next_item: int = 0


class SplitWriter:
    """Writes samples into `{out}/{split}-%06d.tar`, rolling over at max_count samples or max_size bytes."""

    def __init__(self, out: str, split: str, options: dict, max_count: int, max_size: float, overwrite: bool = False):
        self.out, self.split, self.options = out, split, options
        self.max_count, self.max_size = max_count, max_size
        self.manifest_path = os.path.join(out, f"{split}.json")
        self.journal_path = os.path.join(out, f"{split}.journal.jsonl")
        os.makedirs(out, exist_ok=True)
        if overwrite:
            self._remove(keep=[])
            for p in (self.manifest_path, self.journal_path):
                if os.path.exists(p):
                    os.remove(p)
        self.progress = self._recover()
        self._writer: wds.ShardWriter | None = None
        self._keys: list[str] = []
        self._captions = 0
        self._failures: list[dict] = []
        self._index = self.progress.next_item

    # ---------------------------------------------------------------- state on disk
    def finished_manifest(self) -> dict | None:
        """The manifest of a finished build with the same options, if there is one."""
        if not os.path.exists(self.manifest_path):
            return None
        with open(self.manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)
        if manifest.get("options") != self.options:
            raise BuildStateError(
                f"{self.manifest_path} was built with other options; pass --overwrite to rebuild "
                f"{self.split}, or choose another --out"
            )
        return manifest

    def _recover(self) -> Progress:
        if os.path.exists(self.manifest_path):
            return Progress()  # finished_manifest() decides
        progress = Progress()
        if os.path.exists(self.journal_path):
            with open(self.journal_path, encoding="utf-8") as f:
                lines = [json.loads(line) for line in f if line.strip().endswith("}")]
            if not lines or lines[0].get("options") != self.options:
                raise BuildStateError(
                    f"{self.journal_path} belongs to an unfinished build with other options; rerun that "
                    f"command to finish it, or pass --overwrite to start {self.split} again"
                )
            for entry in lines[1:]:
                path = os.path.join(self.out, entry["shard"])
                if not (os.path.exists(path) and os.path.getsize(path) == entry["bytes"]):
                    break
                progress.shards.append({k: entry[k] for k in ("shard", "count", "captions", "bytes", "keys")})
                progress.failures.extend(entry["failures"])
                progress.next_item = entry["next"]
            self._rewrite_journal(lines[0], lines[1 : 1 + len(progress.shards)])  # drop entries past a broken one
        else:
            _fsync_append(self.journal_path, {"options": self.options})
        self._remove(keep=[s["shard"] for s in progress.shards])
        return progress

    def _rewrite_journal(self, header: dict, entries: list[dict]) -> None:
        tmp = self.journal_path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for rec in [header, *entries]:
                f.write(json.dumps(rec, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.journal_path)

    def _remove(self, keep: list[str]) -> None:
        for path in glob.glob(os.path.join(self.out, f"{glob.escape(self.split)}-[0-9]*.tar*")):
            if os.path.basename(path) not in keep:
                os.remove(path)

    # ---------------------------------------------------------------- writing
    def _commit(self, partial: str) -> None:
        """ShardWriter's `post` hook: runs when a shard's tar is closed."""
        if not self._keys:
            os.remove(partial)
            return
        final = partial[: -len(".partial")]
        with open(partial, "rb") as f:
            os.fsync(f.fileno())
        os.replace(partial, final)
        entry = {
            "shard": os.path.basename(final),
            "count": len(self._keys),
            "captions": self._captions,
            "bytes": os.path.getsize(final),
            "keys": self._keys,
        }
        _fsync_append(self.journal_path, {**entry, "next": self._index, "failures": self._failures})
        self.progress.shards.append(entry)
        self.progress.failures.extend(self._failures)
        self._keys, self._failures, self._captions = [], [], 0

    def add(self, index: int, sample: dict | None, failure: dict | None) -> None:
        """Record input `index`: a sample to write, or a failure."""
        self._index = index
        if failure is not None:
            self._failures.append(failure)
            return
        if self._writer is None:
            self._writer = wds.ShardWriter(
                os.path.join(self.out, f"{self.split}-%06d.tar.partial"),
                maxcount=self.max_count,
                maxsize=self.max_size,
                post=self._commit,
                start_shard=len(self.progress.shards),
                verbose=0,
                mtime=0.0,
            )
        self._writer.write(sample)
        self._keys.append(sample["__key__"])
        self._captions += sample["txt"].count(b"\n") + 1  # one caption a line (newlines inside were removed)

    def close(self, num_inputs: int) -> None:
        """Commit the open shard (all inputs seen)."""
        self._index = num_inputs
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self.progress.failures.extend(self._failures)
        self._failures = []

    def abort(self) -> None:
        """Close the open shard's file without committing it: it stays .partial, and a rerun redoes it."""
        if self._writer is not None and self._writer.tarstream is not None:
            self._writer.tarstream.close()
        self._writer = None

    @property
    def failures(self) -> list[dict]:
        return self.progress.failures + self._failures

    def write_manifest(self, extra: dict) -> dict:
        shards = [{k: s[k] for k in ("shard", "count", "captions", "bytes")} for s in self.progress.shards]
        reasons: dict[str, int] = {}
        for f in self.progress.failures:
            reasons[f["reason"]] = reasons.get(f["reason"], 0) + 1
        manifest = {
            "split": self.split,
            "shards": shards,
            "totals": {
                "shards": len(shards),
                "samples": sum(s["count"] for s in shards),
                "captions": sum(s["captions"] for s in shards),
                "bytes": sum(s["bytes"] for s in shards),
                "failed": len(self.progress.failures),
            },
            "failures_by_reason": reasons,
            "failures": self.progress.failures,
            "options": self.options,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **extra,
        }
        write_json_atomic(self.manifest_path, manifest)
        os.remove(self.journal_path)
        return manifest
