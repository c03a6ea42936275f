"""Checkpoints in and out: the released upstream T-MASS `.pth` files, and a HF-style export directory.

Upstream layout (the released checkpoints): {"epoch", "state_dict", "optimizer"}, state_dict keys
    clip.<HF CLIPModel keys>  (+ the stale buffers clip.{text,vision}_model.embeddings.position_ids;
                               clip.logit_scale is 0-dim)
    pool_frames.<our TextConditionedPool keys>
    stochastic.std_branch.linear_proj.{weight,bias}  -> radius.linear_proj.*
    stochastic.std_branch.learnable_scalar            (uninitialised, unused: dropped)
Every other missing or unexpected key is an error.

Export directory:
    config.json, model.safetensors   the CLIP part: `CLIPModel.from_pretrained(dir)` loads it as is
    tmass_head.safetensors           pool_frames.* and radius.*
    tmass_config.json                the ModelConfig
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle

import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPModel

from ..config import ModelConfig
from ..errors import DataError
from .clip import one_element_logit_scale
from .tmass import TMASS

IGNORED_UPSTREAM_KEYS = {
    "clip.text_model.embeddings.position_ids",
    "clip.vision_model.embeddings.position_ids",
    "stochastic.std_branch.learnable_scalar",
}
RENAMES = {"stochastic.std_branch.linear_proj.": "radius.linear_proj."}


class CheckpointMismatch(DataError):
    """The checkpoint's keys or shapes do not fit the model built from the flags."""


class UnsafeCheckpoint(CheckpointMismatch):
    """The file needs pickle's arbitrary code to load: it is refused, never executed."""


def read_torch_file(path: str) -> dict:
    """A .pth file as data: torch's weights_only unpickler (tensors, dicts, lists, numbers, strings). A file
    that needs anything more (a class, a function: code that would run on loading) is refused."""
    with open(path, "rb") as f:
        head = f.read(4)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # torch's zip format, or a legacy pickle
        raise CheckpointMismatch(
            f"{path} is not a readable torch checkpoint (neither torch's zip format nor a "
            f"pickle); pass a .pth file, a run directory or an export directory"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "global" not in str(e).lower():
            first = (str(e).splitlines() or [""])[0][:200]
            raise CheckpointMismatch(f"{path} is not a readable torch checkpoint ({first})") from None
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise UnsafeCheckpoint(
            f"{path} holds more than tensors and plain containers ({first}); tmass loads "
            f"checkpoints as data only and will not unpickle it. Re-save its state_dict "
            f"with torch.save({{'state_dict': ...}}) from a trusted session."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:  # truncated, not a torch file, ...
        raise CheckpointMismatch(
            f"{path} is not a readable torch checkpoint ({type(e).__name__}: "
            f"{(str(e).strip().splitlines() or [''])[0][:200]})"
        ) from None


def upstream_to_tmass(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map an upstream state dict onto our parameter names (ignored keys dropped, logit_scale 1-element)."""
    out = {}
    for key, value in state.items():
        if key in IGNORED_UPSTREAM_KEYS:
            continue
        for old, new in RENAMES.items():
            if key.startswith(old):
                key = new + key[len(old) :]
        if key == "clip.logit_scale":
            value = value.reshape(1)
        out[key] = value
    return out


def load_state_strict(model: TMASS, state: dict[str, torch.Tensor], source: str) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if own[k].shape != state[k].shape
    ]
    if missing or unexpected or shapes:

        def head(xs):
            return ", ".join(xs[:8]) + (f" (+{len(xs) - 8} more)" if len(xs) > 8 else "")

        raise CheckpointMismatch(
            f"{source} does not fit the model built from the flags (--clip_arch {model.cfg.clip_arch}, "
            f"--num_frames {model.cfg.num_frames}): "
            + "; ".join(
                p
                for p in (
                    missing and f"missing {head(missing)}",
                    unexpected and f"unexpected {head(unexpected)}",
                    shapes and f"shape {head(shapes)}",
                )
                if p
            )
        )
    model.load_state_dict(state, strict=True)


def load_upstream(model: TMASS, path: str) -> dict:
    """Load a released T-MASS checkpoint into `model`; returns the file's other entries (epoch, ...)."""
    ckpt = read_torch_file(path)
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise CheckpointMismatch(f"{path}: no state_dict inside")
    load_state_strict(model, upstream_to_tmass(state), path)
    return {k: v for k, v in ckpt.items() if k not in ("state_dict", "optimizer")}


def export_hf(model: TMASS, out_dir: str) -> None:
    """Write the HF-style directory described above (fp32)."""
    os.makedirs(out_dir, exist_ok=True)
    clip_state = {k: v.detach().float().cpu().contiguous() for k, v in model.clip.state_dict().items()}
    clip_state["logit_scale"] = clip_state["logit_scale"].reshape(())  # HF's own shape
    model.clip.save_pretrained(out_dir, state_dict=clip_state)
    head = {
        k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items() if not k.startswith("clip.")
    }
    save_file(head, os.path.join(out_dir, "tmass_head.safetensors"))
    with open(os.path.join(out_dir, "tmass_config.json"), "w") as f:
        json.dump(dataclasses.asdict(model.cfg) | {"clip_path": None}, f, indent=1, sort_keys=True)


def load_hf(out_dir: str, **overrides) -> TMASS:
    """Rebuild a TMASS from an exported directory (`overrides` change ModelConfig fields, e.g. dropout)."""
    with open(os.path.join(out_dir, "tmass_config.json")) as f:
        cfg = ModelConfig(**(json.load(f) | overrides))
    clip = CLIPModel.from_pretrained(out_dir, local_files_only=True)
    one_element_logit_scale(clip)
    model = TMASS(cfg, clip=clip)
    state = {f"clip.{k}": v for k, v in clip.state_dict().items()} | load_file(
        os.path.join(out_dir, "tmass_head.safetensors")
    )
    load_state_strict(model, state, out_dir)
    return model
