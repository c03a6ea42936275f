"""Training: a Trainer that runs the steps, validates, checkpoints and logs; `launch/train.py` calls
`train(cfg)`, which checks everything it can before any process group starts.

A run lives in {output_dir}/{exp_name}/ (layout and crash-safe publishing: tmass/checkpoint.py).
Relaunching the same command resumes from checkpoints/latest: parameters, optimiser, schedule, the data
stream position of every rank and every rank's RNG state, so the result equals an uninterrupted run. A
relaunch whose settings would change the run is refused (check_resume).

One optimiser step, per rank, with b = micro batch and B = world * b:
    t, f = encoders(local pairs); the loss gathers t and f from every rank (with gradients) and scores the
    local texts against all B videos and the local videos against all B texts (tmass.model.loss); the noise of
    global pair g at step s is row g of the stream keyed (seed, "train", s, micro), the pooling's dropout mask
    of a pair is keyed by its global ids and (seed, "dropout", s, micro) - independent of the world size.
    DeepSpeed averages the gradients, clips them (JSON), steps AdamW and the schedule; then
    logit_scale <= ln 100 is enforced on the fp32 master copy (tmass/engine.py).
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time

import torch

from . import checkpoint as ckpt
from . import dist
from . import engine as eng
from .config import TOP, Config, ModelConfig
from .data.shardlist import expand_shards, missing_shards, samples_per_epoch
from .data.stream import SkipStats, StreamPosition, TrainStream, EvalStream, check_bad_fraction, make_loader
from .data.tokenizer import load_tokenizer, resolve_tokenizer
from .data.transforms import normalize
from .errors import ConfigError
from .files import write_json_atomic
from .logs import Meter, RunLog
from .model.clip import clip_config, pixel_stats_of
from .model.noise import keyed_noise


# --------------------------------------------------------------------------- checks, before any process group
def model_image_size(cfg: ModelConfig) -> int:
    """The CLIP's frame size, read from --clip_path's config.json or --clip_arch's, without building it."""
    if cfg.clip_path:
        from transformers import CLIPConfig

        from .model.clip import resolve_clip_path

        path = resolve_clip_path(cfg.clip_path)
        try:
            return CLIPConfig.from_pretrained(path, local_files_only=True).vision_config.image_size
        except OSError as e:
            raise ConfigError(
                f"--clip_path {cfg.clip_path}: no CLIP config.json there "
                f"({(str(e).splitlines() or [''])[0][:200]}); pass a CLIP checkpoint directory"
            ) from None
    return clip_config(cfg.clip_arch).vision_config.image_size


def check_inputs(cfg: Config) -> list[str]:
    if not cfg.train.train_shards:
        raise ConfigError("--train_shards is required (build shards with shards/build.py)")
    urls = expand_shards(cfg.train.train_shards)
    missing = missing_shards(urls)
    if missing:
        raise ConfigError(f"{len(missing)} train shard(s) missing, e.g. {missing[0]}")
    missing = missing_shards(expand_shards(cfg.train.val_shards)) if cfg.train.val_shards else []
    if missing:
        raise ConfigError(f"val shard missing: {missing[0]}")
    return urls


# Settings that may differ when a run is relaunched: where things are written, how often, and how, but nothing
# that changes the weights it trains or how its best checkpoint is chosen.
MAY_CHANGE_ON_RESUME = {
    "train": {
        "log_step",
        "save_every_steps",
        "keep_last",
        "log_samples",
        "local_rank",
        "output_dir",
        "exp_name",
        "allow_config_change",
        "verbose",
        "adamw",
    },
    "data": {"decode_timeout", "max_bad_fraction", "num_workers", "stall_skips", "stall_seconds"},
    "eval": {
        "test_shards",
        "checkpoint",
        "results",
        "tensorboard_dir",
        "eval_chunk",
        "eval_compile",
        "eval_batch_size",
        "save_sims",
        "random_init",
        "load_epoch",
    },
    "model": {"grad_checkpointing", "compile", "compile_scope", "attn_implementation"},
}


