"""The command lines: `tmass-train` (launch/train.py), `tmass-eval` (launch/eval.py), `tmass-export`
(launch/export.py); `tmass-build-shards` is tmass.shards.cli. Each parses its flags, calls the library, and turns
a user's error into one line on rank 0 and an exit code (2: the command line, 1: the data or a checkpoint);
a bug still shows its traceback.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from .config import Config

import logging
import os
import sys
import warnings

from .config import EVAL, TRAIN, parse_config
from .dist import env_rank
from .errors import TmassError

QUIET_LOGGERS = ("DeepSpeed", "deepspeed", "torch.distributed.elastic")


class _DropMessages(logging.Filter):
    DROP = ("Attempting to get learning rate from scheduler before it has started",)

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(d in record.getMessage() for d in self.DROP)


def quiet_libraries(verbose: bool) -> None:
    """DeepSpeed's INFO lines and the known harmless warnings off, unless --verbose."""
    if verbose:
        return
    for name in QUIET_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(logging.WARNING)
        logger.addFilter(_DropMessages())
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*reduce_scatter_tensor.*is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message="`torch.jit.script_method` is deprecated")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _one_line(e: BaseException) -> str:
    """The message of an error raised in a loader worker ends with the original exception's line."""
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else type(e).__name__
    if len(lines) > 1 and ": " in last:
        last = last.split(": ", 1)[1]
    return last


def run_command(fn: Callable[[Config], object], argv: list[str] | None, prog: str, mode: str | None = None) -> int:
    """Parse, run, and turn the library's TmassError (tmass/errors.py) into one line on rank 0 and its exit
    code; --help exits 0 through argparse."""
    argv = sys.argv[1:] if argv is None else argv
    quiet_libraries("--verbose" in argv)
    try:
        fn(parse_config(argv, prog=prog, mode=mode) if mode else argv)
    except TmassError as e:
        if env_rank() == 0:
            print(f"error: {_one_line(e)}", file=sys.stderr)
        return e.exit_code
    except SystemExit as e:  # argparse: --help (0), or a usage error of tmass-export's own parser (2)
        return e.code if isinstance(e.code, int) else 2
    return 0


def _prog(script: str, console: str) -> str:
    return f"launch/{script}" if os.path.basename(sys.argv[0]) == script else console


def train_main(argv: list[str] | None = None) -> int:
    from .train import Preempted, train

    def go(cfg) -> None:
        try:
            train(cfg)
        except Preempted:
            pass  # the checkpoint is saved; the job script requeues

    return run_command(go, argv, _prog("train.py", "tmass-train"), TRAIN)


def eval_main(argv: list[str] | None = None) -> int:
    from .evaluate import run

    return run_command(run, argv, _prog("eval.py", "tmass-eval"), EVAL)


def export_main(argv: list[str] | None = None) -> int:
    import argparse

    from .checkpoint import export_checkpoint

    def go(args: list[str]) -> None:
        p = argparse.ArgumentParser(
            prog=_prog("export.py", "tmass-export"),
            allow_abbrev=False,
            description=(
                "Turn a training run's checkpoint into one consolidated fp32 HF-style directory (zero_to_fp32 "
                "underneath): CLIPModel.from_pretrained loads its CLIP part, tmass-eval --checkpoint the whole."
            ),
        )
        p.add_argument("run", help="a run directory (outputs/EXP) or its checkpoints/ directory")
        p.add_argument("out", help="the export directory")
        p.add_argument("--tag", default=None, help="best (default; else the newest), latest, or stepN")
        a = p.parse_args(args)
        print(export_checkpoint(a.run, a.out, a.tag))

    return run_command(go, argv, _prog("export.py", "tmass-export"))
