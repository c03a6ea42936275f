"""The run directory and its checkpoints: save and publish atomically, keep the last few, find the newest
complete one, consolidate (zero_to_fp32), export, and load a model from a run.

    {output_dir}/{exp_name}/
        config.json, clip_config.json, tokenizer/   what rebuilds the model (written when the run starts)
        checkpoints/step{N}/                        DeepSpeed checkpoints, the last --keep_last kept
        checkpoints/best/                           the best by validation t2v R@1 (not counted as latest)
        checkpoints/latest                          the tag a relaunch resumes from
        best.json, summary.json, tb/, train.log, eval_results.json
        stop-request                                asks every rank to save at the next log step and stop

Publishing. Every rank writes its files into checkpoints/.partial-{tag}/. After a barrier (so every rank has
closed its files), rank 0 checks that each rank's files are there and non-empty, flushes them to disk, writes
tmass_meta.json (step, epoch, world size, each file's size) into the folder, renames the folder to {tag} (for
`best`, after moving the previous one aside), and only then rewrites `latest` (a temporary file renamed over
it). A crash or a kill at any point leaves the previous checkpoint and pointer as they were. A folder without
tmass_meta.json, or whose files no longer have the sizes it records, is never loaded: resume, evaluation and
export fall back to the newest complete checkpoint, with a warning.

DeepSpeed reads its own checkpoint files (torch.load of its optimiser and model states); only load checkpoints
that your own runs wrote. tmass's own loading of outside files (upstream .pth) is weights-only (model/io.py).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import time
from typing import TYPE_CHECKING

import torch

from . import dist
from .config import Config, ModelConfig
from .errors import DataError
from .files import write_json_atomic, write_text_atomic
from .model.clip import build_clip
from .model.io import CheckpointMismatch, export_hf, load_hf, load_state_strict, load_upstream
from .model.tmass import TMASS

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

log = logging.getLogger("tmass.checkpoint")

META = "tmass_meta.json"
PARTIAL = ".partial-"
# The evaluation settings that a run validates with, and that launch/eval.py takes from the run by default.
# (Whether the text mass is used is the model's own setting, deterministic_text, and comes with the model.)
EVAL_SETTINGS = ("stochastic_trials", "trial_noise", "eval_protocol", "dsl")


class NoCheckpoint(DataError, FileNotFoundError):
    """The run directory has no complete checkpoint of the kind asked for."""


def run_dir(output_dir: str, exp_name: str) -> str:
    return os.path.join(output_dir, exp_name)


def checkpoints_dir(path: str) -> str:
    """A run directory's checkpoints/ folder (or `path` itself when it is one)."""
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return os.path.join(path, "checkpoints")
    return path


def is_run_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json")) and os.path.isdir(os.path.join(path, "checkpoints"))


# ------------------------------------------------------------------------------------------- the run lock
class RunLocked(DataError, RuntimeError):
    """Another live job trains in this run directory."""


class RunLock:
    """{run}/run.lock, held by rank 0 while a run trains: {"host", "pid", "job"}, its mtime refreshed every
    `beat` seconds by a daemon thread. A second launch on the same run directory is refused while the holder
    lives. The lock is stale, and taken over, when its process is gone (same host), when it belongs to this
    same SLURM job (a requeued job), or when its heartbeat is older than `stale` seconds (another host)."""

    def __init__(self, run: str, beat: float = 30.0, stale: float = 300.0):
        import socket

        self.path, self.beat, self.stale = os.path.join(run, "run.lock"), beat, stale
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "job": os.environ.get("SLURM_JOB_ID")}
        self._stop = None

    def holder(self) -> dict | None:
        try:
            with open(self.path) as f:
                held = json.load(f)
            age = time.time() - os.path.getmtime(self.path)
        except (OSError, ValueError):
            return None
        if not isinstance(held, dict):
            return None
        if held.get("host") == self.me["host"]:
            alive = isinstance(held.get("pid"), int) and dist.process_alive(held["pid"])
        elif held.get("job") and held.get("job") == self.me["job"]:
            alive = False
        else:
            alive = age < self.stale
        return held if alive and held.get("pid") != self.me["pid"] else None

    def acquire(self) -> "RunLock":
        import threading

        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                held = self.holder()
                if held is not None:
                    raise RunLocked(
                        f"{os.path.dirname(self.path)} is in use by pid {held.get('pid')} on "
                        f"{held.get('host')}"
                        + (f" (SLURM job {held['job']})" if held.get("job") else "")
                        + f"; wait for it, stop it, or use another --exp_name (the lock: {self.path})"
                    )
                aside = f"{self.path}.stale{os.getpid()}"
                try:
                    os.replace(self.path, aside)  # one taker wins; the others find the new lock
                    os.unlink(aside)
                except OSError:
                    pass
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.me, f)
            self._stop = threading.Event()
            threading.Thread(target=self._heartbeat, name="tmass-run-lock", daemon=True).start()
            return self
        raise RunLocked(f"could not take {self.path}")

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.beat):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        if self._stop is None:
            return
        self._stop.set()
        try:
            with open(self.path) as f:
                if json.load(f).get("pid") == self.me["pid"]:
                    os.unlink(self.path)
        except (OSError, ValueError):
            pass
        self._stop = None


