"""Atomic file writes (a reader, or a crash, never sees a half-written file in the run store) and checked reads
(a file that cannot be parsed is an error naming it; none of these formats can run code)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import yaml


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


class UnreadableFile(ValueError):
    """A file exists but cannot be read or parsed; the message names it and says why."""


def _checked(path: str | Path, read: Callable[[], Any]) -> Any:
    try:
        return read()
    except Exception as e:  # any parser or OS failure: name the file
        raise UnreadableFile(f"{path}: cannot be read ({type(e).__name__}: {str(e)[:300]})") from e


def read_json(path: str | Path) -> Any:
    """Parse a JSON file; :class:`UnreadableFile` naming it when it is not UTF-8 JSON."""
    return _checked(path, lambda: json.loads(Path(path).read_text()))


def read_yaml_file(path: str | Path) -> Any:
    """Parse a YAML file with PyYAML's safe loader (plain data only); :class:`UnreadableFile` naming it otherwise."""
    return _checked(path, lambda: yaml.safe_load(Path(path).read_text()))


def read_parquet(path: str | Path):
    """Read a Parquet file into a pandas DataFrame; :class:`UnreadableFile` naming it otherwise."""
    import pandas as pd

    return _checked(path, lambda: pd.read_parquet(path))
