"""DICOM → float32 pixel array in display orientation (higher = brighter), through pydicom.

Mammography and CR files store raw detector values that are only meaningful after the DICOM display pipeline
(PS3.4 Annex N): the Modality LUT (Rescale Slope/Intercept or a Modality LUT Sequence), then the VOI LUT (a VOI LUT
Sequence or Window Center/Width), then the photometric interpretation — ``MONOCHROME1`` means *low values are
bright* (common for CR, e.g. the NEMA chest radiograph ``RG1_UNCR.dcm``) and must be inverted, otherwise a model
sees negatives of half its training images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi_lut, convert_color_space

from scaling.data.table import DataError

MONOCHROME = ("MONOCHROME1", "MONOCHROME2")


def read_dicom(path: str | Path, voi: bool = True) -> np.ndarray:
    """Read a single-frame DICOM image as float32, higher = brighter.

    Grayscale images come back as (rows, columns) after the Modality LUT, the VOI LUT / windowing (when the file
    has one and ``voi`` is true; the first of several windows) and MONOCHROME1 inversion within the image's value
    range. Colour images (RGB, YBR_*) come back as (rows, columns, 3) RGB. Any failure — not DICOM, no pixel data,
    a transfer syntax without an installed decoder, several frames — is a DataError naming the file.
    """
    path = Path(path)
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: not a readable DICOM file: {e}") from e
    if "PixelData" not in ds:
        raise DataError(f"{path}: DICOM file has no pixel data")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise DataError(f"{path}: {frames} frames; only single-frame images are supported")
    try:
        arr = ds.pixel_array
    except Exception as e:  # pydicom raises RuntimeError/ValueError/NotImplementedError per decoder
        syntax = ds.file_meta.get("TransferSyntaxUID", "unknown transfer syntax")
        raise DataError(f"{path}: cannot decode pixel data ({syntax}): {e}") from e
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    if photometric not in MONOCHROME:
        if photometric.startswith("YBR"):
            arr = convert_color_space(arr, photometric, "RGB")
        return np.asarray(arr, dtype=np.float32)
    try:
        out = apply_modality_lut(arr, ds)
        if voi:
            out = apply_voi_lut(out, ds)
    except ValueError as e:
        raise DataError(f"{path}: invalid Modality/VOI LUT attributes: {e}") from e
    out = np.asarray(out, dtype=np.float32)
    if photometric == "MONOCHROME1":
        out = out.max() + out.min() - out
    return out
