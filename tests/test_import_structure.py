"""The package's import graph: no cycles (also through imports inside functions), and the tensor-parallel worker
imports no executor code (it only needs the wire format, the collectives and the monitor)."""

from __future__ import annotations

import ast
import os

import stablelm_fast

PKG_DIR = os.path.dirname(stablelm_fast.__file__)
PKG = "stablelm_fast"


def _modules() -> dict[str, str]:
    mods = {}
    for d, dirs, files in os.walk(PKG_DIR):
        dirs[:] = [x for x in dirs if x not in ("kernels", "__pycache__")]
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(d, f)
                name = PKG + "." + os.path.relpath(path, PKG_DIR)[:-3].replace(os.sep, ".")
                mods[name.removesuffix(".__init__")] = path
    return mods


def _imports(path: str, mods: dict[str, str]) -> set[str]:
    """Every module of the package that `path` imports, anywhere in the file."""
    out = set()
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(PKG):
            subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in mods]
            out.update(subs)  # `from pkg import submodule` needs the submodule, not pkg/__init__
            if len(subs) < len(node.names):
                out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith(PKG))
    return {m for m in out if m in mods}


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: _imports(p, mods) for m, p in mods.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}  # state: 1 on the DFS stack, 2 done

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                found.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n, stack + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    return found


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    graph = _graph()
    assert "stablelm_fast.distributed.executor" in graph and "stablelm_fast.server.app" in graph
    assert _cycles(graph) == []


def test_worker_imports_no_executor_code():
    graph = _graph()
    worker = graph["stablelm_fast.distributed.worker"]
    assert "stablelm_fast.distributed.executor" not in worker
    assert {"stablelm_fast.distributed.protocol", "stablelm_fast.distributed.comm"} <= worker
