"""The shard builder: source items -> (read, normalise, probe) in worker processes -> WebDataset shards.

Each sample in a shard:
    __key__   a safe, unique id (letters, digits, '_' and '-')
    mp4       the normalised video (with --no_transcode: the original bytes, under their own extension)
    json      video_id, captions, source, path, duration_s, fps, num_frames (frames that decode), width,
              height, codec, and `orig` (the source video's own figures) when transcoded
    txt       the captions, one a line
Bad input never stops the build: it is listed in the manifest with its reason.
"""

from __future__ import annotations

import functools
import json
import multiprocessing as mp
import os
import re
import time
from dataclasses import asdict, dataclass, field

from tqdm import tqdm

from ..data.video import DecodeError, decode_frames
from .sources import SOURCES, SourceOptions, VideoItem
from .transcode import TranscodeOptions, VideoError, probe, transcode
from .format import VIDEO_EXTS
from .writer import SplitWriter


@dataclass
class BuildConfig:
    source: str
    out: str
    splits: list[str] | None = None  # None: the source's usual splits
    source_opts: SourceOptions = field(default_factory=SourceOptions)
    transcode: TranscodeOptions = field(default_factory=TranscodeOptions)
    no_transcode: bool = False
    workers: int = 1
    max_count: int = 200
    max_size: float = 1e9
    max_failures: int | None = None
    max_failed_fraction: float = 0.2
    overwrite: bool = False
    progress: bool = True

    def content_options(self, split: str) -> dict:
        """Everything that decides the shards' content (and nothing that does not, such as workers)."""
        source_opts = asdict(self.source_opts)
        source_opts["num_videos"] = {k: v for k, v in source_opts["num_videos"].items() if k == split}
        return json.loads(
            json.dumps(
                {
                    "source": self.source,
                    "split": split,
                    "source_opts": source_opts,
                    "transcode": None if self.no_transcode else asdict(self.transcode),
                    "max_count": self.max_count,
                    "max_size": self.max_size,
                }
            )
        )


class TooManyFailures(Exception):
    pass


_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def safe_keys(video_ids: list[str]) -> list[str]:
    """Keys webdataset can split on '.', all distinct: unsafe runs become '_'; a key already taken (by a
    duplicate id or by another id's suffixed key) gets the next free -2, -3, ..."""
    used: set[str] = set()
    next_n: dict[str, int] = {}
    keys = []
    for vid in video_ids:
        base = _UNSAFE.sub("_", vid).strip("_")[:120] or "video"
        key, n = base, next_n.get(base, 1)
        while key in used:
            n += 1
            key = f"{base}-{n}"
        next_n[base] = n
        used.add(key)
        keys.append(key)
    return keys


def _video_field(item: VideoItem, transcoded: bool) -> str:
    if transcoded or not item.path:
        return "mp4"
    ext = os.path.splitext(item.path)[1].lstrip(".").lower()
    return ext if ext in VIDEO_EXTS else "mp4"


def process(
    job: tuple[int, str, VideoItem], source: str, opts: TranscodeOptions | None
) -> tuple[int, dict | None, dict | None]:
    """One input -> (index, sample, None) or (index, None, failure). Runs in a worker; never raises."""
    index, key, item = job

    def fail(reason: str, detail: str = "") -> tuple[int, None, dict]:
        return index, None, {"video_id": item.video_id, "path": item.path, "reason": reason, "detail": detail[:300]}

    captions = [" ".join(c.split()) for c in item.captions if isinstance(c, str) and c.strip()]
    if not captions:
        return fail("empty caption")
    try:
        data = item.read()
        orig = None
        if opts is not None:
            data, orig = transcode(data, opts)
        info = probe(data)
        decode_frames(data, 2, "uniform")  # the decoder that training uses must read it too
    except VideoError as e:
        return fail(e.reason, e.detail)
    except DecodeError as e:
        return fail(f"training decoder (decord): {e.reason}", str(e))
    except Exception as e:  # a decoder's surprise must not end a build of a million videos
        return fail("error", f"{type(e).__name__}: {e}")
    meta = {
        "video_id": item.video_id,
        "captions": captions,
        "source": source,
        "path": item.path,
        **info.to_dict(),
        **item.meta,
    }
    if orig is not None:
        meta["orig"] = orig.to_dict()
    sample = {
        "__key__": key,
        _video_field(item, opts is not None): data,
        "json": json.dumps(meta, sort_keys=True).encode(),
        "txt": "\n".join(captions).encode(),
    }
    return index, sample, None


