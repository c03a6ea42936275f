"""The shape of the house: no import cycles in tmass/ (function-local imports included, read from the source),
short functions, launch/ scripts that stay thin, and a training sample's path through few homes, as
docs/architecture.md shows it."""
import ast
import os
import re

from conftest import REPO

PKG = os.path.join(REPO, "tmass")


def modules():
    out = {}
    for root, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(root, f), REPO)[:-3].replace(os.sep, ".")
                out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(root, f)
    return out


def imports_of(name, path, known):
    package = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rsplit(".", 1)[0] if "." in t else ""
            if t and t != name:
                found.add(t)
    return found


def test_no_import_cycles():
    known = modules()
    graph = {m: {t for t in imports_of(m, p, known) if not m.startswith(t + ".") and t != "tmass"}
             for m, p in known.items()}
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert "tmass.checkpoint" in graph["tmass.evaluate"]  # the graph is real: function-local imports included
    assert "tmass.data.shardlist" in graph["tmass.data.tokenizer"]


MAX_FUNCTION_LINES = 50


def test_no_function_of_tmass_is_long():
    """Every function of tmass/ (methods and nested ones included) holds at most 50 lines, its docstring not
    counted, as the formatter lays it out."""
    long = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                first = node.body[0]
                if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(
                        first.value.value, str):
                    lines -= first.end_lineno - first.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert not long, "split these functions: " + "; ".join(long)
    assert modules()["tmass.train"]  # the walk found the package


def test_the_public_api_has_type_hints():
    """Every public function and method of tmass/ (no leading underscore) annotates its parameters and return."""
    missing = []
    for name, path in modules().items():
        tree = ast.parse(open(path).read())
        for node in tree.body:
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                fns = [m for m in node.body if isinstance(m, ast.FunctionDef)]
            else:
                fns = [node] if isinstance(node, ast.FunctionDef) else []
            for fn in fns:
                if fn.name.startswith("_"):
                    continue
                args = [a for a in fn.args.args + fn.args.kwonlyargs if a.arg not in ("self", "cls")]
                if any(a.annotation is None for a in args) or fn.returns is None:
                    missing.append(f"{name}.{fn.name}")
    assert not missing, missing


def test_launch_scripts_are_thin():
    for name in os.listdir(os.path.join(REPO, "launch")):
        if name.endswith(".py"):
            lines = open(os.path.join(REPO, "launch", name)).read().splitlines()
            assert len(lines) < 60, name


def traced_modules(run, inside):
    """The tmass/ files whose functions run while a frame of one of the code objects `inside` is on the stack
    (generator frames included), during run()."""
    import sys

    hits = set()

    def profile(frame, event, arg):
        if event != "call" or not frame.f_code.co_filename.startswith(PKG):
            return
        f = frame
        while f is not None:
            if f.f_code in inside:
                hits.add(os.path.relpath(frame.f_code.co_filename, REPO))
                return
            f = f.f_back

    sys.setprofile(profile)
    try:
        run()
    finally:
        sys.setprofile(None)
    return hits


def documented_path(title):
    """The tmass/ files that docs/architecture.md's table under `title` names."""
    text = open(os.path.join(REPO, "docs", "architecture.md")).read()
    table = text.split(f"## {title}", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"`(tmass/[\w/]+\.py)`", table))


def home(path):
    """A concern's home: a package of tmass/ (data/, model/) or a top-level module."""
    parts = path.split("/")
    return "/".join(parts[:2]) if len(parts) > 2 else path


def test_a_training_sample_from_tar_to_optimiser_step(synthetic_shards, tmp_path):
    """One optimiser step of a real run in this process (one rank, the stream in this process), traced: every
    tmass/ module that runs while the stream makes the batch or the step trains on it is in the architecture
    doc's table of that path, and they live in at most 6 homes."""
    from tmass.config import parse_config
    from tmass.data.stream import TrainStream
    from tmass.train import Trainer, train

    cfg = parse_config(["--deepspeed_config", os.path.join(REPO, "ds_configs", "cpu_fp32.json"), "--preset", "demo",
                        "--num_frames", "4", "--train_shards", str(synthetic_shards / "train-*.tar"),
                        "--batch_size", "2", "--max_steps", "1", "--num_workers", "0", "--output_dir", str(tmp_path),
                        "--support_loss_weight", "0.8", "--decode_timeout", "0"])  # decode in this thread
    inside = {TrainStream.__iter__.__code__, Trainer.train_step.__code__}
    traced = traced_modules(lambda: train(cfg), inside)
    documented = documented_path("From a tar file to an optimiser step")
    assert {"tmass/data/stream.py", "tmass/data/video.py", "tmass/model/loss.py", "tmass/train.py"} <= traced
    assert traced <= documented, f"on the path but not in docs/architecture.md: {sorted(traced - documented)}"
    assert len({home(p) for p in traced}) <= 6, sorted(traced)
