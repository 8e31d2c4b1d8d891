"""The analysis axes in a real (tiny) study: linear-probe, k-shot and re-initialised cells, CKA per fine-tuned run
and between scales, each checked against an independent computation; a grown study adds an evaluation set to a
probe run and recomputes CKA without training anything."""

import dataclasses
import re

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from scaling.analysis.cka import linear_cka
from scaling.analysis.features import block_features
from scaling.analysis.probe import LinearProbe
from scaling.config import load_config
from scaling.data.dataset import TableDataset
from scaling.data.splits import kshot_subset
from scaling.models import build_model
from scaling.models.reinit import units
from scaling.study.grid import RunSpec, run_config, run_id
from scaling.study.protocols import cka_sample, feature_cache
from scaling.study.report import build_report, render_html
from scaling.study.data import load_study_data
from scaling.study.runner import run_study
from scaling.study.store import RunStore, StoreError
from study_launch import count

LABELS = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]
UP = "upstream:up"


def overrides(store, *extra):
    return [
        f"output_dir={store}", "name=analysis", "data.root=synthetic", "data.image_size=32",
        f"data.labels=[{','.join(LABELS)}]", "data.options={uncertainty: ignore}", "train.batch_size=16",
        "train.lr=0.05", "train.steps=6", "train.warmup_steps=1", "train.log_every=6", "sharding.strategy=none",
        "eval.n_boot=20", "probe.cs=[0.01,1.0]", "cka.max_examples=64", "cka.batch_size=64",
        "upstream=[{name: up, num_images: 200, num_classes: 4, image_size: 32, steps: 5, batch_size: 32}]",
        "grid.backbones=[resnetv2_tiny,vit_micro]", f"grid.pretrained=['{UP}']", "grid.fractions=[1.0]",
        "grid.protocols=[finetune,linear_probe]",
        f"grid.also=[{{backbones: [resnetv2_tiny], pretrained: ['{UP}'], protocols: [finetune], reinit: ['after:2']}},"
        f" {{backbones: [resnetv2_tiny], pretrained: ['{UP}'], fractions: [], shots: [2], "
        "protocols: [linear_probe]}]", *extra]


OOD = "data.ood=[{name: ood_site_b, root: 'synthetic:b', split: train}]"


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    """The study without an OOD set, then grown by one OOD set and another CKA sample size."""
    store = tmp_path_factory.mktemp("analysis") / "store"
    first = load_config(None, overrides(store))
    table = run_study(first, report=False)
    trained = count(store, "train")
    cfg = load_config(None, overrides(store, OOD, "cka.max_examples=48"))
    run_study(cfg)
    return cfg, RunStore(store), table, trained


def _model(cfg, spec, store, weights=None):
    """The cell's model as a plain module: pretrained (and re-initialised) or with its stored fine-tuned weights."""
    rcfg = run_config(cfg, spec)
    source = str(store.upstream_dir("up") / f"{spec.backbone}.safetensors") if spec.pretrained == UP else "scratch"
    torch.manual_seed(spec.seed)
    model = build_model(dataclasses.replace(rcfg.model, pretrained="scratch" if weights else source),
                        num_outputs=len(LABELS), image_size=32)
    if weights:
        model.load_state_dict(load_file(weights))
    return model.eval()


def _dataset(table):
    return TableDataset(table, LABELS, 32, train=False)


def test_every_cell_ran_once_and_the_grown_study_trained_nothing(grown):
    cfg, store, table, trained = grown
    assert len(table) == 2 * 2 + 1 + 1 and set(table["status"]) == {"complete"}
    assert set(table["protocol"]) == {"finetune", "linear_probe"} and set(table["shots"]) == {0, 2}
    assert count(store.root, "train") == trained and len(trained) == len(table)
    probes = {r for r in store.run_ids() if "__probe" in r}
    # the OOD set reached the probe runs from their stored probes, and the fine-tuned ones from their weights
    assert set(count(store.root, "evaluate")) == set(store.run_ids())
    # CKA with another sample size was recomputed for the fine-tuned runs only, from stored weights
    assert set(count(store.root, "cka")) == set(store.run_ids()) - probes
    for rid in probes:
        assert not (store.run_dir(rid) / "checkpoints").exists()  # no fine-tuned weights
        assert not (store.run_dir(rid) / "cka.parquet").exists()


