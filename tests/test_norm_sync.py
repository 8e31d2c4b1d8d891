"""BatchNorm running statistics on 2 real ranks (torchrun, gloo): every rank predicts with the same, averaged
statistics, and the exported weights and the final checkpoint hold exactly those (tests/dist_scripts/norm_suite.py).
Without the averaging each rank keeps the statistics of its own micro-batches, so ``predict`` scores each rank's
share with different buffers and the export holds rank 0's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist_scripts"))

import launcher  # noqa: E402


@pytest.fixture(scope="module")
def norm_suite(tmp_path_factory):
    out = tmp_path_factory.mktemp("norm")
    cmd = launcher.command("norm", script=launcher.HERE / "norm_suite.py", out=out)
    proc = subprocess.run(cmd, env=launcher.env(), cwd=launcher.REPO, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return torch.load(out / "norm.pt", weights_only=False)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_batchnorm_statistics_agree_across_ranks_and_with_the_export(norm_suite, strategy):
    assert norm_suite["world"] == 2, "the launched run must really have 2 ranks"
    cell = norm_suite[strategy]
    rank0, rank1 = cell["buffers"]
    assert set(rank0) == set(rank1) and len(rank0) == 6  # running_mean and running_var of 3 BatchNorm layers
    for name in rank0:
        torch.testing.assert_close(rank0[name], rank1[name], rtol=0, atol=0)
        torch.testing.assert_close(cell["exported"][name], rank0[name], rtol=0, atol=0)
    # The statistics were really updated by training (not the initial zeros / ones).
    assert rank0["stem.1.running_mean"].abs().max() > 1e-3
    # predict's logits are those of the exported weights, for every sample whichever rank scored it.
    np.testing.assert_allclose(cell["pred"]["logits"], cell["reloaded_logits"], rtol=0, atol=1e-5)
    # A Trainer reloading the run's final checkpoint predicts the same.
    assert cell["from_final"] is True
    np.testing.assert_array_equal(cell["pred_again"]["index"], cell["pred"]["index"])
    np.testing.assert_allclose(cell["pred_again"]["logits"], cell["pred"]["logits"], rtol=0, atol=1e-6)
