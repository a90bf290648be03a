"""A small runner for tests/gpu/ that works with or without pytest installed (a bare GPU machine may have torch,
triton and transformers but no pytest, and no pip to get it).

It runs the module-level functions test_* of the given files, expanding stacked `pytest.mark.parametrize` marks,
honouring `pytest.mark.skipif` (module `pytestmark` or per function) and `pytest.skip(...)`, and providing the
fixtures the GPU tests use: hf_checkpoints (tests/checkpoints.py, made once), monkeypatch (setenv / delenv /
setattr, undone after each test) and tmp_path. Without pytest a minimal `pytest` module with exactly those
pieces is installed first. A deadline stops starting new tests (they are reported "not run"), so one slow test
cannot eat a scarce GPU lease. Results go to a JSON file that gpu/summary.py prints.

    python -m gpu.minitest tests/gpu/test_gpu_kernels.py ... --json results.json [--deadline-s 270] [--collect-only]
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import sys
import tempfile
import time
import traceback
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Skipped(Exception):
    pass


class _Mark:
    """pytest.mark.<name>: called with arguments it makes a mark; applied to a function it records itself."""

    def __init__(self, name: str, args: tuple = (), kwargs: dict | None = None) -> None:
        self.name, self.args, self.kwargs = name, args, kwargs or {}

    def __call__(self, *args, **kwargs):
        if len(args) == 1 and callable(args[0]) and not kwargs:  # used as a decorator
            args[0].__dict__.setdefault("pytestmark", []).append(self)
            return args[0]
        return _Mark(self.name, args, kwargs)


def install_pytest_shim() -> None:
    """A `pytest` module with mark.<name>(...), skip(), fixture and param, enough to import tests/gpu/."""
    shim = types.ModuleType("pytest")

    class _MarkGen:
        def __getattr__(self, name):
            return _Mark(name)

    def skip(reason: str = "", **_):
        raise _Skipped(reason)

    skip.Exception = _Skipped
    shim.mark, shim.skip = _MarkGen(), skip
    shim.param = lambda *values, id=None, marks=(): types.SimpleNamespace(values=values, id=id, marks=marks)
    shim.fixture = lambda *a, **k: (a[0] if a and callable(a[0]) else (lambda fn: fn))
    sys.modules["pytest"] = shim


def _skip_exception():
    import pytest

    return pytest.skip.Exception


class MonkeyPatch:
    def __init__(self) -> None:
        self._undo: list = []

    def setenv(self, name: str, value: str) -> None:
        old = os.environ.get(name)
        self._undo.append(lambda: os.environ.__setitem__(name, old) if old is not None else os.environ.pop(name, None))
        os.environ[name] = value

    def delenv(self, name: str, raising: bool = True) -> None:
        if name in os.environ:
            old = os.environ.pop(name)
            self._undo.append(lambda: os.environ.__setitem__(name, old))

    def setattr(self, target, name: str, value) -> None:
        old = getattr(target, name)
        self._undo.append(lambda: setattr(target, name, old))
        setattr(target, name, value)

    def undo(self) -> None:
        for fn in reversed(self._undo):
            fn()
        self._undo.clear()


def _marks(obj) -> list:
    marks = getattr(obj, "pytestmark", [])
    return [getattr(m, "mark", m) for m in (marks if isinstance(marks, list) else [marks])]


def expand(fn) -> list[tuple[str, dict]]:
    """(id, kwargs) for every parametrize combination of fn."""
    axes = []
    for m in _marks(fn):
        if m.name != "parametrize":
            continue
        names = [n.strip() for n in m.args[0].split(",")] if isinstance(m.args[0], str) else list(m.args[0])
        ids = m.kwargs.get("ids")
        values = list(m.args[1])
        axis = []
        for i, v in enumerate(values):
            pid = None
            if hasattr(v, "values") and hasattr(v, "id") and not isinstance(v, dict):  # pytest.param(...)
                v, pid = tuple(v.values), v.id
            else:
                v = tuple(v) if len(names) > 1 else (v,)
            label = pid or (ids[i] if ids else "-".join(str(x).replace("torch.", "") for x in v))
            axis.append((label, dict(zip(names, v))))
        axes.append(axis)
    out = []
    for combo in itertools.product(*reversed(axes)) if axes else [()]:
        kwargs, labels = {}, []
        for label, kw in combo:
            labels.append(label)
            kwargs.update(kw)
        out.append(("-".join(labels), kwargs))
    return out


def _skip_reason(objs) -> str | None:
    for obj in objs:
        for m in _marks(obj):
            if m.name == "skipif" and (m.args[0] if m.args else m.kwargs.get("condition")):
                return m.kwargs.get("reason", "skipif")
    return None


class _Fixtures:
    def __init__(self) -> None:
        self._hf = None

    def hf_checkpoints(self) -> dict:
        if self._hf is None:
            sys.path.insert(0, os.path.join(ROOT, "tests"))
            from checkpoints import VARIANTS, make_hf_checkpoint

            root = tempfile.mkdtemp(prefix="slf-gpu-ckpt-")
            self._hf = {v: make_hf_checkpoint(os.path.join(root, v), v, seed=i) for i, v in enumerate(VARIANTS)}
        return self._hf


def _write(path: str, results: list[dict]) -> None:
    counts = {k: sum(r["outcome"] == k for r in results) for k in
              ("passed", "failed", "skipped", "not run", "collected")}
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump({"counts": counts, "results": results}, f, indent=1)
    os.replace(path + ".tmp", path)


def run(paths: list[str], json_path: str | None, deadline_s: float, collect_only: bool = False,
        select: str | None = None) -> int:
    try:
        import pytest  # noqa: F401
    except ImportError:
        install_pytest_shim()
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    for d in sorted({os.path.dirname(os.path.abspath(p)) for p in paths}):  # sibling helpers (tests/ops/op_impls)
        sys.path.insert(0, d)
    skip_exc = _skip_exception()
    fixtures, results, t_start = _Fixtures(), [], time.monotonic()
    for path in paths:
        name = "gputest_" + os.path.splitext(os.path.basename(path))[0]
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        for fname, fn in sorted(vars(mod).items(), key=lambda kv: getattr(kv[1], "__code__", None) and
                                kv[1].__code__.co_firstlineno or 0):
            if not (fname.startswith("test_") and callable(fn)):
                continue
            for pid, kwargs in expand(fn):
                tid = f"{os.path.basename(path)}::{fname}[{pid}]" if pid else f"{os.path.basename(path)}::{fname}"
                if select and not all(part in tid for part in select.split()):
                    continue
                res = {"id": tid, "file": os.path.basename(path), "test": fname}
                reason = _skip_reason([mod, fn])
                t0 = time.monotonic()
                if collect_only:
                    res.update(outcome="collected", message=reason or "")
                elif reason:
                    res.update(outcome="skipped", message=reason)
                elif time.monotonic() - t_start > deadline_s:
                    res.update(outcome="not run", message=f"time budget of {deadline_s:.0f} s spent")
                else:
                    mp = MonkeyPatch()
                    try:
                        params = fn.__code__.co_varnames[: fn.__code__.co_argcount]
                        extra = {"monkeypatch": mp, "tmp_path": None}
                        for p in params:
                            if p in kwargs:
                                continue
                            if p == "hf_checkpoints":
                                kwargs[p] = fixtures.hf_checkpoints()
                            elif p == "tmp_path":
                                import pathlib

                                kwargs[p] = pathlib.Path(tempfile.mkdtemp(prefix="slf-gpu-"))
                            elif p in extra:
                                kwargs[p] = extra[p]
                            else:
                                raise RuntimeError(f"minitest has no fixture {p!r}")
                        fn(**kwargs)
                        res.update(outcome="passed", message="")
                    except skip_exc as e:
                        res.update(outcome="skipped", message=str(getattr(e, "msg", e)))
                    except Exception as e:  # noqa: BLE001  (a failing test is a result)
                        tb = traceback.format_exc(limit=-3)
                        res.update(outcome="failed", message=f"{type(e).__name__}: {str(e)[:500]}", traceback=tb)
                        print(f"FAILED {tid}: {res['message'][:300]}", flush=True)
                    finally:
                        mp.undo()
                res["seconds"] = round(time.monotonic() - t0, 2)
                results.append(res)
                if json_path and not collect_only:  # after every test: a killed run keeps what it did
                    _write(json_path, results)
    counts = {k: sum(r["outcome"] == k for r in results) for k in
              ("passed", "failed", "skipped", "not run", "collected")}
    print("minitest: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v) +
          f" in {time.monotonic() - t_start:.1f} s", flush=True)
    if json_path:
        _write(json_path, results)
    return 1 if counts["failed"] or counts["not run"] else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="+")
    p.add_argument("--json", default=None)
    p.add_argument("--deadline-s", type=float, default=1e9)
    p.add_argument("--collect-only", action="store_true")
    p.add_argument("-k", dest="select", default=None, help="run only ids containing every space-separated word")
    a = p.parse_args(argv)
    return run(a.paths, a.json, a.deadline_s, a.collect_only, a.select)


if __name__ == "__main__":
    sys.exit(main())
