"""Writes that a crash cannot tear: the text goes to a temporary file beside the target, is flushed to disk,
and is renamed over the target (a rename within a folder is atomic), so a reader sees the old file or the new
one, never half of one. Used for manifests, run files, results, the `latest` pointer and an index's feature files."""

from __future__ import annotations

import json
import os
from typing import IO, Any, Callable


def _replace_atomic(path: str, write: Callable[[IO], None], mode: str) -> None:
    """write(f) into a temporary file beside `path`, flushed to disk, then renamed over `path`."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, mode, **({"encoding": "utf-8"} if "b" not in mode else {})) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_text_atomic(path: str, text: str) -> None:
    _replace_atomic(path, lambda f: f.write(text), "w")


def write_json_atomic(path: str, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1, sort_keys=True))


def save_npy_atomic(path: str, array: Any) -> None:
    """np.save (no pickles), torn by no crash."""
    import numpy as np

    _replace_atomic(path, lambda f: np.save(f, array, allow_pickle=False), "wb")
