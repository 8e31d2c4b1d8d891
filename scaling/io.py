"""Atomic file writes: a reader (or a crash) never sees a half-written file in the run store."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, fsync it, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        write(tmp)
        # mkstemp creates 0600 files; results on a shared cluster should follow the user's umask like any file.
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    atomic_write(path, lambda p: p.write_text(text))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as pretty JSON to ``path`` atomically (NaN is written as ``NaN``, which ``json`` reads back)."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str))


def atomic_write_parquet(path: str | Path, df) -> None:
    """Write a pandas DataFrame as Parquet atomically."""
    atomic_write(path, lambda p: df.to_parquet(p, index=False))
