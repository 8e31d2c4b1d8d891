"""Tiny stand-ins for the public datasets, written in each dataset's exact on-disk format.

``write_fixture(name, root)`` writes the released layout of one dataset under ``root`` — real file names, real
headers, real value encodings and the traps the real releases hold (blank and ``-1.0`` labels,
``Unknown``/``unknown`` sex, age 0 and implausible ages, NIH's bracketed header with its trailing empty column, both
CBIS-DDSM ``breast density`` spellings, ``BI-RADS k``/``DENSITY X`` strings, EMBED letter codes and its
double-spaced race string, PadChest 16-bit PNGs, MONOCHROME1 DICOMs) — with small decodable images.

The first copy of each fixture is a fixed, hand-written set of rows that the loader tests assert exactly. Asking
for more images (``n``) appends further copies of that set with fresh ids in the same formats, so the labels keep
both classes and patients stay disjoint between copies. Pixels are seeded noise plus a bright disc on images whose
primary label is positive, so a smoke training has something to learn.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

GRAY_SIZE = (64, 64)
"""(height, width) of chest X-ray fixture images."""
DERM_SIZE = (48, 64)
"""(height, width) of dermatology fixture images (the 3:4 aspect of HAM10000's 450×600)."""
MAMMO_SIZE = (64, 48)
"""(height, width) of mammography fixture DICOMs (portrait, like a mammogram)."""

MG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1.2"  # Digital Mammography X-Ray Image Storage - For Presentation


# --------------------------------------------------------------------------------------------------------------
# Pixels and image files
# --------------------------------------------------------------------------------------------------------------


def _pattern(rng: np.random.Generator, shape: tuple[int, int], positive: bool) -> np.ndarray:
    """Noise in [0, 1] with a bright central disc when ``positive`` (the learnable signal)."""
    h, w = shape
    img = 0.25 + 0.15 * rng.random((h, w))
    if positive:
        yy, xx = np.mgrid[:h, :w]
        img[(yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (min(h, w) / 4) ** 2] += 0.5
    return np.clip(img, 0.0, 1.0)


def write_gray(path: Path, rng: np.random.Generator, positive: bool, bits: int = 8) -> None:
    """An 8-bit grayscale JPEG/PNG, or a 16-bit grayscale PNG when ``bits == 16`` (PadChest)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = _pattern(rng, GRAY_SIZE, positive)
    arr = (img * 65535).astype(np.uint16) if bits == 16 else (img * 255).astype(np.uint8)
    Image.fromarray(arr).save(path)


def write_rgb(path: Path, rng: np.random.Generator, positive: bool) -> None:
    """An RGB JPEG/PNG with a skin-like tint (dermatology)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = _pattern(rng, DERM_SIZE, positive)
    rgb = np.stack([0.6 + 0.4 * img, 0.3 + 0.5 * img, 0.2 + 0.4 * img], axis=-1)
    Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8)).save(path)


