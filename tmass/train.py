"""Training: the DeepSpeed engine, the global contrastive batch, the schedule, checkpoints with exact resume,
validation and logs. `launch/train.py` calls `train(cfg)`.

A run lives in {output_dir}/{exp_name}/ (layout and crash-safe publishing: tmass/checkpoint.py).
Relaunching the same command resumes from checkpoints/latest: parameters, optimiser, schedule, the data
stream position of every rank and every rank's RNG state, so the result equals an uninterrupted run. A
relaunch whose settings would change the run is refused (check_resume).

One optimiser step, per rank, with b = micro batch and B = world * b:
    t, f = encoders(local pairs); the loss gathers t and f from every rank (with gradients) and scores the
    local texts against all B videos and the local videos against all B texts (tmass.model.loss); the noise of
    global pair g at step s is row g of the stream keyed (seed, "train", s, micro) - independent of the world
    size. DeepSpeed averages the gradients, clips them (JSON), steps AdamW and the schedule; then
    logit_scale <= ln 100 is enforced on the fp32 master copy.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import sys
import time

import torch

from . import checkpoint as ckpt
from . import dist
from .config import Config, ModelConfig
from .data.stream import (SkipStats, StreamPosition, TrainStream, EvalStream, check_bad_fraction, expand_shards,
                          make_loader, samples_per_epoch)
from .data.tokenizer import load_tokenizer, resolve_tokenizer, text_config_overrides
from .data.transforms import normalize
from .model.loss import MAX_LOGIT_SCALE
from .model.clip import build_clip, clip_config
from .model.stochastic import keyed_noise
from .model.tmass import TMASS

log = logging.getLogger("tmass.train")


# ------------------------------------------------------------------------------------------- configuration
def world_size_from_env() -> int:
    for key in ("WORLD_SIZE", "SLURM_NTASKS"):
        if key in os.environ:
            return int(os.environ[key])
    return 1


def prepare_ds_config(cfg: Config, world: int, cuda: bool) -> dict:
    """Read the DeepSpeed JSON, check it against the flags and the machine, fill its "auto" batch size.
    Everything here runs before any process group starts."""
    path = cfg.train.deepspeed_config
    if not path:
        raise SystemExit("error: --deepspeed_config is required (e.g. ds_configs/zero2_bf16.json on GPUs, "
                         "ds_configs/cpu_fp32.json on CPUs)")
    if not os.path.isfile(path):
        raise SystemExit(f"error: --deepspeed_config {path}: no such file (see ds_configs/)")
    try:
        with open(path) as f:
            ds = json.load(f)
    except json.JSONDecodeError as e:
        raise SystemExit(f"error: --deepspeed_config {path} is not valid JSON (line {e.lineno}, column {e.colno}: "
                         f"{e.msg}); compare it with the files in ds_configs/") from None
    if not isinstance(ds, dict):
        raise SystemExit(f"error: --deepspeed_config {path} must hold a JSON object (see ds_configs/)")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage == 3:
        raise SystemExit("error: ZeRO-3 partitions the HF CLIP embeddings, whose forward reads their shape "
                         "(stack notes P4); use ds_configs/zero2_bf16.json or zero1_bf16.json: ZeRO-2 is enough "
                         "for a ViT-B/16 T-MASS")
    if ds.get("fp16", {}).get("enabled") and not cuda:
        raise SystemExit(f"error: {path} enables fp16, which DeepSpeed does not run on CPUs; use "
                         f"ds_configs/cpu_bf16.json or cpu_fp32.json")
    if "scheduler" in ds:
        raise SystemExit(f"error: remove the scheduler block from {path}: tmass sets DeepSpeed's WarmupCosineLR "
                         f"from --warmup_proportion and the run length")
    accum = int(ds.get("gradient_accumulation_steps", 1))
    batch = ds.get("train_batch_size", "auto")
    explicit = "batch_size" in cfg.explicit
    if batch == "auto":
        batch = cfg.data.batch_size
    elif explicit and int(batch) != cfg.data.batch_size:
        raise SystemExit(f"error: --batch_size {cfg.data.batch_size} contradicts train_batch_size {batch} in "
                         f"{path}; drop the flag, or set train_batch_size to \"auto\" or {cfg.data.batch_size}")
    batch = int(batch)
    if batch % (world * accum):
        raise SystemExit(f"error: the global batch {batch} is not divisible by world size {world} x gradient "
                         f"accumulation {accum}; choose a --batch_size that is a multiple of {world * accum}")
    micro = batch // (world * accum)
    if ds.get("train_micro_batch_size_per_gpu", "auto") not in ("auto", micro):
        raise SystemExit(f"error: train_micro_batch_size_per_gpu in {path} should be {micro} "
                         f"(= {batch} / ({world} ranks x {accum})), or \"auto\"")
    ds.update(train_batch_size=batch, train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=accum)
    if "optimizer" in ds and not cuda:
        ds["optimizer"].setdefault("params", {})["torch_adam"] = True  # stack notes P2: no fused_adam JIT on CPUs
        ds["zero_force_ds_cpu_optimizer"] = False  # offload on a CPU machine: torch's AdamW is already there
    return ds


def model_image_size(cfg: ModelConfig) -> int:
    """The CLIP's frame size, read from --clip_path's config.json or --clip_arch's, without building it."""
    if cfg.clip_path:
        from transformers import CLIPConfig

        from .model.clip import resolve_clip_path

        try:
            path = resolve_clip_path(cfg.clip_path)
            return CLIPConfig.from_pretrained(path, local_files_only=True).vision_config.image_size
        except FileNotFoundError as e:
            raise SystemExit(f"error: {e}") from None
        except OSError as e:
            raise SystemExit(f"error: --clip_path {cfg.clip_path}: no CLIP config.json there "
                             f"({(str(e).splitlines() or [''])[0][:200]}); pass a CLIP checkpoint directory") \
                from None
    return clip_config(cfg.clip_arch).vision_config.image_size


