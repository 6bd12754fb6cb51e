"""Display windows and the brain mask.

Windows are linear ramps in HU (centre/width as in PS3.3 C.11.2.1.2, without the
``- 0.5`` / ``width - 1`` integer terms that only matter for integer output), giving
float32 in [0, 1] with MONOCHROME2 polarity (air dark), whatever the source's
photometric interpretation.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from pipeline.config import WindowsConfig

LOGGER = logging.getLogger(__name__)


def apply_window(hu: np.ndarray, center: float, width: float) -> np.ndarray:
    """Map ``[center - width/2, center + width/2]`` HU linearly onto [0, 1] (float32)."""
    if width <= 0:
        raise ValueError(f"window width must be positive, got {width}")
    low = np.float32(center - width / 2.0)
    out = np.subtract(hu, low, dtype=np.float32)
    out *= np.float32(1.0 / width)
    np.clip(out, 0.0, 1.0, out=out)
    return out


def three_windows(hu: np.ndarray, config: WindowsConfig | None = None) -> np.ndarray:
    """Brain, subdural and bone windows stacked on a new first axis: (3, ...) float32."""
    cfg = config or WindowsConfig()
    return np.stack([apply_window(hu, *cfg.brain), apply_window(hu, *cfg.subdural),
                     apply_window(hu, *cfg.bone)])


def brain_mask(hu: np.ndarray, spacing: Sequence[float],
               config: WindowsConfig | None = None) -> np.ndarray:
    """Intracranial soft tissue (skull, scalp and air removed) as a bool array like ``hu``.

    ``hu`` is (z, y, x) or (y, x); ``spacing`` is (z, y, x) in mm (the last two entries for
    a 2D slice). Steps: tissue between ``mask_low_hu`` and ``mask_high_hu``; erode by
    ``erosion_mm`` (per slice, so thick slices are not eaten) to cut the brain from scalp
    and neck at the foramina; keep the largest 3D connected component; dilate back within
    the tissue; fill holes per slice; remove bone.
    """
    cfg = config or WindowsConfig()
    vol = hu if hu.ndim == 3 else hu[None]
    sp = tuple(float(s) for s in spacing)[-2:]
    bone = vol > cfg.bone_hu
    tissue = (vol >= cfg.mask_low_hu) & (vol <= cfg.mask_high_hu)
    if not tissue.any():
        return np.zeros(hu.shape, dtype=bool)
    # Inside-the-skull test per slice: tissue not connected to the image border once the
    # skull (and its dilation by one voxel) is a wall; scalp touches air, which touches the
    # border, so it is not enclosed where the skull ring is closed.
    core = np.empty_like(tissue)
    radius = (max(1, round(cfg.erosion_mm / sp[0])), max(1, round(cfg.erosion_mm / sp[1])))
    yy, xx = np.ogrid[-radius[0]:radius[0] + 1, -radius[1]:radius[1] + 1]
    disk = (yy / radius[0]) ** 2 + (xx / radius[1]) ** 2 <= 1.0
    for z in range(vol.shape[0]):
        core[z] = ndimage.binary_erosion(tissue[z], structure=disk) if cfg.erosion_mm else tissue[z]
    labels, n = ndimage.label(core)
    if n == 0:
        return np.zeros(hu.shape, dtype=bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    largest = labels == int(np.argmax(sizes))
    mask = np.empty_like(largest)
    for z in range(vol.shape[0]):
        grown = (ndimage.binary_dilation(largest[z], structure=disk) & tissue[z]
                 if cfg.erosion_mm else largest[z])
        mask[z] = ndimage.binary_fill_holes(grown) & ~bone[z]
    return mask if hu.ndim == 3 else mask[0]