def test_probe_cell_is_sklearn_on_the_frozen_pretrained_features(grown):
    cfg, store, *_ = grown
    spec = RunSpec("resnetv2_tiny", UP, 1.0, 0, protocol="linear_probe")
    rid = run_id(cfg, spec)
    data = load_study_data(cfg)
    model = _model(cfg, spec, store)
    feats = {name: block_features(model, _dataset(t), layers=["pre_logits"])["features"]["pre_logits"].double()
             .numpy() for name, t in (("train", data.train), ("test", data.test), ("ood_site_b", data.ood["ood_site_b"]))}
    mean, std = feats["train"].mean(0), feats["train"].std(0)
    std[std <= 1e-12] = 1.0  # a constant feature (a dead ReLU channel) is left at zero, as the probe documents
    probe = LinearProbe.load(store.run_dir(rid) / "probe.safetensors")
    chosen = probe.chosen().set_index("label")["C"]
    for name in ("test", "ood_site_b"):
        pred = store.read_predictions(rid, name)
        assert list(pred["sample_id"]) == list(data.eval_sets()[name]["sample_id"])
        for j, label in enumerate(LABELS):
            y = data.train[f"label:{label}"].to_numpy(float)
            ok = ~np.isnan(y)
            ref = LogisticRegression(C=chosen[label], max_iter=2000).fit(((feats["train"] - mean) / std)[ok], y[ok])
            expected = ref.decision_function((feats[name] - mean) / std)
            np.testing.assert_allclose(pred[f"logit:{label}"], expected, atol=2e-3, rtol=1e-3)
    # the stored AUROC of the probe run is scikit-learn's on its stored predictions
    pred, m = store.read_predictions(rid, "test"), store.read_metrics(rid)
    for label in LABELS:
        ok = pred[f"label:{label}"].notna()
        row = m[(m.eval_set == "test") & (m.label == label) & (m.attribute == "all") & (m.metric == "auroc")]
        assert row.value.iloc[0] == pytest.approx(roc_auc_score(pred.loc[ok, f"label:{label}"],
                                                                pred.loc[ok, f"logit:{label}"]), abs=1e-9)


def test_kshot_probe_shares_the_feature_cache_and_fits_on_its_subset(grown):
    cfg, store, *_ = grown
    shot = RunSpec("resnetv2_tiny", UP, 1.0, 0, protocol="linear_probe", shots=2)
    full = dataclasses.replace(shot, shots=0)
    assert feature_cache(cfg, store, shot) == feature_cache(cfg, store, full)
    assert sorted(p.name for p in feature_cache(cfg, store, shot).iterdir()) == [
        "ood_site_b.safetensors", "test.safetensors", "train.safetensors", "val.safetensors"]
    data = load_study_data(cfg)
    subset = kshot_subset(data.train, 2, seed=0)
    rid = run_id(cfg, shot)
    assert store.read_spec(rid)["n_train_images"] == len(subset)
    search = LinearProbe.load(store.run_dir(rid) / "probe.safetensors").search
    assert (search["n_train"] == subset[[f"label:{lab}" for lab in LABELS]].notna().sum().to_numpy().repeat(2)).all()
    assert (search.groupby("label")["n_train_pos"].first() >= 2).all()  # k positive patients per label at least


def test_cka_is_linear_cka_of_the_initialisation_and_the_fine_tuned_model(grown):
    cfg, store, *_ = grown
    data = load_study_data(cfg)
    sample = _dataset(cka_sample(data.test, cfg.cka))
    assert len(sample) == 48
    for spec in (RunSpec("resnetv2_tiny", UP, 1.0, 0), RunSpec("resnetv2_tiny", UP, 1.0, 0, reinit="after:2")):
        rid = run_id(cfg, spec)
        init = _model(cfg, spec, store)
        if spec.reinit != "none":
            from scaling.models.reinit import reinit_after

            reinit_after(init, 2, seed=0)
            assert store.read_spec(rid)["units_reinitialised"] == list(units(init))[2:]
        tuned = _model(cfg, spec, store, weights=store.model_path(rid))
        a, b = block_features(init, sample)["features"], block_features(tuned, sample)["features"]
        t = pd.read_parquet(store.run_dir(rid) / "cka.parquet")
        diag = t[t.index_a == t.index_b].set_index("layer_a")["cka"]
        assert list(diag.index) == list(a) and (t["n_examples"] == 48).all()
        for layer in a:
            assert diag[layer] == pytest.approx(linear_cka(a[layer], b[layer]), abs=1e-4)
        assert store.read_evaluation(rid)["cka"] == {"eval_set": "test", "max_examples": 48, "batch_size": 64,
                                                     "order": "shuffled"}