def check_input_res(cfg: Config) -> None:
    """Frames come at the CLIP's resolution: taken from the model unless --input_res is given, and then it must
    agree."""
    size = model_image_size(cfg.model)
    if "input_res" in cfg.explicit and cfg.data.input_res != size:
        what = cfg.model.clip_path or f"--clip_arch {cfg.model.clip_arch}"
        raise SystemExit(f"error: --input_res {cfg.data.input_res}, but the CLIP ({what}) takes {size} x {size} "
                         f"frames; drop --input_res or pass {size}")
    cfg.data.input_res = size


def check_inputs(cfg: Config) -> list[str]:
    if not cfg.train.train_shards:
        raise SystemExit("error: --train_shards is required (build shards with shards/build.py)")
    urls = expand_shards(cfg.train.train_shards)
    missing = [u for u in urls if not u.startswith("pipe:") and "://" not in u and not os.path.exists(u)]
    if missing:
        raise SystemExit(f"error: {len(missing)} train shard(s) missing, e.g. {missing[0]}")
    if cfg.train.val_shards:
        for u in expand_shards(cfg.train.val_shards):
            if not u.startswith("pipe:") and not os.path.exists(u):
                raise SystemExit(f"error: val shard missing: {u}")
    return urls


# Settings that may differ when a run is relaunched: where things are written, how often, and how, but nothing
# that changes the weights it trains or how its best checkpoint is chosen.
MAY_CHANGE_ON_RESUME = {
    "train": {"log_step", "save_every_steps", "keep_last", "log_samples", "local_rank", "output_dir", "exp_name",
              "allow_config_change", "verbose"},
    "data": {"decode_timeout", "max_bad_fraction", "num_workers", "stall_skips", "stall_seconds"},
    "eval": {"test_shards", "checkpoint", "results", "tensorboard_dir", "eval_chunk", "eval_compile",
             "eval_batch_size", "save_sims", "random_init", "load_epoch"},
    "model": {"grad_checkpointing", "compile"},
}


def config_changes(old: dict, new: dict) -> list[str]:
    """`--flag old -> new` for every setting that differs and may not change on resume."""
    out = []
    for sec, fields in new.items():
        if not isinstance(fields, dict):
            continue
        for name, value in fields.items():
            before = old.get(sec, {}).get(name, value)
            if name not in MAY_CHANGE_ON_RESUME.get(sec, set()) and before != value:
                out.append(f"--{name} {before} -> {value}")
    return out


