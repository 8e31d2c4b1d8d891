"""DICOM decoding: Modality LUT, VOI windowing, MONOCHROME1 inversion, 16-bit, and errors that name the file."""

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from scaling.data.dicom import read_dicom
from dataset_fixtures import write_dicom
from scaling.data.table import DataError

RAW = np.array([[0, 100, 1000], [5000, 30000, 65535]], dtype=np.uint16)


def test_16_bit_monochrome2_keeps_the_full_range(tmp_path):
    write_dicom(tmp_path / "a.dcm", RAW)
    out = read_dicom(tmp_path / "a.dcm")
    assert out.dtype == np.float32 and out.shape == (2, 3)
    np.testing.assert_array_equal(out, RAW.astype(np.float32))


def test_rescale_slope_intercept_is_applied(tmp_path):
    write_dicom(tmp_path / "a.dcm", RAW, rescale=(2.0, -100.0))
    np.testing.assert_array_equal(read_dicom(tmp_path / "a.dcm"), RAW.astype(np.float32) * 2 - 100)


def test_monochrome1_is_inverted_so_higher_is_brighter(tmp_path):
    raw = np.array([[0, 100], [200, 300]], dtype=np.uint16)
    write_dicom(tmp_path / "m1.dcm", raw, photometric="MONOCHROME1")
    np.testing.assert_array_equal(read_dicom(tmp_path / "m1.dcm"), [[300, 200], [100, 0]])


def test_window_center_width_linear(tmp_path):
    write_dicom(tmp_path / "w.dcm", RAW, window=(1000.0, 200.0))
    out = read_dicom(tmp_path / "w.dcm")
    # DICOM PS3.3 C.11.2.1.2.1 LINEAR: below c-0.5-(w-1)/2 -> ymin, above -> ymax; 16 bits stored -> [0, 65535].
    assert out[0, 0] == 0.0 and out[0, 1] == 0.0
    assert out[1, 0] == 65535.0 and out[1, 2] == 65535.0
    assert out[0, 2] == pytest.approx(((1000 - 999.5) / 199 + 0.5) * 65535, abs=1e-2)
    np.testing.assert_array_equal(read_dicom(tmp_path / "w.dcm", voi=False), RAW.astype(np.float32))


def test_monochrome1_with_window_inverts_after_windowing(tmp_path):
    raw = np.array([[800, 1000, 1200]], dtype=np.uint16)
    write_dicom(tmp_path / "m1w.dcm", raw, photometric="MONOCHROME1", window=(1000.0, 200.0))
    out = read_dicom(tmp_path / "m1w.dcm")
    windowed = np.array([0.0, ((1000 - 999.5) / 199 + 0.5) * 65535, 65535.0])
    np.testing.assert_allclose(out[0], windowed.max() + windowed.min() - windowed, atol=1e-2)
    assert out[0, 0] > out[0, 1] > out[0, 2]


def test_pydicom_ct_small_rescale():
    path = get_testdata_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    expected = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(read_dicom(path), expected)  # CT_small has no window: Hounsfield units
    assert read_dicom(path).shape == (128, 128)


def test_pydicom_mr_small_window():
    path = get_testdata_file("MR_small.dcm")
    ds = pydicom.dcmread(path)
    assert (float(ds.WindowCenter), float(ds.WindowWidth), ds.PixelRepresentation) == (600.0, 1600.0, 1)
    # LINEAR window into the signed 16-bit output range [-32768, 32767], computed by hand.
    x = ds.pixel_array.astype(np.float64)
    expected = np.clip(((x - 599.5) / 1599 + 0.5) * 65535 - 32768, -32768, 32767)
    out = read_dicom(path)
    assert out.shape == (64, 64) and out.dtype == np.float32
    np.testing.assert_allclose(out, expected, atol=0.05)


def test_pydicom_monochrome1_cr_is_inverted():
    path = Path(get_testdata_file("CT_small.dcm")).parent / "dicomdirtests/77654033/CR1/6154"
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    raw = ds.pixel_array.astype(np.float64)
    hu = raw * 0.684 + 200  # its Rescale Slope / Intercept
    np.testing.assert_allclose(read_dicom(path, voi=False), hu.max() + hu.min() - hu, atol=1e-2)
    out = read_dicom(path)
    assert out.shape == raw.shape and out[np.unravel_index(raw.argmin(), raw.shape)] == out.max()