@pytest.fixture(scope="module")
def grown_report(grown):
    """The report of the grown study, built once for the tests that read it (they do not change the store)."""
    return build_report(grown[1].root, n_boot_fit=10)


def test_report_shows_the_analysis_tables_and_their_numbers(grown, grown_report):
    cfg, store, *_ = grown
    rep = grown_report
    text = render_html(rep)
    for tid in ("probe_gap", "fewshot", "reinit", "cka_blocks", "cka_scales"):
        assert f'id="tbl-{tid}"' in text and f'id="fig-{tid}"><img' in text, tid
    macro = {}
    for rid in store.run_ids():
        m = store.read_metrics(rid)
        spec = store.read_spec(rid)
        row = m[(m.eval_set == "test") & (m.label == "macro") & (m.attribute == "all") & (m.metric == "auroc")]
        macro[(spec["backbone"], spec["pretrained"], spec["protocol"], spec["shots"], spec["reinit"])] = \
            row.value.iloc[0]
    gap = rep.tables["probe_gap"].set_index(["backbone", "pretrained", "budget"])
    for bb in ("resnetv2_tiny", "vit_micro"):
        r = gap.loc[(bb, UP, "fraction 1")]
        ft, lp = macro[(bb, UP, "finetune", 0, "none")], macro[(bb, UP, "linear_probe", 0, "none")]
        assert (r["finetune"], r["probe"]) == (pytest.approx(ft), pytest.approx(lp))
        assert r["gap"] == pytest.approx(ft - lp) and r["gap_lo"] <= r["gap"] <= r["gap_hi"]
        assert r["gap_ci"] == "bootstrap"
    ri = rep.tables["reinit"].set_index("reinit")
    assert ri.loc["after:2", "units_kept"] == 2 and ri.loc["none", "units_kept"] == ri.loc["none", "n_units"] == 6
    assert ri.loc["after:2", "auroc_lost"] == pytest.approx(
        macro[("resnetv2_tiny", UP, "finetune", 0, "none")] - macro[("resnetv2_tiny", UP, "finetune", 0, "after:2")])
    fs = rep.tables["fewshot"]
    assert list(fs["shots"]) == [2] and fs["mean"].iloc[0] == pytest.approx(
        macro[("resnetv2_tiny", UP, "linear_probe", 2, "none")])
    # the scaling views read plain fine-tuning cells only
    dl = rep.tables["comparisons"]  # macro and per label on test and on the OOD set
    assert sorted(dl["eval_set"]) == sorted(["ood_site_b", "test"] * (1 + len(LABELS))) and (dl["n"] > 0).all()
    blocks = rep.tables["cka_blocks"]
    assert blocks["mean"].between(-1e-6, 1 + 1e-6).all() and set(blocks["reinit"]) == {"none", "after:2"}


def test_cka_between_scales_is_cka_of_the_two_fine_tuned_models(grown, grown_report):
    cfg, store, *_ = grown
    scales = grown_report.tables["cka_scales"]
    assert set(scales["backbone_a"]) == {"vit_micro"} and set(scales["backbone_b"]) == {"resnetv2_tiny"}
    data = load_study_data(cfg)
    sample = _dataset(cka_sample(data.test, cfg.cka))
    feats = {}
    for bb in ("vit_micro", "resnetv2_tiny"):
        spec = RunSpec(bb, UP, 1.0, 0)
        feats[bb] = block_features(_model(cfg, spec, store, weights=store.model_path(run_id(cfg, spec))),
                                   sample)["features"]
    got = scales[scales["pretrained"] == UP].set_index(["layer_a", "layer_b"])["cka"]
    for la, xa in feats["vit_micro"].items():
        for lb, xb in feats["resnetv2_tiny"].items():
            assert got[(la, lb)] == pytest.approx(linear_cka(xa, xb), abs=1e-4)


