"""The DeepSpeed side of training: the JSON checked against the flags and the machine, the model and its two
learning-rate groups, the engine with its schedule, and the logit clamp. Nothing here knows of data or of the
run directory.

    schedule: linear warm-up from 0 over --warmup_proportion of the steps, then a half cosine to 0, stepped per
    optimiser step (upstream's), through DeepSpeed's WarmupCosineLR
    clamp:    logit_scale <= ln 100 after every step, on ZeRO's fp32 master copy
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import TYPE_CHECKING

import torch

from .config import Config, ModelConfig
from .data.tokenizer import text_config_overrides
from .errors import ConfigError
from .model.clip import build_clip, clip_config
from .model.loss import MAX_LOGIT_SCALE
from .model.tmass import TMASS

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine
    from transformers import PreTrainedTokenizerBase


def world_size_from_env() -> int:
    for key in ("WORLD_SIZE", "SLURM_NTASKS"):
        if key in os.environ:
            return int(os.environ[key])
    return 1


def read_ds_json(path: str) -> dict:
    """The DeepSpeed JSON that --deepspeed_config names, as a dict; ConfigError with the fix otherwise."""
    if not path:
        raise ConfigError(
            "--deepspeed_config is required (e.g. ds_configs/zero2_bf16.json on GPUs, ds_configs/cpu_fp32.json on CPUs)"
        )
    if not os.path.isfile(path):
        raise ConfigError(f"--deepspeed_config {path}: no such file (see ds_configs/)")
    try:
        with open(path) as f:
            ds = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"--deepspeed_config {path} is not valid JSON (line {e.lineno}, column {e.colno}: "
            f"{e.msg}); compare it with the files in ds_configs/"
        ) from None
    if not isinstance(ds, dict):
        raise ConfigError(f"--deepspeed_config {path} must hold a JSON object (see ds_configs/)")
    return ds


def batch_sizes(ds: dict, cfg: Config, world: int, path: str) -> tuple[int, int, int]:
    """(global batch, micro batch per rank, gradient accumulation) from the JSON and --global_batch_size:
    global = micro x world x accumulation, each "auto" filled, each contradiction an error."""
    accum = int(ds.get("gradient_accumulation_steps", 1))
    batch = ds.get("train_batch_size", "auto")
    given = cfg.train.global_batch_size
    if batch == "auto":
        batch = given
    elif "global_batch_size" in cfg.explicit and int(batch) != given:
        raise ConfigError(
            f"--global_batch_size (--batch_size) {given} contradicts train_batch_size {batch} in "
            f'{path}; drop the flag, or set train_batch_size to "auto" or {given}'
        )
    batch = int(batch)
    if batch % (world * accum):
        raise ConfigError(
            f"the global batch {batch} is not divisible by world size {world} x gradient "
            f"accumulation {accum}; choose a --global_batch_size (--batch_size) that is a multiple "
            f"of {world * accum}"
        )
    micro = batch // (world * accum)
    if ds.get("train_micro_batch_size_per_gpu", "auto") not in ("auto", micro):
        raise ConfigError(
            f"train_micro_batch_size_per_gpu in {path} should be {micro} "
            f'(= {batch} / ({world} ranks x {accum})), or "auto"'
        )
    return batch, micro, accum


def prepare_ds_config(cfg: Config, world: int, cuda: bool) -> dict:
    """Read the DeepSpeed JSON, check it against the flags and the machine, fill its "auto" batch size.
    Everything here runs before any process group starts."""
    path = cfg.train.deepspeed_config
    ds = read_ds_json(path)
    if ds.get("fp16", {}).get("enabled") and not cuda:
        raise ConfigError(
            f"{path} enables fp16, which DeepSpeed does not run on CPUs; use ds_configs/cpu_bf16.json or cpu_fp32.json"
        )
    if "scheduler" in ds:
        raise ConfigError(
            f"remove the scheduler block from {path}: tmass sets DeepSpeed's WarmupCosineLR "
            f"from --warmup_proportion and the run length"
        )
    batch, micro, accum = batch_sizes(ds, cfg, world, path)
    ds.update(train_batch_size=batch, train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=accum)
    if "optimizer" in ds and not cuda:
        ds["optimizer"].setdefault("params", {})["torch_adam"] = True  # no fused_adam JIT on CPUs
        ds["zero_force_ds_cpu_optimizer"] = False  # offload on a CPU machine: torch's AdamW is already there
    return ds


def build_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> TMASS:
    """From --clip_path, or random weights of --clip_arch whose text tower fits the tokenizer."""
    if cfg.clip_path:
        model = TMASS(cfg)
        if len(tokenizer) > model.clip.config.text_config.vocab_size:
            raise ConfigError(
                f"the tokenizer has {len(tokenizer)} tokens but the CLIP checkpoint's text "
                f"tower only {model.clip.config.text_config.vocab_size}: use the checkpoint's own "
                f"tokenizer (--tokenizer {cfg.clip_path})"
            )
        return model
    conf = clip_config(cfg.clip_arch)
    for key, value in text_config_overrides(tokenizer).items():
        setattr(conf.text_config, key, value)
    return TMASS(cfg, clip=build_clip(config=conf))


def param_groups(model: TMASS, cfg: Config) -> list[dict]:
    """Two learning rates, split like upstream by the 'clip.' prefix; optional no-decay group."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_clip = name.startswith("clip.")
        no_decay = cfg.train.no_decay_norm_bias and (p.dim() < 2 or "norm" in name or "logit_scale" in name)
        groups.setdefault((is_clip, no_decay), []).append(p)
    # ZeRO-1/2 packs each group into one flat buffer and makes the module's parameters views of it, in this
    # order. A parameter at an offset that is not a multiple of 16 bytes makes cuBLAS fall back to its slow
    # generic kernels: CLIP's 1-element logit_scale first made a ViT-B/16 step 2.4x slower on an H200. So the
    # parameters whose size is a multiple of 8 elements go first, the odd-sized ones (logit_scale) after them.
    for ps in groups.values():
        ps.sort(key=lambda p: p.numel() % 8 != 0)
    return [
        {
            "params": ps,
            "lr": cfg.train.clip_lr if is_clip else cfg.train.noclip_lr,
            "weight_decay": 0.0 if no_decay else cfg.train.weight_decay,
            "name": ("clip" if is_clip else "noclip") + ("_no_decay" if no_decay else ""),
        }
        for (is_clip, no_decay), ps in sorted(groups.items())
    ]


