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
import itertools
import json
import logging
import multiprocessing
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..config import DataConfig
from ..errors import DataError
from ..shards.format import VIDEO_EXTS as VIDEO_KEYS  # the fields a builder may have stored a video under
from .shardlist import manifest_counts
from .tokenizer import tokenize, trim
from .transforms import eval_transform, train_transform
from .video import DecodeError, TimedDecoder, decode_frames

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
log = logging.getLogger("tmass.data")


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


UNREADABLE = "unreadable shard"  # the skip reason of a shard that cannot be read to its end


class TooManyBadSamples(DataError, RuntimeError):
    pass


def check_bad_fraction(total: dict, limit: float, min_seen: int = 100) -> None:
    """Stop a run whose skip rate passes `limit`, naming the worst shards. `total`: seen, and the skips by
    reason and by shard (Counters or plain dicts)."""
    reasons, shards = Counter(total.get("reasons", {})), Counter(total.get("shards", {}))
    bad = sum(reasons.values())
    if total["seen"] >= min_seen and bad > limit * total["seen"]:
        worst = ", ".join(f"{u} ({n})" for u, n in shards.most_common(5))
        why = ", ".join(f"{r}: {n}" for r, n in reasons.most_common())
        raise TooManyBadSamples(f"{bad} of {total['seen']} samples were skipped ({why}), more than "
                                f"--max_bad_fraction {limit:g}. Worst shards: {worst}. Rebuild them with "
                                f"shards/build.py, or raise --max_bad_fraction.")


class StreamStalled(TooManyBadSamples):
    """A training stream got no good sample for too long: every shard it reads is bad or unreadable."""


class StallGuard:
    """Ends a training stream that makes no progress (shards that are all bad, a failing `pipe:` command):
    `skips` samples skipped in a row, or `seconds` without a good sample, raise StreamStalled with the shards
    and the reasons. Checked at every sample and at every shard opened, so empty shards count too."""

    def __init__(self, urls: list[str], stats: SkipStats, skips: int, seconds: float):
        self.urls, self.stats, self.skips, self.seconds = urls, stats, skips, seconds
        self.in_a_row, self.since = 0, time.monotonic()

    def good(self) -> None:
        self.in_a_row, self.since = 0, time.monotonic()

    def bad(self) -> None:
        self.in_a_row += 1
        self.check()

    def check(self) -> None:
        waited = time.monotonic() - self.since
        if (self.skips and self.in_a_row >= self.skips) or (self.seconds and waited >= self.seconds):
            why = ", ".join(f"{r}: {n}" for r, n in self.stats.reasons.most_common()) or "no samples at all"
            shards = ", ".join(u for u, _ in self.stats.shards.most_common(5)) or ", ".join(self.urls[:5])
            raise StreamStalled(f"no usable training sample in {self.in_a_row} samples and {waited:.0f} s ({why}); "
                                f"shards: {shards}. Check or rebuild them (shards/build.py); the bounds are "
                                f"--stall_skips and --stall_seconds")


# ------------------------------------------------------------------------------------------- stages
def read_samples(urls: list[str], assignments: Iterator[tuple[int, int, int]], stats: SkipStats,
                 guard: StallGuard | None = None) -> Iterator[dict]:
    """Samples of the assigned shards, annotated with __shard__ and __pos__. An unreadable shard, or a tar cut
    mid-member, counts one sample as seen and skipped under that shard's URL."""
    def handler_for(url: str):
        def handler(exn: Exception) -> bool:
            stats.seen += 1
            stats.skip(f"{UNREADABLE} ({type(exn).__name__})", url)
            if guard:
                guard.bad()
            return True
        return handler

    for shard, offset, stride in assignments:
        if guard:
            guard.check()
        src = wds.tariterators.tarfile_samples([{"url": urls[shard]}], handler=handler_for(urls[shard]))
        for pos, sample in enumerate(src):
            if pos % stride == offset:
                sample["__shard__"], sample["__pos__"] = shard, pos
                yield sample


