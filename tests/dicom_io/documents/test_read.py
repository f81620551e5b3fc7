from pathlib import Path

import numpy as np
import pytest
from pydicom.pixels import convert_color_space
from pydicom.uid import (
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from gastrolens.dicom_io.documents.read import decode_rgb_frames
from gastrolens.errors import DecodeError

from .synthetic import (
    MULTIFRAME_TRUE_COLOR_SC,
    SECONDARY_CAPTURE,
    encode,
    endoscopy_frame,
    lesion_mask,
    make_source,
)

ROWS, COLS = 33, 47  # odd, and at least 32 so OpenJPEG can encode it


@pytest.fixture(scope="module")
def frame():
    return endoscopy_frame(ROWS, COLS, seed=3, lesion=lesion_mask(ROWS, COLS))


def test_rgb_single_frame_is_exact(frame):
    (decoded,) = decode_rgb_frames(make_source([frame]))
    assert decoded.dtype == np.uint8 and decoded.shape == (ROWS, COLS, 3)
    np.testing.assert_array_equal(decoded, frame)


def test_planar_configuration_1(frame):
    ds = make_source([frame])
    ds.PlanarConfiguration = 1
    ds.PixelData = np.moveaxis(frame, -1, 0).tobytes()
    np.testing.assert_array_equal(decode_rgb_frames(ds)[0], frame)


def test_multi_frame_gives_one_array_per_frame(frame):
    frames = [frame, frame[::-1].copy(), 255 - frame]
    decoded = decode_rgb_frames(make_source(frames, sop_class=MULTIFRAME_TRUE_COLOR_SC))
    assert len(decoded) == 3
    for got, want in zip(decoded, frames, strict=True):
        np.testing.assert_array_equal(got, want)


def test_ybr_full_is_converted_to_rgb(frame):
    ds = make_source([frame])
    ds.PhotometricInterpretation = "YBR_FULL"
    ds.PixelData = convert_color_space(frame, "RGB", "YBR_FULL").tobytes()
    assert np.abs(decode_rgb_frames(ds)[0].astype(int) - frame).max() <= 2


@pytest.mark.parametrize(
    "syntax",
    [JPEGLSLossless, JPEG2000Lossless, RLELossless, JPEGLossless, JPEGLosslessSV1],
    ids=lambda uid: uid.keyword,
)
def test_lossless_transfer_syntaxes_are_exact(frame, syntax):
    ds = encode(make_source([frame]), syntax)
    np.testing.assert_array_equal(decode_rgb_frames(ds)[0], frame)


@pytest.mark.parametrize("syntax", [JPEGLossless, JPEGLosslessSV1], ids=lambda uid: uid.keyword)
def test_jpeg_lossless_process_14_multi_frame_is_exact(frame, syntax):
    frames = [frame, frame[::-1].copy()]
    ds = encode(make_source(frames, sop_class=MULTIFRAME_TRUE_COLOR_SC), syntax)
    for got, want in zip(decode_rgb_frames(ds), frames, strict=True):
        np.testing.assert_array_equal(got, want)


def test_jpeg_baseline_ybr_422_comes_back_as_rgb(frame):
    ds = encode(make_source([frame]), JPEGBaseline8Bit)
    assert ds.PhotometricInterpretation == "YBR_FULL_422"
    decoded = decode_rgb_frames(ds)[0]
    assert decoded.shape == (ROWS, COLS, 3)
    assert np.abs(decoded.astype(int) - frame).mean() < 8


def test_grayscale_8_bit_is_repeated_on_three_channels(frame):
    gray = frame[..., 0].copy()
    (decoded,) = decode_rgb_frames(make_source([gray], sop_class=SECONDARY_CAPTURE, grayscale=True))
    for channel in range(3):
        np.testing.assert_array_equal(decoded[..., channel], gray)


def test_monochrome1_is_inverted(frame):
    gray = frame[..., 0].copy()
    ds = make_source([gray], sop_class=SECONDARY_CAPTURE, grayscale=True)
    ds.PhotometricInterpretation = "MONOCHROME1"
    np.testing.assert_array_equal(decode_rgb_frames(ds)[0][..., 1], 255 - gray)


def test_grayscale_12_bit_is_scaled_to_8_bits():
    gray = np.linspace(0, 4095, ROWS * COLS).reshape(ROWS, COLS).astype(np.uint16)
    ds = make_source([np.zeros((ROWS, COLS), np.uint8)], sop_class=SECONDARY_CAPTURE, grayscale=True)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelData = gray.tobytes()
    decoded = decode_rgb_frames(ds)[0]
    assert decoded[0, 0, 0] == 0 and decoded[-1, -1, 0] == 255
    assert np.all(np.diff(decoded[..., 0].ravel().astype(int)) >= 0)


def test_reads_a_file_path(tmp_path: Path, frame):
    path = tmp_path / "src.dcm"
    make_source([frame]).save_as(path, enforce_file_format=True)
    np.testing.assert_array_equal(decode_rgb_frames(path)[0], frame)


def test_missing_pixel_data_is_a_decode_error(frame):
    ds = make_source([frame])
    del ds.PixelData
    with pytest.raises(DecodeError, match="no pixel data"):
        decode_rgb_frames(ds)


def test_truncated_pixel_data_is_a_decode_error(frame):
    ds = make_source([frame])
    ds.PixelData = ds.PixelData[:100]
    with pytest.raises(DecodeError, match="cannot decode"):
        decode_rgb_frames(ds)


def test_not_dicom_is_a_decode_error(tmp_path: Path):
    path = tmp_path / "junk.dcm"
    path.write_bytes(b"not dicom at all")
    with pytest.raises(DecodeError):
        decode_rgb_frames(path)


def test_absurd_geometry_is_refused_before_decoding(frame):
    """65535 x 65535 claimed in a few kilobytes: a DecodeError, nothing allocated."""
    ds = make_source([frame])
    ds.Rows = ds.Columns = 65535
    with pytest.raises(DecodeError, match="cannot decode pixel data: .*65535"):
        decode_rgb_frames(ds)
