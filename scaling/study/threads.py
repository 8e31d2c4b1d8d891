"""Threads for the report's per-run and per-comparison statistics.

A study's report spends most of its time in work that is independent run by run (patient bootstrap replicates)
or comparison by comparison (the paired tests), and that work is numpy sorts, takes, cumulative sums and einsums
on large arrays, which release the GIL; reading a run's predictions (pyarrow) does too. So a thread pool uses a
node's cores without copying any data into worker processes. Results come back in the order of the inputs and do
not depend on the number of threads (every task is a pure function of its input; no random draw is made inside).
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask: what SLURM or a container grants), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no affinity masks on this platform (macOS)
        return max(1, os.cpu_count() or 1)


def resolve_workers(workers: int | None) -> int:
    """``workers`` threads, or :func:`usable_cores` for None; a clear error for less than 1."""
    if workers is None:
        return usable_cores()
    if int(workers) < 1:
        raise ValueError(f"workers must be >= 1 (or None for every usable core), got {workers}")
    return int(workers)


def thread_map(fn: Callable[[T], R], items: Iterable[T], workers: int | None = None) -> Iterator[R]:
    """``fn`` over ``items`` on up to ``workers`` threads (None: every usable core), results in the items' order.

    ``items`` is drawn lazily, at most two per thread ahead of the result being handed out, so a generator that
    reads data (a run's predictions) is not drained into memory ahead of the work. One thread: plain ``map`` in
    the calling thread. An exception in ``fn`` is raised here when its result's turn comes.
    """
    n = resolve_workers(workers)
    if n == 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(max_workers=n, thread_name_prefix="scaling-report") as pool:
        pending: collections.deque = collections.deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * n:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
