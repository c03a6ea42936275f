"""Processes and collectives: one code path under `deepspeed`, `torchrun`, `srun` and plain `python`.

- `init()` reads RANK / WORLD_SIZE / LOCAL_RANK (set by deepspeed and torchrun; mapped from SLURM_* under srun;
  defaulted for a single plain process), starts the process group (NCCL on GPUs, gloo on CPUs) through
  DeepSpeed, and returns this process's place.
- `gather_with_grad` is the autograd all-gather of the global contrastive batch: the backward sums every rank's
  gradient for a shard back onto the rank that owns it.
- `gather_rows` gathers tensors whose first dimension differs per rank (evaluation shares).
"""

from __future__ import annotations

import importlib
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as tdist


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list such as 'gpu[012-015,020],cpu3' -> 'gpu012'."""
    head = nodelist.split(",")[0] if "[" not in nodelist.split(",")[0] else nodelist[: nodelist.index("]") + 1]
    if "[" not in head:
        return head
    prefix, ranges = head.split("[", 1)
    return prefix + ranges.rstrip("]").split(",")[0].split("-")[0]


def env_from_slurm(env: dict | None = None) -> dict:
    """Under `srun` (one task per GPU), map SLURM's variables onto torch's. DeepSpeed does not read them."""
    env = os.environ if env is None else env
    if "RANK" in env or "SLURM_PROCID" not in env or "SLURM_NTASKS" not in env:
        return {}
    mapped = {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": env["SLURM_NTASKS"],
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "MASTER_ADDR": env.get("MASTER_ADDR") or first_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1")),
        "MASTER_PORT": env.get("MASTER_PORT") or str(29500 + int(env.get("SLURM_JOB_ID", "0")) % 20000),
    }
    env.update(mapped)
    return mapped


def env_rank() -> int:
    """This process's global rank before any process group starts (the launcher's RANK, or srun's)."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def init(timeout_minutes: int = 30) -> DistInfo:
    """Start (or join) the process group and return this process's rank, world size and device."""
    env_from_slurm()
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    own_port = "MASTER_PORT" not in os.environ  # a lone process: any free port will do
    if own_port:
        os.environ["MASTER_PORT"] = str(_free_port())
    if not tdist.is_initialized():
        import deepspeed

        # The shared-memory op JIT-compiles for a minute on a fresh CPU machine and training
        # never uses it.
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        from datetime import timedelta

        for attempt in range(5):
            try:
                deepspeed.init_distributed(
                    dist_backend="nccl" if cuda else "gloo", verbose=False, timeout=timedelta(minutes=timeout_minutes)
                )
                break
            except RuntimeError as e:  # the free port was taken before the store bound it: take another
                if not own_port or "EADDRINUSE" not in str(e) or attempt == 4:
                    raise
                os.environ["MASTER_PORT"] = str(_free_port())
    local = int(os.environ["LOCAL_RANK"])
    device = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return DistInfo(tdist.get_rank(), tdist.get_world_size(), local, device)


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return ""


def _parent_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def process_alive(pid: int) -> bool:
    """A process that exists and is not a zombie (a killed launcher stays a zombie until it is reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


LAUNCHERS = ("deepspeed", "torchrun", "torch.distributed.run", "torch.distributed.launch")


def launcher_chain(pid: int | None = None) -> list[int]:
    """The launcher processes above this one: its parent, and up from there while the command line is that of
    a launcher (`deepspeed` runs `deepspeed.launcher.launch`, which runs the ranks; torchrun runs them itself).
    Empty for a plain process or an srun task (slurmstepd stops its tasks itself)."""
    chain, pid = [], _parent_of(os.getpid() if pid is None else pid)
    while pid > 1 and any(name in _cmdline(pid) for name in LAUNCHERS):
        chain.append(pid)
        pid = _parent_of(pid)
    return chain


def exit_with_launcher(sig: int = 15, every: float = 2.0) -> list[int]:
    """When a launcher above this rank dies (killed alone, its ranks would train on as orphans), send `sig`
    (SIGTERM: the trainer's handler checkpoints at the next log step and stops) to this process. The parent
    is watched by the kernel (PR_SET_PDEATHSIG), the launchers above it by a daemon thread. Returns the chain."""
    import ctypes
    import signal
    import threading
    import time

    chain = launcher_chain()
    if not chain:
        return chain
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(sig))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(every)
            gone = os.getppid() != parent or not all(process_alive(p) for p in chain)
            if gone:
                os.kill(os.getpid(), signal.Signals(sig))
                return

    threading.Thread(target=watch, name="tmass-launcher-watch", daemon=True).start()
    return chain


def world() -> int:
    return tdist.get_world_size() if tdist.is_available() and tdist.is_initialized() else 1


class _GatherWithGrad(torch.autograd.Function):
    """forward: all-gather [b, ...] -> [W * b, ...]. backward: every rank's loss depends on every shard, so the
    gradient of this rank's shard is the sum over ranks of their gradients for it (all-reduce, then slice)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(tdist.get_world_size())]
        tdist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.rows = tdist.get_rank(), x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        tdist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """[b, ...] on each rank (the same b everywhere) -> [world * b, ...] in rank order, differentiable."""
    return x if world() == 1 else _GatherWithGrad.apply(x)


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows from every rank (each rank may hold a different number), concatenated in rank order."""
    if world() == 1:
        return x
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world())]
    tdist.all_gather(sizes, n)
    most = int(max(s.item() for s in sizes))
    padded = torch.zeros((most, *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world())]
    tdist.all_gather(parts, padded.contiguous())
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)], dim=0)


def all_sum(x: torch.Tensor) -> torch.Tensor:
    if world() > 1:
        tdist.all_reduce(x)
    return x


def all_max(x: torch.Tensor) -> torch.Tensor:
    if world() > 1:
        tdist.all_reduce(x, op=tdist.ReduceOp.MAX)
    return x


def rank() -> int:
    return tdist.get_rank() if tdist.is_available() and tdist.is_initialized() else 0


def barrier() -> None:
    """Every rank waits here for the others (nothing to wait for in one process)."""
    if world() > 1:
        tdist.barrier()


def gather_objects(items: list) -> list:
    """Python lists from every rank, concatenated in rank order (small metadata only)."""
    if world() == 1:
        return list(items)
    out = [None] * world()
    tdist.all_gather_object(out, list(items))
    return [x for part in out for x in part]
