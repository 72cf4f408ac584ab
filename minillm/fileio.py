"""Atomic file writes: the one way minillm writes a file that must never be seen half-written.

`atomic_write(path, write)` lets `write` fill a temporary file beside `path`, flushes it to disk,
then renames it over `path` (`os.replace` is atomic on POSIX and Windows). A crash mid-write leaves
the old file (or none) and a stray `.tmp`, never a damaged `path`; an exception removes the
temporary file and leaves `path` as it was. A leaf module, so that every layer (tokenizer, data,
checkpoints, the Hugging Face writer, scripts) can use it without an import circle.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object], suffix: str = "") -> None:
    """Call `write(tmp)` to write a temporary file beside `path`, then rename it to `path`.
    `suffix` ends the temporary name (np.save appends ".npy" to names without it)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{suffix}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:  # on disk before the rename, so the rename never exposes
            os.fsync(f.fileno())     # an empty file after a power loss
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """`text` to `path`, atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(text))


def write_json(path: str | os.PathLike, obj, indent: int | None = None) -> None:
    """`obj` as JSON to `path`, atomically (a trailing newline when indented)."""
    write_text(path, json.dumps(obj, indent=indent) + ("\n" if indent is not None else ""))


__all__ = ["atomic_write", "write_text", "write_json"]
