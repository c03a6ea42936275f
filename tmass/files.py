"""Writes that a crash cannot tear: the text goes to a temporary file beside the target, is flushed to disk,
and is renamed over the target (a rename within a folder is atomic), so a reader sees the old file or the new
one, never half of one. Used for manifests, run files, results, the `latest` pointer and an index's feature files."""

from __future__ import annotations

import json
import os
from typing import Any


def write_text_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: str, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1, sort_keys=True))


def save_npy_atomic(path: str, array: Any) -> None:
    """np.save, torn by no crash: the .npy goes to a temporary file beside the target, then is renamed over it."""
    import numpy as np

    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
