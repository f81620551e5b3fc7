"""JPEG Baseline (ISO 10918-1) encoding of drawn RGB frames, for the overlay of a lossy source.

A source that went through lossy compression already (Lossy Image Compression 01, or a
lossy transfer syntax) gains nothing from a lossless overlay: its picture is what the
endoscope's JPEG made of it. Its overlay is stored as JPEG Baseline instead, about ten
times smaller (640 x 480: about 95 KB instead of 900 KB), which is what delivery sends
to the PACS. Lossless sources keep their native overlay.

Encoding is Pillow's (libjpeg-turbo, as highdicom's own JPEG Baseline encoder) with
fixed settings, so the same pixels always give the same bytes (libjpeg-turbo's default
integer DCT is exact on every CPU): quality 95 (highdicom's choice; the picture was
compressed once already) and 4:2:2 chroma subsampling, which is what the Photometric
Interpretation YBR_FULL_422 says (PS3.5 8.2.1). The Lossy Image Compression attributes
(PS3.3 C.7.6.1.1.5) record this compression: ratio (uncompressed bytes over compressed
bytes, two decimals) and method ISO_10918_1.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGBaseline8Bit

TRANSFER_SYNTAX = JPEGBaseline8Bit
PHOTOMETRIC_INTERPRETATION = "YBR_FULL_422"
METHOD = "ISO_10918_1"
QUALITY = 95
SUBSAMPLING = 1
"""Pillow's code for 4:2:2."""


@dataclass(frozen=True, kw_only=True)
class EncodedFrames:
    """Pixel Data's value (encapsulated, PS3.5 A.4) and the compression ratio as a DS string."""

    pixel_data: bytes
    ratio: str


def encode_frames(frames: Sequence[np.ndarray]) -> EncodedFrames:
    """JPEG Baseline streams of RGB uint8 ``frames``, encapsulated one fragment per frame."""
    streams = []
    for frame in frames:
        buffer = io.BytesIO()
        Image.fromarray(frame).save(buffer, format="JPEG", quality=QUALITY, subsampling=SUBSAMPLING,
                                                optimize=False, progressive=False)
        streams.append(buffer.getvalue())
    uncompressed = sum(int(frame.nbytes) for frame in frames)
    ratio = uncompressed / max(1, sum(len(s) for s in streams))
    return EncodedFrames(pixel_data=encapsulate(streams, has_bot=len(streams) > 1), ratio=f"{ratio:.2f}")
