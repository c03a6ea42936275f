"""Test videos made with PyAV directly (not with the code under test): a bright square that moves
left to right across a dark background, so that content can be checked after transcoding."""
from __future__ import annotations

import io
from fractions import Fraction

import av
import numpy as np

SQUARE = 16


def square_x(t: float, seconds: float, width: int) -> float:
    """Centre x of the square at time t."""
    return SQUARE + (width - 2 * SQUARE) * t / seconds


def make_clip(width: int = 160, height: int = 120, fps: float = 15, seconds: float = 2.0, codec: str = "libx264",
              fmt: str = "mp4", pix_fmt: str = "yuv420p") -> bytes:
    buf = io.BytesIO()
    n = int(round(fps * seconds))
    with av.open(buf, mode="w", format=fmt) as out:
        stream = out.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        for i in range(n):
            img = np.full((height, width, 3), 30, np.uint8)
            cx = int(square_x(i / fps, seconds, width))
            img[height // 2 - SQUARE // 2: height // 2 + SQUARE // 2, cx - SQUARE // 2: cx + SQUARE // 2] = 230
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return buf.getvalue()


def no_video_stream() -> bytes:
    """An mp4 container that holds no stream at all."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        out.start_encoding()
    return buf.getvalue()


def undecodable_clip() -> bytes:
    """A well-formed mp4 whose every coded frame is zeroed: the container opens, no frame decodes."""
    data = bytearray(make_clip(160, 120, fps=15, seconds=2))
    start = data.find(b"mdat") + 4
    end = data.find(b"moov") if data.find(b"moov") > start else len(data)
    data[start:end] = bytes(end - start)
    return bytes(data)


def decode_all(data: bytes) -> list[np.ndarray]:
    with av.open(io.BytesIO(data)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def bright_centroid_x(img: np.ndarray) -> float:
    mask = img.mean(axis=2) > 130
    return float(np.nonzero(mask)[1].mean())