def read_ranges(urls: list[str], segments: list[tuple[int, int, int]], stats: SkipStats, guard: StallGuard,
                pairs: bool) -> Iterator[dict]:
    """Units lo <= u < hi of each segment (shard, lo, hi), a unit being a sample or, with `pairs`, a (video,
    caption) pair counted in the shard's order; a shard is read only up to its segment's end."""
    for shard, lo, hi in segments:
        u = 0
        for sample in read_samples(urls, iter([(shard, 0, 1)]), stats, guard):
            for unit in (expand_pairs([sample]) if pairs else (sample,)):
                if lo <= u < hi:
                    yield unit
                u += 1
            if u >= hi:
                break


def epoch_segments(units: list[int], order: list[int], start: int, length: int) -> list[tuple[int, int, int]]:
    """Positions start .. start + length - 1 of the epoch's cyclic sequence (the shards in `order`, each of
    units[shard] units, end to end; positions past the end wrap to the beginning) as (shard, lo, hi) segments."""
    total = sum(units[s] for s in order)
    bounds, acc = [], 0
    for s in order:
        bounds.append((s, acc, acc + units[s]))
        acc += units[s]
    segments, p, end = [], start, start + length
    while p < end:
        base = p - p % total
        for s, a, b in bounds:
            lo, hi = max(p, base + a), min(end, base + b)
            if lo < hi:
                segments.append((s, lo - base - a, hi - base - a))
        p = base + total
    return segments


def resampled_shards(num_shards: int, seed: int, epoch: int, rank: int,
                     stream: int) -> Iterator[tuple[int, int, int]]:
    """--shard_sampling resampled: an endless shard order for one stream, drawn with replacement."""
    rng = keyed_rng("shards", seed, epoch, rank, stream)
    while True:
        yield rng.randrange(num_shards), 0, 1


def captions_of(sample: dict) -> list[str]:
    if "json" in sample:
        try:
            caps = json.loads(sample["json"]).get("captions") or []
            caps = [caps] if isinstance(caps, str) else caps  # one caption, not one per letter
            return [c for c in caps if isinstance(c, str) and c.strip()] if isinstance(caps, list) else []
        except (ValueError, AttributeError):
            pass
    if "txt" in sample:
        return [c for c in sample["txt"].decode("utf-8", "replace").split("\n") if c.strip()]
    return []


def video_bytes(sample: dict) -> bytes | None:
    return next((sample[k] for k in VIDEO_KEYS if k in sample), None)


