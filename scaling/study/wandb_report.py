"""The study's Weights & Biases view: a W&B Report with a panel per study view, and a study-level W&B run.

The per-cell W&B runs (``scaling.tracking.Tracker``) carry the study axes in ``config`` and the headline numbers in
``summary`` (``test/auroc``, ``ood_site_b/auroc_drop``, ``test/sex/worst_group_auroc``, ...). The Report built here
plots those summaries against the axes — one run set per pretraining source, so each source is its own colour —
mirroring the HTML report's views. Building the Report object needs ``wandb-workspaces`` (``pip install
'scaling[wandb-report]'``) but no network; saving it needs an online W&B login and happens only in online mode.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from scaling.config import ConfigError, TrackingConfig

log = logging.getLogger(__name__)

UNPUBLISHED = ("completion", "problems")
"""Report tables not sent to W&B: the grid's run ids and failure messages are bookkeeping of this machine."""


def _wr():
    try:
        import wandb_workspaces.reports.v2 as wr
    except ImportError as e:
        raise ImportError("building a W&B Report needs wandb-workspaces: pip install 'scaling[wandb-report]'") from e
    return wr


def check_available(tracking_cfg: TrackingConfig) -> None:
    """Refuse, before any training, an online study that cannot log or will fail at its end.

    Only ``tracking.wandb: online`` (after ``WANDB_MODE``) is checked. It needs W&B credentials on this machine
    (``WANDB_API_KEY`` or a ``wandb login``; read, not verified, so no network is touched) — without them every cell
    fails when its tracker starts, one FAILED.json each — and wandb-workspaces for the W&B Report built when the
    grid is done — without it the study trains every cell and then stops with an ImportError. Raises
    :class:`ConfigError` naming the field and the fix.
    """
    from scaling.tracking import wandb_mode

    if wandb_mode(tracking_cfg) != "online":
        return
    try:
        _wr()
    except ImportError as e:
        raise ConfigError(
            "tracking.wandb=online creates a W&B Report when the study is done, which needs wandb-workspaces: "
            "pip install 'scaling[wandb-report]' (or set tracking.wandb=offline and create the Report later with "
            "`python -m scaling.study wandb-report <store>`)") from e
    import wandb

    if not wandb.login(verify=False, prompt=False):
        raise ConfigError(
            "tracking.wandb=online needs W&B credentials on this machine and none were found: run `wandb login` or "
            "export WANDB_API_KEY (or set tracking.wandb=offline and `wandb sync` the runs later)")


def _quote(s: str) -> str:
    return "'" + str(s).replace("\\", "\\\\").replace("'", "\\'") + "'"


def report_panels(ood_sets=(), attributes=None) -> list[tuple[str, str, str, bool]]:
    """The Report's scatter panels as (title, x, y, log_x); x/y are ``config:<key>`` or ``summary:<key>``.

    ``attributes`` maps each evaluation set to its subgroup attributes (``{"test": ["sex"], "ddi": ["skin_group"]}``):
    a set's fairness panels exist only for the attributes it has.
    """
    size = "config:n_params"
    panels = [("AUROC vs model size (test)", size, "summary:test/auroc", True),
              ("AUROC vs labelled fraction (test)", "config:fraction", "summary:test/auroc", True),
              ("AUROC vs pretraining images (test)", "config:pretrain_images", "summary:test/auroc", True)]
    for o in ood_sets:
        # Both axes on the labels the OOD set shares with test (auroc_id / auroc_ood), as in the HTML report.
        panels += [(f"In-distribution vs OOD AUROC ({o})", f"summary:{o}/auroc_id", f"summary:{o}/auroc_ood", False),
                   (f"OOD drop vs model size ({o})", size, f"summary:{o}/auroc_drop", True)]
    for e, attrs in (attributes or {}).items():
        for a in attrs:
            panels += [(f"Worst-group AUROC vs model size ({e}, {a})", size, f"summary:{e}/{a}/worst_group_auroc",
                        True),
                       (f"AUROC gap vs model size ({e}, {a})", size, f"summary:{e}/{a}/auroc_gap", True)]
    for e in ("test", *ood_sets):
        panels += [(f"ECE vs model size ({e})", size, f"summary:{e}/ece", True),
                   (f"ECE after temperature scaling vs model size ({e})", size, f"summary:{e}/ece_temp", True)]
    panels.append(("Selective prediction: AURC vs model size (test)", size, "summary:test/aurc", True))
    return panels


PLAIN_FILTER = "Config('protocol') == 'finetune' and Config('reinit') == 'none' and Config('shots') == 0"
"""The plain fine-tuning cells of a study with analysis cells (their W&B config carries these axes)."""