def check_resume(cfg: Config, out: str, world: int) -> str | None:
    """The tag to resume from (None: a fresh run). Refuses, with the differences and the way out, a relaunch
    whose settings would change the run, or whose world size or --max_steps cannot continue it."""
    try:
        tag = ckpt.resume_tag(os.path.join(out, "checkpoints"))
    except ckpt.NoCheckpoint as e:
        raise SystemExit(f"error: {e}") from None
    if tag is None:
        return None
    meta = ckpt.read_meta(os.path.join(out, "checkpoints"), tag)
    try:
        with open(os.path.join(out, "config.json")) as f:
            old = json.load(f)
    except (OSError, ValueError):
        old = {}
    changes = config_changes(old, cfg.to_dict())
    if changes and not cfg.train.allow_config_change:
        raise SystemExit(f"error: {out} is an existing run (step {meta['step']}), and these settings differ from "
                         f"its config.json: {'; '.join(changes)}. Start a new run with another --exp_name, or "
                         f"pass --allow_config_change to resume with the new settings anyway")
    if meta["world"] != world:
        raise SystemExit(f"error: {out} was written by {meta['world']} ranks, and this launch has {world}; resume "
                         f"with {meta['world']} (exact resume replays every rank's data stream), or start a new "
                         f"--exp_name")
    if cfg.train.max_steps and cfg.train.max_steps < meta["step"]:
        raise SystemExit(f"error: --max_steps {cfg.train.max_steps}, but {out} has already reached step "
                         f"{meta['step']}; raise --max_steps, or evaluate the run as it is")
    if changes and os.environ.get("RANK", "0") == "0":
        print(f"warning: resuming {out} with changed settings (--allow_config_change): {'; '.join(changes)}",
              file=sys.stderr)
    return tag


def key_hash(key: str) -> int:
    import hashlib

    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") >> 1


# ------------------------------------------------------------------------------------------- model and optimiser
def build_model(cfg: ModelConfig, tokenizer) -> TMASS:
    """From --clip_path, or random weights of --clip_arch whose text tower fits the tokenizer."""
    if cfg.clip_path:
        model = TMASS(cfg)
        if len(tokenizer) > model.clip.config.text_config.vocab_size:
            raise SystemExit(f"error: the tokenizer has {len(tokenizer)} tokens but the CLIP checkpoint's text "
                             f"tower only {model.clip.config.text_config.vocab_size}: use the checkpoint's own "
                             f"tokenizer (--tokenizer {cfg.clip_path})")
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
    return [{"params": ps, "lr": cfg.train.clip_lr if is_clip else cfg.train.noclip_lr,
             "weight_decay": 0.0 if no_decay else cfg.train.weight_decay, "name": ("clip" if is_clip else "noclip")
             + ("_no_decay" if no_decay else "")} for (is_clip, no_decay), ps in sorted(groups.items())]


def clamp_logit_scale(engine) -> None:
    """logit_scale <= ln 100 after every step, on the fp32 master copy that ZeRO keeps (else the module's copy
    would be overwritten at the next step)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

    p = engine.module.logit_scale
    master = safe_get_full_fp32_param(p)
    if master is not None and master.max() > MAX_LOGIT_SCALE:
        safe_set_full_fp32_param(p, master.clamp(max=MAX_LOGIT_SCALE))
    with torch.no_grad():
        p.clamp_(max=MAX_LOGIT_SCALE)


# ------------------------------------------------------------------------------------------- rng state
def _rng_state() -> dict:
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ------------------------------------------------------------------------------------------- the loop
class Preempted(Exception):
    """A SIGUSR1/SIGTERM arrived: every rank saved a checkpoint together at the end of the step."""


def _install_signal_handlers() -> dict:
    flag = {"signal": None}

    def handler(signum, frame):
        flag["signal"] = signum

    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, handler)
    return flag


def train(cfg: Config) -> dict:
    """The whole run. Returns the final summary (also written to {run}/summary.json on rank 0). Every check
    of the flags, inputs and run directory happens here, before any process group starts; rank 0 holds the
    run directory's lock while it trains; every rank stops (with a checkpoint) when its launcher dies."""
    cuda = torch.cuda.is_available()
    ds_config = prepare_ds_config(cfg, world_size_from_env(), cuda)
    urls = check_inputs(cfg)
    check_input_res(cfg)
    out = ckpt.run_dir(cfg.train.output_dir, cfg.train.exp_name)
    resume_from = check_resume(cfg, out, world_size_from_env())
    lock = None
    if int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0:
        try:
            lock = ckpt.RunLock(out).acquire()
        except ckpt.RunLocked as e:
            raise SystemExit(f"error: {e}") from None
    try:
        signals = _install_signal_handlers()
        dist.exit_with_launcher()
        return _run(cfg, ds_config, urls, out, resume_from, signals)
    finally:
        if lock:
            lock.release()