def decode_item(decoder: Callable[..., np.ndarray], sample: dict, url: str, captions: list[str], num_frames: int,
                sample_type: str, stats: SkipStats, rng: random.Random | None = None,
                require_captions: bool = True) -> np.ndarray | None:
    """The frames [F, H, W, 3] uint8 of a sample that has a video and (unless not `require_captions`) `captions`
    (decode_frames' signature), or None when it is skipped (and counted in `stats` under its reason): no video
    bytes, no caption, or a video that does not decode."""
    data = video_bytes(sample)
    if data is None or (require_captions and not captions):
        stats.skip("no video bytes" if data is None else "no caption", url)
        return None
    try:
        return decoder(data, num_frames, sample_type, rng)
    except DecodeError as e:
        stats.skip(e.reason, url)
        return None


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
    """The training batches of one rank for one epoch (`batches_per_epoch` of `batch_size` pairs: the rank's
    micro batch), from `position` on; every random choice is keyed by `seed`."""

    def __init__(self, urls: list[str], cfg: DataConfig, tokenizer, batches_per_epoch: int, *, batch_size: int,
                 num_frames: int, seed: int, rank: int = 0, world: int = 1, position: StreamPosition | None = None,
                 decode=decode_frames):
        self.urls, self.cfg, self.tokenizer = urls, cfg, tokenizer
        self.batch_size, self.num_frames, self.seed = batch_size, num_frames, seed
        self.batches_per_epoch, self.rank, self.world = batches_per_epoch, rank, world
        self.streams = max(1, cfg.num_workers)
        self.position = position or StreamPosition(streams=self.streams)
        if self.position.streams != self.streams:
            raise ValueError(f"the checkpoint's data position was made with {self.position.streams} loader "
                             f"workers per rank; resume with --num_workers {self.position.streams}")
        self.decoder = TimedDecoder(cfg.decode_timeout, decode)
        self._units: list[int] | None = None
        if cfg.shard_sampling == "shuffled":
            self.shard_units()  # fails here, before any worker starts, when the counts are unknown

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
        guard = StallGuard(self.urls, stats, cfg.stall_skips, cfg.stall_seconds)
        if cfg.shard_sampling == "shuffled":
            shuffled = self._epoch_share(stream, pos.epoch, stats, guard)
        else:
            raw = read_samples(self.urls, resampled_shards(len(self.urls), self.seed, pos.epoch, self.rank, stream),
                               stats, guard)
            if cfg.caption_sampling == "pairs":
                raw = expand_pairs(raw)
            shuffled = self._buffer(raw, pos.epoch, stream)
        skip = pos.taken.get(stream, 0)
        items: list[dict] = []
        for taken, sample in enumerate(shuffled, start=1):
            if taken <= skip:
                guard.good()
                continue  # consumed before the checkpoint: skipped before decoding
            stats.seen += 1
            item = self._train_item(sample, keyed_rng("sample", self.seed, pos.epoch, self.rank, stream, taken), stats)
            if item is None:
                guard.bad()
                continue
            guard.good()
            stats.ok += 1
            items.append(item)
            if len(items) == self.batch_size:
                yield self._collate(items, stream, taken, stats)
                items = []
                todo -= 1
                if todo == 0:
                    return

    def _buffer(self, samples: Iterator[dict], epoch: int, stream: int, *extra) -> Iterator[dict]:
        cfg = self.cfg
        if cfg.shuffle_buffer <= 1:
            return samples
        return wds.shuffle(cfg.shuffle_buffer, cfg.shuffle_initial,
                           rng=keyed_rng("buffer", self.seed, epoch, self.rank, stream, *extra))(samples)

    def _epoch_share(self, stream: int, epoch: int, stats: SkipStats, guard: StallGuard) -> Iterator[dict]:
        """--shard_sampling shuffled: the epoch is one cyclic sequence of every unit (sample, or pair in pairs
        mode), the shards end to end in a per-epoch permutation. Reader k = rank * W + stream takes the next
        `quota` positions after the readers before it, quota = its batches x batch size, so the readers of all
        ranks tile the sequence and an epoch of ceil(N / B) global batches sees every unit once, the last
        batch's overhang wrapping to the start. Its share is shuffled in the buffer (drained at the share's
        end); skipped samples are made up by a second pass over the share, shuffled on its own."""
        cfg = self.cfg
        units = self.shard_units()
        order = list(range(len(self.urls)))
        keyed_rng("perm", self.seed, epoch).shuffle(order)
        per_rank = self.batches_per_epoch * self.batch_size
        start = self.rank * per_rank + sum(self._batches_of(w, self.batches_per_epoch) for w in range(stream)) \
            * self.batch_size
        quota = self._batches_of(stream, self.batches_per_epoch) * self.batch_size
        segments = epoch_segments(units, order, start, quota)
        pairs = cfg.caption_sampling == "pairs"
        for cycle in itertools.count():
            yield from self._buffer(read_ranges(self.urls, segments, stats, guard, pairs), epoch, stream, cycle)

    def shard_units(self) -> list[int]:
        """Units per shard (samples, or captions in pairs mode), from the builder's manifests."""
        if self._units is None:
            try:
                counts = manifest_counts(self.urls)
            except FileNotFoundError as e:
                raise ValueError(f"--shard_sampling shuffled needs each shard's sample count ({e}); use "
                                 f"--shard_sampling resampled for shards without a manifest") from None
            key = "captions" if self.cfg.caption_sampling == "pairs" else "count"
            self._units = [int(counts[u][key]) for u in self.urls]
            if sum(self._units) == 0:
                raise ValueError(f"the manifests of {self.urls[0]} ... count no samples")
        return self._units

    def _train_item(self, sample: dict, rng: random.Random, stats: SkipStats) -> dict | None:
        cfg = self.cfg
        caption = sample.get("__caption__") if "__caption__" in sample else None
        if caption is None:
            caps = captions_of(sample)
            caption = rng.choice(caps) if caps else None
        frames = decode_item(self.decoder, sample, self.urls[sample["__shard__"]], [caption] if caption else [],
                             self.num_frames, cfg.video_sample_type, stats, rng)
        if frames is None:
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
    each caption's video; caption_index [N_t], its place among its video's captions.
    first_captions [B]: each video's first caption (None without one). A tokenizer of None: no captions are
    tokenized (an index); require_captions False: a video without captions is kept, with none."""

    def __init__(self, urls: list[str], cfg: DataConfig, tokenizer, batch_size: int, *, num_frames: int,
                 rank: int = 0, world: int = 1, decode=decode_frames, require_captions: bool = True):
        self.urls, self.cfg, self.tokenizer = urls, cfg, tokenizer
        self.require_captions = require_captions
        self.batch_size, self.num_frames = batch_size, num_frames
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
            caps = captions_of(sample)
            frames = decode_item(self.decoder, sample, self.urls[sample["__shard__"]], caps, self.num_frames,
                                 self.cfg.video_sample_type, stats, require_captions=self.require_captions)
            if frames is None:
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
        texts = [c for it in items for c in it["captions"]] if self.tokenizer is not None else []
        if texts:
            ids, mask = trim(*tokenize(self.tokenizer, texts))
        else:
            ids, mask = torch.zeros(0, 1, dtype=torch.long), torch.zeros(0, 1, dtype=torch.long)
        s = self.cfg.input_res
        video = torch.stack([it["video"] for it in items]) if items else torch.zeros(
            0, self.num_frames, 3, s, s, dtype=torch.uint8)
        return {"video": video,
                "shard": torch.tensor([it["shard"] for it in items], dtype=torch.long),
                "pos": torch.tensor([it["pos"] for it in items], dtype=torch.long),
                "keys": [it["key"] for it in items], "input_ids": ids, "attention_mask": mask,
                "first_captions": [(it["captions"] or [None])[0] for it in items],
                "text_video": torch.tensor([i for i, it in enumerate(items) for _ in it["captions"]], dtype=torch.long),
                "caption_index": torch.tensor([k for it in items for k in range(len(it["captions"]))],
                                              dtype=torch.long),
                "stats": stats.to_dict(), "reader": reader}


def worker_context() -> multiprocessing.context.ForkServerContext:
    """Loader workers start from a forkserver: a single-threaded process that imported this module once.
    Forking the trainer itself is unsafe, as it runs threads (TensorBoard's writer, the run lock's heartbeat,
    the launcher watch, the previous loader's queue feeders): a fork while one of them holds an interpreter
    lock leaves the worker blocked in os.fork for ever, and the job hangs at an epoch's start."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])  # takes effect when the server starts (the first loader)
    return ctx


def make_loader(dataset: IterableDataset, num_workers: int) -> DataLoader:
    """A DataLoader that runs the stream's stages in `num_workers` processes (0: in this one)."""
    # Its own generator: creating a loader must not draw from the global RNG, or a resumed run's dropout
    # masks would drift from the uninterrupted run's (the streams draw nothing from it).
    return DataLoader(dataset, batch_size=None, num_workers=num_workers, persistent_workers=False,
                      prefetch_factor=4 if num_workers else None, generator=torch.Generator().manual_seed(0),
                      multiprocessing_context=worker_context() if num_workers else None)
