"""Generated data in real on-disk formats: a CheXpert-small look-alike with learnable findings, and FractalDB-style
formula-driven images for upstream pretraining. Both are seeded, deterministic and vectorised (seconds, not minutes).

**Synthetic CheXpert** (:func:`write_synthetic_chexpert`) writes exactly the CheXpert-v1.0-small layout::

    <root>/CHEXPERT DEMO.xlsx                          PATIENT, GENDER, AGE_AT_CXR, PRIMARY_RACE, ETHNICITY
    <root>/CheXpert-v1.0-small/train.csv, valid.csv    the real 19 columns and encodings
    <root>/CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg (+ view2_lateral.jpg for some studies)
    <root>/CheXpert-v1.0-small/valid/patientNNNNN/study1/view1_frontal.jpg

so :mod:`scaling.data.datasets.chexpert` reads it through the code path real data takes. Images are 8-bit grayscale JPEGs
(``image_size`` wide, 9/8 of that high, like the portrait CheXpert-small files) showing a stylised chest: body,
two dark lung fields with rib texture, mediastinum, heart. Each of the 13 findings has its own image signal at a
label-dependent place, scaled by a per-study severity:

========================== ==============================================================================
Cardiomegaly               heart wider (cardiothoracic ratio up)
Enlarged Cardiomediastinum upper mediastinum wider
Pleural Effusion           bright fluid filling a lung base, meniscus at the lateral wall
Edema                      bilateral perihilar haze ("bat wing")
Consolidation              one dense blob inside a lung
Pneumonia                  several smaller patchy blobs in a lower zone
Atelectasis                a horizontal plate-like band in a lower zone
Pneumothorax               dark, texture-free apex with a thin pleural line
Lung Lesion                a small round nodule
Pleural Other              a bright strip along a lateral lung wall
Fracture                   a short bright oblique line across a peripheral rib
Support Devices            a vertical tube line and, sometimes, a pacemaker box
Lung Opacity               positive when any parenchymal finding is (as in CheXpert's label hierarchy)
========================== ==============================================================================

Prevalence depends on the patient: age raises cardiomegaly, effusion, edema and atelectasis; men have more
pneumothorax; a shared "cardiac" factor couples cardiomegaly, edema and effusion. Women get breast soft-tissue
shadows over the lung bases, which lower the conspicuity of basal findings (effusion, atelectasis): a built-in
subgroup gap for the fairness analysis. AP films (more likely when sick or with devices) magnify the heart.

Reported labels follow CheXpert's encodings: a true finding is reported ``1.0`` (82 %), ``-1.0`` (13 %, with a
fainter signal) or blank (5 %); an absent one blank (65 %), ``0.0`` (30 %) or ``-1.0`` (5 %). ``No Finding`` is
``1.0`` only when no pathology is present or uncertain, else blank. ``valid.csv`` holds consensus labels, 0/1 only.
About 0.5 % of patients have ``Unknown`` sex and 0.5 % age 0, the release's traps.

``site="b"`` renders the same anatomy through another acquisition: a different intensity curve (gamma), lower
contrast, more noise and more blur. It is the out-of-distribution test set; its patients are numbered from 80001.

**Fractal pretraining data** (:func:`write_fractal_imagefolder`): each class is one iterated function system
(2-4 random contractive affine maps, rejected until the attractor fills a reasonable share of the frame), as in
FractalDB (Kataoka et al. 2020). Every image renders its class's system with jittered coefficients, a random
rotation/scale/shift/flip and random colours, by the chaos game, vectorised over images and points.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from scipy.ndimage import gaussian_filter

from scaling.data.datasets.chexpert import COLUMNS
from scaling.data.labels import CHEXPERT_LABELS
from scaling.data.table import DataError

log = logging.getLogger(__name__)

RELEASE = "CheXpert-v1.0-small"
PATHOLOGIES = tuple(n for n in CHEXPERT_LABELS if n not in ("No Finding", "Lung Opacity"))
PARENCHYMAL = ("Edema", "Consolidation", "Pneumonia", "Atelectasis", "Lung Lesion")
"""Findings that make ``Lung Opacity`` positive (CheXpert's label hierarchy)."""

# Base prevalence (probability at age 60, female, cardiac factor 0), then logit slopes per 15 years of age, for
# male sex, and for the shared cardiac factor.
_PREVALENCE = {
    "Enlarged Cardiomediastinum": (0.08, 0.3, 0.0, 0.6),
    "Cardiomegaly": (0.16, 0.8, 0.1, 1.2),
    "Lung Lesion": (0.07, 0.4, 0.2, 0.0),
    "Edema": (0.18, 0.5, 0.0, 1.2),
    "Consolidation": (0.12, 0.2, 0.2, 0.0),
    "Pneumonia": (0.07, 0.2, 0.1, 0.0),
    "Atelectasis": (0.20, 0.4, 0.0, 0.3),
    "Pneumothorax": (0.08, -0.4, 0.7, 0.0),
    "Pleural Effusion": (0.28, 0.6, 0.0, 1.0),
    "Pleural Other": (0.04, 0.2, 0.0, 0.0),
    "Fracture": (0.05, 0.3, 0.3, 0.0),
    "Support Devices": (0.33, 0.4, 0.2, 0.5),
}
_RACES = (("White", 0.45), ("White, non-Hispanic", 0.12), ("Black or African American", 0.12), ("Asian", 0.10),
          ("Asian, non-Hispanic", 0.05), ("Other", 0.08), ("Unknown", 0.05), ("Patient Refused", 0.03))
_ETHNICITIES = (("Non-Hispanic/Non-Latino", 0.75), ("Hispanic/Latino", 0.12), ("Not Hispanic", 0.05), ("Unknown", 0.08))

# Acquisition per site: gamma of the intensity curve, contrast around the lung-field grey level, noise sigma, blur
# sigma (px at 64 px width). The pivot keeps lung fields at about the same mean grey in both sites: a global
# brightness jump would mimic diffuse haze (edema) on every film instead of degrading the signal.
_PIVOT = 0.3
SITES = {
    "a": {"gamma": 1.0, "contrast": 1.0, "noise": 0.035, "blur": 0.4},
    "b": {"gamma": 0.6, "contrast": 0.6, "noise": 0.11, "blur": 2.0},
}
_FIRST_PATIENT = {"a": 1, "b": 80001}


# ----------------------------------------------------------------------------------------------------------------
# Patients, studies and labels
# ----------------------------------------------------------------------------------------------------------------


def _sigmoid(x):
    return 0.5 + 0.5 * np.tanh(0.5 * x)  # = 1 / (1 + exp(-x)), without overflow warnings for large |x|


def _logit(p):
    return np.log(p / (1.0 - p))


def _choose(rng, options, n):
    names, probs = zip(*options)
    return np.asarray(names, dtype=object)[rng.choice(len(names), size=n, p=np.asarray(probs) / sum(probs))]


def _patients(rng, n: int, first: int) -> pd.DataFrame:
    sex = np.where(rng.random(n) < 0.45, "Female", "Male").astype(object)
    sex[rng.random(n) < 0.005] = "Unknown"
    age = np.clip(np.rint(rng.normal(61, 17, n)), 18, 90).astype(int)
    age[rng.random(n) < 0.005] = 0
    return pd.DataFrame(
        {
            "patient": [f"patient{first + i:05d}" for i in range(n)],
            "sex": sex,
            "age": age,
            "race": _choose(rng, _RACES, n),
            "ethnicity": _choose(rng, _ETHNICITIES, n),
            "n_studies": 1 + (rng.random(n) < 0.25),
        }
    )


def _true_findings(rng, patients: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """One row per study with each pathology's true state (0/1)."""
    studies = patients.loc[patients.index.repeat(patients["n_studies"])].reset_index(drop=True)
    studies["study"] = studies.groupby("patient").cumcount() + 1
    n = len(studies)
    z_age = np.where(studies["age"] > 0, (studies["age"] - 60) / 15.0, 0.0)
    male = (studies["sex"] == "Male").to_numpy(dtype=float)
    cardiac = rng.normal(0, 1, n)
    truth = {}
    for name, (p, a_age, a_male, a_card) in _PREVALENCE.items():
        logit = _logit(p) + a_age * z_age + a_male * male + a_card * cardiac
        truth[name] = (rng.random(n) < _sigmoid(logit)).astype(int)
    truth["Lung Opacity"] = np.max([truth[k] for k in PARENCHYMAL], axis=0) | (rng.random(n) < 0.04)
    return studies, truth


def _report(rng, truth: dict[str, np.ndarray], consensus: bool) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """CheXpert cell text per label and the image-signal severity per finding (0 when absent)."""
    cells, severity = {}, {}
    n = len(next(iter(truth.values())))
    for name, t in truth.items():
        u = rng.random(n)
        if consensus:
            text = np.where(t == 1, "1.0", "0.0")
            sev = np.where(t == 1, rng.uniform(0.35, 1.0, n), 0.0)
        else:
            text = np.where(t == 1, np.where(u < 0.82, "1.0", np.where(u < 0.95, "-1.0", "")),
                            np.where(u < 0.65, "", np.where(u < 0.95, "0.0", "-1.0")))
            # Uncertain mentions of a true finding look fainter on the film, as in real reports.
            sev = np.where(t == 1, np.where(text == "-1.0", rng.uniform(0.2, 0.5, n), rng.uniform(0.45, 1.0, n)), 0.0)
        cells[name], severity[name] = text.astype(object), sev
    pathologies = [k for k in truth if k != "Support Devices"]
    clean = np.all([truth[k] == 0 for k in pathologies], axis=0) & np.all(
        [cells[k] != "-1.0" for k in pathologies], axis=0
    )
    cells["No Finding"] = np.where(clean, "1.0", "0.0" if consensus else "").astype(object)
    return cells, severity


# ----------------------------------------------------------------------------------------------------------------
# Rendering (vectorised over a batch of images: every parameter is an (N, 1, 1) array)
# ----------------------------------------------------------------------------------------------------------------


def _col(v) -> np.ndarray:
    return np.asarray(v, dtype=np.float32)[:, None, None]


def _ellipse(X, Y, cx, cy, rx, ry, edge=0.06):
    r = np.sqrt(((X - cx) / rx) ** 2 + ((Y - cy) / ry) ** 2)
    return _sigmoid((1.0 - r) / edge)


def _blob(X, Y, cx, cy, s, power=2):
    return np.exp(-((((X - cx) ** 2 + (Y - cy) ** 2) / (s * s)) ** (power / 2)))


def _render(rng, meta: pd.DataFrame, sev: dict[str, np.ndarray], width: int, height: int, site: str) -> np.ndarray:
    """Render a batch of chest films; returns uint8 (N, height, width)."""
    n = len(meta)
    acq = SITES[site]
    # float32 throughout: half the memory traffic of float64 in the ~50 whole-batch feature maps below.
    ys, xs = np.meshgrid(np.linspace(-1.0, 1.0, height, dtype=np.float32),
                         np.linspace(-1.0, 1.0, width, dtype=np.float32), indexing="ij")
    # Patient positioning: small shift and scale per image.
    scale = _col(rng.normal(1.0, 0.035, n))
    X = (xs[None] - _col(rng.normal(0, 0.03, n))) / scale
    Y = (ys[None] - _col(rng.normal(0, 0.03, n))) / scale
    lateral = _col(meta["view"].to_numpy() == "lateral")
    ap = _col(meta["ap"].to_numpy())
    female = _col(meta["sex"].to_numpy() == "Female")
    s = {k: _col(v) for k, v in sev.items()}

    def u(lo, hi):
        return _col(rng.uniform(lo, hi, n))

    side = np.where(rng.random((n, 1, 1)) < 0.5, -1.0, 1.0).astype(np.float32)  # which lung (image left/right)
    img = 0.06 + 0.42 * _ellipse(X, Y, 0.0, 0.12, 0.93, 1.08, 0.05)

    # Lungs: two fields (frontal) or one (lateral); ribs as a sinusoid with age-dependent bone contrast.
    lung_l = _ellipse(X, Y, -0.42, -0.06, 0.33, 0.62)
    lung_r = _ellipse(X, Y, 0.42, -0.06, 0.33, 0.62)
    lung_lat = _ellipse(X, Y, 0.05, -0.05, 0.55, 0.68)
    lungs = (1 - lateral) * np.maximum(lung_l, lung_r) + lateral * lung_lat
    one_lung = (1 - lateral) * np.where(side < 0, lung_l, lung_r) + lateral * lung_lat
    cx_side = (1 - lateral) * side * 0.42 + lateral * 0.05
    ribs = 0.5 + 0.5 * np.sin(Y * 17.0 + 2.0 * np.abs(X) + u(0, 6.28))
    bone = 0.05 - 0.015 * _col((meta["age"].to_numpy() - 60) / 30.0)
    img += lungs * (-0.27 + bone * ribs)

    # Mediastinum, spine and heart (frontal: heart to the image right; lateral: anterior = image left).
    img += (1 - lateral) * 0.18 * _sigmoid((0.11 - np.abs(X)) / 0.03)
    img += lateral * 0.18 * _sigmoid((0.08 - np.abs(X - 0.68)) / 0.03)
    heart_w = (1.0 + 0.10 * ap) * (u(0.93, 1.07) + 0.42 * s["Cardiomegaly"])
    hx = (1 - lateral) * 0.13 + lateral * -0.3
    img += 0.26 * _ellipse(X, Y, hx, 0.38, 0.29 * heart_w, 0.23 * (1.0 + 0.05 * ap))
    upper = _sigmoid((0.15 - Y) / 0.05) * _sigmoid((Y + 0.75) / 0.05)
    img += (1 - lateral) * 0.16 * upper * _sigmoid((0.10 + 0.14 * s["Enlarged Cardiomediastinum"] - np.abs(X)) / 0.03)

    # Findings.
    sev_eff = s["Pleural Effusion"]
    level = 0.58 - 0.42 * sev_eff + 0.25 * np.abs(X - cx_side)  # meniscus: higher at the lateral wall
    both = _col(rng.random(n) < 0.4)
    eff_region = both * lungs + (1 - both) * one_lung
    img += (sev_eff > 0) * 0.20 * eff_region * _sigmoid((Y - level) / 0.04)
    haze = _blob(X, Y, -0.22, 0.0, 0.32) + _blob(X, Y, 0.22, 0.0, 0.32)
    img += 0.16 * s["Edema"] * lungs * haze
    c_x, c_y = cx_side + u(-0.12, 0.12), u(-0.35, 0.3)
    img += 0.26 * np.sign(s["Consolidation"]) * (0.5 + 0.5 * s["Consolidation"]) * one_lung * _blob(X, Y, c_x, c_y, 0.15, 4)
    pn = sum(_blob(X, Y, -cx_side + u(-0.15, 0.15), u(0.1, 0.45), 0.07, 2) for _ in range(3))
    img += 0.24 * s["Pneumonia"] * lungs * pn
    band_y = u(0.15, 0.4)
    img += 0.22 * np.sign(s["Atelectasis"]) * (0.5 + 0.5 * s["Atelectasis"]) * one_lung * _sigmoid(
        (0.045 - np.abs(Y - band_y - 0.15 * (X - cx_side))) / 0.012)
    outer = _sigmoid((X - cx_side) * np.sign(cx_side) / 0.04)  # the lung's lateral half
    apex = one_lung * _sigmoid((-0.3 - Y) / 0.05) * outer
    img += -0.16 * np.sign(s["Pneumothorax"]) * (0.5 + 0.5 * s["Pneumothorax"]) * apex
    l_x, l_y = cx_side + u(-0.15, 0.15), u(-0.4, 0.35)
    img += 0.40 * np.sign(s["Lung Lesion"]) * (0.6 + 0.4 * s["Lung Lesion"]) * _blob(X, Y, l_x, l_y, 0.06, 4)
    wall = one_lung * _sigmoid((0.05 - np.abs(np.abs(X - cx_side) - 0.28)) / 0.02) * _sigmoid((Y + 0.2) / 0.1)
    img += 0.22 * s["Pleural Other"] * wall
    f_x, f_y = cx_side * 1.6, u(-0.4, 0.3)
    frac = _sigmoid((0.025 - np.abs((Y - f_y) - 0.9 * (X - f_x))) / 0.008) * _blob(X, Y, f_x, f_y, 0.12, 4)
    img += 0.35 * np.sign(s["Fracture"]) * frac
    dev = np.sign(s["Support Devices"])
    tube_x = u(-0.06, 0.06)
    img += 0.45 * dev * _sigmoid((0.018 - np.abs(X - tube_x)) / 0.006) * _sigmoid((0.25 - Y) / 0.03)
    pacer = dev * _col(rng.random(n) < 0.4)
    img += 0.5 * pacer * _sigmoid((0.08 - np.abs(X - 0.6)) / 0.01) * _sigmoid((0.06 - np.abs(Y + 0.6)) / 0.01)

    # Breast soft tissue over the lung bases in women: lowers the conspicuity of basal findings.
    img += (1 - lateral) * female * 0.13 * (_blob(X, Y, -0.45, 0.55, 0.3) + _blob(X, Y, 0.45, 0.55, 0.3))

    # Acquisition (site): blur, intensity curve, contrast, noise.
    sigma = acq["blur"] * width / 64.0 * (1.0 + 0.3 * ap[:, 0, 0])
    img = np.stack([gaussian_filter(im, float(sg)) for im, sg in zip(img, sigma)]) if acq["blur"] > 0 else img
    img = np.clip(img, 0.0, 1.0) ** acq["gamma"]
    img = _PIVOT + acq["contrast"] * (img - _PIVOT)
    img += rng.normal(0.0, acq["noise"], img.shape).astype(np.float32)
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------------
# CheXpert writer
# ----------------------------------------------------------------------------------------------------------------


def _split_rows(rng, patients: pd.DataFrame, split: str, lateral_fraction: float, consensus: bool):
    studies, truth = _true_findings(rng, patients)
    cells, sev = _report(rng, truth, consensus)
    n = len(studies)
    sick = np.sum([truth[k] for k in ("Support Devices", "Edema", "Pleural Effusion", "Pneumothorax")], axis=0)
    ap = rng.random(n) < np.clip(0.45 + 0.15 * sick, 0, 0.95)
    has_lateral = rng.random(n) < lateral_fraction
    rows = []
    for i in range(n):
        views = ["frontal", "lateral"] if has_lateral[i] else ["frontal"]
        for k, view in enumerate(views, start=1):
            rows.append((i, view, k))
    idx = np.array([r[0] for r in rows])
    meta = studies.iloc[idx].reset_index(drop=True)
    meta["view"] = [r[1] for r in rows]
    meta["ap"] = np.where(meta["view"] == "frontal", ap[idx], False)
    meta["rel"] = [
        f"{split}/{p}/study{st}/view{k}_{v}.jpg"
        for p, st, k, v in zip(meta["patient"], meta["study"], [r[2] for r in rows], meta["view"])
    ]
    csv = pd.DataFrame(
        {
            "Path": RELEASE + "/" + meta["rel"],
            "Sex": meta["sex"],
            "Age": meta["age"].astype(str),
            "Frontal/Lateral": np.where(meta["view"] == "frontal", "Frontal", "Lateral"),
            "AP/PA": np.where(meta["view"] == "frontal", np.where(meta["ap"], "AP", "PA"), ""),
        }
    )
    for name in CHEXPERT_LABELS:
        csv[name] = cells[name][idx]
    return csv[list(COLUMNS)], meta, {k: v[idx] for k, v in sev.items()}


def write_synthetic_chexpert(
    root: str | Path,
    n_patients: int = 600,
    seed: int = 0,
    site: str = "a",
    image_size: int = 64,
    n_valid_patients: int | None = None,
    lateral_fraction: float = 0.3,
    demographics: bool = True,
    jpeg_quality: int = 92,
) -> Path:
    """Write a synthetic CheXpert-v1.0-small under ``root`` (see the module docstring); return the release dir.

    Args:
        root: output directory; ``root/CheXpert-v1.0-small/`` and ``root/CHEXPERT DEMO.xlsx`` are written.
        n_patients: patients in train.csv (about 1.6 images each: 25 % have a second study, 30 % of studies a lateral).
        seed: everything (patients, labels, pixels) is a deterministic function of the arguments.
        site: ``a`` (reference acquisition) or ``b`` (shifted acquisition, the OOD set).
        image_size: image width in pixels (height is 9/8 of it).
        n_valid_patients: patients in valid.csv (one frontal each, consensus 0/1 labels); default ``max(20, n/10)``.
        lateral_fraction: share of studies that also have a lateral view (train split).
        demographics: also write ``CHEXPERT DEMO.xlsx`` with race and ethnicity.
        jpeg_quality: JPEG quality of the images.
    """
    if site not in SITES:
        raise DataError(f"synthetic site {site!r} is not defined; choose one of {sorted(SITES)}")
    if n_patients < 1 or image_size < 16:
        raise DataError(f"synthetic CheXpert needs n_patients >= 1 and image_size >= 16 (got {n_patients}, {image_size})")
    t0 = time.perf_counter()
    rng = np.random.default_rng([seed, ord(site)])
    root = Path(root)
    out = root / RELEASE
    width, height = image_size, image_size + image_size // 8
    n_valid = n_valid_patients if n_valid_patients is not None else max(20, n_patients // 10)
    first = _FIRST_PATIENT[site]
    train_patients = _patients(rng, n_patients, first)
    valid_patients = _patients(rng, n_valid, first + n_patients).assign(n_studies=1)
    all_patients = []
    n_images = 0
    for split, patients, consensus, lat in (
        ("train", train_patients, False, lateral_fraction),
        ("valid", valid_patients, True, 0.0),
    ):
        csv, meta, sev = _split_rows(rng, patients, split, lat, consensus)
        for d in {str(Path(r).parent) for r in meta["rel"]}:
            (out / d).mkdir(parents=True, exist_ok=True)
        for lo in range(0, len(meta), 256):  # batches bound memory at (256, H, W) float32 per feature
            chunk = slice(lo, lo + 256)
            pixels = _render(rng, meta.iloc[chunk], {k: v[chunk] for k, v in sev.items()}, width, height, site)
            for rel, im in zip(meta["rel"].iloc[chunk], pixels):
                Image.fromarray(im, mode="L").save(out / rel, quality=jpeg_quality)
        csv.to_csv(out / f"{split}.csv", index=False)
        all_patients.append(patients)
        n_images += len(csv)
    if demographics:
        p = pd.concat(all_patients, ignore_index=True)
        demo = pd.DataFrame(
            {
                "PATIENT": p["patient"],
                "GENDER": p["sex"],
                "AGE_AT_CXR": p["age"],
                "PRIMARY_RACE": p["race"],
                "ETHNICITY": p["ethnicity"],
            }
        )
        demo.to_excel(root / "CHEXPERT DEMO.xlsx", index=False)
    log.info("synthetic CheXpert site %s: %d images in %.1fs at %s", site, n_images, time.perf_counter() - t0, out)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Fractal (FractalDB-style) pretraining images
# ----------------------------------------------------------------------------------------------------------------


def _random_ifs(rng) -> tuple[np.ndarray, np.ndarray]:
    """A random contractive IFS: (maps (M, 6) = a, b, c, d, e, f; probabilities (M,) proportional to |det|)."""
    m = int(rng.integers(2, 5))
    maps = rng.uniform(-1.0, 1.0, (m, 6))
    for k in range(m):
        lin = maps[k, :4].reshape(2, 2)
        lin *= rng.uniform(0.35, 0.85) / max(np.linalg.norm(lin, 2), 1e-6)
        maps[k, :4] = lin.ravel()
    det = np.abs(maps[:, 0] * maps[:, 3] - maps[:, 1] * maps[:, 2])
    return maps, (det + 0.02) / (det + 0.02).sum()


def _chaos_game(rng, maps: np.ndarray, probs: np.ndarray, points: int, iters: int, keep: int):
    """Run the chaos game for a batch of IFS: maps (B, M, 6), probs (B, M).

    Returns x, y (B, points * keep) of the last ``keep`` iterations and the map id that produced each point.
    """
    b, m, _ = maps.shape
    coef = maps.reshape(b * m, 6).astype(np.float32).T  # six flat coefficient tables: one gather each per step
    offset = (np.arange(b) * m)[:, None]
    cum = np.cumsum(probs, axis=1).astype(np.float32)
    x = rng.uniform(-1, 1, (b, points)).astype(np.float32)
    y = rng.uniform(-1, 1, (b, points)).astype(np.float32)
    xs, ys, ks = [], [], []
    for it in range(iters):
        u = rng.random((b, points), dtype=np.float32)
        k = np.zeros((b, points), dtype=np.int64)
        for j in range(m - 1):  # inverse CDF over <= 4 maps: a few compares beat a reduction over a tiny axis
            k += u > cum[:, j : j + 1]
        a, bb, c, d, e, f = (np.take(t, k + offset) for t in coef)
        x, y = a * x + bb * y + e, c * x + d * y + f
        if it >= iters - keep:
            xs.append(x)
            ys.append(y)
            ks.append(k)
    return np.concatenate(xs, 1), np.concatenate(ys, 1), np.concatenate(ks, 1)


def _rasterise(x: np.ndarray, y: np.ndarray, size: int, rng, jitter: bool) -> tuple[np.ndarray, np.ndarray]:
    """Fit each image's points into the frame (robust bbox, then random rotation/scale/shift/flip).

    Returns flat pixel indices (B, N) into a (size, size) frame and the mask of points inside it.
    """
    b = x.shape[0]
    # Bounding box from the 1st-99th percentiles of a subsample: robust to burn-in stragglers, 8x cheaper.
    lo_x, hi_x = np.percentile(x[:, ::8], [1, 99], axis=1)
    lo_y, hi_y = np.percentile(y[:, ::8], [1, 99], axis=1)
    half = np.maximum(np.maximum(hi_x - lo_x, hi_y - lo_y) / 2, 1e-6)[:, None]
    qx, qy = (x - ((lo_x + hi_x) / 2)[:, None]) / half, (y - ((lo_y + hi_y) / 2)[:, None]) / half
    if jitter:
        ang = rng.uniform(0, 2 * np.pi, b)[:, None]
        c, s = np.cos(ang), np.sin(ang)
        qx, qy = (c * qx - s * qy) * np.where(rng.random(b) < 0.5, -1, 1)[:, None], s * qx + c * qy
        scale = rng.uniform(0.65, 0.95, b)[:, None]
        qx, qy = qx * scale + rng.uniform(-0.08, 0.08, (b, 1)), qy * scale + rng.uniform(-0.08, 0.08, (b, 1))
    else:
        qx, qy = qx * 0.9, qy * 0.9
    px = np.rint((qx + 1) / 2 * (size - 1)).astype(np.int64)
    py = np.rint((qy + 1) / 2 * (size - 1)).astype(np.int64)
    inside = (px >= 0) & (px < size) & (py >= 0) & (py < size)
    return py * size + px, inside


def _fill_rate(maps, probs, rng, size=32) -> float:
    x, y, _ = _chaos_game(rng, maps[None], probs[None], 2000, 12, 6)
    flat, inside = _rasterise(x, y, size, rng, jitter=False)
    return len(np.unique(flat[inside])) / (size * size)


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Vectorised HSV (value 1) to RGB in [0, 1]; returns shape h.shape + (3,)."""
    i = np.floor(h * 6).astype(int) % 6
    f = h * 6 - np.floor(h * 6)
    p, q, t = 1 - s, 1 - s * f, 1 - s * (1 - f)
    one = np.ones_like(h)
    table = np.stack([np.stack(c, -1) for c in ((one, t, p), (q, one, p), (p, one, t), (p, q, one), (t, p, one), (one, p, q))])
    return np.take_along_axis(np.moveaxis(table, 0, -2), i[..., None, None], axis=-2)[..., 0, :]


def _render_fractals(rng, systems, classes: np.ndarray, size: int) -> np.ndarray:
    """Render one image per entry of ``classes`` (indices into ``systems``); returns uint8 (B, size, size, 3)."""
    b, m_max = len(classes), 4
    maps = np.zeros((b, m_max, 6))
    probs = np.zeros((b, m_max))
    for j, c in enumerate(classes):
        mp, pr = systems[c]
        maps[j, : len(mp)] = mp + rng.normal(0, 0.03, mp.shape)  # intra-class variation (FractalDB-style)
        probs[j, : len(pr)] = pr
    x, y, k = _chaos_game(rng, maps, probs, points=max(64, size * size // 8), iters=22, keep=14)
    flat, inside = _rasterise(x, y, size, rng, jitter=True)
    # Colour: one hue per map (offset per image); brightness from the log point density.
    hues = (rng.random((b, 1)) + 0.23 * np.arange(m_max)) % 1.0
    cols = _hsv_to_rgb(hues, rng.uniform(0.5, 1.0, (b, m_max)))  # (B, M, 3)
    flat = (flat + (np.arange(b) * size * size)[:, None])[inside]
    point_cols = cols[np.nonzero(inside)[0], k[inside]]  # (N, 3)
    n_pix = b * size * size
    rgb = np.stack([np.bincount(flat, weights=point_cols[:, ch], minlength=n_pix) for ch in range(3)], -1)
    count = np.bincount(flat, minlength=n_pix)[:, None]
    colour = (rgb / np.maximum(count, 1)).reshape(b, size, size, 3)
    density = np.log1p(count).reshape(b, size, size, 1)
    density /= np.maximum(density.max(axis=(1, 2, 3), keepdims=True), 1e-6)
    value = np.clip(1.6 * gaussian_filter(density, (0, 0.5, 0.5, 0)), 0, 1)
    img = rng.uniform(0.0, 0.25, (b, 1, 1, 3)) * (1 - value) + colour * value
    return np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)


def write_fractal_imagefolder(
    root: str | Path,
    num_images: int = 2000,
    num_classes: int = 20,
    image_size: int = 64,
    seed: int = 0,
) -> Path:
    """Write FractalDB-style images as an ImageFolder, ``root/<class>/<i>.png`` (RGB PNG); return ``root``.

    Class ``class_NNN`` is one random IFS whose attractor fills 8-50 % of a 32 px frame (degenerate line/point
    attractors are rejected). Images per class differ by coefficient jitter (sigma 0.03), random rotation, scale,
    shift, flip, per-map colours and background. Deterministic in ``seed``.
    """
    if num_classes < 2 or num_images < num_classes:
        raise DataError(f"fractal data needs num_classes >= 2 and num_images >= num_classes (got {num_images}, {num_classes})")
    t0 = time.perf_counter()
    rng = np.random.default_rng([seed, 0xFDB])
    root = Path(root)
    systems = []
    while len(systems) < num_classes:
        maps, probs = _random_ifs(rng)
        if 0.08 <= _fill_rate(maps, probs, rng) <= 0.5:
            systems.append((maps, probs))
    labels = np.arange(num_images) % num_classes
    for c in range(num_classes):
        (root / f"class_{c:03d}").mkdir(parents=True, exist_ok=True)
    for lo in range(0, num_images, 128):  # batches bound memory; every step inside is vectorised over the batch
        cls = labels[lo : lo + 128]
        pixels = _render_fractals(rng, systems, cls, image_size)
        for j, c in enumerate(cls):
            Image.fromarray(pixels[j], mode="RGB").save(root / f"class_{c:03d}" / f"{lo + j:05d}.png", compress_level=1)
    log.info("fractal images: %d x %dpx, %d classes in %.1fs at %s", num_images, image_size, num_classes,
             time.perf_counter() - t0, root)
    return root