def write_dicom(
    path: Path,
    pixels: np.ndarray,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 16,
    window: tuple[float, float] | None = None,
    rescale: tuple[float, float] | None = None,
    **attributes,
) -> None:
    """Write a single-frame unsigned 16-bit grayscale DICOM (explicit VR little endian) with pydicom.

    ``window`` = (center, width) adds a VOI window, ``rescale`` = (slope, intercept) a Modality LUT; further
    keyword arguments become DICOM attributes (``ImageLaterality='L'``, ``ViewPosition='CC'``, ...).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    sop_uid = attributes.pop("SOPInstanceUID", None) or generate_uid(entropy_srcs=[path.as_posix()])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MG_SOP_CLASS
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = MG_SOP_CLASS
    ds.SOPInstanceUID = sop_uid
    ds.Modality = "MG"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    for key, value in attributes.items():
        setattr(ds, key, value)
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def _mammo_dicom(path: Path, rng: np.random.Generator, positive: bool, monochrome1: bool = False, **attrs) -> None:
    """A 12-bit mammogram-like DICOM; MONOCHROME1 files store the inverted image (bright tissue = low values)."""
    img = _pattern(rng, MAMMO_SIZE, positive)
    if monochrome1:
        img = 1.0 - img
    pixels = (img * 4095).astype(np.uint16)
    write_dicom(path, pixels, "MONOCHROME1" if monochrome1 else "MONOCHROME2", bits_stored=12,
                window=(2047.0, 4096.0), **attrs)


def _csv(df: pd.DataFrame, path: Path, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(path, index=False, **kwargs)


def _hex(rng: np.random.Generator, n: int = 32) -> str:
    return "".join(rng.choice(list("0123456789abcdef"), n))


# --------------------------------------------------------------------------------------------------------------
# Chest X-ray
# --------------------------------------------------------------------------------------------------------------

MIMIC_LABELS = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
    "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
    "Pneumothorax", "Support Devices",
)  # mimic-cxr-2.0.0-chexpert.csv column order (alphabetical)

# (subject, study, dicom_id, ViewPosition, StudyDate, split)
_MIMIC_IMAGES = [
    (10000032, 50414267, "02aa804e-bde0afdd-112c0b34-7bc16630-4e384014", "PA", 21800506, "train"),
    (10000032, 50414267, "174413ec-4ec4c1f7-34ea26b7-c5f994f8-79ef1962", "LATERAL", 21800506, "train"),
    (10000032, 53189527, "2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab", "AP", 21810915, "train"),
    (10000764, 57375967, "096052b7-d256dc40-453a102b-fa7d01c6-1b22c6b4", "", 21321015, "validate"),
    (10000898, 50771383, "1a3b4a28-3c7b5d05-4b6e1a32-9b7c1f1e-23ab5cd1", "PA", 21560214, "test"),
    (10000898, 50771383, "4f2b1c9e-8d3a7b60-2c1e4f5a-6b7d8e9f-0a1b2c3d", "LL", 21560214, "test"),
    (10001884, 56668612, "5e6f7a8b-9c0d1e2f-3a4b5c6d-7e8f9a0b-1c2d3e4f", "PA", 21310316, "train"),
    (10002428, 59258269, "6f7a8b9c-0d1e2f3a-4b5c6d7e-8f9a0b1c-2d3e4f5a", "AP", 21510704, "test"),
]
# study -> {label: raw cell}; study 56668612 deliberately has no label row.
_MIMIC_CHEXPERT = {
    50414267: {"Cardiomegaly": "1.0", "Edema": "0.0", "Pleural Effusion": "-1.0"},
    53189527: {"No Finding": "1.0"},
    57375967: {"Atelectasis": "-1.0", "Pleural Effusion": "1.0", "Support Devices": "1.0"},
    50771383: {"Atelectasis": "1.0", "Cardiomegaly": "0.0", "Edema": "1.0", "Pleural Effusion": "0.0",
               "Pneumothorax": "1.0"},
    59258269: {"Cardiomegaly": "1.0", "Consolidation": "1.0", "Pleural Effusion": "1.0", "Support Devices": "-1.0"},
}  # the test split has positives and negatives for each of the 5 competition tasks
_MIMIC_NEGBIO = {**_MIMIC_CHEXPERT, 50414267: {"Cardiomegaly": "1.0", "Edema": "0.0", "Pleural Effusion": "1.0"}}
# subject -> (gender, anchor_age, anchor_year, anchor_year_group); 10001884 is absent from patients on purpose.
_MIMIC_PATIENTS = {
    10000032: ("F", 52, 2180, "2014 - 2016"),
    10000764: ("M", 86, 2132, "2014 - 2016"),
    10000898: ("F", 40, 2154, "2011 - 2013"),
    10002428: ("M", 70, 2150, "2008 - 2010"),
}
# (subject, hadm_id, admittime, insurance, race)
_MIMIC_ADMISSIONS = [
    (10000032, 22595853, "2180-05-06 22:23:00", "Other", "WHITE"),
    (10000032, 22841357, "2180-06-26 18:27:00", "Medicaid", "WHITE - OTHER EUROPEAN"),
    (10000764, 27897940, "2132-10-14 23:31:00", "Medicare", "UNKNOWN"),
    (10000764, 20000001, "2132-11-01 10:00:00", "Medicare", "BLACK/AFRICAN AMERICAN"),
    (10000898, 29364534, "2154-01-02 08:00:00", "Other", "ASIAN - CHINESE"),
    (10000898, 26000002, "2155-03-01 09:00:00", "Medicaid", "HISPANIC/LATINO - PUERTO RICAN"),
    (10002428, 23473524, "2151-07-04 11:00:00", "Medicare", "AMERICAN INDIAN/ALASKA NATIVE"),
]


def _mimic(root: Path, rng: np.random.Generator, copies: int) -> None:
    meta, split, chex, negbio, patients, admissions = [], [], [], [], [], []
    for k in range(copies):
        subj = lambda s: s + 100_000 * k  # noqa: E731 - keeps 8 digits starting with 1
        study = lambda s: s + 1_000_000 * k  # noqa: E731 - keeps 8 digits starting with 5
        did = lambda d: d if k == 0 else f"{k:08x}" + d[8:]  # noqa: E731
        for s, st, d, view, date, sp in _MIMIC_IMAGES:
            meta.append({
                "dicom_id": did(d), "subject_id": subj(s), "study_id": study(st),
                "PerformedProcedureStepDescription": "CHEST (PA AND LAT)", "ViewPosition": view,
                "Rows": 3056, "Columns": 2544, "StudyDate": date, "StudyTime": 213014.531,
                "ProcedureCodeSequence_CodeMeaning": "CHEST (PA AND LAT)",
                "ViewCodeSequence_CodeMeaning": {"PA": "postero-anterior", "AP": "antero-posterior",
                                                 "LATERAL": "lateral", "LL": "left lateral"}.get(view, ""),
                "PatientOrientationCodeSequence_CodeMeaning": "Erect",
            })
            split.append({"dicom_id": did(d), "study_id": study(st), "subject_id": subj(s), "split": sp})
            labels = _MIMIC_CHEXPERT.get(st, {})
            positive = labels.get("Pleural Effusion") == "1.0" or labels.get("Cardiomegaly") == "1.0"
            path = root / "files" / f"p{str(subj(s))[:2]}" / f"p{subj(s)}" / f"s{study(st)}" / f"{did(d)}.jpg"
            write_gray(path, rng, positive)
        for table, source in ((chex, _MIMIC_CHEXPERT), (negbio, _MIMIC_NEGBIO)):
            for st, labels in source.items():
                s = next(i[0] for i in _MIMIC_IMAGES if i[1] == st)
                table.append({"subject_id": subj(s), "study_id": study(st),
                              **{n: labels.get(n, "") for n in MIMIC_LABELS}})
        for s, (g, age, year, group) in _MIMIC_PATIENTS.items():
            patients.append({"subject_id": subj(s), "gender": g, "anchor_age": age, "anchor_year": year,
                             "anchor_year_group": group, "dod": ""})
        for s, hadm, t, ins, race in _MIMIC_ADMISSIONS:
            admissions.append({
                "subject_id": subj(s), "hadm_id": hadm + 1_000_000 * k, "admittime": t, "dischtime": t,
                "deathtime": "", "admission_type": "EW EMER.", "admit_provider_id": "P874LG",
                "admission_location": "EMERGENCY ROOM", "discharge_location": "HOME", "insurance": ins,
                "language": "ENGLISH", "marital_status": "WIDOWED", "race": race, "edregtime": "", "edouttime": "",
                "hospital_expire_flag": 0,
            })
    # The release ships gzip-compressed CSVs; labels are written as text so blanks stay blank and -1.0 stays -1.0.
    _csv(pd.DataFrame(meta), root / "mimic-cxr-2.0.0-metadata.csv.gz")
    _csv(pd.DataFrame(chex), root / "mimic-cxr-2.0.0-chexpert.csv.gz")
    _csv(pd.DataFrame(negbio), root / "mimic-cxr-2.0.0-negbio.csv.gz")
    _csv(pd.DataFrame(split), root / "mimic-cxr-2.0.0-split.csv.gz")
    _csv(pd.DataFrame(patients), root / "hosp" / "patients.csv.gz")
    _csv(pd.DataFrame(admissions), root / "hosp" / "admissions.csv.gz")


NIH_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],"
)  # the original Data_Entry_2017.csv header: commas inside brackets and a trailing empty 12th field
# (image index, finding labels, follow-up, patient, age, sex, view, image folder, official list)
_NIH_ROWS = [
    ("00000001_000.png", "Cardiomegaly", 0, 1, 57, "M", "PA", 1, "train_val"),
    ("00000001_001.png", "Atelectasis|Cardiomegaly|Emphysema", 1, 1, 58, "M", "PA", 1, "train_val"),
    ("00000002_000.png", "No Finding", 0, 2, 81, "M", "PA", 1, "train_val"),
    ("00000003_000.png", "Consolidation|Edema|Effusion|Pleural_Thickening", 0, 3, 414, "F", "AP", 2, "train_val"),
    ("00000004_000.png", "Atelectasis|Cardiomegaly|Hernia|Mass|Nodule", 0, 4, 82, "F", "AP", 2, "test"),
    ("00000005_000.png", "Consolidation|Edema|Effusion|Infiltration|Pneumothorax", 0, 5, 69, "F", "PA", 2, "test"),
    ("00000006_000.png", "No Finding", 0, 6, 35, "M", "PA", 2, "test"),
]  # each of the 5 CheXpert competition tasks has positives and negatives in both official lists


def _nih(root: Path, rng: np.random.Generator, copies: int) -> None:
    lines, lists = [NIH_HEADER], {"train_val": [], "test": []}
    for k in range(copies):
        for name, finding, follow, pid, age, sex, view, folder, which in _NIH_ROWS:
            pid = pid + 10_000 * k
            name = f"{pid:08d}_{follow:03d}.png"
            lines.append(f"{name},{finding},{follow},{pid},{age},{sex},{view},2500,2048,0.168,0.168,")
            lists[which].append(name)
            write_gray(root / f"images_{folder:03d}" / "images" / name, rng, "Effusion" in finding)
    (root / "Data_Entry_2017.csv").write_text("\n".join(lines) + "\n")
    (root / "train_val_list.txt").write_text("\n".join(lists["train_val"]) + "\n")
    (root / "test_list.txt").write_text("\n".join(lists["test"]) + "\n")


PADCHEST_CSV = "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"
# (ImageID, ImageDir, StudyDate, PatientID, PatientBirth, sex, Projection, Manufacturer, Labels)
_PADCHEST_ROWS = [
    ("216840111366964012819207061112010307142602253_04-014-084.png", 0, 20150708, "p1", "1939.0", "M", "PA",
     "PhilipsMedicalSystems", "['normal']"),
    ("216840111366964012819207061112010307142602254_04-014-085.png", 0, 20150708, "p1", "1939.0", "M", "L",
     "PhilipsMedicalSystems", "['cardiomegaly', ' pleural effusion']"),
    ("216840111366964012989926673512011074122523403_00-163-058.png", 0, 20120106, "p2", "", "F", "AP_horizontal",
     "Agfa", "['pneumonia', 'infiltrates', 'unchanged']"),
    ("216840111366964013076187734852011291090445391_00-196-188.png", 1, 20111018, "p3", "1975.0", "", "PA",
     "Agfa", ""),
    ("216840111366964013076187734852011291090445392_00-196-189.png", 1, 20111018, "p3", "1975.0", "", "PA",
     "Agfa", "['atelectasis', 'nodule', 'hiatal hernia']"),
    # children of PadChest's finding hierarchy count for their parent label
    ("216840111366964013076187734852011291090445393_00-196-190.png", 1, 20111018, "p4", "1950.0", "F", "PA",
     "Agfa", "['laminar atelectasis', 'callus rib fracture', ' pulmonary mass', 'loculated pleural effusion', "
     "'multiple nodules', 'apical pleural thickening', 'interstitial pattern', 'air bronchogram']"),
]


def _padchest(root: Path, rng: np.random.Generator, copies: int) -> None:
    rows = []
    for k in range(copies):
        for image, folder, date, pid, birth, sex, proj, maker, labels in _PADCHEST_ROWS:
            image = image if k == 0 else f"{k:06d}" + image[6:]
            pid = hashlib.md5(f"{pid}/{k}".encode()).hexdigest() if k else pid
            rows.append({
                "ImageID": image, "ImageDir": folder, "StudyDate_DICOM": date, "StudyID": f"{pid}-{date}",
                "PatientID": pid, "PatientBirth": birth, "PatientSex_DICOM": sex,
                "ViewPosition_DICOM": {"PA": "POSTEROANTERIOR", "L": "LATERAL"}.get(proj, ""),
                "Projection": proj, "MethodProjection": "Manual review of DICOM fields", "Pediatric": "No",
                "Modality_DICOM": "CR", "Manufacturer_DICOM": maker, "Labels": labels, "Localizations": "[]",
                "MethodLabel": "Physician",
            })
            positive = "effusion" in labels or "pneumonia" in labels
            write_gray(root / str(folder) / image, rng, positive, bits=16)
    df = pd.DataFrame(rows)
    # The release CSV starts with an unnamed pandas index column.
    _csv(df.reset_index().rename(columns={"index": ""}), root / PADCHEST_CSV)


# A hospital's own export (the ``inhouse`` loader): one patient under several id spellings, Windows and upper-case
# paths, label words and uncertain values, free-text sex, DICOM age strings, a manufacturer in two spellings,
# 8/16-bit PNGs and DICOMs in nested folders (MONOCHROME1 and 2, with and without a VOI window).
# (patient cell, accession, image file, format, Cardiomegaly, Effusion, sex, age)
_INHOUSE_ROWS = [
    ("0000101", "A1", "images\\{p}\\{a}\\img0.png", "png8", "1", "0", "M", "061Y"),
    (" 0000101", "A1", "images\\{p}\\{a}\\img1.png", "png16", "yes", "", "Male", "61"),
    ("101", "A2", "dicom/{p}/{a}/series1/IM0000.dcm", "mono1", "positive", "1.0", "male", "061Y"),
    ("0000102", "A3", "IMAGES/{p}/{a}/IMG0.PNG", "png8", "0", "1", "F", "045"),
    ("0000102", "A3", "dicom/{p}/{a}/series1/IM0000.dcm", "mono2_voi", "no", " 1", "Female", "045Y"),
    ("0000103", "A4", "dicom/{p}/{a}/series2/IM0001.dcm", "mono2", "-1", "negative", "", "089Y"),
    ("0000103 ", "A5", "images/{p}/{a}/img0.png", "png16", "0.0", "0", "F", ""),
    ("0000104", "A6", "images/{p}/{a}/img0.png", "png8", "", "yes", "O", "006M"),
]


def _inhouse(root: Path, rng: np.random.Generator, copies: int) -> None:
    rows = []
    first = int(rng.integers(1, 90)) * 1000  # seeds give other patient numbers: a second site is other patients
    for k in range(copies):
        for patient, accession, image, kind, card, effusion, sex, age in _INHOUSE_ROWS:
            number = first + int(patient) + 10 * k
            padded, acc = f"{number:07d}", f"{accession}{number}"
            cell = patient.replace(patient.strip(), padded if patient.strip().startswith("0") else str(number))
            rel = image.format(p=padded, a=acc)
            on_disk = rel.replace("\\", "/")
            path = root / (on_disk.lower() if on_disk.startswith("IMAGES/") else on_disk)  # the export's case differs
            positive = card.strip().lower() in ("1", "yes", "positive")
            if kind.startswith("png"):
                write_gray(path, rng, positive, bits=16 if kind == "png16" else 8)
            else:
                img = _pattern(rng, GRAY_SIZE, positive)
                stored = (1.0 - img if kind == "mono1" else img) * 4095
                write_dicom(path, stored.astype(np.uint16), "MONOCHROME1" if kind == "mono1" else "MONOCHROME2",
                            bits_stored=12, window=(2047.0, 4096.0) if kind == "mono2_voi" else None)
            maker = "ge  HEALTHCARE" if patient[0] == " " else ["GE Healthcare", "SIEMENS"][k % 2]
            rows.append({"PatientID": cell, "AccessionNumber": acc, "StudyDate": "20190301", "ImagePath": rel,
                         "Cardiomegaly": card, "Effusion": effusion, "PatientSex": sex, "PatientAge": age,
                         "Manufacturer": maker})
    _csv(pd.DataFrame(rows), root / "export.csv")


# --------------------------------------------------------------------------------------------------------------
# Dermatology
# --------------------------------------------------------------------------------------------------------------

# lesion_id,image_id,dx,dx_type,age,sex,localization,dataset (+ the image folder part)
_HAM_ROWS = [
    ("HAM_0000118", "ISIC_0027419", "bkl", "histo", "80.0", "male", "scalp", "vidir_modern", 1),
    ("HAM_0000118", "ISIC_0025030", "bkl", "histo", "80.0", "male", "scalp", "vidir_modern", 1),
    ("HAM_0002730", "ISIC_0026769", "mel", "histo", "60.0", "female", "face", "rosendahl", 1),
    ("HAM_0001466", "ISIC_0031633", "nv", "follow_up", "0.0", "unknown", "back", "vidir_molemax", 1),
    ("HAM_0002761", "ISIC_0029176", "bcc", "histo", "", "female", "lower extremity", "vienna_dias", 2),
    ("HAM_0005132", "ISIC_0025837", "akiec", "histo", "45.0", "male", "upper extremity", "rosendahl", 2),
    ("HAM_0001396", "ISIC_0025276", "df", "consensus", "55.0", "female", "lower extremity", "vidir_modern", 2),
    ("HAM_0004234", "ISIC_0029396", "vasc", "consensus", "70.0", "male", "trunk", "vidir_modern", 2),
]


def _ham10000(root: Path, rng: np.random.Generator, copies: int) -> None:
    rows = []
    for k in range(copies):
        for lesion, image, dx, dx_type, age, sex, loc, site, part in _HAM_ROWS:
            lesion = f"HAM_{int(lesion[4:]) + 10_000 * k:07d}"
            image = f"ISIC_{int(image[5:]) + 100_000 * k:07d}"
            rows.append({"lesion_id": lesion, "image_id": image, "dx": dx, "dx_type": dx_type, "age": age,
                         "sex": sex, "localization": loc, "dataset": site})
            write_rgb(root / f"HAM10000_images_part_{part}" / f"{image}.jpg", rng, dx in ("mel", "bcc", "akiec"))
    _csv(pd.DataFrame(rows), root / "HAM10000_metadata.csv")


ISIC2019_CLASSES = ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK")
# image, class, age_approx, anatom_site_general, lesion_id, sex
_ISIC2019_ROWS = [
    ("ISIC_0000000", "NV", "55.0", "anterior torso", "", "female"),
    ("ISIC_0000002_downsampled", "NV", "60.0", "upper extremity", "MSK4_0011169", "female"),
    ("ISIC_0026769", "MEL", "60.0", "head/neck", "HAM_0002730", "female"),
    ("ISIC_0053453", "BCC", "70.0", "head/neck", "BCN_0003925", "male"),
    ("ISIC_0053454", "SCC", "", "", "BCN_0003926", ""),
    ("ISIC_0053455", "AK", "80.0", "head/neck", "BCN_0003927", "female"),
    ("ISIC_0027419", "BKL", "80.0", "head/neck", "HAM_0000118", "male"),
    ("ISIC_0053460", "DF", "35.0", "lower extremity", "BCN_0000019", "female"),
    ("ISIC_0053461", "VASC", "40.0", "posterior torso", "BCN_0000020", "male"),
]


def _isic2019(root: Path, rng: np.random.Generator, copies: int) -> None:
    gt, meta = [], []
    for k in range(copies):
        for image, cls, age, site, lesion, sex in _ISIC2019_ROWS:
            if k:
                image = f"ISIC_{int(image[5:12]) + 200_000 * k:07d}{image[12:]}"
                prefix, _, number = lesion.rpartition("_")
                lesion = f"{prefix}_{int(number) + 20_000 * k:07d}" if lesion else ""
            gt.append({"image": image, **{c: 1.0 if c == cls else 0.0 for c in ISIC2019_CLASSES}})
            meta.append({"image": image, "age_approx": age, "anatom_site_general": site, "lesion_id": lesion,
                         "sex": sex})
            write_rgb(root / "ISIC_2019_Training_Input" / f"{image}.jpg", rng, cls in ("MEL", "BCC", "SCC", "AK"))
    _csv(pd.DataFrame(gt), root / "ISIC_2019_Training_GroundTruth.csv")
    _csv(pd.DataFrame(meta), root / "ISIC_2019_Training_Metadata.csv")


# image_name,patient_id,sex,age_approx,anatom_site_general_challenge,diagnosis,benign_malignant,target
_ISIC2020_ROWS = [
    ("ISIC_2637011", "IP_7279968", "male", "45.0", "head/neck", "unknown", "benign", 0),
    ("ISIC_0015719", "IP_3075186", "female", "45.0", "upper extremity", "unknown", "benign", 0),
    ("ISIC_0052212", "IP_2842074", "female", "50.0", "lower extremity", "nevus", "benign", 0),
    ("ISIC_0068279", "IP_6890425", "female", "45.0", "head/neck", "unknown", "benign", 0),
    ("ISIC_0149568", "IP_0962375", "female", "55.0", "upper extremity", "melanoma", "malignant", 1),
    ("ISIC_0074268", "IP_6890425", "female", "45.0", "", "melanoma", "malignant", 1),
    ("ISIC_0076262", "IP_5075533", "", "", "torso", "seborrheic keratosis", "benign", 0),
]


def _isic2020(root: Path, rng: np.random.Generator, copies: int) -> None:
    rows = []
    for k in range(copies):
        for image, pid, sex, age, site, diagnosis, bm, target in _ISIC2020_ROWS:
            image = f"ISIC_{int(image[5:]) + 3_000_000 * k:07d}"
            pid = f"IP_{int(pid[3:]) + 30_000 * k:07d}"
            rows.append({"image_name": image, "patient_id": pid, "sex": sex, "age_approx": age,
                         "anatom_site_general_challenge": site, "diagnosis": diagnosis, "benign_malignant": bm,
                         "target": target})
            write_rgb(root / "train" / f"{image}.jpg", rng, target == 1)
    _csv(pd.DataFrame(rows), root / "ISIC_2020_Training_GroundTruth.csv")


# md5hash, fitzpatrick_scale, fitzpatrick_centaur, label, nine_partition_label, three_partition_label, qc, url host
_FITZ_ROWS = [
    ("5e82a45bc5d78bd24ae9202d194423f8", 3, 3, "drug induced pigmentary changes", "inflammatory",
     "non-neoplastic", "", "https://www.dermaamin.com/site/images/clinical-pic/m/minocycline/minocycline1.jpg"),
    ("0b9d9c1d1d7d0e6a6b2f2a55b2b1c3d4", 1, 2, "melanoma", "malignant melanoma", "malignant", "1 Diagnostic",
     "http://atlasdermatologico.com.br/img?imageId=4091"),
    ("1c6e5f1a2b3c4d5e6f708192a3b4c5d6", -1, -1, "basal cell carcinoma", "malignant epidermal", "malignant", "",
     "https://www.dermaamin.com/site/images/clinical-pic/b/bcc/bcc12.jpg"),
    ("2d7f6a2b3c4d5e6f708192a3b4c5d6e7", 6, 5, "seborrheic keratosis", "benign epidermal", "benign", "", ""),
    ("3e8a7b3c4d5e6f708192a3b4c5d6e7f8", 5, 5, "psoriasis", "inflammatory", "non-neoplastic",
     "3 Wrongly labelled", "https://www.dermaamin.com/site/images/clinical-pic/p/psoriasis/psoriasis7.jpg"),
    ("4f9b8c4d5e6f708192a3b4c5d6e7f809", 2, 2, "superficial spreading melanoma ssm", "malignant melanoma",
     "malignant", "", "http://atlasdermatologico.com.br/img?imageId=2077"),
]


def _fitzpatrick17k(root: Path, rng: np.random.Generator, copies: int) -> None:
    rows = []
    for k in range(copies):
        for md5, fst, centaur, label, nine, three, qc, url in _FITZ_ROWS:
            md5 = md5 if k == 0 else _hex(rng)
            alnum = "".join(ch for ch in url if ch.isalnum()) + ".jpg" if url else ""
            rows.append({"md5hash": md5, "fitzpatrick_scale": fst, "fitzpatrick_centaur": centaur, "label": label,
                         "nine_partition_label": nine, "three_partition_label": three, "qc": qc, "url": url,
                         "url_alphanum": alnum})
            write_rgb(root / "images" / f"{md5}.jpg", rng, three == "malignant")
    _csv(pd.DataFrame(rows), root / "fitzpatrick17k.csv")


# DDI_ID, skin_tone, malignant, disease
_DDI_ROWS = [
    (1, 56, True, "melanoma-in-situ"),
    (2, 56, True, "mycosis-fungoides"),
    (3, 12, False, "seborrheic-keratosis-irritated"),
    (4, 34, False, "melanocytic-nevi"),
    (5, 12, True, "basal-cell-carcinoma"),
    (6, 34, False, "verruca-vulgaris"),
]


def _ddi(root: Path, rng: np.random.Generator, copies: int) -> None:
    rows = []
    for k in range(copies):
        for ddi_id, tone, malignant, disease in _DDI_ROWS:
            ddi_id += len(_DDI_ROWS) * k
            rows.append({"DDI_ID": ddi_id, "DDI_file": f"{ddi_id:06d}.png", "skin_tone": tone,
                         "malignant": malignant, "disease": disease})
            write_rgb(root / "images" / f"{ddi_id:06d}.png", rng, malignant)
    # The official metadata file carries a leading unnamed index column.
    _csv(pd.DataFrame(rows).reset_index().rename(columns={"index": ""}), root / "ddi_metadata.csv")


# --------------------------------------------------------------------------------------------------------------
# Mammography
# --------------------------------------------------------------------------------------------------------------

CBIS_MASS_COLUMNS = ["patient_id", "breast_density", "left or right breast", "image view", "abnormality id",
                     "abnormality type", "mass shape", "mass margins", "assessment", "pathology", "subtlety",
                     "image file path", "cropped image file path", "ROI mask file path"]
CBIS_CALC_COLUMNS = ["patient_id", "breast density", "left or right breast", "image view", "abnormality id",
                     "abnormality type", "calc type", "calc distribution", "assessment", "pathology", "subtlety",
                     "image file path", "cropped image file path", "ROI mask file path"]
# file, patient, density, side, view, abnormality id, assessment, pathology
_CBIS_ROWS = [
    ("mass_train", "P_00001", 3, "LEFT", "CC", 1, 4, "MALIGNANT"),
    ("mass_train", "P_00001", 3, "LEFT", "MLO", 1, 4, "MALIGNANT"),
    ("mass_train", "P_00004", 3, "RIGHT", "MLO", 1, 3, "BENIGN"),
    ("calc_train", "P_00005", 3, "RIGHT", "CC", 1, 3, "MALIGNANT"),
    ("calc_train", "P_00005", 3, "RIGHT", "CC", 2, 2, "BENIGN_WITHOUT_CALLBACK"),
    ("calc_train", "P_00001", 3, "LEFT", "CC", 2, 2, "BENIGN_WITHOUT_CALLBACK"),
    ("mass_test", "P_00016", 4, "LEFT", "CC", 1, 5, "MALIGNANT"),
    ("calc_test", "P_00038", 2, "LEFT", "MLO", 1, 0, "BENIGN"),
    ("calc_test", "P_00038", 2, "RIGHT", "CC", 1, 2, "BENIGN"),
]


def _cbis_uid(rng: np.random.Generator) -> str:
    return "1.3.6.1.4.1.9590.100.1.2." + "".join(rng.choice(list("0123456789"), 39))


def _cbis_ddsm(root: Path, rng: np.random.Generator, copies: int) -> None:
    tables: dict[str, list] = {"mass_train": [], "calc_train": [], "mass_test": [], "calc_test": []}
    images: dict[str, str] = {}
    written: set[str] = set()
    for k in range(copies):
        for file, pid, density, side, view, abn, assessment, pathology in _CBIS_ROWS:
            pid = f"P_{int(pid[2:]) + 2_000 * k:05d}"
            kind, split = file.split("_")
            prefix = f"{'Mass' if kind == 'mass' else 'Calc'}-{'Training' if split == 'train' else 'Test'}"
            subject = f"{prefix}_{pid}_{side}_{view}"
            # One DICOM per mammogram: a second abnormality of the same image repeats its path.
            image = images.setdefault(subject, f"{subject}/{_cbis_uid(rng)}/{_cbis_uid(rng)}/000000.dcm")
            crop = f"{subject}_{abn}/{_cbis_uid(rng)}/{_cbis_uid(rng)}/000000.dcm"
            row = {
                "patient_id": pid, "breast_density" if kind == "mass" else "breast density": density,
                "left or right breast": side, "image view": view, "abnormality id": abn,
                "abnormality type": "mass" if kind == "mass" else "calcification",
                **({"mass shape": "IRREGULAR", "mass margins": "SPICULATED"} if kind == "mass"
                   else {"calc type": "PLEOMORPHIC", "calc distribution": "CLUSTERED"}),
                "assessment": assessment, "pathology": pathology, "subtlety": 4, "image file path": image,
                # The released CSVs end the cropped/ROI paths with a newline inside the quotes.
                "cropped image file path": crop + "\n", "ROI mask file path": crop.replace("000000", "000001") + "\n",
            }
            tables[file].append(row)
            if image not in written:
                written.add(image)
                _mammo_dicom(root / "CBIS-DDSM" / image, rng, pathology == "MALIGNANT", PatientID=subject,
                             ImageLaterality=side[0], ViewPosition=view)
    for file, rows in tables.items():
        kind, split = file.split("_")
        columns = CBIS_MASS_COLUMNS if kind == "mass" else CBIS_CALC_COLUMNS
        _csv(pd.DataFrame(rows, columns=columns), root / f"{kind}_case_description_{split}_set.csv")


# study_id (4-image studies or single breasts), laterality, BI-RADS, density, split, age, manufacturer, MONOCHROME1
_VINDR_STUDIES = [
    ("5a54d4ed8d2a4ac2b15d5fc8d3d2d1a1", {"L": 4, "R": 1}, "C", "training", "053Y", "SIEMENS", False),
    ("6b65e5fe9e3b5bd3c26e6ad9e4e3e2b2", {"L": 3}, "B", "test", "041Y", "SIEMENS", False),
    ("7c76f6af0f4c6ce4d37f7bea05f4f3c3", {"R": 5}, "A", "training", "", "Planmed", False),
    ("8d87a7b01a5d7df5e48a8cfb1605a4d4", {"L": 4}, "D", "test", "067Y", "IMS GIOTTO S.p.A.", True),
]


def _vindr_mammo(root: Path, rng: np.random.Generator, copies: int) -> None:
    breast, findings, metadata = [], [], []
    for k in range(copies):
        for study, sides, density, split, age, maker, mono1 in _VINDR_STUDIES:
            study = study if k == 0 else _hex(rng)
            series = _hex(rng)
            for side, birads in sides.items():
                for view in ("CC", "MLO"):
                    image = _hex(rng)
                    common = {"study_id": study, "series_id": series, "image_id": image, "laterality": side,
                              "view_position": view, "height": MAMMO_SIZE[0], "width": MAMMO_SIZE[1]}
                    breast.append({**common, "breast_birads": f"BI-RADS {birads}",
                                   "breast_density": f"DENSITY {density}", "split": split})
                    findings.append({**common, "breast_birads": f"BI-RADS {birads}",
                                     "breast_density": f"DENSITY {density}",
                                     "finding_categories": "['Mass']" if birads >= 4 else "['No Finding']",
                                     "finding_birads": f"BI-RADS {birads}" if birads >= 3 else "",
                                     "xmin": 10.0 if birads >= 4 else "", "ymin": 12.0 if birads >= 4 else "",
                                     "xmax": 30.0 if birads >= 4 else "", "ymax": 40.0 if birads >= 4 else "",
                                     "split": split})
                    metadata.append({"SOP Instance UID": image, "Series Instance UID": series,
                                     "Patient's Age": age, "View Position": view, "Image Laterality": side,
                                     "Photometric Interpretation": "MONOCHROME1" if mono1 else "MONOCHROME2",
                                     "Rows": MAMMO_SIZE[0], "Columns": MAMMO_SIZE[1], "Manufacturer": maker,
                                     "Manufacturer's Model Name": "Mammomat Inspiration" if maker == "SIEMENS"
                                     else ""})
                    _mammo_dicom(root / "images" / study / f"{image}.dicom", rng, birads >= 4, monochrome1=mono1,
                                 ImageLaterality=side, ViewPosition=view, Manufacturer=maker)
    _csv(pd.DataFrame(breast), root / "breast-level_annotations.csv")
    _csv(pd.DataFrame(findings), root / "finding_annotations.csv")
    _csv(pd.DataFrame(metadata), root / "metadata.csv")


CMMD_COLUMNS = ["ID1", "LeftRight", "Age", "number", "abnormality", "classification", "subtype"]
_CMMD_ROWS = [
    ("D1-0001", "R", 44, 2, "calcification", "Benign", ""),
    ("D1-0002", "L", 51, 4, "mass", "Malignant", ""),
    ("D1-0002", "R", 51, 4, "mass", "Benign", ""),
    ("D2-0001", "L", 60, 2, "both", "Malignant", "Luminal B"),
]
# ID1 -> [(file, laterality, view, how the view is recorded)]
_CMMD_IMAGES = {
    "D1-0001": [("1-1.dcm", "R", "CC", "code"), ("1-2.dcm", "R", "MLO", "code")],
    "D1-0002": [("1-1.dcm", "L", "CC", "code"), ("1-2.dcm", "L", "MLO", "code"),
                ("1-3.dcm", "R", "CC", "code"), ("1-4.dcm", "R", "MLO", "code")],
    "D2-0001": [("1-1.dcm", "L", "CC", "tag"), ("1-2.dcm", "L", "MLO", "tag")],
}
_VIEW_CODES = {"CC": ("R-10242", "cranio-caudal"), "MLO": ("R-10226", "medio-lateral oblique")}


def _cmmd(root: Path, rng: np.random.Generator, copies: int) -> None:
    rows = []
    for k in range(copies):
        for pid, side, age, number, abnormality, cls, subtype in _CMMD_ROWS:
            pid = pid if k == 0 else f"{pid[:2]}-{int(pid[3:]) + 1000 * k:04d}"
            rows.append([pid, side, age, number, abnormality, cls, subtype])
        for pid, images in _CMMD_IMAGES.items():
            pid = pid if k == 0 else f"{pid[:2]}-{int(pid[3:]) + 1000 * k:04d}"
            series = root / "CMMD" / pid / "07-18-2010-NA-NA-79377" / "1.000000-NA-70244"
            for file, side, view, how in images:
                positive = any(r[0] == pid and r[1] == side and r[5] == "Malignant" for r in rows)
                attrs = {"PatientID": pid, "ImageLaterality": side, "Manufacturer": "SIEMENS"}
                if how == "tag":
                    attrs["ViewPosition"] = view
                else:
                    code = Dataset()
                    code.CodeValue, code.CodeMeaning = _VIEW_CODES[view]
                    code.CodingSchemeDesignator = "SRT"
                    attrs["ViewCodeSequence"] = Sequence([code])
                _mammo_dicom(series / file, rng, positive, **attrs)
    path = root / "CMMD_clinicaldata_revision.xlsx"
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=CMMD_COLUMNS).replace("", None).to_excel(path, index=False)


EMBED_RACE_BLACK = "African American  or Black"  # two spaces, as released
# (empi, acc, cohort, [(side, asses, path_severity)], tissueden, race, ethnicity, age, images)
_EMBED_EXAMS = [
    (10000879, 6117700412478730, 1, [("", "N", "")], 2, EMBED_RACE_BLACK, "Non-Hispanic or Latino", "56.3",
     [("L", "CC", "2D", 0), ("L", "MLO", "2D", 0), ("R", "CC", "2D", 0), ("R", "MLO", "2D", 0),
      ("L", "CC", "C-view", 0)]),
    (10001234, 7000000000000001, 1, [("L", "S", "0"), ("R", "B", "")], 3, "Caucasian or White",
     "Non-Hispanic or Latino", "64.0", [("L", "CC", "2D", 0), ("L", "MLO", "2D", 0), ("R", "CC", "2D", 0),
                                         ("L", "CC", "2D", 1)]),
    (10005678, 8000000000000002, 2, [("B", "P", "")], 5, "Asian", "Non-Hispanic or Latino", "71.9",
     [("L", "MLO", "2D", 0), ("R", "MLO", "2D", 0)]),
    (10009999, 8000000000000003, 2, [("R", "M", "4")], 1, "Unknown, Unavailable or Unreported", "Unknown", "",
     [("R", "CC", "2D", 0), ("L", "CC", "2D", 0)]),
]


def _embed(root: Path, rng: np.random.Generator, copies: int) -> None:
    clinical, metadata = [], []
    for k in range(copies):
        for empi, acc, cohort, findings, density, race, ethnic, age, images in _EMBED_EXAMS:
            empi, acc = empi + 100_000 * k, acc + 10**12 * k
            for side, asses, severity in findings:
                clinical.append({
                    "empi_anon": empi, "acc_anon": acc, "study_date_anon": "2019-05-14",
                    "desc": "MG Screening Bilateral" if asses == "N" else "MG Diagnostic Mammo Bilateral",
                    "numfind": len(findings), "side": side, "asses": asses, "tissueden": density,
                    "path_severity": severity, "RACE_DESC": race, "ETHNIC_GROUP_DESC": ethnic, "age_at_study": age,
                })
            for side, view, image_type, spot in images:
                sop = f"1.2.826.0.1.3680043.8.498.{rng.integers(10**15, 10**16)}"
                rel = f"cohort_{cohort}/{empi}/{acc}/{sop}.dcm"
                side_findings = [f for f in findings if f[0] in (side, "B", "")]
                positive = any(f[1] in ("S", "M", "K") for f in side_findings)
                metadata.append({
                    "empi_anon": empi, "acc_anon": acc,
                    # The released path carries the site's mount prefix; only the cohort_N/... tail is portable.
                    "anon_dicom_path": f"/mnt/NAS2/mammo/anon_dicom/{rel}",
                    "StudyDescription": "MG Diagnostic Mammo Bilateral", "SeriesDescription": f"{side} {view}",
                    "FinalImageType": image_type, "ImageLateralityFinal": side, "ViewPosition": view,
                    "spot_mag": 1.0 if spot else "", "Manufacturer": "HOLOGIC, Inc." if cohort == 1 else "GE MEDICAL SYSTEMS",
                    "ManufacturerModelName": "Selenia Dimensions" if cohort == 1 else "Senographe Pristina",
                    "PatientSex": "M" if density == 5 else "F",
                })
                _mammo_dicom(root / "images" / rel, rng, positive, SOPInstanceUID=sop, ImageLaterality=side,
                             ViewPosition=view)
    _csv(pd.DataFrame(clinical), root / "tables" / "EMBED_OpenData_clinical.csv")
    _csv(pd.DataFrame(metadata), root / "tables" / "EMBED_OpenData_metadata.csv")


# --------------------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------------------

_WRITERS: dict[str, tuple[Callable[[Path, np.random.Generator, int], None], int]] = {
    "mimic_cxr": (_mimic, len(_MIMIC_IMAGES)),
    "nih_cxr14": (_nih, len(_NIH_ROWS)),
    "padchest": (_padchest, len(_PADCHEST_ROWS)),
    "ham10000": (_ham10000, len(_HAM_ROWS)),
    "isic2019": (_isic2019, len(_ISIC2019_ROWS)),
    "isic2020": (_isic2020, len(_ISIC2020_ROWS)),
    "fitzpatrick17k": (_fitzpatrick17k, len(_FITZ_ROWS)),
    "ddi": (_ddi, len(_DDI_ROWS)),
    "cbis_ddsm": (_cbis_ddsm, 7),
    "vindr_mammo": (_vindr_mammo, sum(2 * len(s[1]) for s in _VINDR_STUDIES)),
    "cmmd": (_cmmd, sum(len(v) for v in _CMMD_IMAGES.values())),
    "embed": (_embed, sum(len(e[-1]) for e in _EMBED_EXAMS)),
    "inhouse": (_inhouse, len(_INHOUSE_ROWS)),
}
DATASETS = tuple(_WRITERS)
"""Names of the datasets :func:`write_fixture` can write (the ``scaling.data`` registry names)."""
LOADER_OPTIONS = {
    "inhouse": {"file": "export.csv", "image_column": "ImagePath", "patient_column": "PatientID",
                "label_columns": {"Cardiomegaly": "Cardiomegaly", "Pleural Effusion": "Effusion"},
                "sex_column": "PatientSex", "age_column": "PatientAge",
                "attribute_columns": {"manufacturer": "Manufacturer", "study_id": "AccessionNumber"}},
}
"""The loader options a fixture needs to be read (an export's column names; the public releases need none)."""


def write_fixture(name: str, root: str | Path, seed: int = 0, n: int | None = None) -> Path:
    """Write dataset ``name`` in its exact released layout under ``root`` and return ``root``.

    Without ``n`` the fixture is the hand-written base set (a handful of images; the loader tests assert it
    exactly). With ``n``, copies of the base set with fresh ids are appended until there are at least ``n``
    images. ``seed`` drives pixel noise and generated ids, so the same arguments write the same files.
    """
    if name not in _WRITERS:
        raise ValueError(f"no fixture for dataset {name!r}; choose one of {list(DATASETS)}")
    writer, base = _WRITERS[name]
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    copies = 1 if n is None else max(1, math.ceil(n / base))
    writer(root, np.random.default_rng(seed), copies)
    return root