ANALYSIS_PANELS = {
    "probe": [("Fine-tuned vs linear probe: AUROC vs model size (test)", "config:n_params", "summary:test/auroc",
               True),
              ("Fine-tuned vs linear probe: AUROC vs labelled fraction (test)", "config:fraction",
               "summary:test/auroc", True)],
    "shots": [("Few-shot: AUROC vs k (test)", "config:shots", "summary:test/auroc", True)],
}
"""The analysis block's scatter panels, per run-set family (see :func:`build_wandb_report`)."""


def build_wandb_report(study: str, *, project: str, entity: str = "", sources=(), ood_sets=(), attributes=None,
                       description: str = "", analysis: bool = False, config_hash: str | None = None,
                       shuffles=()):
    """The W&B Report object of a study (``wandb_workspaces.reports.v2.Report``), built without network access.

    One run set per pretraining source (runs of W&B group ``study``, job type ``source`` and, given ``config_hash``,
    that study config: the cells' W&B config carries it, so the runs of an earlier config of the same study name in
    the same W&B project, e.g. another learning rate, are not drawn beside them), scatter panels from
    :func:`report_panels`, a parallel-coordinates panel over the axes and the training-loss curves. With
    ``analysis`` (the study has probe, k-shot or re-initialised cells) those run sets hold the plain fine-tuning
    cells only, and a second block compares them with the linear-probe cells of each source and draws the k-shot
    cells against k (docs/analysis.md); the numbers of every analysis table are in the study-level run.
    ``shuffles`` are the block sizes of the study's block-shuffled cells: the plain run sets leave them out by
    value (``Config('shuffle') != '8'``), which keeps the runs logged before the axis existed, whose W&B config has
    no ``shuffle``.
    """
    wr = _wr()
    plain = PLAIN_FILTER + "".join(f" and Config('shuffle') != {_quote(str(b))}" for b in shuffles)

    def axis(spec: str):
        kind, key = spec.split(":", 1)
        return wr.Config(key) if kind == "config" else wr.SummaryMetric(key)

    of_config = f" and Config('config_hash') == {_quote(config_hash)}" if config_hash else ""

    def runset(name: str, src: str, extra: str = ""):
        where = f"Group = {_quote(study)} and JobType = {_quote(src)}{of_config}" + (f" and {extra}" if extra else "")
        return wr.Runset(entity=entity, project=project, name=name, filters=where)

    runsets = [runset(str(src), src, plain if analysis else "") for src in sources]
    if not runsets:
        runsets = [wr.Runset(entity=entity, project=project, name=study,
                             filters=f"Group = {_quote(study)}{of_config}")]
    panels: list[Any] = [wr.ScatterPlot(title=t, x=axis(x), y=axis(y), log_x=lx) for t, x, y, lx in
                         report_panels(ood_sets, attributes)]
    panels.append(wr.ParallelCoordinatesPlot(title="Study axes → test AUROC", columns=[
        wr.ParallelCoordinatesPlotColumn(metric=wr.Config(k)) for k in ("n_params", "pretrain_images", "fraction")
    ] + [wr.ParallelCoordinatesPlotColumn(metric=wr.SummaryMetric("test/auroc"))]))
    panels.append(wr.LinePlot(title="Training loss", y=["train/loss"]))
    blocks = [
        wr.H1(f"Scaling study: {study}"),
        wr.P(description or "Each point is one grid cell (backbone × pretraining source × data fraction × seed); "
             "colours are pretraining sources. The local HTML report (python -m scaling.study report <store>) "
             "has the same views with seed intervals, fitted scaling laws and pairwise model comparisons."),
        wr.PanelGrid(runsets=runsets, panels=panels),
    ]
    if analysis:
        probe = "Config('protocol') == 'linear_probe' and Config('shots') == 0"
        shots = "Config('shots') >= 1 and Config('reinit') == 'none'"
        families = {"probe": [runset(f"{src}: fine-tuned", src, plain) for src in sources]
                    + [runset(f"{src}: linear probe", src, probe) for src in sources],
                    "shots": [runset(f"{src}: k-shot, {p}", src, f"{shots} and Config('protocol') == {_quote(p)}")
                              for src in sources for p in ("finetune", "linear_probe")]}
        blocks += [wr.H2("What the pretrained features contribute"),
                   wr.P("Fine-tuned vs linear-probe cells of each source, and the k-shot cells against k. The HTML "
                        "report and the study-level run (report/probe_gap, report/fewshot, report/reinit, "
                        "report/cka_blocks, report/cka_scales) hold every table with its intervals.")]
        blocks += [wr.PanelGrid(runsets=sets, panels=[wr.ScatterPlot(title=t, x=axis(x), y=axis(y), log_x=lx)
                                                      for t, x, y, lx in ANALYSIS_PANELS[name]])
                   for name, sets in families.items()]
    return wr.Report(project=project, entity=entity, title=f"Scaling study: {study}", blocks=blocks)


