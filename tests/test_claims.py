"""Run claims: one holder at a time, a dead or silent holder is taken over, a live one on another host is not."""

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from scaling.study import claims
from study_launch import REPO
from scaling.study.claims import file_lock, is_stale, live_owner, read_owner, try_claim


def _record(path, **kw):
    rec = {"host": claims.HOST, "pid": 1, "launch": "other", "started": time.time(), "heartbeat": time.time(), **kw}
    path.with_suffix(".owner.json").write_text(json.dumps(rec))
    return rec


def test_one_holder_at_a_time(tmp_path):
    lock = tmp_path / "locks" / "run__f0.5__s0__abcd1234.lock"
    first = try_claim(lock)
    assert first is not None
    owner = read_owner(lock.with_suffix(".owner.json"))
    assert owner["host"] == claims.HOST and owner["launch"] == claims.LAUNCH
    assert try_claim(lock) is None  # flock is per open file: a second claim in this process is refused too
    assert live_owner(lock) == owner
    first.release()
    assert not lock.with_suffix(".owner.json").exists() and live_owner(lock) is None
    second = try_claim(lock)
    assert second is not None
    second.release()
    second.release()  # idempotent


def test_a_killed_holder_releases_its_claim(tmp_path):
    lock = tmp_path / "r.lock"
    code = (f"import time; from pathlib import Path; from scaling.study.claims import try_claim; "
            f"c = try_claim(Path({str(lock)!r})); print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert proc.stdout.readline().strip() == "held"
        assert try_claim(lock) is None
        assert read_owner(lock.with_suffix(".owner.json"))["pid"] == proc.pid
    finally:
        proc.kill()
        proc.wait()
    # the kernel dropped the lock; the owner record stayed behind, and names a pid that is gone
    assert is_stale(read_owner(lock.with_suffix(".owner.json")))
    c = try_claim(lock)
    assert c is not None and read_owner(lock.with_suffix(".owner.json"))["pid"] != proc.pid
    c.release()


def test_another_hosts_record_counts_while_its_heartbeat_is_fresh(tmp_path):
    # File systems with node-local locks: the lock is free here, the owner record says another host works on it.
    lock = tmp_path / "r.lock"
    _record(lock, host="node-7", pid=99)
    assert try_claim(lock, stale_s=60) is None
    assert live_owner(lock, stale_s=60)["host"] == "node-7"
    _record(lock, host="node-7", pid=99, heartbeat=time.time() - 120)
    assert live_owner(lock, stale_s=60) is None
    c = try_claim(lock, stale_s=60)
    assert c is not None and read_owner(lock.with_suffix(".owner.json"))["host"] == claims.HOST
    c.release()


def test_the_heartbeat_is_refreshed_while_the_claim_is_held(tmp_path):
    lock = tmp_path / "r.lock"
    c = try_claim(lock, heartbeat_s=0.05)
    try:
        first = read_owner(lock.with_suffix(".owner.json"))["heartbeat"]
        deadline = time.time() + 10
        while read_owner(lock.with_suffix(".owner.json"))["heartbeat"] == first:
            assert time.time() < deadline, "no heartbeat in 10 s"
            time.sleep(0.02)
    finally:
        c.release()


def test_file_lock_serialises_shared_preparation(tmp_path):
    lock, order = tmp_path / "prep.lock", []

    def worker(name):
        with file_lock(lock):
            order.append(f"{name}+")
            time.sleep(0.05)
            order.append(f"{name}-")

    threads = [threading.Thread(target=worker, args=(n,)) for n in "abc"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # never two holders at once: every enter is followed by its own exit
    assert all(order[i][0] == order[i + 1][0] and order[i].endswith("+") for i in range(0, 6, 2))


@pytest.mark.parametrize("owner, stale", [
    ({"host": claims.HOST, "pid": os.getpid()}, False),  # this host, a live process
    ({"host": claims.HOST, "pid": 2 ** 22 + 12345}, True),  # this host, no such process
    ({"host": "elsewhere", "pid": 1, "heartbeat": 0.0}, True),  # another host, silent since 1970
])
def test_is_stale(owner, stale):
    assert is_stale(owner) is stale