def config_changes(old: dict, new: dict) -> list[str]:
    """`--flag old -> new` for every setting that differs and may not change on resume."""
    out = [f"--{name} {old[name]} -> {new[name]}" for name in TOP if name in old and old[name] != new[name]]
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
    tag = ckpt.resume_tag(os.path.join(out, "checkpoints"))
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
        raise ConfigError(
            f"{out} is an existing run (step {meta['step']}), and these settings differ from "
            f"its config.json: {'; '.join(changes)}. Start a new run with another --exp_name, or "
            f"pass --allow_config_change to resume with the new settings anyway"
        )
    if meta["world"] != world:
        raise ConfigError(
            f"{out} was written by {meta['world']} ranks, and this launch has {world}; resume "
            f"with {meta['world']} (exact resume replays every rank's data stream), or start a new "
            f"--exp_name"
        )
    if cfg.train.max_steps and cfg.train.max_steps < meta["step"]:
        raise ConfigError(
            f"--max_steps {cfg.train.max_steps}, but {out} has already reached step "
            f"{meta['step']}; raise --max_steps, or evaluate the run as it is"
        )
    if changes and dist.env_rank() == 0:
        print(
            f"warning: resuming {out} with changed settings (--allow_config_change): {'; '.join(changes)}",
            file=sys.stderr,
        )
    return tag


def key_hash(key: str) -> int:
    import hashlib

    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") >> 1


def _rng_state() -> dict:
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def gathered_skips(stats: dict[int, dict]) -> dict:
    """This epoch's skip counts of every stream of every rank (a collective: every rank calls it)."""
    total = SkipStats.total(list(stats.values()))
    return SkipStats.total(
        [
            t | {"ok": 0}
            for t in dist.gather_objects(
                [{"seen": total["seen"], "reasons": dict(total["reasons"]), "shards": dict(total["shards"])}]
            )
        ]
    )


# ------------------------------------------------------------------------------------------- the run
class Preempted(Exception):
    """A SIGUSR1/SIGTERM or a stop request ({run}/stop-request) arrived: every rank saved a checkpoint together at
    the next log step."""


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
    ds_config = eng.prepare_ds_config(cfg, eng.world_size_from_env(), torch.cuda.is_available())
    urls = check_inputs(cfg)
    cfg = cfg.resolve(
        model_image_size(cfg.model), f"the CLIP ({cfg.model.clip_path or '--clip_arch ' + cfg.model.clip_arch})"
    )
    mean, std = pixel_stats_of(cfg.model)  # fixed in the run's config.json, which evaluation reads
    cfg = cfg.replace(model={"image_mean": mean, "image_std": std})
    out = ckpt.run_dir(cfg.train.output_dir, cfg.train.exp_name)
    resume_from = check_resume(cfg, out, eng.world_size_from_env())
    lock = None
    if dist.env_rank() == 0:
        lock = ckpt.RunLock(out).acquire()
    try:
        signals = _install_signal_handlers()
        dist.exit_with_launcher()
        return Trainer(cfg, ds_config, urls, out, resume_from, signals).fit()
    finally:
        if lock:
            lock.release()