def build_split(cfg: BuildConfig, split: str, pool: mp.pool.Pool | None) -> dict:
    """Build (or finish, or find finished) one split; return its manifest."""
    source = SOURCES[cfg.source]
    items = source.items(split, cfg.source_opts)  # annotation errors stop here, before anything is written
    writer = SplitWriter(cfg.out, split, cfg.content_options(split), cfg.max_count, cfg.max_size, cfg.overwrite)
    done = writer.finished_manifest()
    if done is not None:
        check_failed_fraction(done, cfg.max_failed_fraction, done.get("failures", []))
        return {**done, "already_built": True}
    keys = safe_keys([it.video_id for it in items])
    start = writer.progress.next_item
    jobs = [(i, keys[i], items[i]) for i in range(start, len(items))]
    fn = functools.partial(process, source=cfg.source, opts=None if cfg.no_transcode else cfg.transcode)
    results = pool.imap(fn, jobs, chunksize=2) if pool is not None else map(fn, jobs)
    t0 = time.time()
    bar = tqdm(
        total=len(items),
        initial=start,
        desc=split,
        unit="video",
        disable=not cfg.progress,
        mininterval=1.0,
        dynamic_ncols=True,
    )
    try:
        for index, sample, failure in results:
            writer.add(index, sample, failure)
            bar.update(1)
            if cfg.max_failures is not None and len(writer.failures) > cfg.max_failures:
                raise TooManyFailures(_failure_report(split, writer.failures, cfg.max_failures))
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    writer.close(len(items))
    manifest = writer.write_manifest(
        {"source": cfg.source, "inputs": len(items), "elapsed_s": round(time.time() - t0, 2)}
    )
    check_failed_fraction(manifest, cfg.max_failed_fraction, writer.failures)
    return manifest


def check_failed_fraction(manifest: dict, limit: float, failures: list[dict]) -> None:
    """A split where more than `limit` of the inputs failed is an error (the shards are kept: a rerun after
    fixing the inputs, with --overwrite, rebuilds them)."""
    inputs, failed = manifest.get("inputs", 0), manifest["totals"]["failed"]
    if inputs and failed > limit * inputs:
        raise TooManyFailures(_failure_report(manifest["split"], failures, None, limit, inputs))


def _failure_report(
    split: str, failures: list[dict], limit: int | None, fraction: float | None = None, inputs: int = 0
) -> str:
    reasons: dict[str, int] = {}
    for f in failures:
        reasons[f["reason"]] = reasons.get(f["reason"], 0) + 1
    head = "\n".join(f"  {f['video_id']} ({f['path']}): {f['reason']} {f['detail']}" for f in failures[:5])
    if fraction is None:
        bound, fix = f"more than --max_failures {limit}", "rerun the same command: it resumes"
    else:
        bound = f"{len(failures)} of {inputs}, more than --max_failed_fraction {fraction:g}"
        fix = "rerun with --overwrite, or raise --max_failed_fraction"
    return (
        f"{split}: {len(failures)} inputs failed, {bound} "
        f"({', '.join(f'{k}: {v}' for k, v in sorted(reasons.items()))}). First ones:\n{head}\n"
        f"Fix the inputs and {fix}."
    )


def summary_line(m: dict) -> str:
    t = m["totals"]
    why = ", ".join(f"{k}: {v}" for k, v in sorted(m["failures_by_reason"].items()))
    state = "already built (--overwrite rebuilds it)" if m.get("already_built") else f"in {m.get('elapsed_s', 0):.1f} s"
    return (
        f"{m['split']}: {t['samples']} samples, {t['captions']} captions in {t['shards']} shards "
        f"({t['bytes'] / 1e6:.1f} MB), {t['failed']} failed{f' ({why})' if why else ''}, {state}"
    )


def summary_table(manifests: list[dict]) -> str:
    rows = [("split", "shards", "samples", "captions", "MB", "failed")]
    for m in manifests:
        t = m["totals"]
        rows.append(
            (
                m["split"],
                str(t["shards"]),
                str(t["samples"]),
                str(t["captions"]),
                f"{t['bytes'] / 1e6:.1f}",
                str(t["failed"]),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows
    )


def build(cfg: BuildConfig) -> list[dict]:
    """Build every requested split. Returns the manifests; raises TooManyFailures past --max_failures."""
    source = SOURCES[cfg.source]
    splits = cfg.splits or list(source.splits_for(cfg.source_opts) if hasattr(source, "splits_for") else source.splits)
    pool = mp.get_context("fork").Pool(cfg.workers) if cfg.workers > 1 else None
    try:
        manifests = [build_split(cfg, split, pool) for split in splits]
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    if cfg.source == "synthetic" and "train" in splits:
        save_synthetic_tokenizer(cfg)
    return manifests


def save_synthetic_tokenizer(cfg: BuildConfig) -> str:
    """The synthetic corpus has no CLIP checkpoint: a word-level tokenizer of its caption grammar goes beside
    the shards, in {out}/tokenizer/ (see tmass.data.tokenizer)."""
    out = os.path.join(cfg.out, "tokenizer")
    if not os.path.exists(os.path.join(out, "tokenizer.json")):
        from ..data.tokenizer import build_caption_tokenizer  # transformers: imported only here

        from .sources.synthetic import grammar_text

        build_caption_tokenizer(grammar_text(), out)
    return out
