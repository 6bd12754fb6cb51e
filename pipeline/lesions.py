"""Connected components of a subtype label map -> a table of :class:`Lesion`.

Components are found per subtype in 3D with 26-connectivity (``scipy.ndimage.label``
with a full 3x3x3 structure). Volumes use the voxel volume from the image spacing;
centroids are mapped to patient coordinates (LPS, mm) with the SimpleITK image's
``TransformContinuousIndexToPhysicalPoint``, so gantry-tilt-corrected or oblique
volumes report true positions. Components below ``min_volume_ml`` are removed from the
mask and not reported. :func:`one_extra_axial_subtype` gives each epidural/subdural
collection a single subtype before the table is made.
"""

from __future__ import annotations

import logging

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from pipeline.findings import SUBTYPE_CODE, Lesion

LOGGER = logging.getLogger(__name__)

_STRUCTURE_26 = np.ones((3, 3, 3), dtype=bool)


def voxel_volume_ml(image: sitk.Image) -> float:
    """Volume of one voxel in mL (spacing in mm; 1 mL = 1000 mm^3)."""
    sx, sy, sz = image.GetSpacing()
    return float(sx * sy * sz) / 1000.0


def _box(marked: np.ndarray) -> tuple[slice, ...]:
    """Bounding box of the True voxels of boolean ``marked`` (at least one): the work on a
    mask is done inside it, since most of a head CT is unmarked."""
    box = ndimage.find_objects(marked.view(np.uint8))[0]
    assert box is not None
    return tuple(box)


def one_extra_axial_subtype(mask: np.ndarray) -> np.ndarray:
    """``mask`` with every connected collection of epidural and subdural voxels given the
    one of the two codes that most of its voxels carry (ties: epidural).

    A segmenter that decides voxel by voxel can split one convexity collection into an
    epidural and a subdural part; a collection is one or the other (the lens or crescent
    shape, the sutures it crosses or not), so the minority part is relabelled. Other
    subtypes are left alone: intraventricular extension of a parenchymal bleed is two
    subtypes in one connected region and is reported as such.
    """
    epi, sub = SUBTYPE_CODE["epidural"], SUBTYPE_CODE["subdural"]
    extra = (mask == epi) | (mask == sub)
    if not extra.any():
        return mask
    box = _box(extra)
    part, inside = mask[box], extra[box]
    labels, n = ndimage.label(inside, structure=_STRUCTURE_26)
    flat = labels.ravel()
    n_epi = np.bincount(flat, weights=(part == epi).ravel(), minlength=n + 1)
    n_sub = np.bincount(flat, weights=(part == sub).ravel(), minlength=n + 1)
    winner = np.where(n_sub > n_epi, sub, epi).astype(mask.dtype)
    out = mask.copy()
    out[box][inside] = winner[labels[inside]]
    return out


def largest_components(mask: np.ndarray, codes: list[int]) -> tuple[np.ndarray, int]:
    """Voxels of the largest 26-connected component of each code in ``codes`` (same order),
    and of the largest component of all marked voxels (any nonzero code)."""
    def largest(binary: np.ndarray) -> int:
        if not binary.any():
            return 0
        labels, n = ndimage.label(binary, structure=_STRUCTURE_26)
        return int(np.bincount(labels.ravel(), minlength=n + 1)[1:].max())

    marked = mask != 0
    if not marked.any():
        return np.zeros(len(codes), dtype=np.int64), 0
    box = _box(marked)
    sub = mask[box]
    return np.array([largest(sub == c) for c in codes], dtype=np.int64), largest(marked[box])


def find_lesions(mask: np.ndarray, image: sitk.Image, min_volume_ml: float = 0.05
                 ) -> tuple[list[Lesion], np.ndarray]:
    """Lesions of a (z, y, x) uint8 subtype map on the grid of ``image``.

    Returns the lesions (by subtype code, then largest first) and a copy of ``mask`` with
    the components below ``min_volume_ml`` set to 0. Raises ValueError when the mask and
    image grids differ or the mask holds codes outside 0..5.
    """
    size_xyz = image.GetSize()
    if mask.shape != (size_xyz[2], size_xyz[1], size_xyz[0]):
        raise ValueError(f"mask shape {mask.shape} differs from the image grid "
                         f"{(size_xyz[2], size_xyz[1], size_xyz[0])} (z, y, x)")
    histogram = np.bincount(mask.ravel(), minlength=256) if mask.dtype == np.uint8 else \
        np.bincount(np.asarray(mask, dtype=np.int64).ravel())
    codes = set(np.flatnonzero(histogram).tolist()) - {0}
    unknown = codes - set(SUBTYPE_CODE.values())
    if unknown:
        raise ValueError(f"mask holds codes {sorted(unknown)}; only 0..5 are subtype codes")
    spacing = image.GetSpacing()  # x, y, z
    vox_ml = voxel_volume_ml(image)
    min_voxels = min_volume_ml / vox_ml if vox_ml > 0 else 0.0
    cleaned = mask.copy()
    lesions: list[Lesion] = []
    if not codes:
        return lesions, cleaned
    crop = _box(mask != 0)
    offset = (crop[0].start, crop[1].start, crop[2].start)
    sub = mask[crop]
    view = cleaned[crop]
    for subtype, code in SUBTYPE_CODE.items():
        if code not in codes:
            continue
        labels, n = ndimage.label(sub == code, structure=_STRUCTURE_26)
        if n == 0:
            continue
        objects = ndimage.find_objects(labels)
        counts = np.bincount(labels.ravel(), minlength=n + 1)
        found: list[Lesion] = []
        for k, box in enumerate(objects, start=1):
            if box is None:
                continue
            voxels = int(counts[k])
            if voxels < min_voxels:
                view[box][labels[box] == k] = 0
                continue
            comp = labels[box] == k
            zz, yy, xx = np.nonzero(comp)
            z0, y0, x0 = (b.start + o for b, o in zip(box, offset, strict=True))
            cz, cy, cx = float(zz.mean()) + z0, float(yy.mean()) + y0, float(xx.mean()) + x0
            centroid = image.TransformContinuousIndexToPhysicalPoint((cx, cy, cz))
            per_slice = comp.sum(axis=(1, 2))
            extent = tuple(float((b.stop - b.start) * s)
                           for b, s in zip((box[2], box[1], box[0]), spacing, strict=True))
            found.append(Lesion(
                subtype=subtype, code=code, volume_ml=voxels * vox_ml,
                centroid_mm=(float(centroid[0]), float(centroid[1]), float(centroid[2])),
                extent_mm=(extent[0], extent[1], extent[2]),
                slices=(int(z0), int(z0 + box[0].stop - box[0].start - 1)),
                largest_slice=int(z0 + int(np.argmax(per_slice))),
                voxels=voxels))
        found.sort(key=lambda les: -les.volume_ml)
        lesions.extend(found)
    LOGGER.debug("%d lesion(s) kept", len(lesions))
    return lesions, cleaned
