"""Nothing read from a store runs code: a finished study relaunched, its report rebuilt and its run resumed with
every file replaced by a pickle that would create a marker file when unpickled.

The relaunch is repeated until it succeeds: each failure must name one of the planted files, which is then put back,
so every file the relaunch and the report read is met by its reader in turn.
"""

from __future__ import annotations

import dataclasses
import pickle
import re
import shutil
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist_scripts"))

from toy import ToyDataset, plant  # noqa: E402

from scaling.config import load_config  # noqa: E402
from scaling.engine.checkpoint import CheckpointError  # noqa: E402
from scaling.study.grid import expand_grid, run_config, run_id  # noqa: E402
from scaling.study.runner import run_study  # noqa: E402
from scaling.study.store import RunStore  # noqa: E402


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A real one-cell study on the synthetic data, run to the end (store, report, final checkpoint)."""
    tmp = tmp_path_factory.mktemp("study")
    cfg = {"name": "trust", "output_dir": str(tmp / "store"),
           "data": {"root": "synthetic", "image_size": 32, "labels": ["Atelectasis", "Edema"],
                    "options": {"uncertainty": "ignore"}, "subgroups": ["sex"]},
           "train": {"batch_size": 16, "lr": 0.05, "steps": 3, "warmup_steps": 1, "log_every": 1},
           "eval": {"n_boot": 20},
           "grid": {"backbones": ["resnetv2_tiny"], "pretrained": ["scratch"], "fractions": [0.2], "seeds": [0]}}
    path = tmp / "study.yaml"
    path.write_text(yaml.safe_dump(cfg))
    config = load_config(path)
    run_study(config)
    return config, Path(config.output_dir)


def _planted(store: Path) -> list[Path]:
    """The files a relaunch could read: study.yaml and everything of every run (the demo images and the image
    cache are inputs of training, which a finished study does not redo)."""
    return [store / "study.yaml", *sorted(p for p in (store / "runs").rglob("*") if p.is_file())]


def _meet_every_reader(read, store: Path, pristine: Path, marker: Path) -> set[str]:
    """Plant a pickle in every file of the store, then call ``read()`` until it succeeds: each failure must name a
    planted file, which is put back so the next reader is met. Returns the files the readers named."""
    planted = _planted(store)
    for f in planted:
        plant(f, marker)
    named = []
    for _ in range(len(planted) + 1):
        try:
            read()
            break
        except Exception as e:  # noqa: BLE001 - any error is acceptable if it names a planted file
            assert not marker.exists(), f"code ran while reading the store ({e})"
            hit = [f for f in planted if str(f) in str(e) and f not in named]
            assert hit, f"the error names none of the planted files: {type(e).__name__}: {e}"
            named.append(hit[0])
            shutil.copy2(pristine / hit[0].relative_to(store), hit[0])  # put it back: meet the next reader
    else:
        pytest.fail("the reader kept failing")
    assert not marker.exists()
    return {str(f.relative_to(store)) for f in named}


def test_relaunched_study_and_report_never_run_code_from_the_store(finished, tmp_path):
    from scaling.study.report import write_report

    cfg, pristine = finished
    marker = tmp_path / "PWNED"
    plant(tmp_path / "probe.pkl", marker)
    pickle.loads((tmp_path / "probe.pkl").read_bytes())
    assert marker.exists()  # the payload is live
    marker.unlink()
    store = tmp_path / "store"
    shutil.copytree(pristine, store)
    rid = run_id(cfg, expand_grid(cfg)[0])

    # The relaunch decides what each run lacks from its recorded settings, evaluation record and axes.
    read = _meet_every_reader(lambda: run_study(dataclasses.replace(cfg, output_dir=str(store))), store, pristine,
                              marker)
    assert {f"runs/{rid}/settings.json", f"runs/{rid}/evaluation.json", f"runs/{rid}/spec.json"} <= read, read
    # The report stops at an unreadable study config (naming it) and reports a run whose files are unreadable as
    # not in the numbers, naming the file, instead of hiding the rest of the study: nothing it reads runs code either.
    read = _meet_every_reader(lambda: write_report(store), store, pristine, marker)
    assert read == {"study.yaml"}, read
    html = (store / "report.html").read_text()
    assert f"runs/{rid}/spec.json: cannot be read" in html  # the run is listed as not in the numbers, and why


def test_resuming_a_finished_run_never_runs_code_from_its_checkpoint(finished, tmp_path):
    from scaling.engine import Trainer
    from scaling.models import build_model

    cfg, pristine = finished
    marker = tmp_path / "PWNED"
    spec = expand_grid(cfg)[0]
    rcfg = run_config(cfg, spec)
    src = RunStore(pristine).run_dir(run_id(cfg, spec))
    files = sorted(p.relative_to(src) for p in (src / "checkpoints").rglob("*") if p.is_file())
    assert {f.name for f in files} == {"latest", "trainer_state.json", "model.safetensors"}
    for f in files:
        run = tmp_path / f"run_{f.name}"
        shutil.copytree(src, run)
        plant(run / f, marker)
        model = build_model(rcfg.model, num_outputs=len(cfg.data.labels), image_size=cfg.data.image_size)
        with pytest.raises(CheckpointError, match=re.escape(str(run / f))):
            Trainer(model, rcfg.train, rcfg.sharding, output_dir=run).fit(ToyDataset(64))
        assert not marker.exists(), f"unpickling {f} ran code"


def test_a_checkpoint_index_pickled_by_python_3_13_reads_on_every_python():
    """Python 3.13 moved pathlib's classes to ``pathlib._local`` and pickles a path under that name; DCP's index holds
    paths. The allowlisting unpickler refused them, so on 3.13 no checkpoint resumed (every resume failed with
    "global pathlib._local.PosixPath is not allowed"). Read here on whatever Python runs the suite, from the bytes
    3.13 writes; anything else under that module is still refused."""
    import io

    from scaling.engine.checkpoint import _MetadataUnpickler

    def unpickle(module: str, name: str):
        # pickle.dumps(PosixPath("/a/b/c"), protocol=2) on Python 3.13.0, with the global's module and name swapped in
        data = b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"q\x00X\x06\x00\x00\x00/a/b/cq\x01\x85q\x02Rq\x03."
        return _MetadataUnpickler(io.BytesIO(data)).load()

    for module in ("pathlib._local", "pathlib"):  # as 3.13+ writes it, as 3.10-3.12 write it
        assert unpickle(module, "PosixPath") == Path("/a/b/c") and isinstance(unpickle(module, "PosixPath"), Path)
    with pytest.raises(pickle.UnpicklingError, match=r"global pathlib(\._local)?\.Path is not allowed"):
        unpickle("pathlib._local", "Path")
    with pytest.raises(pickle.UnpicklingError, match=r"global os\.system is not allowed"):
        unpickle("os", "system")