def test_cka_scales_off_keeps_no_gram_matrices_and_on_again_fills_in_only_the_missing(grown, tmp_path):
    """``cka.scales: false``: a fine-tuned run's CKA keeps no Gram matrices (write_cka), and a store that has them
    keeps them (nothing is recomputed or removed); turned on again, only the run without them gets its CKA
    recomputed from its stored weights, and its Gram matrices equal the ones computed the first time."""
    import shutil

    from scaling.study.protocols import GRAMS_FILE, write_cka

    cfg, store, *_ = grown
    x, y = torch.randn(8, 3), torch.randn(8, 5)
    off = dataclasses.replace(cfg.cka, scales=False, batch_size=4)
    scratch = RunStore(tmp_path / "scratch")
    write_cka(scratch, "r", {"features": {"a": x}}, {"features": {"a": y}}, off, "key")
    assert (scratch.run_dir("r") / "cka.parquet").is_file() and not (scratch.run_dir("r") / GRAMS_FILE).exists()

    copy = RunStore(shutil.copytree(store.root, tmp_path / "store"))
    over = [f"output_dir={copy.root}", OOD, "cka.max_examples=48"]
    run_study(load_config(None, overrides(copy.root, *over, "cka.scales=false")), report=False)
    tuned = sorted(set(count(copy.root, "cka")))
    assert count(copy.root, "cka") == count(store.root, "cka")  # nothing recomputed
    assert all((copy.run_dir(r) / GRAMS_FILE).is_file() for r in tuned)  # nothing removed
    before = load_file(copy.run_dir(tuned[0]) / GRAMS_FILE)
    (copy.run_dir(tuned[0]) / GRAMS_FILE).unlink()
    run_study(load_config(None, overrides(copy.root, *over)), report=False)
    again = count(copy.root, "cka")
    assert {r: again[r] - count(store.root, "cka")[r] for r in tuned} == {r: int(r == tuned[0]) for r in tuned}
    after = load_file(copy.run_dir(tuned[0]) / GRAMS_FILE)
    assert after.keys() == before.keys()
    for k in before:
        torch.testing.assert_close(after[k], before[k], atol=1e-4, rtol=1e-4)


