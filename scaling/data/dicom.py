"""DICOM → float32 pixel array in display orientation (higher = brighter), through pydicom.

Mammography and CR files store raw detector values that are only meaningful after the DICOM display pipeline
(PS3.4 Annex N): the Modality LUT (Rescale Slope/Intercept or a Modality LUT Sequence), then the VOI LUT (a VOI LUT
Sequence or Window Center/Width), then the photometric interpretation — ``MONOCHROME1`` means *low values are
bright* (common for CR, e.g. the NEMA chest radiograph ``RG1_UNCR.dcm``) and must be inverted, otherwise a model
sees negatives of half its training images.

Colour: pydicom 3's ``pixel_array`` already returns RGB for every YCbCr photometric interpretation (``YBR_FULL``,
``YBR_FULL_422``, and ``YBR_ICT``/``YBR_RCT``, which the JPEG 2000 decoders convert), so no second conversion is
applied (converting again turns a pure red pixel into (75, 255, 27)). ``PALETTE COLOR`` images store indices into
the file's red/green/blue lookup tables (PS3.3 C.7.6.3.1.5) and are mapped through them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, pixel_array

from scaling.data.table import DataError

MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "PALETTE COLOR")
"""Photometric interpretations returned as RGB (``pixel_array`` converts the YBR ones itself)."""
DICOM_MAGIC_OFFSET = 128
"""A DICOM Part 10 file has a 128-byte preamble followed by ``DICM`` (PS3.10 section 7.1)."""


def is_dicom(path: str | Path) -> bool:
    """True when ``path`` is a DICOM Part 10 file, by its ``DICM`` magic (many archives store DICOM files without a
    ``.dcm`` suffix, e.g. ``.../CR1/6154`` or a SOP instance UID as the file name)."""
    try:
        with open(path, "rb") as f:
            f.seek(DICOM_MAGIC_OFFSET)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def dicom_kind(path: str | Path) -> tuple[int, int]:
    """(channels, bits stored) from a DICOM header only (no pixel data is read): 3 for colour, 1 for grey."""
    path = Path(path)
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: not a readable DICOM file: {e}") from e
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    try:  # header values are parsed when read: a malformed one raises here
        bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)) or 16)
        if photometric == "PALETTE COLOR":  # the lookup tables, not the indices, set the output depth
            desc = ds.get("RedPaletteColorLookupTableDescriptor")
            bits = int(desc[2]) if desc is not None and len(desc) == 3 else 16
    except (TypeError, ValueError) as e:
        raise DataError(f"{path}: invalid BitsStored/palette descriptor in the DICOM header: {e}") from e
    return (1 if photometric in MONOCHROME else 3), bits


def read_dicom(path: str | Path, voi: bool = True) -> np.ndarray:
    """Read a single-frame DICOM image as float32, higher = brighter.

    Grayscale images come back as (rows, columns) after the Modality LUT, the VOI LUT / windowing (when the file
    has one and ``voi`` is true; the first of several windows) and MONOCHROME1 inversion within the image's value
    range. Colour images (RGB, YBR_*) come back as (rows, columns, 3) RGB. Any failure — not DICOM, no pixel data,
    a transfer syntax without an installed decoder, several frames, a malformed header value — is a DataError naming
    the file.
    """
    path = Path(path)
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: not a readable DICOM file: {e}") from e
    if "PixelData" not in ds:
        raise DataError(f"{path}: DICOM file has no pixel data")
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError) as e:
        raise DataError(f"{path}: invalid NumberOfFrames in the DICOM header: {e}") from e
    if frames != 1:
        raise DataError(f"{path}: {frames} frames; only single-frame images are supported")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    if photometric not in MONOCHROME + COLOUR:
        raise DataError(f"{path}: photometric interpretation {photometric!r} is not supported "
                        f"(supported: {list(MONOCHROME + COLOUR)})")
    try:
        # as_rgb: YBR_* comes back as RGB, converted once by pydicom (and by the JPEG 2000 decoder for ICT/RCT).
        arr = pixel_array(ds, as_rgb=True)
        if photometric == "PALETTE COLOR":
            arr = apply_color_lut(arr, ds)
    except Exception as e:  # pydicom raises RuntimeError/ValueError/NotImplementedError per decoder
        syntax = ds.file_meta.get("TransferSyntaxUID", "unknown transfer syntax")
        raise DataError(f"{path}: cannot decode pixel data ({syntax}, {photometric}): "
                        f"{type(e).__name__}: {e}") from e
    if photometric not in MONOCHROME:
        return np.asarray(arr, dtype=np.float32)
    try:
        out = apply_modality_lut(arr, ds)
        if voi:
            out = apply_voi_lut(out, ds)
    except (TypeError, ValueError) as e:  # a non-numeric RescaleSlope reaches numpy as text: UFuncTypeError
        raise DataError(f"{path}: invalid Modality/VOI LUT attributes: {type(e).__name__}: {e}") from e
    out = np.asarray(out, dtype=np.float32)
    if photometric == "MONOCHROME1":
        out = out.max() + out.min() - out
    return out
