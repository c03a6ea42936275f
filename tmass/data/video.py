"""Decoding clips from bytes in memory with decord, frame sampling, and a decode timeout.

Frame sampling (upstream's): split [0, n) into m = min(F, n) equal intervals
    edges = linspace(0, n, m + 1) as int;  interval k = [edges[k], edges[k+1] - 1]
    uniform: the middle, (a + b) // 2         rand: a random frame of the interval (a when it is empty)
then repeat the last index until there are F (clips shorter than F frames never crash).
"""
from __future__ import annotations

import io
import queue
import random
import threading
from typing import Callable

import numpy as np


class DecodeError(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def frame_indices(num_stored: int, num_frames: int, mode: str, rng: random.Random | None = None) -> list[int]:
    if num_stored < 1:
        raise DecodeError("no frames")
    m = min(num_frames, num_stored)
    edges = np.linspace(0, num_stored, num=m + 1).astype(int)
    intervals = [(int(edges[k]), int(edges[k + 1]) - 1) for k in range(m)]
    if mode == "uniform":
        idx = [(a + b) // 2 for a, b in intervals]
    elif mode == "rand":
        rng = rng or random.Random()
        idx = [rng.randrange(a, b) if b > a else a for a, b in intervals]
    else:
        raise ValueError(f"unknown --video_sample_type {mode!r} (uniform or rand)")
    return idx + [idx[-1]] * (num_frames - len(idx))


def decode_frames(data: bytes, num_frames: int, mode: str, rng: random.Random | None = None) -> np.ndarray:
    """[F, H, W, 3] uint8 RGB from an in-memory video."""
    import decord  # imported here: a worker that never decodes does not pay for it

    if not data:
        raise DecodeError("no video bytes")
    try:
        vr = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), num_threads=1)
        idx = frame_indices(len(vr), num_frames, mode, rng)
        return vr.get_batch(idx).asnumpy()
    except DecodeError:
        raise
    except Exception as e:  # decord raises DECORDError / RuntimeError on bad bytes
        raise DecodeError("decode error", f"{type(e).__name__}: {str(e)[:200]}") from None


class TimedDecoder:
    """Runs a decode function in a helper daemon thread and gives up after `timeout` seconds.

    decord calls native code through ctypes, which releases the GIL, so a decode that hangs there cannot
    stop this thread from timing out. The stuck helper is abandoned (it is a daemon thread, so it never holds
    the process at exit), a new one serves the next clip, and the clip is dropped as 'decode timeout'.
    """

    def __init__(self, timeout: float, fn: Callable[..., np.ndarray] = decode_frames):
        self.timeout, self.fn = timeout, fn
        self._jobs: queue.Queue | None = None
        self.abandoned = 0

    def _serve(self, jobs: queue.Queue) -> None:
        while True:
            args, kwargs, box = jobs.get()
            try:
                box.put((True, self.fn(*args, **kwargs)))
            except BaseException as e:  # handed to the caller
                box.put((False, e))

    def __call__(self, *args, **kwargs) -> np.ndarray:
        if self.timeout <= 0:
            return self.fn(*args, **kwargs)
        if self._jobs is None:
            self._jobs = queue.Queue()
            threading.Thread(target=self._serve, args=(self._jobs,), daemon=True, name="decode").start()
        box: queue.Queue = queue.Queue(maxsize=1)
        self._jobs.put((args, kwargs, box))
        try:
            ok, value = box.get(timeout=self.timeout)
        except queue.Empty:
            self._jobs = None  # the helper is stuck in this clip: leave it behind
            self.abandoned += 1
            raise DecodeError("decode timeout", f"> {self.timeout:g} s") from None
        if ok:
            return value
        raise value

    def __getstate__(self):  # picklable for DataLoader workers: the helper thread is made anew there
        return {"timeout": self.timeout, "fn": self.fn, "_jobs": None, "abandoned": 0}
