from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from streaming.frame import Frame


def test_frame_is_frozen_and_pixels_read_only_without_copy() -> None:
    px = np.zeros((4, 5), np.uint8)
    f = Frame(seq=0, device="Image", pixels=px, spacing_mm=(0.2, 0.3))
    assert np.shares_memory(f.pixels, px)  # no copy on the hot path
    with pytest.raises(ValueError, match="read-only"):
        f.pixels[0, 0] = 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        f.seq = 1  # type: ignore[misc]
    assert (f.height, f.width, f.components) == (4, 5, 1)
    assert f.image_to_reference.shape == (4, 4)
    with pytest.raises(TypeError):
        f.metadata["x"] = "y"  # type: ignore[index]


def test_frame_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="2-D or 3-D"):
        Frame(seq=0, device="d", pixels=np.zeros(3))
    with pytest.raises(ValueError, match="4x4"):
        Frame(seq=0, device="d", pixels=np.zeros((2, 2)), image_to_reference=np.eye(3))
