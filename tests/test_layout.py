"""The shape of the house: no import cycles in tmass/ (function-local imports included, read from the source),
and launch/ scripts that stay thin."""
import ast
import os

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


def test_launch_scripts_are_thin():
    for name in os.listdir(os.path.join(REPO, "launch")):
        if name.endswith(".py"):
            lines = open(os.path.join(REPO, "launch", name)).read().splitlines()
            assert len(lines) < 60, name
