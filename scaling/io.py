"""Atomic file writes (a reader, or a crash, never sees a half-written file in the run store) and checked reads
(a file that cannot be parsed is an error naming it; none of these formats can run code)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import yaml


class WriteError(OSError):
    """Writing a file failed (full disk, file-size limit, read-only directory, a saver's own error); the message
    names the file, the bytes needed or written, and the free space of its file system."""


def free_bytes(path: str | Path) -> int | None:
    """Free bytes on the file system holding ``path`` (its nearest existing parent); None when unknown."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def check_free_space(path: str | Path, nbytes: int, what: str = "writing") -> None:
    """Raise :class:`WriteError` (ENOSPC) before ``nbytes`` are written to ``path`` when its file system has less
    free space. A memory-mapped file on a full file system does not fail with an error but kills the process with
    SIGBUS when a page is first written, so memmaps must be checked up front."""
    free = free_bytes(path)
    if free is not None and free < nbytes:
        err = WriteError(f"{what} {path} needs {nbytes:,} bytes, but its file system has only {free:,} free")
        err.errno = errno.ENOSPC
        raise err


def write_error(path: str | Path, exc: BaseException, nbytes: int | None = None, written: int | None = None,
                what: str = "cannot write") -> WriteError:
    """A :class:`WriteError` for ``exc`` raised while writing ``path``: names the file, the bytes, the free space."""
    free = free_bytes(path)
    sizes = [f"{nbytes:,} bytes needed" if nbytes is not None else "",
             f"{written:,} bytes written before the error" if written is not None else "",
             f"{free:,} bytes free on its file system" if free is not None else ""]
    err = WriteError(f"{what} {path} ({'; '.join(s for s in sizes if s)}): {type(exc).__name__}: {exc}")
    err.errno = getattr(exc, "errno", None) or errno.EIO
    return err


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[Path], None], nbytes: int | None = None) -> None:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, fsync it, then rename it over ``path``.

    Any failure (``nbytes``, when given, is checked against the free space first) becomes a :class:`WriteError`
    naming ``path`` and the bytes: savers report a full disk in their own ways (``torch.save`` as an opaque
    RuntimeError, safetensors as a SafetensorError), and the old file is kept either way.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if nbytes is not None:
            check_free_space(path, nbytes)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except WriteError:
        raise
    except OSError as e:
        raise write_error(path, e, nbytes) from e
    os.close(fd)
    tmp = Path(tmp)
    try:
        write(tmp)
        # mkstemp creates 0600 files; results on a shared cluster should follow the user's umask like any file.
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as e:  # noqa: BLE001 - every saver's failure is a failure to write this file
        written = tmp.stat().st_size if tmp.exists() else None
        raise write_error(path, e, nbytes, written) from e
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


def read_parquet(path: str | Path, columns=None):
    """Read a Parquet file into a pandas DataFrame; :class:`UnreadableFile` naming it otherwise. ``columns``: read
    only those of them the file holds (a name it lacks is left out, not an error)."""
    import pandas as pd

    def read():
        if columns is None:
            return pd.read_parquet(path)
        import pyarrow.parquet as pq

        have = set(pq.read_schema(path).names)
        return pd.read_parquet(path, columns=[c for c in columns if c in have])

    return _checked(path, read)


def read_parquet_columns(path: str | Path) -> list[str]:
    """The column names of a Parquet file, from its footer alone (no data is read); :class:`UnreadableFile` naming
    it when it is not Parquet (a truncated file has no footer)."""
    def read():
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names)

    return _checked(path, read)


def read_safetensors(path: str | Path, *, tensors: bool = True) -> tuple[dict, dict[str, str]]:
    """The tensors (``{}`` with ``tensors=False``: the header alone) and the string metadata of a safetensors file;
    :class:`UnreadableFile` naming it when it is damaged (safetensors' own error names no file)."""
    def read():
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return ({k: f.get_tensor(k) for k in f.keys()} if tensors else {}), dict(f.metadata() or {})

    return _checked(path, read)