def study_report_args(store_root: str | Path, *, config_hash: str | None = None, allow_mixed: bool = False) -> dict:
    """Study name, pretraining sources, OOD sets, per test/OOD set the subgroup attributes, whether the study
    has analysis cells (probe, k-shot, re-initialised, block-shuffled), the block sizes of the shuffled ones and the
    study config the Report selects (``config_hash``),
    found in a run store (the runs of ``config_hash`` only, or of every config with ``allow_mixed``:
    :func:`scaling.study.aggregate.load_study`). Without a choice, the config hash is that of the store's runs (a
    store of one config); with ``allow_mixed`` it is None and the Report draws every config of the study name, as
    the HTML report then aggregates them."""
    from scaling.study.aggregate import PLAIN, load_study
    from scaling.study.tables import ood_sets

    study = load_study(store_root, config_hash=config_hash, allow_mixed=allow_mixed)
    df, runs = study.results, study.runs
    names = sorted(runs["study"].dropna().unique())
    hashes = sorted(runs["config_hash"].dropna().unique())
    return {
        "study": names[0] if names else Path(store_root).name,
        "sources": sorted(runs["pretrained"].dropna().unique()),
        "ood_sets": ood_sets(df) if len(df) else [],
        "attributes": {e: sorted(a for a in df.loc[df["eval_set"] == e, "attribute"].unique() if a != "all")
                       for e in ["test", *ood_sets(df)] if (df["eval_set"] == e).any()} if len(df) else {},
        "analysis": bool(len(runs)) and any(k in runs and (runs[k].fillna(v) != v).any() for k, v in PLAIN.items()),
        "config_hash": config_hash or (hashes[0] if len(hashes) == 1 and not allow_mixed else None),
        "shuffles": sorted({str(b) for b in (runs["shuffle"].dropna() if "shuffle" in runs else ())} - {"none"},
                           key=int),
    }


def publish_study(store_root: str | Path, tracking_cfg: TrackingConfig, report,
                  config_hash: str | None = None) -> str | None:
    """Mirror the study to W&B: a study-level run (job type ``report``) with the report's figures and tables, and,
    when online, the W&B Report. Returns the Report URL (None when not online; nothing at all when tracking is off).

    ``report`` is the :class:`scaling.study.report.StudyReport` the HTML report was rendered from. The study run's id
    is kept in ``<store>/wandb-study/`` so publishing again continues the same W&B run. ``config_hash``: the study
    config the report covers (a store may also hold runs of earlier configs).
    """
    from scaling.tracking import Tracker, wandb_mode

    mode = wandb_mode(tracking_cfg)
    if mode == "off":
        return None
    store_root = Path(store_root)
    args = study_report_args(store_root, config_hash=config_hash)
    run_dir = store_root / "wandb-study"
    tracker = Tracker.create(tracking_cfg, args["study"], f"{args['study']}-report",
                             {"study": args["study"], "config_hash": args["config_hash"]},
                             run_dir, job_type="report")
    try:
        figures = run_dir / "figures"
        figures.mkdir(parents=True, exist_ok=True)
        paths = {}
        for name, png in report.figures.items():
            path = figures / f"{name.replace(':', '-')}.png"
            path.write_bytes(png)
            paths[f"report/{name.replace(':', '/')}"] = path
        tracker.log_images(paths)
        for name, table in report.tables.items():
            if name not in UNPUBLISHED and table is not None and len(table):
                tracker.log_metrics_table(table, key=f"report/{name.replace(':', '/')}", summary=False)
    finally:
        tracker.finish()
    if mode != "online":
        log.info("W&B Report not created (tracking mode %s): it needs online W&B; sync the runs with `wandb sync`, "
                 "then run `python -m scaling.study wandb-report <store>` online", mode)
        return None
    return save_wandb_report(store_root, tracking_cfg, config_hash=config_hash)


def save_wandb_report(store_root: str | Path, tracking_cfg: TrackingConfig, *, config_hash: str | None = None,
                      allow_mixed: bool = False) -> str:
    """Build the study's W&B Report and save it to the server (needs an online W&B login); return its URL."""
    report = build_wandb_report(project=tracking_cfg.project, entity=tracking_cfg.entity or _default_entity(),
                                **study_report_args(store_root, config_hash=config_hash, allow_mixed=allow_mixed))
    report.save()
    log.info("W&B Report: %s", report.url)
    return report.url


def _default_entity() -> str:
    import wandb

    return wandb.Api().default_entity or ""
