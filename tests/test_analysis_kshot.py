"""Few-shot subsets (BiT's 1/5/10/25-shot protocol): per label k positive and k negative patients, nested, seeded."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_data_core import make_table  # noqa: E402

from scaling.data.splits import BIT_SHOTS, kshot_subset  # noqa: E402

LABELS = ["label:Edema", "label:Hernia", "label:Fracture"]


def _per_patient(df):
    return df.groupby("patient_id")[LABELS].max()


def test_every_label_gets_k_positive_and_k_negative_patients_nested_in_k():
    df = make_table(400)
    full = _per_patient(df)
    subsets = {k: kshot_subset(df, k, seed=3) for k in BIT_SHOTS}
    previous: set = set()
    for k, sub in subsets.items():
        patients = set(sub["patient_id"])
        assert previous <= patients  # nested: the 5-shot set contains the 1-shot set, and so on
        previous = patients
        per = _per_patient(sub)
        for col in LABELS:
            for value in (1.0, 0.0):
                available = int((full[col] == value).sum())
                assert int((per[col] == value).sum()) >= min(k, available), (k, col, value)
        # patient-level: every image of a chosen patient comes along, no image of any other patient
        pd.testing.assert_frame_equal(sub.reset_index(drop=True),
                                      df[df["patient_id"].isin(patients)].reset_index(drop=True))
    # small: at most 2k patients per label (overlaps only shrink it)
    assert all(subsets[k]["patient_id"].nunique() <= 2 * k * len(LABELS) for k in BIT_SHOTS)
    assert subsets[1]["patient_id"].nunique() < subsets[25]["patient_id"].nunique()


def test_exactly_the_first_k_of_the_seeded_order_and_unlabelled_never_counts():
    # One label, hand-checkable: patients 0-9, positives are the even ones, patient 1 is unlabelled (NaN).
    y = [1.0, np.nan, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    df = pd.DataFrame({"sample_id": [f"s{i}" for i in range(10)], "patient_id": [f"p{i}" for i in range(10)],
                       "label:A": y})
    from scaling.data.splits import patient_order

    order = list(patient_order(df, seed=5, salt="kshot"))
    per = df.set_index("patient_id")["label:A"]
    expected = [p for p in order if per[p] == 1.0][:2] + [p for p in order if per[p] == 0.0][:2]
    got = kshot_subset(df, 2, seed=5)
    assert set(got["patient_id"]) == set(expected) and "p1" not in set(got["patient_id"])


def test_seeded_and_row_order_free_and_short_labels_logged(caplog):
    df = make_table(300)
    a = set(kshot_subset(df, 5, seed=0)["patient_id"])
    assert a == set(kshot_subset(df.sample(frac=1.0, random_state=2), 5, seed=0)["patient_id"])
    assert a != set(kshot_subset(df, 5, seed=1)["patient_id"])
    n_rare = int((_per_patient(df)["label:Hernia"] == 1.0).sum())
    with caplog.at_level(logging.WARNING, logger="scaling.data.splits"):
        sub = kshot_subset(df, n_rare + 5, seed=0)
    assert f"label 'Hernia' has only {n_rare} positive patient(s)" in caplog.text
    assert int((_per_patient(sub)["label:Hernia"] == 1.0).sum()) == n_rare
    with pytest.raises(Exception, match="k=0 must be >= 1"):
        kshot_subset(df, 0)