def clamp_logit_scale(engine: DeepSpeedEngine) -> None:
    """logit_scale <= ln 100 after every step, on the fp32 master copy that ZeRO keeps (else the module's copy
    would be overwritten at the next step)."""
    from deepspeed.utils import (
        safe_get_full_fp32_param,
        safe_get_local_fp32_param,
        safe_set_full_fp32_param,
        safe_set_local_fp32_param,
    )

    p = engine.module.logit_scale
    if hasattr(p, "ds_id"):  # ZeRO-3: each rank clamps its own partition of the master copy (padding included)
        local = safe_get_local_fp32_param(p)
        if local is not None:
            safe_set_local_fp32_param(p, local.clamp(max=MAX_LOGIT_SCALE))
    else:
        master = safe_get_full_fp32_param(p)
        if master is not None:  # unconditional: a test of the value would make the host wait for the device
            safe_set_full_fp32_param(p, master.clamp(max=MAX_LOGIT_SCALE))
    with torch.no_grad():
        p.clamp_(max=MAX_LOGIT_SCALE)


def whole_parameters(model: torch.nn.Module) -> contextlib.AbstractContextManager:
    """Every parameter whole on every rank while the context lasts: under ZeRO-3, gathered (read-only) from the
    ranks' partitions; under ZeRO 0-2 they are whole already."""
    params = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def make_adamw(groups: list[dict], cfg: Config, cuda: bool) -> torch.optim.AdamW:
    """AdamW (betas 0.9/0.999, eps 1e-6) over the parameter groups, in the implementation --adamw names (auto:
    fused on CUDA, torch's default elsewhere)."""
    choice = "fused" if cfg.train.adamw == "auto" and cuda else cfg.train.adamw
    kernel = {"fused": {"fused": True}, "foreach": {"foreach": True}}.get(choice, {})
    return torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-6, weight_decay=cfg.train.weight_decay, **kernel)


def initialize(cfg: Config, ds_config: dict, model: TMASS, total_steps: int) -> tuple[DeepSpeedEngine, object]:
    """(engine, scheduler): make_adamw's AdamW over param_groups, unless the JSON names its own optimiser, and
    the warm-up + cosine schedule over `total_steps`."""
    import deepspeed
    from deepspeed.runtime.lr_schedules import WarmupCosineLR

    groups = param_groups(model, cfg)
    client_opt = None if "optimizer" in ds_config else make_adamw(groups, cfg, torch.cuda.is_available())

    def schedule(opt):
        return WarmupCosineLR(
            opt,
            total_num_steps=total_steps,
            warmup_min_ratio=0.0,
            cos_min_ratio=0.0,
            warmup_num_steps=max(1, int(cfg.train.warmup_proportion * total_steps)),
            warmup_type="linear",
        )

    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        optimizer=client_opt,
        config=ds_config,
        model_parameters=groups if client_opt is None else None,
        lr_scheduler=schedule,
    )
    return engine, scheduler
