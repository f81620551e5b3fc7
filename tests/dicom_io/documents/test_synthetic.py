"""The test inputs themselves must be valid instances, or the output checks mean little."""

from pathlib import Path

import pytest

from .conftest import assert_dciodvfy_clean
from .synthetic import MULTIFRAME_TRUE_COLOR_SC, SECONDARY_CAPTURE, VL_ENDOSCOPIC, endoscopy_frame, make_source


@pytest.mark.parametrize(
    "sop_class, frames, grayscale",
    [(VL_ENDOSCOPIC, 1, False), (SECONDARY_CAPTURE, 1, False), (SECONDARY_CAPTURE, 1, True),
     (MULTIFRAME_TRUE_COLOR_SC, 3, False)],
)
def test_sources_pass_dciodvfy(tmp_path: Path, sop_class, frames, grayscale):
    frame = endoscopy_frame(33, 47)
    pictures = [frame[..., 0].copy() if grayscale else frame] * frames
    path = tmp_path / "source.dcm"
    make_source(pictures, sop_class=sop_class, grayscale=grayscale).save_as(path, enforce_file_format=True)
    assert_dciodvfy_clean(path)