class Trainer:
    """One rank's share of a run: the engine, where the run is (step, epoch, best, data position), the steps,
    validation, checkpoints and logs. Every method that touches a collective is called by every rank."""

    def __init__(self, cfg: Config, ds_config: dict, urls: list[str], out: str, resume_from: str | None, signals: dict):
        info = dist.init()
        self.cfg, self.urls, self.out, self.signals = cfg, urls, out, signals
        self.rank, self.world, self.device = info.rank, info.world, info.device
        self.ckpt_dir = os.path.join(out, "checkpoints")
        self.tokenizer = load_tokenizer(
            resolve_tokenizer(cfg.eval.tokenizer, cfg.model.clip_path, cfg.train.train_shards)
        )
        self.micro_batch_size = ds_config["train_micro_batch_size_per_gpu"]  # per rank, per micro-step
        self.accum = ds_config["gradient_accumulation_steps"]
        n_samples = cfg.train.train_num_samples or samples_per_epoch(urls, cfg.data.caption_sampling)
        self.steps_per_epoch = max(1, math.ceil(n_samples / ds_config["train_batch_size"]))
        self.total_steps = self.steps_per_epoch * cfg.train.num_epochs
        if cfg.train.max_steps:
            self.total_steps = min(self.total_steps, cfg.train.max_steps)
        self.eval_every = max(1, self.steps_per_epoch // cfg.train.evals_per_epoch)  # validations inside an epoch
        torch.manual_seed(cfg.seed)  # the same initial weights everywhere (DeepSpeed broadcasts rank 0's too)
        model = eng.build_model(cfg.model, self.tokenizer)
        if self.rank == 0 and (resume_from is None or cfg.train.allow_config_change):
            self._write_run_files(model)
        self.engine, self.scheduler = eng.initialize(cfg, ds_config, model, self.total_steps)
        self.dtype = next(self.engine.module.parameters()).dtype
        self.pixel_stats = cfg.model.pixel_stats()  # parsed once, not per step
        self.step, self.epoch, self.best = 0, 0, {"t2v_R@1": -1.0, "step": None}
        self.position = StreamPosition(streams=max(1, cfg.data.num_workers))
        if resume_from is not None:
            _, client = self.engine.load_checkpoint(
                self.ckpt_dir, tag=resume_from, load_optimizer_states=True, load_lr_scheduler_states=True
            )
            self.load_state_dict(client)
        self.log = RunLog(out, self.rank == 0, self.step, self.total_steps, cfg.to_json())
        if self.step:
            self.log.line(
                f"resumed from {self.ckpt_dir} at step {self.step} (epoch {self.epoch}, checkpoint {resume_from})"
            )
        self.samples_log = (
            open(os.path.join(out, f"samples-rank{self.rank}.jsonl"), "a", buffering=1)
            if cfg.train.log_samples
            else None
        )
        self.meter, self.stats, self.micro_in_step = Meter(), {}, 0
        self.done = {"saved": None, "validated": None}

    def _write_run_files(self, model) -> None:
        os.makedirs(self.out, exist_ok=True)
        write_json_atomic(os.path.join(self.out, "config.json"), self.cfg.to_dict())
        model.clip.config.to_json_file(os.path.join(self.out, "clip_config.json"))
        self.tokenizer.save_pretrained(os.path.join(self.out, "tokenizer"))

    # ---------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """The checkpoint's client state: where the run is, and every rank's data position and RNG state."""
        return {
            "step": self.step,
            "epoch": self.epoch,
            "best": self.best,
            "world": self.world,
            "config": self.cfg.to_dict(),
            "positions": dist.gather_objects([self.position.state_dict()]),
            "rng": dist.gather_objects([_rng_state()]),
        }

    def load_state_dict(self, client: dict) -> None:
        self.step, self.epoch, self.best = client["step"], client["epoch"], client["best"]
        self.position = StreamPosition.from_state_dict(client["positions"][self.rank])
        _set_rng_state(client["rng"][self.rank])

    def meta(self) -> dict:
        return {"step": self.step, "steps_per_epoch": self.steps_per_epoch}  # epochs done = step // steps_per_epoch

    def checkpoint(self) -> None:
        if self.done["saved"] != self.step:
            ckpt.save(
                self.engine, self.ckpt_dir, f"step{self.step}", self.state_dict(), self.meta(), self.cfg.train.keep_last
            )
            self.done["saved"] = self.step

    # ---------------------------------------------------------------------------------------- steps
    def train_step(self, batch: dict) -> dict:
        """One micro-batch: forward over the global batch, backward, and DeepSpeed's step (an optimiser step
        once every --gradient_accumulation_steps micro-batches)."""
        cfg, dev, dim, n = self.cfg, self.device, self.engine.module.dim, self.micro_batch_size * self.world
        video = normalize(batch["video"].to(dev, non_blocking=True), self.pixel_stats).to(self.dtype)
        key = (cfg.seed, "train", self.step, self.micro_in_step)
        eps = (
            torch.zeros(n, dim, device=dev)
            if cfg.model.deterministic_text
            else keyed_noise(
                key, torch.arange(n), 1, dim, cfg.model.stochastic_prior, cfg.model.stochastic_prior_std, dev
            )[:, 0]
        )
        video_ids = None
        if cfg.train.multi_positive:  # the global batch's video of every pair, as 63-bit key hashes
            local = torch.tensor([key_hash(k) for k in batch["keys"]], dtype=torch.long, device=dev)
            video_ids = dist.gather_rows(local)
        out = self.engine(
            batch["input_ids"].to(dev),
            batch["attention_mask"].to(dev),
            video,
            eps,
            offset=self.rank * self.micro_batch_size,
            gather=dist.gather_with_grad,
            video_ids=video_ids,
            dropout_stream=(cfg.seed, "dropout", self.step, self.micro_in_step),
        )
        self.engine.backward(out["loss"])
        self.engine.step()
        return out

    def after_optimiser_step(self) -> str | None:
        """The clamp, logs, checkpoints and validation that follow an optimiser step; "signal" or "max_steps"
        when the run must stop here. The host waits for the device only at log steps (--log_step): the loss is
        read there, and a signal is acted on there."""
        eng.clamp_logit_scale(self.engine)
        self.step += 1
        self.log.advance()
        step, tr = self.step, self.cfg.train
        log_step = step % tr.log_step == 0 or step == self.total_steps
        if log_step:
            self.log_step()
        if step % tr.save_every_steps == 0:
            self.checkpoint()
        if step % self.eval_every == 0 and step % self.steps_per_epoch != 0:
            self.validate()
        if log_step and self.signalled():
            return "signal"
        return "max_steps" if step >= self.total_steps else None

    def signalled(self) -> bool:
        """Whether any rank got SIGUSR1/SIGTERM, or the run directory holds a stop request (read by rank 0 alone,
        one look at the shared file system per log step): a collective that waits for the device, so it runs at
        log steps only, like every other read of a device value."""
        asked = self.signals["signal"] or (self.rank == 0 and ckpt.stop_requested(self.out))
        return bool(dist.all_max(torch.tensor([1 if asked else 0], device=self.device)).item())

    def run_epoch(self) -> str:
        """This epoch's batches from the current position: "epoch" when it ends, else why the run stops."""
        cfg = self.cfg
        stream = TrainStream(
            self.urls,
            cfg.data,
            self.tokenizer,
            self.steps_per_epoch * self.accum,
            batch_size=self.micro_batch_size,
            num_frames=cfg.model.num_frames,
            seed=cfg.seed,
            rank=self.rank,
            world=self.world,
            position=self.position,
        )
        t_wait = time.perf_counter()
        for batch in make_loader(stream, self.cfg.data.num_workers):
            self.meter.wait += time.perf_counter() - t_wait
            self.stats[batch["stream"]] = batch["stats"]
            out = self.train_step(batch)
            self.position.advance(batch)
            if self.samples_log:
                self.samples_log.write(
                    json.dumps(
                        {
                            "step": self.step,
                            "micro": self.micro_in_step,
                            "keys": batch["keys"],
                            "captions": batch["captions"],
                        }
                    )
                    + "\n"
                )
            self.meter.add(out, len(batch["keys"]))
            self.micro_in_step += 1
            if self.micro_in_step == self.accum:
                self.micro_in_step = 0
                stop = self.after_optimiser_step()
                if stop:
                    return stop
            t_wait = time.perf_counter()
        return "epoch"

    def fit(self) -> dict:
        """Epochs until the schedule's end, a signal, or --max_steps; then the last checkpoint and validation."""
        stopped_by = None
        while self.epoch < self.cfg.train.num_epochs and self.step < self.total_steps:
            ended = self.run_epoch()
            if ended != "epoch":
                stopped_by = "signal" if ended == "signal" else None
                break
            check_bad_fraction(gathered_skips(self.stats), self.cfg.data.max_bad_fraction, min_seen=1)
            self.epoch += 1
            self.position = StreamPosition(epoch=self.epoch, streams=max(1, self.cfg.data.num_workers))
            self.checkpoint()  # the end of every epoch
            self.validate()
        self.log.close_bar()
        if stopped_by is None:
            check_bad_fraction(gathered_skips(self.stats), self.cfg.data.max_bad_fraction, min_seen=1)
        self.checkpoint()
        if stopped_by:
            if self.rank == 0:
                ckpt.clear_stop_request(self.out)  # acted on: a relaunch trains on
            self.log.line(
                f"stopped by a signal or a stop request at step {self.step}: checkpoint saved; rerun the same "
                "command to resume"
            )
        else:
            self.validate()
        return self.finish(stopped_by)

    def finish(self, stopped_by: str | None) -> dict:
        summary = {
            "step": self.step,
            "epoch": self.step // self.steps_per_epoch,  # epochs completed
            "world": self.world,
            "best": {k: v for k, v in self.best.items() if k != "results"},
            "stopped_by": stopped_by,
            "run_dir": self.out,
            "checkpoints": self.ckpt_dir,
            "tensorboard": os.path.join(self.out, "tb"),
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
        }
        if self.rank == 0:
            write_json_atomic(os.path.join(self.out, "summary.json"), summary)
        self.log.close()
        if self.samples_log:
            self.samples_log.close()
        torch.distributed.barrier()
        if stopped_by:
            raise Preempted(summary)
        return summary

    # ---------------------------------------------------------------------------------------- validation, logs
    def validate(self) -> dict | None:
        """Validation R@1 on --val_shards (the evaluation's code and settings); the best checkpoint follows it."""
        cfg = self.cfg
        if not cfg.train.val_shards or self.done["validated"] == self.step:
            return None
        self.done["validated"] = self.step
        from .evaluate import evaluate

        stream = EvalStream(
            expand_shards(cfg.train.val_shards),
            cfg.data,
            self.tokenizer,
            cfg.eval.eval_batch_size,
            num_frames=cfg.model.num_frames,
            rank=self.rank,
            world=self.world,
        )
        with eng.whole_parameters(self.engine.module):  # the scorer reads weights outside module calls
            results = evaluate(
                self.engine.module,
                make_loader(stream, cfg.data.num_workers),
                cfg.eval,
                cfg.seed,
                self.device,
                autocast_dtype=self.dtype,
                max_bad_fraction=cfg.data.max_bad_fraction,
            )
        self.log.scalars(
            {f"val/{d}_{k}": results[d][k] for d in ("t2v", "v2t") for k in ("R@1", "R@5", "R@10", "MdR", "MnR")},
            self.step,
        )
        if results["t2v"]["R@1"] > self.best["t2v_R@1"]:
            self.best = {"t2v_R@1": results["t2v"]["R@1"], "step": self.step, "results": results}
            ckpt.save(self.engine, self.ckpt_dir, "best", self.state_dict(), self.meta(), None, latest=False)
            if self.rank == 0:
                write_json_atomic(os.path.join(self.out, "best.json"), self.best)
        self.log.line(
            f"step {self.step} val t2v R@1 {results['t2v']['R@1']:.2f} R@5 {results['t2v']['R@5']:.2f} "
            f"v2t R@1 {results['v2t']['R@1']:.2f} (best {self.best['t2v_R@1']:.2f} at step "
            f"{self.best['step']})"
        )
        return results

    def log_step(self) -> None:
        """TensorBoard scalars and one log line; the bad-sample check (a collective: every rank calls it)."""
        merged = gathered_skips(self.stats)
        check_bad_fraction(merged, self.cfg.data.max_bad_fraction)
        if self.rank == 0:
            lrs = {g.get("name", str(i)): g["lr"] for i, g in enumerate(self.engine.optimizer.param_groups)}
            scalars = self.meter.scalars(self.world) | {f"train/lr_{n}": lr for n, lr in lrs.items()}
            norm = self.engine.get_global_grad_norm()
            if norm is not None:
                scalars["train/grad_norm"] = float(norm)
            scalars |= {f"data/skipped_{r.replace(' ', '_')}": n for r, n in merged["reasons"].items()}
            self.log.scalars(scalars, self.step)
            self.log.line(
                f"step {self.step} loss {scalars['train/loss']:.4f} lr {max(lrs.values()):.2e} "
                f"logit_scale {scalars['train/logit_scale']:.3f} {scalars['perf/samples_per_s']:.1f} "
                f"samples/s data wait {100 * scalars['perf/data_wait_fraction']:.0f}%"
            )
        self.meter = Meter()