def test_errors_name_the_file(tmp_path):
    (tmp_path / "text.dcm").write_text("this is not a DICOM file")
    with pytest.raises(DataError, match=r"text\.dcm: not a readable DICOM file"):
        read_dicom(tmp_path / "text.dcm")
    write_dicom(tmp_path / "cut.dcm", np.zeros((64, 48), dtype=np.uint16))
    data = (tmp_path / "cut.dcm").read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[: len(data) - 3000])  # truncated pixel data
    with pytest.raises(DataError, match=r"cut\.dcm"):
        read_dicom(tmp_path / "cut.dcm")
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    del ds.PixelData
    ds.save_as(tmp_path / "nopix.dcm")
    with pytest.raises(DataError, match=r"nopix\.dcm: DICOM file has no pixel data"):
        read_dicom(tmp_path / "nopix.dcm")
    with pytest.raises(DataError, match=r"missing\.dcm"):
        read_dicom(tmp_path / "missing.dcm")


# --- Colour and real files from pydicom-data (the test extra) ---------------------------------------------------

def _rgb_reference() -> np.ndarray:
    """SC_rgb.dcm: the uncompressed RGB original of the colour test images (red, green, blue, ... bands)."""
    return pydicom.dcmread(get_testdata_file("SC_rgb.dcm")).pixel_array.astype(np.float32)


@pytest.mark.parametrize("name,tol", [("SC_rgb_jpeg_dcmtk.dcm", 3.0),             # YBR_FULL, JPEG baseline
                                      ("SC_ybr_full_uncompressed.dcm", 2.0),      # YBR_FULL, native
                                      ("SC_ybr_full_422_uncompressed.dcm", 2.0)])  # YBR_FULL_422, native
def test_ybr_images_come_back_as_the_rgb_original(name, tol):
    out = read_dicom(get_testdata_file(name))
    assert out.shape == (100, 100, 3)
    # the top band is pure red in the RGB original; a second YBR->RGB conversion turned it into (75, 255, 27)
    np.testing.assert_allclose(out[5, 5], [255, 0, 0], atol=tol)
    assert np.abs(out - _rgb_reference()).mean() < tol


def test_ybr_rct_jpeg2000_is_lossless_rgb():
    lossless = read_dicom(get_testdata_file("US1_J2KR.dcm"))  # YBR_RCT, JPEG 2000 lossless
    original = pydicom.dcmread(get_testdata_file("US1_UNCR.dcm")).pixel_array.astype(np.float32)  # its RGB source
    assert lossless.shape == original.shape == (480, 640, 3)
    np.testing.assert_array_equal(lossless, original)


def test_undecodable_colour_file_is_a_data_error_naming_it():
    with pytest.raises(DataError, match=r"GDCMJ2K_TextGBR\.dcm: cannot decode pixel data .*YBR_RCT"):
        read_dicom(get_testdata_file("GDCMJ2K_TextGBR.dcm"))


def test_palette_colour_is_mapped_through_the_lookup_tables():
    path = get_testdata_file("OBXXXX1A.dcm")
    ds = pydicom.dcmread(path)
    index = ds.pixel_array.astype(np.int64)
    out = read_dicom(path)
    assert out.shape == index.shape + (3,)
    # PS3.3 C.7.6.3.1.5 by hand: descriptor = (entries, first mapped value, bits); entries 0 means 65536
    for c, colour in enumerate(("Red", "Green", "Blue")):
        entries, first, bits = ds[f"{colour}PaletteColorLookupTableDescriptor"].value
        lut = np.frombuffer(ds[f"{colour}PaletteColorLookupTableData"].value, dtype="<u2" if bits == 16 else "u1")
        lut = lut[: entries or 65536].astype(np.float32)
        expected = lut[np.clip(index - first, 0, len(lut) - 1)]
        np.testing.assert_array_equal(out[..., c], expected)
    assert len(np.unique(out.reshape(-1, 3), axis=0)) > 10  # colours, not grey indices


def test_dicom_without_suffix_is_recognised_by_its_magic(tmp_path):
    from scaling.data.images import decode, probe

    for name, channels in (("SC_rgb.dcm", 3), ("CT_small.dcm", 1)):
        bare = tmp_path / name.replace(".dcm", "")  # e.g. .../CR1/6154 or a UID as the file name
        bare.write_bytes(Path(get_testdata_file(name)).read_bytes())
        assert probe(bare)[0] == channels
        np.testing.assert_array_equal(decode(bare, 32, channels), decode(get_testdata_file(name), 32, channels))
    rgb = decode(tmp_path / "SC_rgb", None, 3)
    # colour DICOMs keep their hues: one scale for all planes (8 bits stored -> /255), no per-plane stretch
    np.testing.assert_allclose(rgb[:, 5, 5], [1.0, 0.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(rgb.transpose(1, 2, 0), _rgb_reference() / 255.0, atol=1e-6)