def test_a_damaged_cka_file_is_named_by_the_report(grown, tmp_path, capsys):
    """The report treats a damaged CKA file as it treats a damaged predictions file: exit 2, one line naming it
    (nothing is written; deleted, the file is computed again by the next launch)."""
    import shutil

    from scaling.io import UnreadableFile
    from scaling.study.__main__ import main as study_cli
    from scaling.study.aggregate import load_study
    from scaling.study.analysis_tables import cka_blocks
    from scaling.study.protocols import CKA_FILE, GRAMS_FILE

    copy = RunStore(shutil.copytree(grown[1].root, tmp_path / "store"))
    tuned = sorted(r for r in copy.run_ids() if (copy.run_dir(r) / GRAMS_FILE).is_file())
    grams = copy.run_dir(tuned[0]) / GRAMS_FILE
    grams.write_bytes(grams.read_bytes()[:200])
    capsys.readouterr()
    assert study_cli(["report", str(copy.root), "-o", str(tmp_path / "report.html"), "--n-boot", "10"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {grams} is not a readable Gram-matrix file (SafetensorError: ")
    assert not (tmp_path / "report.html").exists()

    runs = load_study(copy.root).runs
    table = copy.run_dir(tuned[1]) / CKA_FILE
    table.write_bytes(b"garbage" * 20)
    with pytest.raises(UnreadableFile, match=rf"^{re.escape(str(table))}: cannot be read \(ArrowInvalid: "):
        cka_blocks(copy.root, runs)
    pd.DataFrame({"x": [1.0]}).to_parquet(table)
    with pytest.raises(StoreError, match=rf"^{re.escape(str(table))}: not a CKA table \(no column \['cka', "):
        cka_blocks(copy.root, runs)


def test_the_probe_gap_over_seeds_combines_their_spread_with_each_pair_s_patient_interval(monkeypatch, tmp_path):
    """Two seeds: gap = mean of the per-seed paired differences; its interval V = S²/k + mean se_j² with se_j from
    each seed's paired bootstrap interval, t with Welch–Satterthwaite df (Satterthwaite 1946), by hand."""
    from scipy import stats

    from scaling.study import analysis_tables

    pairs = {("ft0", "lp0"): (0.10, 0.04, 0.16), ("ft1", "lp1"): (0.14, 0.09, 0.19)}  # (gap, lo, hi) per seed
    monkeypatch.setattr(analysis_tables.RunStore, "read_predictions", lambda self, rid, eval_set: rid)
    monkeypatch.setattr(analysis_tables, "paired_macro_gap", lambda a, b, n_boot, alpha: pairs[a, b])
    rows = [{"eval_set": "test", "label": "macro", "attribute": "all", "group": "all", "metric": "auroc",
             "reinit": "none", "pretrained": "bit-m", "backbone": "bit_r50x1", "n_params": 23.5e6, "fraction": 1.0,
             "shots": 0, "protocol": protocol, "seed": seed, "run_id": f"{tag}{seed}", "value": value,
             "lo": value - 0.05, "hi": value + 0.05}
            for protocol, tag, values in (("finetune", "ft", (0.80, 0.84)), ("linear_probe", "lp", (0.70, 0.70)))
            for seed, value in enumerate(values)]
    row = analysis_tables.probe_gap(pd.DataFrame(rows), tmp_path).iloc[0]
    z = stats.norm.ppf(0.975)
    gaps = np.array([0.10, 0.14])
    seed_term = gaps.var(ddof=1) / 2
    patient_term = np.mean([((0.16 - 0.04) / (2 * z)) ** 2, ((0.19 - 0.09) / (2 * z)) ** 2])
    v = seed_term + patient_term
    df = v ** 2 * (2 - 1) / seed_term ** 2
    half = stats.t.ppf(0.975, df) * np.sqrt(v)
    assert row["gap"] == pytest.approx(0.12) and row["gap_ci"] == "seeds+patients"
    assert (row["gap_lo"], row["gap_hi"]) == (pytest.approx(0.12 - half), pytest.approx(0.12 + half))
    # the probe's two seeds agree exactly: its interval is the patient term alone (a normal interval, df = ∞)
    assert (row["probe_lo"], row["probe_hi"]) == (pytest.approx(0.65), pytest.approx(0.75))


def test_reinit_after_and_first_keep_different_units_and_are_drawn_as_two_lines():
    """``after:4`` and ``first:2`` of a 6-unit backbone both keep 4 units pretrained, the lowest and the highest:
    the table says which, and the figure draws each direction as its own line through the fully pretrained cell."""
    from scaling.study import plots
    from scaling.study.analysis_tables import reinit_table

    aurocs = {"none": 0.80, "after:2": 0.70, "after:4": 0.78, "first:2": 0.79, "first:4": 0.75}
    summary = pd.DataFrame([{"eval_set": "test", "label": "macro", "attribute": "all", "group": "all",
                             "metric": "auroc", "protocol": "finetune", "pretrained": "bit-m", "backbone": "bit_r50x1",
                             "n_params": 23.5e6, "fraction": 1.0, "shots": 0, "reinit": r, "mean": v, "lo": v - 0.02,
                             "hi": v + 0.02, "n_seeds": 1} for r, v in aurocs.items()])
    table = reinit_table(summary, pd.DataFrame([{"backbone": "bit_r50x1", "n_units": 6}])).set_index("reinit")
    assert table["kept"].to_dict() == {"none": "all", "after:2": "first", "after:4": "first", "first:2": "last",
                                       "first:4": "last"}
    assert table["units_kept"].to_dict() == {"none": 6, "after:2": 2, "after:4": 4, "first:2": 4, "first:4": 2}
    assert table.loc["first:4", "auroc_lost"] == pytest.approx(0.05)
    fig = plots.reinit_curves(table.reset_index())
    lines = {line.get_linestyle(): [tuple(map(float, p)) for p in zip(*line.get_data())]
             for line in fig.axes[0].get_lines() if line.get_linestyle() in ("-", "--")}  # not the error-bar caps
    assert lines["-"] == [(2.0, 0.70), (4.0, 0.78), (6.0, 0.80)]
    assert lines["--"] == [(2.0, 0.75), (4.0, 0.79), (6.0, 0.80)]


def test_the_probe_feature_cache_is_shared_by_seeds_unless_the_backbone_is_the_seed_s(tmp_path):
    """A loaded backbone's pooled features are the same for every seed (only the head, which they precede, is
    seeded), so every seed's probe cells read one cache; a scratch backbone is its seed's random init."""
    store = RunStore(tmp_path / "store")
    cfg = load_config(None, overrides(store.root, "grid.seeds=[0,1]", "grid.pretrained=['upstream:up',scratch]"))
    probe = {"protocol": "linear_probe"}
    for source in (UP, "/weights/bit_m.npz"):
        caches = {feature_cache(cfg, store, RunSpec("resnetv2_tiny", source, f, s, shots=k, **probe))
                  for f, s, k in ((1.0, 0, 0), (1.0, 1, 0), (0.2, 1, 0), (1.0, 1, 5))}
        assert caches == {store.root / "features" / run_id(cfg, RunSpec("resnetv2_tiny", source, 1.0, 0, **probe))}
    scratch = [feature_cache(cfg, store, RunSpec("resnetv2_tiny", "scratch", 0.2, s, **probe)) for s in (0, 1)]
    assert scratch == [store.root / "features" / run_id(cfg, RunSpec("resnetv2_tiny", "scratch", 1.0, s, **probe))
                       for s in (0, 1)]


def test_a_reinit_beyond_the_backbone_s_units_is_refused_before_anything_runs(tmp_path):
    """``after:9`` of resnetv2_tiny (6 units) is a ConfigError naming the value and the units, by the dry run and
    the launch alike, instead of a failed run after the grid's other cells trained."""
    from scaling.config import ConfigError
    from scaling.study.runner import plan

    store = tmp_path / "store"
    cfg = load_config(None, overrides(store, "grid.backbones=[resnetv2_tiny,vit_micro]", "grid.protocols=[finetune]",
                                      "grid.also=[]", "grid.reinit=[none,'after:5','after:9','first:7']"))
    message = r"^grid\.reinit \['after:9', 'first:7'\]: backbone resnetv2_tiny has 6 units \(stem, stages\.0\.blocks\.0"
    with pytest.raises(ConfigError, match=message + r" \.\. neck\), so k must be at most 6$"):
        run_study(cfg, report=False)
    assert not (store / "runs").exists()
    with pytest.raises(ConfigError, match=message):
        plan(cfg)


def test_cka_minibatches_of_a_set_sorted_by_label_are_random_draws_of_it():
    """Minibatch CKA estimates the whole sample's CKA only from random minibatches: a test set sorted by label must
    not become one minibatch per class. Reference: full-batch linear CKA of the whole sample."""
    from scaling.analysis.cka import cka_from_grams, gram_batches
    from scaling.config import CKAConfig

    rng = np.random.default_rng(0)
    n, d = 512, 64
    label = np.repeat([0, 1], n // 2)  # the table lists every negative, then every positive
    centres = rng.normal(size=(2, d)) * 3
    x = centres[label] + rng.normal(size=(n, d))  # two representations sharing the class structure only
    y = (centres @ rng.normal(size=(d, d)) / np.sqrt(d))[label] + rng.normal(size=(n, d))
    table = pd.DataFrame({"sample_id": [f"s{i}" for i in range(n)], "label:Edema": label.astype(float)})
    cka = CKAConfig(max_examples=n, batch_size=256)
    rows = cka_sample(table, cka)["sample_id"].str[1:].astype(int).to_numpy()
    assert sorted(rows) == list(range(n))  # the same images, in another order
    got = cka_from_grams(gram_batches({"x": torch.from_numpy(x[rows])}, batch_size=cka.batch_size), ["x"],
                         gram_batches({"y": torch.from_numpy(y[rows])}, batch_size=cka.batch_size), ["y"])
    assert linear_cka(x, y) > 0.99 and got["cka"].iloc[0] == pytest.approx(linear_cka(x, y), abs=0.01)
