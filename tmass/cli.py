"""The command lines: `tmass-train` (launch/train.py), `tmass-eval` (launch/eval.py), `tmass-export`
(launch/export.py), `tmass-index` (launch/index.py), `tmass-search` (launch/search.py); `tmass-build-shards` is
tmass.shards.cli. Each parses its flags, calls the library, and turns
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


# The settings of the run's config that tmass-index and tmass-search take, with the same flags as tmass-eval.
INDEX_SETTINGS = (
    "local_rank",
    "checkpoint",
    "tokenizer",
    "eval_batch_size",
    "num_workers",
    "decode_timeout",
    "max_bad_fraction",
    "verbose",
)
SEARCH_SETTINGS = (
    "local_rank",
    "checkpoint",
    "tokenizer",
    "stochastic_trials",
    "trial_noise",
    "eval_chunk",
    "seed",
    "decode_timeout",
    "verbose",
)


def _parser(script: str, console: str, description: str, settings: tuple[str, ...]):
    import argparse

    from .config import Parser, add_flags

    p = Parser(
        prog=_prog(script, console), description=description, argument_default=argparse.SUPPRESS, allow_abbrev=False
    )
    add_flags(p.add_argument_group("settings shared with tmass-eval"), settings)
    return p


def _split(args, own: tuple[str, ...]) -> tuple[dict, dict]:
    """(this command's own flags, the config's settings)."""
    a = vars(args)
    return {k: a.pop(k) for k in own if k in a}, a


def index_main(argv: list[str] | None = None) -> int:
    from .config import config_of
    from .search import DTYPES, IndexOptions, build_index

    def go(args: list[str]) -> None:
        p = _parser(
            "index.py",
            "tmass-index",
            "Encode the frames of a set of shards with a trained T-MASS into an "
            "index folder that tmass-search queries; every rank encodes its share; rerunning a killed "
            "build resumes it.",
            INDEX_SETTINGS,
        )
        p.add_argument("--shards", required=True, help="the shards to index: a quoted wildcard or webdataset URLs")
        p.add_argument("--index", required=True, help="the index folder to write")
        p.add_argument(
            "--index_dtype",
            choices=sorted(DTYPES),
            default="float16",
            help="the stored features' type (default float16: half the size, ranks as float32 does)",
        )
        p.add_argument(
            "--shards_per_part",
            type=int,
            default=16,
            metavar="N",
            help="shards per part, the unit of resuming (default 16)",
        )
        p.add_argument(
            "--overwrite", action="store_true", default=False, help="rebuild an index made with other settings"
        )
        own, settings = _split(p.parse_args(args), ("shards", "index", "index_dtype", "shards_per_part", "overwrite"))
        if own["shards_per_part"] < 1:
            p.error("--shards_per_part must be at least 1")
        opts = IndexOptions(out=own.pop("index"), dtype=own.pop("index_dtype"), **own)
        out = build_index(config_of(settings), opts)
        if env_rank() == 0:
            print(f"index: {out}")

    return run_command(go, argv, _prog("index.py", "tmass-index"))


def _search_parser():
    p = _parser(
        "search.py",
        "tmass-search",
        "Search an index (tmass-index) with text queries: stage 1 ranks "
        "every video by the text against its mean-pooled frames, stage 2 re-ranks the best "
        "--candidates with the full T-MASS score (pooling and trials).",
        SEARCH_SETTINGS,
    )
    p.add_argument("queries", nargs="+", help="one or more text queries")
    p.add_argument("--index", required=True, help="an index folder (tmass-index)")
    p.add_argument("--top_k", type=int, default=10, metavar="N", help="hits shown per query (default 10)")
    p.add_argument(
        "--candidates",
        type=int,
        default=50,
        metavar="K",
        help="videos of stage 1 that stage 2 re-ranks (default 50)",
    )
    p.add_argument("--json", action="store_true", default=False, help="print the hits as JSON")
    p.add_argument("--html", metavar="OUT", help="also write a page of the hits with a thumbnail each")
    return p


def search_main(argv: list[str] | None = None) -> int:
    import contextlib
    import json

    from .config import config_of
    from .search import encode_queries, open_for_search, search
    from .search_page import format_hits, write_html

    def go(args: list[str]) -> None:
        p = _search_parser()
        own, settings = _split(p.parse_args(args), ("queries", "index", "top_k", "candidates", "json", "html"))
        if own["top_k"] < 1 or own["candidates"] < 1:
            p.error("--top_k and --candidates must be at least 1")
        with contextlib.redirect_stdout(sys.stderr):  # stdout is for the hits (DeepSpeed's loader prints there)
            model, index, cfg, tok = open_for_search(config_of(settings), own["index"])
        text = encode_queries(model, tok, own["queries"])
        hits = search(model, index, text, cfg, own["top_k"], own["candidates"])
        results = [{"query": q, "hits": h} for q, h in zip(own["queries"], hits)]
        if own.get("html"):
            write_html(own["html"], results, own["index"], cfg.data.decode_timeout)
        if own["json"]:
            settings = {
                "trials": 0 if model.cfg.deterministic_text else cfg.eval.stochastic_trials,
                "trial_noise": cfg.eval.trial_noise,
                "seed": cfg.seed,
                "candidates": own["candidates"],
                "deterministic_text": model.cfg.deterministic_text,
            }
            print(json.dumps({"index": own["index"], "settings": settings, "results": results}, indent=1))
        else:
            print("\n\n".join(format_hits(r["query"], r["hits"]) for r in results))

    return run_command(go, argv, _prog("search.py", "tmass-search"))
