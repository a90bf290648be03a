"""The training text of the small StableLM: the Python standard library's own .py sources (every machine has them).

Files are listed in sorted relative-path order; a file is held out when the SHA-256 of its relative path falls in
1/HELDOUT_EVERY of the hash space, so the split does not depend on which other files this Python version ships.
Tests, the IDE, 2to3, codec tables and generated doc data are left out (they are not the code we want to imitate).
"""

from __future__ import annotations

import hashlib
import os
import sysconfig

HELDOUT_EVERY = 20
_SKIP_DIRS = {"test", "tests", "idle_test", "idlelib", "lib2to3", "site-packages", "dist-packages", "__pycache__",
              "encodings", "pydoc_data", "ensurepip", "turtledemo"}


def stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def is_heldout(relpath: str) -> bool:
    digest = hashlib.sha256(relpath.replace(os.sep, "/").encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % HELDOUT_EVERY == 0


def list_files(root: str | None = None) -> list[str]:
    """Relative paths of the corpus files under root (the running interpreter's stdlib), sorted."""
    root = root or stdlib_dir()
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("test"))
        for name in filenames:
            if name.endswith(".py") and not name.startswith("test_"):
                out.append(os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/"))
    return sorted(out)


def read_text(relpath: str, root: str | None = None) -> str | None:
    """The file's text, or None when it is not UTF-8 (skipped, deterministically)."""
    try:
        with open(os.path.join(root or stdlib_dir(), relpath), encoding="utf-8") as f:
            return f.read()
    except (UnicodeDecodeError, OSError):
        return None


def split(root: str | None = None) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, heldout): lists of (relpath, text), in sorted path order."""
    train, heldout = [], []
    for rel in list_files(root):
        text = read_text(rel, root)
        if text and text.strip():
            (heldout if is_heldout(rel) else train).append((rel, text))
    return train, heldout