def _run(cfg: Config, ds_config: dict, urls: list[str], out: str, resume_from: str | None, signals: dict) -> dict:
    import deepspeed
    from deepspeed.runtime.lr_schedules import WarmupCosineLR

    ckpt_dir = os.path.join(out, "checkpoints")
    info = dist.init()
    rank, world, device = info.rank, info.world, info.device
    tokenizer = load_tokenizer(resolve_tokenizer(cfg.eval.tokenizer, cfg.model.clip_path, cfg.train.train_shards))
    cfg.data.num_frames = cfg.model.num_frames
    micro, accum = ds_config["train_micro_batch_size_per_gpu"], ds_config["gradient_accumulation_steps"]
    global_batch = ds_config["train_batch_size"]
    n_samples = cfg.train.train_num_samples or samples_per_epoch(urls, cfg.data.caption_sampling)
    steps_per_epoch = max(1, math.ceil(n_samples / global_batch))
    total_steps = steps_per_epoch * cfg.train.num_epochs
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)

    torch.manual_seed(cfg.data.seed)  # the same initial weights everywhere (DeepSpeed broadcasts rank 0's too)
    model = build_model(cfg.model, tokenizer)
    if rank == 0 and (resume_from is None or cfg.train.allow_config_change):
        os.makedirs(out, exist_ok=True)
        ckpt.write_json(os.path.join(out, "config.json"), cfg.to_dict())
        model.clip.config.to_json_file(os.path.join(out, "clip_config.json"))
        tokenizer.save_pretrained(os.path.join(out, "tokenizer"))
    groups = param_groups(model, cfg)
    client_opt = None if "optimizer" in ds_config else torch.optim.AdamW(
        groups, betas=(0.9, 0.999), eps=1e-6, weight_decay=cfg.train.weight_decay)
    def schedule(opt):  # linear warmup from 0, then a half cosine to 0, stepped per optimiser step (upstream's)
        return WarmupCosineLR(opt, total_num_steps=total_steps, warmup_min_ratio=0.0, cos_min_ratio=0.0,
                              warmup_num_steps=max(1, int(cfg.train.warmup_proportion * total_steps)),
                              warmup_type="linear")

    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=client_opt, config=ds_config,
                                                   model_parameters=groups if client_opt is None else None,
                                                   lr_scheduler=schedule)
    dtype = next(engine.module.parameters()).dtype

    step, epoch, best = 0, 0, {"t2v_R@1": -1.0, "step": None}
    position = StreamPosition(streams=max(1, cfg.data.num_workers))
    if resume_from is not None:
        _, client = engine.load_checkpoint(ckpt_dir, tag=resume_from, load_optimizer_states=True,
                                           load_lr_scheduler_states=True)
        step, epoch, best = client["step"], client["epoch"], client["best"]
        position = StreamPosition.from_state_dict(client["positions"][rank])
        _set_rng_state(client["rng"][rank])

    tb = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        tb = SummaryWriter(os.path.join(out, "tb"), purge_step=step + 1 if step else None)
        tb.add_text("config", "```\n" + cfg.to_json() + "\n```", step)
    logfile = open(os.path.join(out, "train.log"), "a") if rank == 0 else None
    if step:
        _log(logfile, f"resumed from {ckpt_dir} at step {step} (epoch {epoch}, checkpoint {resume_from})")

    def client_state() -> dict:
        return {"step": step, "epoch": epoch, "best": best, "world": world, "config": cfg.to_dict(),
                "positions": dist.gather_objects([position.state_dict()]),
                "rng": dist.gather_objects([_rng_state()])}

    done = {"saved": None, "validated": None}

    def meta() -> dict:
        return {"step": step, "epoch": epoch, "steps_per_epoch": steps_per_epoch}

    def checkpoint() -> None:
        if done["saved"] != step:
            ckpt.save(engine, ckpt_dir, f"step{step}", client_state(), meta(), cfg.train.keep_last)
            done["saved"] = step

    def validate() -> dict | None:
        nonlocal best
        if not cfg.train.val_shards or done["validated"] == step:
            return None
        done["validated"] = step
        from .evaluate import evaluate

        stream = EvalStream(expand_shards(cfg.train.val_shards), cfg.data, tokenizer, cfg.eval.eval_batch_size,
                            rank=rank, world=world)
        results = evaluate(engine.module, make_loader(stream, cfg.data.num_workers), cfg.eval, cfg.data.seed,
                           device, autocast_dtype=dtype, max_bad_fraction=cfg.data.max_bad_fraction)
        if tb:
            for d in ("t2v", "v2t"):
                for k in ("R@1", "R@5", "R@10", "MdR", "MnR"):
                    tb.add_scalar(f"val/{d}_{k}", results[d][k], step)
        if results["t2v"]["R@1"] > best["t2v_R@1"]:
            best = {"t2v_R@1": results["t2v"]["R@1"], "step": step, "results": results}
            ckpt.save(engine, ckpt_dir, "best", client_state(), meta(), None, latest=False)
            if rank == 0:
                ckpt.write_json(os.path.join(out, "best.json"), best)
        _log(logfile, f"step {step} val t2v R@1 {results['t2v']['R@1']:.2f} R@5 {results['t2v']['R@5']:.2f} "
                      f"v2t R@1 {results['v2t']['R@1']:.2f} (best {best['t2v_R@1']:.2f} at step {best['step']})")
        return results

    eval_every = max(1, steps_per_epoch // max(1, cfg.train.evals_per_epoch))
    dim = engine.module.dim
    stats: dict[int, dict] = {}
    meter = {"t0": time.perf_counter(), "wait": 0.0, "samples": 0, "loss": 0.0, "n": 0}
    bar = None
    if rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", dynamic_ncols=True, mininterval=2)
    samples_log = open(os.path.join(out, f"samples-rank{rank}.jsonl"), "a", buffering=1) if cfg.train.log_samples \
        else None
    micro_in_step, last = 0, {}
    stopped_by = None
    while epoch < cfg.train.num_epochs and step < total_steps and stopped_by is None:
        stream = TrainStream(urls, dataclasses.replace(cfg.data, batch_size=micro), tokenizer,
                             steps_per_epoch * accum, rank=rank, world=world, position=position)
        t_wait = time.perf_counter()
        for batch in make_loader(stream, cfg.data.num_workers):
            meter["wait"] += time.perf_counter() - t_wait
            stats[batch["stream"]] = batch["stats"]
            video = normalize(batch["video"].to(device, non_blocking=True)).to(dtype)
            eps = torch.zeros(micro * world, dim, device=device) if cfg.model.deterministic_text else keyed_noise(
                (cfg.data.seed, "train", step, micro_in_step), torch.arange(micro * world), 1, dim,
                cfg.model.stochastic_prior, cfg.model.stochastic_prior_std, device)[:, 0]
            video_ids = None
            if cfg.train.multi_positive:  # the global batch's video of every pair, as 63-bit key hashes
                local = torch.tensor([key_hash(k) for k in batch["keys"]], dtype=torch.long, device=device)
                video_ids = dist.gather_rows(local)
            out_ = engine(batch["input_ids"].to(device), batch["attention_mask"].to(device), video, eps,
                          offset=rank * micro, gather=dist.gather_with_grad, video_ids=video_ids,
                          dropout_stream=(cfg.data.seed, "dropout", step, micro_in_step))
            engine.backward(out_["loss"])
            engine.step()
            position.advance(batch)
            if samples_log:
                samples_log.write(json.dumps({"step": step, "micro": micro_in_step, "keys": batch["keys"],
                                              "captions": batch["captions"]}) + "\n")
            meter["samples"] += len(batch["keys"])
            meter["loss"] += out_["loss"].item()
            meter["n"] += 1
            last = out_
            micro_in_step += 1
            if micro_in_step == accum:  # an optimiser step happened
                micro_in_step = 0
                clamp_logit_scale(engine)
                step += 1
                if bar:
                    bar.update(1)
                if step % cfg.train.log_step == 0 or step == total_steps:
                    _log_step(cfg, engine, tb, logfile, step, last, meter, stats, world, scheduler)
                if step % cfg.train.save_every_steps == 0:
                    checkpoint()
                if step % eval_every == 0 and step % steps_per_epoch != 0:
                    validate()
                preempt = dist.all_max(torch.tensor([1 if signals["signal"] else 0], device=device)).item()
                if preempt:
                    stopped_by = "signal"
                    break
                if step >= total_steps:
                    break
            t_wait = time.perf_counter()
        else:
            check_bad_fraction(gathered_skips(stats), cfg.data.max_bad_fraction, min_seen=1)  # any epoch size
            epoch += 1
            position = StreamPosition(epoch=epoch, streams=max(1, cfg.data.num_workers))
            checkpoint()  # the end of every epoch
            validate()
            continue
        if stopped_by is None:  # max_steps reached mid-epoch
            break
    if bar:
        bar.close()
    if stopped_by is None:
        check_bad_fraction(gathered_skips(stats), cfg.data.max_bad_fraction, min_seen=1)  # the last epoch's
    checkpoint()
    if stopped_by:
        _log(logfile, f"stopped by a signal at step {step}: checkpoint saved; rerun the same command to resume")
    else:
        validate()
    summary = {"step": step, "epoch": epoch, "world": world, "best": {k: v for k, v in best.items() if k != "results"},
               "stopped_by": stopped_by, "run_dir": out, "checkpoints": ckpt_dir,
               "tensorboard": os.path.join(out, "tb"), "steps_per_epoch": steps_per_epoch, "total_steps": total_steps}
    if rank == 0:
        ckpt.write_json(os.path.join(out, "summary.json"), summary)
        tb.close()
        logfile.close()
    if samples_log:
        samples_log.close()
    torch.distributed.barrier()
    if stopped_by:
        raise Preempted(summary)
    return summary


def _log(logfile, line: str) -> None:
    if logfile is not None:
        print(line, file=sys.stderr, flush=True)
        logfile.write(line + "\n")
        logfile.flush()


def gathered_skips(stats: dict[int, dict]) -> dict:
    """This epoch's skip counts of every stream of every rank (a collective: every rank calls it)."""
    total = SkipStats.total(list(stats.values()))
    merged = SkipStats.total([t | {"ok": 0} for t in dist.gather_objects([{
        "seen": total["seen"], "reasons": dict(total["reasons"]), "shards": dict(total["shards"])}])])
    return merged


def _log_step(cfg, engine, tb, logfile, step, last, meter, stats, world, scheduler) -> None:
    """TensorBoard scalars and one log line; the bad-sample check (a collective: every rank calls it)."""
    merged = gathered_skips(stats)
    check_bad_fraction(merged, cfg.data.max_bad_fraction)
    if tb is None:
        return
    elapsed = time.perf_counter() - meter["t0"]
    lrs = {g.get("name", str(i)): g["lr"] for i, g in enumerate(engine.optimizer.param_groups)}
    scalars = {"train/loss": meter["loss"] / max(1, meter["n"]), "train/loss_stochastic": last["loss_stochastic"],
               "train/logit_scale": last["logit_scale"], "train/radius_l1": last["radius_l1"],
               "perf/samples_per_s": meter["samples"] * world / elapsed,
               "perf/samples_per_s_per_rank": meter["samples"] / elapsed,
               "perf/data_wait_fraction": meter["wait"] / elapsed}
    if "loss_support" in last:
        scalars["train/loss_support"] = last["loss_support"]
    norm = engine.get_global_grad_norm()
    if norm is not None:
        scalars["train/grad_norm"] = float(norm)
    for name, lr in lrs.items():
        scalars[f"train/lr_{name}"] = lr
    for reason, n in merged["reasons"].items():
        scalars[f"data/skipped_{reason.replace(' ', '_')}"] = n
    for k, v in scalars.items():
        tb.add_scalar(k, float(v), step)
    _log(logfile, f"step {step} loss {scalars['train/loss']:.4f} lr {max(lrs.values()):.2e} "
                  f"logit_scale {float(last['logit_scale']):.3f} {scalars['perf/samples_per_s']:.1f} samples/s "
                  f"data wait {100 * scalars['perf/data_wait_fraction']:.0f}%")
    meter.update(t0=time.perf_counter(), wait=0.0, samples=0, loss=0.0, n=0)