# ------------------------------------------------------------------------------------------- the stop request
STOP_REQUEST = "stop-request"


def stop_request_path(run: str) -> str:
    """{run}/stop-request: a file that asks a training run to checkpoint at its next log step and stop, for ranks
    that no signal reaches (under pdsh or srun on other nodes). slurm/train.sbatch writes it on SIGUSR1/SIGTERM;
    `touch` does the same by hand. The trainer removes it once it has stopped."""
    return os.path.join(run, STOP_REQUEST)


def stop_requested(run: str) -> bool:
    return os.path.exists(stop_request_path(run))


def clear_stop_request(run: str) -> None:
    try:
        os.unlink(stop_request_path(run))
    except FileNotFoundError:
        pass


# ------------------------------------------------------------------------------------------- writing
def _fsync_tree(folder: str) -> None:
    for root, _, names in os.walk(folder):
        for name in names:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _files(folder: str) -> dict[str, int]:
    return {
        os.path.relpath(os.path.join(root, n), folder): os.path.getsize(os.path.join(root, n))
        for root, _, names in os.walk(folder)
        for n in names
        if n != META
    }


def check_files(folder: str, world: int) -> dict[str, int]:
    """The checkpoint's files and sizes; raises when one is empty or a rank's ZeRO partition is missing."""
    files = _files(folder)
    empty = sorted(n for n, size in files.items() if size == 0)
    if empty:
        raise RuntimeError(f"{folder}: empty checkpoint file(s) {', '.join(empty)}; not published")
    if not any(n.endswith("model_states.pt") for n in files):
        raise RuntimeError(f"{folder}: no model states written; not published")
    if any("zero_pp_rank_" in n for n in files):
        lacking = [r for r in range(world) if not any(f"zero_pp_rank_{r}_" in n for n in files)]
        if lacking:
            raise RuntimeError(f"{folder}: no optimiser partition of rank(s) {lacking}; not published")
    return files


def save(
    engine: DeepSpeedEngine,
    ckpt_dir: str,
    tag: str,
    client_state: dict,
    meta: dict,
    keep_last: int | None,
    latest: bool = True,
) -> None:
    """Save on every rank, then publish (see the module's docstring). A collective: every rank calls it."""
    partial = os.path.join(ckpt_dir, PARTIAL + tag)
    if dist.rank() == 0 and os.path.isdir(partial):  # left by a crash
        shutil.rmtree(partial)
    torch.distributed.barrier()
    engine.save_checkpoint(ckpt_dir, tag=PARTIAL + tag, client_state=client_state, save_latest=False)
    torch.distributed.barrier()  # every rank's files are closed
    error = None
    if dist.rank() == 0:
        try:
            _publish(ckpt_dir, tag, partial, meta | {"tag": tag, "world": dist.world()}, latest)
        except Exception as e:  # noqa: BLE001 (reported on every rank below)
            error = f"{type(e).__name__}: {e}"
        if error is None and keep_last:
            for old in complete_steps(ckpt_dir)[:-keep_last]:
                shutil.rmtree(os.path.join(ckpt_dir, f"step{old}"), ignore_errors=True)
    error = dist.gather_objects([error])[0]
    if error:
        raise RuntimeError(f"checkpoint {tag} was not published: {error}")


