"""Probe and normalise one video with PyAV (libx264), entirely in memory.

A normalised clip is H.264 yuv420p in mp4, short side at most `short_side`, at most `fps` frames per
second (never more than the source has), a keyframe at least every second, and no audio. Every function
raises `VideoError` with a short `reason` for a video that cannot be used; the builder counts those
reasons in the manifest instead of crashing.
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Iterable, Iterator

import av
import numpy as np


class VideoError(Exception):
    """A video that cannot be used. `reason` is the short category the manifest counts."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class TranscodeOptions:
    short_side: int = 224  # downscale so that min(width, height) <= short_side; never upscale
    fps: float = 3.0  # stored frame rate (CLIP4Clip's compression); lower sources keep theirs
    crf: int = 23
    preset: str = "veryfast"
    tune: str = "fastdecode"  # no CABAC, no deblocking: ~2x faster decoding for ~15% more bytes ("" for none)
    max_frames: int = 0  # > 0: lower the fps of long clips so that at most this many frames are stored


@dataclass
class VideoInfo:
    num_frames: int  # frames that actually decode
    fps: float
    duration_s: float
    width: int
    height: int
    codec: str

    def to_dict(self) -> dict:
        d = asdict(self)
        d["fps"] = round(self.fps, 4)
        d["duration_s"] = round(self.duration_s, 4)
        return d


def _open(data: bytes) -> av.container.InputContainer:
    if not data:
        raise VideoError("empty file")
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except av.FFmpegError as e:
        raise VideoError("not a video", str(e)) from None
    if not container.streams.video:
        container.close()
        raise VideoError("no video stream")
    return container


def _frames(container, stream) -> Iterator[tuple[float, av.VideoFrame]]:
    """Yield (time in seconds, frame); a demux or decode error mid-stream is a VideoError."""
    stream.thread_type = "SLICE"
    stream.codec_context.thread_count = 1  # the builder parallelises over processes
    rate = float(stream.average_rate or stream.guessed_rate or 0) or 25.0
    i = 0
    try:
        for frame in container.decode(stream):
            yield (frame.time if frame.time is not None else i / rate), frame
            i += 1
    except av.FFmpegError as e:
        raise VideoError("decode error" if i else "no decodable frame", str(e)) from None


def _source_fps(stream) -> float | None:
    rate = stream.average_rate or stream.guessed_rate
    return float(rate) if rate else None


def _duration(container, stream) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return None


def probe(data: bytes) -> VideoInfo:
    """Decode every frame and report what is really there."""
    with _open(data) as container:
        stream = container.streams.video[0]
        declared = stream.frames
        count, width, height = 0, stream.codec_context.width, stream.codec_context.height
        for _, frame in _frames(container, stream):
            count += 1
            width, height = frame.width, frame.height
        if count == 0:
            raise VideoError("no decodable frame")
        # A truncated file often still opens and yields its first frames: compare with the index.
        if declared and count < 0.9 * declared:
            raise VideoError("truncated", f"decoded {count} of {declared} frames")
        fps = _source_fps(stream) or 0.0
        duration = _duration(container, stream) or (count / fps if fps else 0.0)
        return VideoInfo(count, fps, duration, width, height, stream.codec_context.name)


def output_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """Scale so that the short side is at most `short_side`, keeping the aspect; even sizes for yuv420p."""
    scale = min(1.0, short_side / min(width, height))
    even = lambda x: max(2, int(round(x * scale / 2)) * 2)  # noqa: E731
    return even(width), even(height)


def encode_frames(
    frames: Iterable[av.VideoFrame | np.ndarray],
    fps: float,
    opts: TranscodeOptions,
    size: tuple[int, int] | None = None,
) -> bytes:
    """Encode frames (PyAV frames or HxWx3 uint8 RGB arrays) as H.264 yuv420p mp4 at `fps`.

    The size is `size`, or the first frame's scaled by `output_size`. A keyframe at least every second:
    GOP = max(1, floor(fps)) frames.
    """
    buf = io.BytesIO()
    rate = Fraction(fps).limit_denominator(1001)
    n = 0
    with av.open(buf, mode="w", format="mp4") as out:
        stream = None
        for frame in frames:
            if isinstance(frame, np.ndarray):
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            if stream is None:
                w, h = size or output_size(frame.width, frame.height, opts.short_side)
                stream = out.add_stream("libx264", rate=rate)
                stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
                gop = max(1, math.floor(fps))
                stream.codec_context.gop_size = gop
                stream.codec_context.thread_count = 1
                # mbtree=0: x264's MB-tree pass depends on memory that changes with the process's history. The
                # same frames encoded 40 times in a fresh process gave 5 to 9 distinct bitstreams (an IDR off by a
                # byte), so shards differed between builds. Without it, 1; the cost on textured footage is +0.7%
                # bytes and -0.3 dB PSNR.
                stream.options = {
                    "crf": str(opts.crf),
                    "preset": opts.preset,
                    "x264-params": f"keyint={gop}:min-keyint=1:scenecut=0:mbtree=0",
                    **({"tune": opts.tune} if opts.tune else {}),
                }
            f = frame.reformat(width=stream.width, height=stream.height, format="yuv420p", interpolation="AREA")
            f.pts, f.time_base = n, 1 / rate
            n += 1
            out.mux(stream.encode(f))
        if stream is None:
            raise VideoError("no decodable frame")
        out.mux(stream.encode(None))
    return buf.getvalue()


def transcode(data: bytes, opts: TranscodeOptions) -> tuple[bytes, VideoInfo]:
    """Normalise `data`; return the new mp4 bytes and the source's own VideoInfo.

    Frames are resampled in time: output frame k is the first source frame at or after t0 + k / fps_out,
    with fps_out = min(opts.fps, source fps, max_frames / duration).
    """
    with _open(data) as container:
        stream = container.streams.video[0]
        src_fps = _source_fps(stream)
        duration = _duration(container, stream)
        fps_out = min(opts.fps, src_fps) if src_fps else opts.fps
        if opts.max_frames and duration:
            fps_out = min(fps_out, opts.max_frames / duration)
        seen = {"count": 0, "size": (stream.codec_context.width, stream.codec_context.height)}

        def selected() -> Iterator[av.VideoFrame]:
            t0, last = None, -1
            for t, frame in _frames(container, stream):
                seen["count"] += 1
                seen["size"] = (frame.width, frame.height)
                t0 = t if t0 is None else t0
                k = math.floor((t - t0) * fps_out + 1e-3)
                if k > last:
                    last = k
                    yield frame

        encoded = encode_frames(selected(), fps_out, opts)
        declared = stream.frames
        if declared and seen["count"] < 0.9 * declared:
            raise VideoError("truncated", f"decoded {seen['count']} of {declared} frames")
        w, h = seen["size"]
        src = VideoInfo(seen["count"], src_fps or 0.0, duration or 0.0, w, h, stream.codec_context.name)
    return encoded, src
