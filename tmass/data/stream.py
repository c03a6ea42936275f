"""Shards -> batches on every rank: the training and evaluation streams.

Both are composed from small generator stages (OpenCLIP's habit), inside an IterableDataset that a plain
torch DataLoader runs in its workers:

    train:  shard order (resampled, or shuffled per epoch) -> tar samples -> (pairs) -> shuffle buffer
            -> position/skip -> decode + augment + tokenize (bad samples counted, skipped) -> batches
    eval:   this reader's shards or samples -> tar samples -> decode + centre crop + tokenize -> batches

Determinism. A rank with W loader workers has W *streams*; batch j of an epoch always comes from stream
j mod W, and everything random in a stream (shard order, shuffle buffer, caption choice, crop, flip) is drawn
from generators keyed by (seed, epoch, rank, stream[, sample]). So a stream is a fixed sequence, and a
`StreamPosition` (batches taken, and per stream the samples taken from the shuffle buffer) restarts it
exactly: the buffer is refilled from the raw bytes and the samples already used are skipped before decoding.
Every stream makes a fixed number of batches, so every rank makes the same number by construction.

Pixels leave the loader as uint8 [B, F, 3, S, S]; `transforms.normalize` runs on the consumer's device.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..config import DataConfig
from ..shards.format import VIDEO_EXTS as VIDEO_KEYS  # the fields a builder may have stored a video under
from .tokenizer import tokenize, trim
from .transforms import eval_transform, train_transform
from .video import DecodeError, TimedDecoder, decode_frames

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
log = logging.getLogger("tmass.data")


# ------------------------------------------------------------------------------------------- shards and counts
def expand_shards(spec: str | list[str]) -> list[str]:
    """webdataset's URL syntax: brace ranges, several sources joined by '::', local paths or 'pipe:' commands."""
    urls = wds.shardlists.expand_urls(spec) if isinstance(spec, str) else [u for s in spec for u in expand_shards(s)]
    if not urls:
        raise ValueError(f"no shards in {spec!r}")
    return urls


def manifest_counts(urls: list[str]) -> dict[str, dict]:
    """url -> {"count": videos, "captions": captions} from the builder's manifests beside local shards."""
    out: dict[str, dict] = {}
    manifests: dict[str, dict] = {}
    for url in urls:
        folder, name = os.path.split(url)
        split = name.rsplit("-", 1)[0]
        path = os.path.join(folder, f"{split}.json")
        if path not in manifests:
            if url.startswith("pipe:") or not os.path.exists(path):
                raise FileNotFoundError(f"no manifest for {url} (looked for {path}); pass the sample count "
                                        f"explicitly (e.g. --train_num_samples) for shards without one")
            with open(path) as f:
                manifests[path] = {s["shard"]: s for s in json.load(f)["shards"]}
        if name not in manifests[path]:
            raise FileNotFoundError(f"{url} is not listed in {path}")
        out[url] = manifests[path][name]
    return out


def samples_per_epoch(urls: list[str], caption_sampling: str) -> int:
    counts = manifest_counts(urls).values()
    return sum(c["captions"] if caption_sampling == "pairs" else c["count"] for c in counts)


def keyed_rng(*key) -> random.Random:
    return random.Random(hashlib.blake2b(repr(key).encode(), digest_size=8).hexdigest())


def reader_assignment(num_shards: int, readers: int, reader: int) -> list[tuple[int, int, int]]:
    """(shard, offset, stride) triples: this reader keeps the samples at positions p = offset (mod stride) of
    those shards. Every sample goes to exactly one reader, also when shards are fewer than readers."""
    if num_shards >= readers:
        return [(s, 0, 1) for s in range(reader, num_shards, readers)]
    shard = reader % num_shards
    group = list(range(shard, readers, num_shards))
    return [(shard, group.index(reader), len(group))]


