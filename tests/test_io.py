"""Atomic writes: the old file survives a failed write, a failure names the file and the bytes, and new files
follow the umask (not mkstemp's 0600)."""

import errno
import os
import shutil
import stat

import pytest

from scaling.io import WriteError, atomic_write, atomic_write_text, check_free_space


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "metrics.json"
    atomic_write_text(target, "old")

    def boom(p):
        p.write_text("half")
        raise RuntimeError("disk full")  # how torch.save reports a full disk: an opaque RuntimeError

    with pytest.raises(WriteError, match=f"cannot write {target} .4 bytes written before the error.*RuntimeError: "
                                         "disk full") as e:
        atomic_write(target, boom)
    assert isinstance(e.value.__cause__, RuntimeError)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_free_space_is_checked_before_writing(tmp_path, monkeypatch):
    free = shutil.disk_usage(tmp_path).free
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    with pytest.raises(WriteError, match=f"weights {tmp_path / 'w.bin'} needs 5,000 bytes, but its file system has "
                                         "only 1,000 free") as e:
        check_free_space(tmp_path / "w.bin", 5000, "weights")
    assert e.value.errno == errno.ENOSPC
    with pytest.raises(WriteError, match="needs 5,000 bytes"):
        atomic_write(tmp_path / "w.bin", lambda p: p.write_bytes(b"x" * 5000), nbytes=5000)
    assert list(tmp_path.iterdir()) == []
    check_free_space(tmp_path / "w.bin", 1000)  # exactly enough is enough
    assert free > 0


def test_mode_follows_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644
