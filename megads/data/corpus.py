"""Where training text comes from.

The default corpus is the Python standard library's own source code: it is real,
varied text that is present on every machine with a Python interpreter, so a
training run needs no download.  A user corpus (a file or a directory of text
files) can be used instead.
"""

from __future__ import annotations

import os
import pathlib
import sysconfig
from collections.abc import Iterable, Iterator

# Directories skipped when walking the standard library.  ``site-packages`` is
# third-party code whose contents differ from machine to machine, which would
# make the corpus (and its cache key) depend on what happens to be installed.
# The test suites are dropped because they are dominated by repetitive
# boilerplate and by deliberately odd inputs (bad encodings, syntax errors).
# ``idlelib`` and ``lib2to3`` are kept: they are ordinary application code.
_EXCLUDED_STDLIB_DIRS = frozenset({"site-packages", "test", "tests", "idle_test"})

# File types accepted in a user corpus directory.
_TEXT_SUFFIXES = frozenset({".txt", ".py", ".md"})


def take_until_bytes(paths: Iterable[pathlib.Path], max_bytes: int) -> list[pathlib.Path]:
    """Take files in order until their total size reaches ``max_bytes``.

    The file that crosses the limit is included, so the result holds at least
    ``max_bytes`` bytes unless ``paths`` runs out first.
    """
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    taken: list[pathlib.Path] = []
    total = 0
    for path in paths:
        if total >= max_bytes:
            break
        taken.append(path)
        total += path.stat().st_size
    return taken


def stdlib_source_files(max_bytes: int) -> list[pathlib.Path]:
    """The standard library's ``.py`` files, up to about ``max_bytes`` in total.

    Files are sorted by their path relative to the stdlib root (as a POSIX
    string) so the selection is the same on every run and every machine with
    the same Python version.
    """
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = []
    # os.walk lets excluded directories be pruned before they are entered:
    # site-packages alone can hold tens of thousands of files.
    for directory, subdirectories, names in os.walk(root):
        subdirectories[:] = [d for d in subdirectories if d not in _EXCLUDED_STDLIB_DIRS]
        files.extend(pathlib.Path(directory, name) for name in names if name.endswith(".py"))
    files.sort(key=lambda path: path.relative_to(root).as_posix())
    if not files:
        raise ValueError(f"no .py files found in the standard library at {root}")
    return take_until_bytes(files, max_bytes)


def text_files_in(path: str | pathlib.Path) -> list[pathlib.Path]:
    """A user corpus: ``path`` itself if it is a file, else the ``*.txt``,
    ``*.py`` and ``*.md`` files under the directory (recursively), sorted by
    relative path."""
    path = pathlib.Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ValueError(f"corpus path {path} does not exist")
    files = [p for p in path.rglob("*") if p.is_file() and p.suffix in _TEXT_SUFFIXES]
    files.sort(key=lambda p: p.relative_to(path).as_posix())
    if not files:
        suffixes = ", ".join(sorted(_TEXT_SUFFIXES))
        raise ValueError(f"no text files ({suffixes}) found under {path}")
    return files


def iter_documents(paths: Iterable[pathlib.Path]) -> Iterator[str]:
    """Yield each file's text, one document per file.

    Undecodable bytes become U+FFFD rather than aborting a long build over one
    odd file.
    """
    for path in paths:
        yield pathlib.Path(path).read_text(encoding="utf-8", errors="replace")