def _publish(ckpt_dir: str, tag: str, partial: str, meta: dict, latest: bool) -> None:
    files = check_files(partial, meta["world"])
    _fsync_tree(partial)
    write_json_atomic(os.path.join(partial, META), meta | {"files": files})
    final = os.path.join(ckpt_dir, tag)
    old = None
    if os.path.exists(final):
        old = os.path.join(ckpt_dir, f"{PARTIAL}old-{tag}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(partial, final)
    if old:
        shutil.rmtree(old, ignore_errors=True)
    if latest:
        write_text_atomic(os.path.join(ckpt_dir, "latest"), tag)


# ------------------------------------------------------------------------------------------- reading
def read_meta(ckpt_dir: str, tag: str) -> dict | None:
    """The tag's metadata if the checkpoint is complete (published, every file of the recorded size)."""
    folder = os.path.join(ckpt_dir, tag)
    try:
        with open(os.path.join(folder, META)) as f:
            meta = json.load(f)
        if _files(folder) != meta["files"]:
            return None
        return meta
    except (OSError, ValueError, KeyError, TypeError):
        return None


def complete_steps(ckpt_dir: str) -> list[int]:
    steps = sorted(
        int(os.path.basename(p)[4:])
        for p in glob.glob(os.path.join(ckpt_dir, "step*"))
        if os.path.basename(p)[4:].isdigit()
    )
    return [s for s in steps if read_meta(ckpt_dir, f"step{s}") is not None]


def _pointer(ckpt_dir: str) -> str | None:
    try:
        with open(os.path.join(ckpt_dir, "latest")) as f:
            return f.read().strip() or None
    except OSError:
        return None


def newest_complete(ckpt_dir: str, wanted: str | None, why: str) -> str | None:
    """`wanted` if it is complete; else the newest complete stepN, with a warning; None if there is none."""
    if wanted and read_meta(ckpt_dir, wanted) is not None:
        return wanted
    steps = complete_steps(ckpt_dir)
    fallback = f"step{steps[-1]}" if steps else None
    if wanted:
        log.warning(
            "%s: checkpoint %r is missing or incomplete; %s",
            ckpt_dir,
            wanted,
            f"using {fallback}, the newest complete one ({why})" if fallback else "no complete checkpoint",
        )
    return fallback


def resume_tag(ckpt_dir: str) -> str | None:
    """The tag a relaunch resumes from: `latest`, or the newest complete step if that is broken."""
    if not os.path.isdir(ckpt_dir):
        return None
    pointer = _pointer(ckpt_dir)
    if pointer is None and not complete_steps(ckpt_dir):
        return None
    found = newest_complete(ckpt_dir, pointer or "latest", "resuming from it")
    if found is None:
        raise NoCheckpoint(
            f"{ckpt_dir} has checkpoints but none is complete (latest: {pointer}); move the folder "
            f"aside to start the run again, or start a new --exp_name"
        )
    return found


def epoch_tag(ckpt_dir: str, epoch: int) -> str:
    """The checkpoint written at the end of epoch `epoch` (1-based, as upstream's --load_epoch)."""
    by_epoch = {}
    for s in complete_steps(ckpt_dir):
        meta = read_meta(ckpt_dir, f"step{s}")
        if meta and meta.get("steps_per_epoch") and s % meta["steps_per_epoch"] == 0:
            by_epoch[s // meta["steps_per_epoch"]] = f"step{s}"
    if epoch not in by_epoch:
        kept = ", ".join(str(e) for e in sorted(by_epoch)) or "none"
        raise NoCheckpoint(
            f"{ckpt_dir}: no checkpoint of the end of epoch {epoch} was kept (epochs kept: {kept}; "
            f"--keep_last sets how many); pass --load_epoch -1 for the best one"
        )
    return by_epoch[epoch]


def model_tag(ckpt_dir: str, tag: str | None) -> str:
    """The tag to evaluate or export: `tag` (best, latest or stepN), by default best, else the newest step."""
    if tag == "latest":
        tag = _pointer(ckpt_dir)
    found = newest_complete(ckpt_dir, tag or "best", "evaluating it")
    if found is None:
        raise NoCheckpoint(f"{ckpt_dir} holds no complete checkpoint (was the run killed before its first save?)")
    return found


def run_config(run: str) -> Config:
    path = os.path.join(run, "config.json")
    try:
        with open(path) as f:
            return Config.from_dict(json.load(f))
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise CheckpointMismatch(
            f"{path} is not a config this version of tmass reads ({type(e).__name__}: "
            f"{str(e)[:200]}); evaluate the run with the tmass that trained it, or export it "
            f"there (tmass-export)"
        ) from None


def consolidated_state(path: str, tag: str | None = None) -> tuple[Config, dict, str, dict]:
    """(the run's Config, an fp32 state dict consolidated from the ZeRO shards, the run dir, the tag's
    metadata) of a run dir or of its checkpoints/ dir; tag: best (default), latest or stepN."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ckpt_dir = checkpoints_dir(path)
    run = os.path.dirname(os.path.abspath(ckpt_dir))
    if not os.path.exists(os.path.join(run, "config.json")):
        raise NoCheckpoint(
            f"{path} is neither a tmass run directory (config.json beside checkpoints/) nor an "
            f"export (tmass_config.json)"
        )
    tag = model_tag(ckpt_dir, tag)
    state = get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=tag)
    return run_config(run), state, run, read_meta(ckpt_dir, tag)


def load_from_run(path: str, tag: str | None = None) -> tuple[TMASS, dict]:
    from transformers import CLIPConfig

    cfg, state, run, meta = consolidated_state(path, tag)
    clip = build_clip(config=CLIPConfig.from_json_file(os.path.join(run, "clip_config.json")))
    model = TMASS(cfg.model, clip=clip)
    load_state_strict(model, state, path)
    info = {
        "kind": "run",
        "run": run,
        "tag": meta["tag"],
        "step": meta["step"],
        "epoch": meta["step"] // meta["steps_per_epoch"],  # epochs completed
        "eval_settings": {k: getattr(cfg.eval, k) for k in EVAL_SETTINGS} | {"seed": cfg.seed},
    }
    return model, info


def export_checkpoint(path: str, out_dir: str, tag: str | None = None) -> str:
    """`launch/export.py`: one consolidated fp32 HF-style directory (zero_to_fp32 underneath), with the run's
    tokenizer, where the weights came from and the evaluation settings the run validated with."""
    model, info = load_from_run(path, tag)
    export_hf(model, out_dir)
    run = info["run"]
    if os.path.isdir(os.path.join(run, "tokenizer")):
        shutil.copytree(os.path.join(run, "tokenizer"), os.path.join(out_dir, "tokenizer"), dirs_exist_ok=True)
    write_json_atomic(os.path.join(out_dir, "tmass_source.json"), info)
    return out_dir


def load_model(cfg: ModelConfig, checkpoint: str | None, tag: str | None = None) -> tuple[TMASS, dict]:
    """The model to evaluate and what it is: an exported directory (its own config), a training run directory
    (`tag`, by default its best checkpoint by validation, else its newest), an upstream .pth (built from
    `cfg`), or random weights (checkpoint None)."""
    if checkpoint is None:
        return TMASS(cfg), {"kind": "random", "checkpoint": None}
    if os.path.isdir(checkpoint) and os.path.exists(os.path.join(checkpoint, "tmass_config.json")):
        info = {"kind": "export"}
        try:
            with open(os.path.join(checkpoint, "tmass_source.json")) as f:
                info |= {k: v for k, v in json.load(f).items() if k != "kind"}
        except (OSError, ValueError):
            pass
        return load_hf(checkpoint), info | {"checkpoint": checkpoint}
    if os.path.isdir(checkpoint):
        model, info = load_from_run(checkpoint, tag)
        return model, info | {"checkpoint": checkpoint}
    if not os.path.isfile(checkpoint):
        raise NoCheckpoint(f"--checkpoint {checkpoint}: no such file or directory")
    model = TMASS(cfg)
    extra = load_upstream(model, checkpoint)
    epoch = extra.get("epoch")
    return model, {
        "kind": "upstream",
        "checkpoint": checkpoint,
        "epoch": epoch if isinstance(epoch, (int, float)) else None,
    }


__all__ = ["CheckpointMismatch", "NoCheckpoint", "load_model", "save", "resume_tag", "export_checkpoint"]
