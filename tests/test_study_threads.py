"""The report's thread pool: results in input order, inputs drawn lazily, errors raised; and every statistic that
uses it gives the same numbers, to the last bit, on one thread and on several."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pandas as pd
import pytest
from study_store import shared_store

from scaling.study.aggregate import load_results, plain_cells, summarise
from scaling.study.compare import brier_comparisons, pairwise_comparisons, subgroup_comparisons
from scaling.study.fits import fit_table, patient_replicates
from scaling.study.store import RunStore
from scaling.study.tables import effective_robustness
from scaling.study.threads import resolve_workers, thread_map, usable_cores


def test_thread_map_keeps_the_order_and_uses_several_threads():
    names = set()

    def slow_square(i: int) -> int:
        names.add(threading.current_thread().name)
        time.sleep(0.002 * (7 - i % 7))  # later items finish first
        return i * i

    assert list(thread_map(slow_square, range(40), workers=3)) == [i * i for i in range(40)]
    assert len(names) == 3 and all(n.startswith("scaling-report") for n in names)
    names.clear()
    assert list(thread_map(slow_square, range(5), workers=1)) == [0, 1, 4, 9, 16]
    assert names == {threading.current_thread().name}  # one worker: the calling thread, no pool


def test_thread_map_draws_its_inputs_lazily_and_raises_the_first_error():
    drawn, handed = [], []

    def items():
        for i in range(30):
            drawn.append(i)
            yield i

    for out in thread_map(lambda i: i, items(), workers=2):
        handed.append(out)
        assert len(drawn) - len(handed) <= 2 * 2  # at most two inputs per thread ahead of the consumer
    assert handed == list(range(30))

    def boom(i: int) -> int:
        if i == 5:
            raise KeyError(f"run {i}")
        return i

    got = []
    with pytest.raises(KeyError, match="run 5"):
        for out in thread_map(boom, range(20), workers=3):
            got.append(out)
    assert got == [0, 1, 2, 3, 4]  # everything before the failing input, in order


def test_workers_default_to_the_usable_cores_and_refuse_less_than_one():
    assert usable_cores() == len(os.sched_getaffinity(0)) >= 1
    assert resolve_workers(None) == usable_cores() and resolve_workers(3) == 3
    with pytest.raises(ValueError, match="workers must be >= 1"):
        resolve_workers(0)


def test_every_threaded_statistic_is_the_same_on_one_thread_and_on_three(tmp_path_factory):
    root, _ = shared_store(tmp_path_factory)
    df = plain_cells(load_results(root))
    sets = ["test", "ood_site_b"]
    for compare in (pairwise_comparisons, subgroup_comparisons, brier_comparisons):
        one, three = compare(root, df, sets, workers=1), compare(root, df, sets, workers=3)
        assert len(one) > 5, compare.__name__
        pd.testing.assert_frame_equal(one, three, check_exact=True)
    one, _ = fit_table(df, n_boot=30, store_root=root, workers=1)
    three, _ = fit_table(df, n_boot=30, store_root=root, workers=3)
    assert (one["ci"] == "seeds+patients").any()
    pd.testing.assert_frame_equal(one, three, check_exact=True)
    summary = summarise(df)
    one, _ = effective_robustness(summary, "ood_site_b", df=df, store_root=root, n_boot=30, workers=1)
    three, _ = effective_robustness(summary, "ood_site_b", df=df, store_root=root, n_boot=30, workers=3)
    assert (one["ci"] == "seeds+patients").all()
    pd.testing.assert_frame_equal(one, three, check_exact=True)
    store = RunStore(root)
    runs = list(df["run_id"].unique())
    loaders = [lambda cols, r=r: store.read_predictions(r, "test", columns=cols) for r in runs]
    reps = patient_replicates(loaders, n_boot=20, workers=1)
    assert reps.shape == (20, len(runs)) and np.isfinite(reps).all()
    np.testing.assert_array_equal(reps, patient_replicates(loaders, n_boot=20, workers=4))


def test_cli_takes_workers_and_refuses_a_bad_count(tmp_path_factory, capsys):
    from scaling.study.__main__ import main

    root, _ = shared_store(tmp_path_factory)
    with pytest.raises(SystemExit) as stop:
        main(["compare", str(root), "--workers", "0"])
    assert stop.value.code == 2 and "--workers must be a whole number >= 1, got '0'" in capsys.readouterr().err
    assert main(["compare", str(root), "--workers", "2"]) == 0
    one = capsys.readouterr().out
    assert main(["compare", str(root), "--workers", "1"]) == 0
    assert capsys.readouterr().out == one and "bb_" in one  # the same table printed either way