# ------------------------------------------------------------------------------------------- bad samples
@dataclass
class SkipStats:
    """What a stream has seen: samples taken, decoded, and skipped by reason and by shard."""

    seen: int = 0
    ok: int = 0
    reasons: Counter = field(default_factory=Counter)
    shards: Counter = field(default_factory=Counter)

    def skip(self, reason: str, url: str) -> None:
        self.reasons[reason] += 1
        self.shards[url] += 1
        _warn_limited(f"skipped a sample of {url}: {reason}")

    def to_dict(self) -> dict:
        return {"seen": self.seen, "ok": self.ok, "reasons": dict(self.reasons), "shards": dict(self.shards)}

    @staticmethod
    def total(snapshots: list[dict]) -> dict:
        out = {"seen": 0, "ok": 0, "reasons": Counter(), "shards": Counter()}
        for s in snapshots:
            out["seen"] += s["seen"]
            out["ok"] += s["ok"]
            out["reasons"].update(s["reasons"])
            out["shards"].update(s["shards"])
        return out


_last_warning = [0.0, 0]


def _warn_limited(message: str, every: float = 30.0) -> None:
    """At most one warning per `every` seconds per process, with the count of those held back."""
    now = time.monotonic()
    if now - _last_warning[0] >= every:
        held = f" ({_last_warning[1]} more since the last warning)" if _last_warning[1] else ""
        log.warning(message + held)
        _last_warning[:] = [now, 0]
    else:
        _last_warning[1] += 1


class TooManyBadSamples(RuntimeError):
    pass


def check_bad_fraction(total: dict, limit: float, min_seen: int = 100) -> None:
    """Stop a run whose skip rate passes `limit`, naming the worst shards."""
    bad = sum(total["reasons"].values())
    if total["seen"] >= min_seen and bad > limit * total["seen"]:
        worst = ", ".join(f"{u} ({n})" for u, n in total["shards"].most_common(5))
        why = ", ".join(f"{r}: {n}" for r, n in total["reasons"].most_common())
        raise TooManyBadSamples(f"{bad} of {total['seen']} samples were skipped ({why}), more than "
                                f"--max_bad_fraction {limit:g}. Worst shards: {worst}. Rebuild them with "
                                f"shards/build.py, or raise --max_bad_fraction.")


# ------------------------------------------------------------------------------------------- stages
def read_samples(urls: list[str], assignments: Iterator[tuple[int, int, int]], stats: SkipStats) -> Iterator[dict]:
    """Samples of the assigned shards, annotated with __shard__ and __pos__; unreadable shards are counted."""
    def handler(exn: Exception) -> bool:
        stats.skip(f"unreadable shard ({type(exn).__name__})", "?")
        return True

    for shard, offset, stride in assignments:
        src = wds.tariterators.tarfile_samples([{"url": urls[shard]}], handler=handler)
        for pos, sample in enumerate(src):
            if pos % stride == offset:
                sample["__shard__"], sample["__pos__"] = shard, pos
                yield sample


def train_assignments(num_shards: int, cfg: DataConfig, epoch: int, rank: int, world: int, stream: int,
                      streams: int) -> Iterator[tuple[int, int, int]]:
    """An endless shard order for one stream: resampled with replacement, or this stream's share of a per-epoch
    permutation, cycled (re-permuted each cycle) for as long as batches are asked for."""
    rng = keyed_rng("shards", cfg.seed, epoch, rank, stream)
    if cfg.shard_sampling == "resampled":
        while True:
            yield rng.randrange(num_shards), 0, 1
    cycle = 0
    while True:
        order = list(range(num_shards))
        keyed_rng("perm", cfg.seed, epoch, cycle).shuffle(order)
        for shard, offset, stride in reader_assignment(num_shards, world * streams, rank * streams + stream):
            yield order[shard], offset, stride
        cycle += 1


def captions_of(sample: dict) -> list[str]:
    if "json" in sample:
        try:
            caps = json.loads(sample["json"]).get("captions") or []
            return [c for c in caps if isinstance(c, str) and c.strip()]
        except (ValueError, AttributeError):
            pass
    if "txt" in sample:
        return [c for c in sample["txt"].decode("utf-8", "replace").split("\n") if c.strip()]
    return []


def video_bytes(sample: dict) -> bytes | None:
    return next((sample[k] for k in VIDEO_KEYS if k in sample), None)


def expand_pairs(samples: Iterator[dict]) -> Iterator[dict]:
    """One sample per (video, caption), as upstream trains."""
    for s in samples:
        caps = captions_of(s)
        for i, c in enumerate(caps or [None]):
            yield {**s, "__caption__": c, "__caption_index__": i}


# ------------------------------------------------------------------------------------------- datasets
def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


