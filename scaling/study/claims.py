"""Claims and locks: many launches (SLURM array tasks, several ``accelerate launch``) share one run store.

A run is worked on by one launch at a time. The launch claims it with ``fcntl.flock`` on
``<store>/locks/<run_id>.lock``, held for as long as it works, and writes an owner record next to it
(``<run_id>.owner.json``: host, pid, launch id, start time, heartbeat) that a background thread refreshes every
:data:`HEARTBEAT_S` seconds. The kernel drops a lock when its process dies, so a killed launch never blocks a run
on one machine. The owner record covers file systems whose locks are node-local (Lustre mounted ``-o localflock``,
NFS without a lock manager): a lock obtained while another host's record still has a fresh heartbeat is given
back, and a record whose heartbeat is older than :data:`STALE_S` is taken over. Shared preparation (demo data,
upstream weights, the study record, the report) is built once under :func:`file_lock`.

Lock files are never deleted: removing a lock file while another process waits on it would let two processes
hold "the" lock on two different files.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from scaling.io import atomic_write_json

log = logging.getLogger(__name__)

HEARTBEAT_S = 30.0
"""Seconds between two refreshes of an owner record."""
STALE_S = 600.0
"""An owner record on another host whose heartbeat is older than this is taken over (20 missed heartbeats)."""

HOST = socket.gethostname()
LAUNCH = uuid.uuid4().hex[:12]
"""Id of this process's launch (one per Python process; ranks of one launch have different ids, only rank 0
claims)."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def is_stale(owner: dict, now: float | None = None, stale_s: float = STALE_S) -> bool:
    """True when an owner record no longer stands for a live claim: same host and its pid is gone, or another host
    and its heartbeat is older than ``stale_s``."""
    now = time.time() if now is None else now
    if owner.get("host") == HOST:
        return not _alive(int(owner.get("pid", -1)))
    return now - float(owner.get("heartbeat", 0.0)) > stale_s


def read_owner(path: Path) -> dict | None:
    """The owner record at ``path`` (None when absent or unreadable: a torn record is no claim)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if needed) for the block; waits for other holders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class Claim:
    """This launch's claim on one run; release it with :meth:`release` (or use it as a context manager)."""

    def __init__(self, lock_path: Path, fd, heartbeat_s: float):
        self.lock_path = lock_path
        self.owner_path = lock_path.with_suffix(".owner.json")
        self._fd = fd
        self._stop = threading.Event()
        self.record = {"host": HOST, "pid": os.getpid(), "launch": LAUNCH, "started": time.time(),
                       "heartbeat": time.time()}
        atomic_write_json(self.owner_path, self.record)
        self._thread = threading.Thread(target=self._beat, args=(heartbeat_s,), daemon=True,
                                        name=f"heartbeat {lock_path.stem}")
        self._thread.start()

    def _beat(self, every: float) -> None:
        while not self._stop.wait(every):
            self.record["heartbeat"] = time.time()
            try:
                atomic_write_json(self.owner_path, self.record)
            except OSError as e:  # a full disk must not kill the run; the flock still holds the claim
                log.warning("cannot refresh claim %s: %s", self.owner_path, e)

    def release(self) -> None:
        """Stop the heartbeat, remove the owner record and drop the lock (idempotent)."""
        if self._fd is None:
            return
        self._stop.set()
        self._thread.join()
        try:
            if (read_owner(self.owner_path) or {}).get("launch") == LAUNCH:
                self.owner_path.unlink(missing_ok=True)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            self._fd.close()
            self._fd = None

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def try_claim(lock_path: Path, *, heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S) -> Claim | None:
    """Claim the item of ``lock_path`` without waiting: a :class:`Claim`, or None when another live launch has it.

    A stale owner record (dead process on this host, or no heartbeat from another host for ``stale_s``) is taken
    over and logged.
    """
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = open(lock_path, "a")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fd.close()
        return None
    owner = read_owner(lock_path.with_suffix(".owner.json"))
    if owner is not None and owner.get("host") != HOST and not is_stale(owner, stale_s=stale_s):
        # We hold the lock, yet another host's heartbeat is fresh: this file system's locks are node-local.
        fcntl.flock(fd, fcntl.LOCK_UN)
        fd.close()
        return None
    if owner is not None and owner.get("launch") != LAUNCH:
        log.warning("taking over %s from %s pid %s (launch %s, last heartbeat %.0f s ago)", lock_path.stem,
                    owner.get("host"), owner.get("pid"), owner.get("launch"),
                    time.time() - float(owner.get("heartbeat", 0.0)))
    try:
        return Claim(lock_path, fd, heartbeat_s)
    except BaseException:
        fcntl.flock(fd, fcntl.LOCK_UN)
        fd.close()
        raise


def live_owner(lock_path: Path, stale_s: float = STALE_S) -> dict | None:
    """The owner record of ``lock_path`` when it stands for a live claim (for reporting; takes no lock)."""
    owner = read_owner(lock_path.with_suffix(".owner.json"))
    return owner if owner is not None and not is_stale(owner, stale_s=stale_s) else None
