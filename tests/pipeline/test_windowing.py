"""Display windows and the brain mask on a synthetic head."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pipeline.config import WindowsConfig
from pipeline.windowing import apply_window, brain_mask, three_windows


def test_apply_window_ramp() -> None:
    hu = np.array([-1000.0, 0.0, 20.0, 40.0, 60.0, 80.0, 3000.0])
    out = apply_window(hu, 40.0, 80.0)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0])
    with pytest.raises(ValueError, match="positive"):
        apply_window(hu, 40.0, 0.0)


@settings(max_examples=30, deadline=None)
@given(arrays(np.float32, (3, 5), elements=st.floats(-3000, 3000, width=32)),
       st.floats(-500, 500), st.floats(1, 4000))
def test_window_is_bounded_and_monotone(hu: np.ndarray, center: float, width: float) -> None:
    out = apply_window(hu, center, width)
    assert out.shape == hu.shape and out.min() >= 0.0 and out.max() <= 1.0
    order = np.argsort(hu.ravel())
    assert np.all(np.diff(out.ravel()[order]) >= 0)


def test_three_windows_order_and_config() -> None:
    hu = np.full((2, 4, 4), 80.0, dtype=np.float32)
    stack = three_windows(hu)
    assert stack.shape == (3, 2, 4, 4) and stack.dtype == np.float32
    np.testing.assert_allclose(stack[:, 0, 0, 0], [1.0, 0.5, (80 - (600 - 1400)) / 2800],
                               rtol=1e-6)
    custom = three_windows(hu, WindowsConfig(brain=(80.0, 10.0)))
    assert custom[0, 0, 0, 0] == pytest.approx(0.5)


def synthetic_head(shape: tuple[int, int, int] = (24, 72, 72),
                   spacing: tuple[float, float, float] = (3.0, 1.0, 1.0)
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Air, a scalp, a 3 mm skull, brain with a bleed and a ventricle, and a neck."""
    z, y, x = np.indices(shape).astype(float)
    cz, cy, cx = (s / 2 for s in shape)
    r = np.sqrt(((z - cz) * spacing[0] / 30.0) ** 2 + ((y - cy) / 32.0) ** 2
                + ((x - cx) / 30.0) ** 2)
    hu = np.full(shape, -1000.0, dtype=np.float32)
    hu[r < 1.0] = 40.0  # scalp
    inner = np.sqrt(((z - cz) * spacing[0] / 26.0) ** 2 + ((y - cy) / 28.0) ** 2
                    + ((x - cx) / 26.0) ** 2)
    hu[inner < 1.0] = 1000.0  # skull
    brain_r = np.sqrt(((z - cz) * spacing[0] / 23.0) ** 2 + ((y - cy) / 25.0) ** 2
                      + ((x - cx) / 23.0) ** 2)
    brain = brain_r < 1.0
    hu[brain] = 32.0
    bleed = brain & (np.hypot(y - cy - 10, x - cx + 8) < 5) & (np.abs(z - cz) < 3)
    hu[bleed] = 75.0
    hu[brain & (np.hypot(y - cy, x - cx) < 4) & (np.abs(z - cz) < 4)] = 5.0  # ventricle
    neck = (z < cz - 5) & (np.hypot(y - cy - 8, x - cx) < 12) & ~(inner < 1.0)
    hu[neck] = 45.0
    return hu, brain, bleed


def test_brain_mask_removes_skull_scalp_and_neck() -> None:
    hu, brain, bleed = synthetic_head()
    mask = brain_mask(hu, (3.0, 1.0, 1.0))
    assert mask.dtype == bool and mask.shape == hu.shape
    dice = 2 * (mask & brain).sum() / (mask.sum() + brain.sum())
    assert dice > 0.95
    assert not mask[hu > 300].any()
    assert mask[bleed].all()
    scalp_or_neck = (hu > 0) & (hu < 100) & ~brain
    assert (mask & scalp_or_neck).sum() < 0.01 * scalp_or_neck.sum()


def test_brain_mask_2d_and_empty() -> None:
    hu, brain, _ = synthetic_head()
    k = hu.shape[0] // 2
    m2 = brain_mask(hu[k], (1.0, 1.0))
    assert m2.shape == hu[k].shape and (2 * (m2 & brain[k]).sum()
                                        / (m2.sum() + brain[k].sum())) > 0.95
    assert not brain_mask(np.full((3, 8, 8), -1000.0), (5.0, 1.0, 1.0)).any()