@dataclass
class StreamPosition:
    """Where a rank's training stream is: what the checkpoint stores to resume exactly."""

    epoch: int = 0
    batches: int = 0  # batches consumed in this epoch
    taken: dict[int, int] = field(default_factory=dict)  # stream -> samples taken from its shuffle buffer
    streams: int = 1

    def advance(self, batch: dict) -> None:
        self.batches += 1
        self.taken[batch["stream"]] = batch["taken"]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches": self.batches, "taken": {str(k): v for k, v in self.taken.items()},
                "streams": self.streams}

    @classmethod
    def from_state_dict(cls, d: dict) -> "StreamPosition":
        return cls(d["epoch"], d["batches"], {int(k): v for k, v in d["taken"].items()}, d["streams"])


class TrainStream(IterableDataset):
    """The training batches of one rank for one epoch (`batches_per_epoch` of them), from `position` on."""

    def __init__(self, urls: list[str], cfg: DataConfig, tokenizer, batches_per_epoch: int, rank: int = 0,
                 world: int = 1, position: StreamPosition | None = None, decode=decode_frames):
        self.urls, self.cfg, self.tokenizer = urls, cfg, tokenizer
        self.batches_per_epoch, self.rank, self.world = batches_per_epoch, rank, world
        self.streams = max(1, cfg.num_workers)
        self.position = position or StreamPosition(streams=self.streams)
        if self.position.streams != self.streams:
            raise ValueError(f"the checkpoint's data position was made with {self.position.streams} loader "
                             f"workers per rank; resume with --num_workers {self.position.streams}")
        self.decoder = TimedDecoder(cfg.decode_timeout, decode)

    def __len__(self) -> int:
        return self.batches_per_epoch - self.position.batches

    def _batches_of(self, stream: int, upto: int) -> int:
        """Batches j < upto with j = stream (mod streams)."""
        return max(0, (upto - stream + self.streams - 1) // self.streams)

    def __iter__(self) -> Iterator[dict]:
        worker, _ = _worker()
        pos, cfg, W = self.position, self.cfg, self.streams
        stream = (worker + pos.batches) % W  # so that batch j still comes from stream j mod W after a resume
        todo = self._batches_of(stream, self.batches_per_epoch) - self._batches_of(stream, pos.batches)
        if todo <= 0:
            return
        stats = SkipStats()
        raw = read_samples(self.urls, train_assignments(len(self.urls), cfg, pos.epoch, self.rank, self.world,
                                                        stream, W), stats)
        if cfg.caption_sampling == "pairs":
            raw = expand_pairs(raw)
        shuffled = raw if cfg.shuffle_buffer <= 1 else wds.shuffle(
            cfg.shuffle_buffer, cfg.shuffle_initial,
            rng=keyed_rng("buffer", cfg.seed, pos.epoch, self.rank, stream))(raw)
        skip = pos.taken.get(stream, 0)
        items: list[dict] = []
        for taken, sample in enumerate(shuffled, start=1):
            if taken <= skip:
                continue  # consumed before the checkpoint: skipped before decoding
            stats.seen += 1
            item = self._train_item(sample, keyed_rng("sample", cfg.seed, pos.epoch, self.rank, stream, taken), stats)
            if item is None:
                continue
            stats.ok += 1
            items.append(item)
            if len(items) == cfg.batch_size:
                yield self._collate(items, stream, taken, stats)
                items = []
                todo -= 1
                if todo == 0:
                    return

    def _train_item(self, sample: dict, rng: random.Random, stats: SkipStats) -> dict | None:
        url, cfg = self.urls[sample["__shard__"]], self.cfg
        data = video_bytes(sample)
        caption = sample.get("__caption__") if "__caption__" in sample else None
        if caption is None:
            caps = captions_of(sample)
            caption = rng.choice(caps) if caps else None
        if data is None:
            stats.skip("no video bytes", url)
            return None
        if not caption:
            stats.skip("no caption", url)
            return None
        try:
            frames = self.decoder(data, cfg.num_frames, cfg.video_sample_type, rng)
        except DecodeError as e:
            stats.skip(e.reason, url)
            return None
        return {"video": train_transform(frames, cfg.input_res, rng, cfg.crop_scale_min, cfg.hflip_prob),
                "caption": caption,
                "key": sample["__key__"]}

    def _collate(self, items: list[dict], stream: int, taken: int, stats: SkipStats) -> dict:
        ids, mask = trim(*tokenize(self.tokenizer, [it["caption"] for it in items]))
        return {"video": torch.stack([it["video"] for it in items]), "input_ids": ids, "attention_mask": mask,
                "keys": [it["key"] for it in items], "captions": [it["caption"] for it in items],
                "stream": stream, "taken": taken, "stats": stats.to_dict()}


class EvalStream(IterableDataset):
    """Every sample exactly once over all ranks and workers, with all its captions, in batches of videos.

    A batch: video uint8 [B, F, 3, S, S]; shard and pos [B] (sort by them for the global order);
    input_ids/attention_mask [N_t, L] for all captions of those videos; text_video [N_t], the batch row of
    each caption's video; caption_index [N_t], its place among its video's captions."""

    def __init__(self, urls: list[str], cfg: DataConfig, tokenizer, batch_size: int | None = None, rank: int = 0,
                 world: int = 1, decode=decode_frames):
        self.urls, self.cfg, self.tokenizer = urls, cfg, tokenizer
        self.batch_size = batch_size or cfg.batch_size
        self.rank, self.world = rank, world
        self.decoder = TimedDecoder(cfg.decode_timeout, decode)

    def __iter__(self) -> Iterator[dict]:
        worker, _ = _worker()
        readers = self.world * max(1, self.cfg.num_workers)
        reader = self.rank * max(1, self.cfg.num_workers) + worker
        stats = SkipStats()
        items, reported = [], 0
        for sample in read_samples(self.urls, iter(reader_assignment(len(self.urls), readers, reader)), stats):
            stats.seen += 1
            url = self.urls[sample["__shard__"]]
            data, caps = video_bytes(sample), captions_of(sample)
            if data is None or not caps:
                stats.skip("no video bytes" if data is None else "no caption", url)
                continue
            try:
                frames = self.decoder(data, self.cfg.num_frames, self.cfg.video_sample_type)
            except DecodeError as e:
                stats.skip(e.reason, url)
                continue
            stats.ok += 1
            items.append({"video": eval_transform(frames, self.cfg.input_res), "captions": caps,
                          "shard": sample["__shard__"], "pos": sample["__pos__"], "key": sample["__key__"]})
            if len(items) == self.batch_size:
                yield self._collate(items, stats, reader)
                items, reported = [], stats.seen
        if items or stats.seen != reported:
            yield self._collate(items, stats, reader)  # the last batch (maybe empty) carries the final counts

    def _collate(self, items: list[dict], stats: SkipStats, reader: int) -> dict:
        texts = [c for it in items for c in it["captions"]]
        if texts:
            ids, mask = trim(*tokenize(self.tokenizer, texts))
        else:
            ids, mask = torch.zeros(0, 1, dtype=torch.long), torch.zeros(0, 1, dtype=torch.long)
        s = self.cfg.input_res
        video = torch.stack([it["video"] for it in items]) if items else torch.zeros(
            0, self.cfg.num_frames, 3, s, s, dtype=torch.uint8)
        return {"video": video,
                "shard": torch.tensor([it["shard"] for it in items], dtype=torch.long),
                "pos": torch.tensor([it["pos"] for it in items], dtype=torch.long),
                "keys": [it["key"] for it in items], "input_ids": ids, "attention_mask": mask,
                "text_video": torch.tensor([i for i, it in enumerate(items) for _ in it["captions"]], dtype=torch.long),
                "caption_index": torch.tensor([k for it in items for k in range(len(it["captions"]))],
                                              dtype=torch.long),
                "stats": stats.to_dict(), "reader": reader}


def make_loader(dataset: IterableDataset, num_workers: int) -> DataLoader:
    """A DataLoader that runs the stream's stages in `num_workers` processes (0: in this one)."""
    # Its own generator: creating a loader must not draw from the global RNG, or a resumed run's dropout
    # masks would drift from the uninterrupted run's (the streams draw nothing from it).
    return DataLoader(dataset, batch_size=None, num_workers=num_workers, persistent_workers=False,
                      prefetch_factor=4 if num_workers else None, generator=torch.Generator().manual_seed(0))
