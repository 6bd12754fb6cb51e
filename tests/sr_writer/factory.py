"""Synthetic inputs for the result writers: a small head CT series, its Volume, and Findings
with a known mask (a subdural crescent and an intraparenchymal blob). No model is involved."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from pydicom import dcmread
from pydicom.dataset import Dataset
from scipy import ndimage

from pipeline.config import VolumeConfig
from pipeline.findings import (
    LABELS,
    SUBTYPE_CODE,
    SUBTYPES,
    Findings,
    LabelFinding,
    Lesion,
    ModelIdentity,
)
from pipeline.volume import Volume, build_volume
from tests.pipeline.ctfactory import SeriesSpec, write_series

DEMO_MODEL = ModelIdentity(name="ich-demo", version="0.1.0", sha256="5e" * 32, demo=True)


def head_hu(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """An elliptical head, 170 x 200 mm: scalp, skull, brain with a faint gradient."""
    r = np.hypot(x / 85.0, y / 100.0)
    out = np.full(np.broadcast(x, y, z).shape, -1000.0)
    out = np.where(r < 1.04, 20.0, out)
    out = np.where(r < 1.0, 1100.0, out)
    out = np.where(r < 0.92, 32.0 + 0.02 * y, out)
    return out


def head_spec(**overrides: object) -> SeriesSpec:
    """64 x 64 x 12, 3.2 mm pixels, 5 mm slices, centred on the head."""
    base = SeriesSpec(n_slices=12, rows=64, cols=64, pixel_spacing=(3.2, 3.2),
                      slice_spacing=5.0, thickness=5.0, origin=(-100.8, -100.8, 0.0),
                      hu_fn=head_hu, series_description="Head 5mm", series_number=3)
    return replace(base, **overrides)  # type: ignore[arg-type]


def write_head_series(directory: Path, **overrides: object) -> tuple[list[Path], SeriesSpec]:
    """Write the series; returns the files and the spec."""
    spec = head_spec(**overrides)
    return write_series(directory, spec), spec


def headers(files: Sequence[Path]) -> list[Dataset]:
    """The headers of ``files`` as the node passes them (no pixels)."""
    return [dcmread(f, stop_before_pixels=True) for f in files]


def reencode(ds: Dataset) -> Dataset:
    """``ds`` written and read back, so that its values are decoded from bytes."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    buf.seek(0)
    return dcmread(buf)


def voxel_centres(image: sitk.Image) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Patient coordinates (LPS, mm) of every voxel centre, each (z, y, x)."""
    nx, ny, nz = image.GetSize()
    k, j, i = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    idx = np.stack([i, j, k], axis=-1).astype(float)
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    spacing = np.asarray(image.GetSpacing(), dtype=float)
    pts = np.asarray(image.GetOrigin(), dtype=float) + (idx * spacing) @ direction.T
    return pts[..., 0], pts[..., 1], pts[..., 2]


def bleed_mask(volume: Volume) -> np.ndarray:
    """A subdural crescent over the left convexity and an intraparenchymal blob on the right."""
    x, y, z = voxel_centres(volume.image)
    r = np.hypot(x / 85.0, y / 100.0)
    mask = np.zeros(volume.hu.shape, dtype=np.uint8)
    crescent = (r > 0.78) & (r < 0.92) & (x > 15.0) & (y < 40.0) & (z >= 12.0) & (z <= 42.0)
    mask[crescent] = SUBTYPE_CODE["subdural"]
    blob = np.hypot(np.hypot(x + 30.0, y - 10.0), z - 30.0) < 13.0
    mask[blob] = SUBTYPE_CODE["intraparenchymal"]
    return mask


def lesions_of(mask: np.ndarray, image: sitk.Image) -> list[Lesion]:
    """Connected components per subtype, as the segmenter reports them."""
    x, y, z = voxel_centres(image)
    voxel_ml = float(np.prod(image.GetSpacing())) / 1000.0
    out = []
    for subtype in SUBTYPES:
        components, n = ndimage.label(mask == SUBTYPE_CODE[subtype])
        for label in range(1, n + 1):
            region = components == label
            per_slice = region.reshape(region.shape[0], -1).sum(axis=1)
            zs = np.nonzero(per_slice)[0]
            out.append(Lesion(
                subtype=subtype, code=SUBTYPE_CODE[subtype],
                volume_ml=float(region.sum()) * voxel_ml,
                centroid_mm=(float(x[region].mean()), float(y[region].mean()),
                             float(z[region].mean())),
                extent_mm=tuple(float(a[region].max() - a[region].min())  # type: ignore[arg-type]
                                for a in (x, y, z)),
                slices=(int(zs[0]), int(zs[-1])), largest_slice=int(np.argmax(per_slice)),
                voxels=int(region.sum())))
    return out


def findings_for(volume: Volume, mask: np.ndarray | None,
                 model: ModelIdentity = DEMO_MODEL, warnings: Sequence[str] = ()) -> Findings:
    """Findings with probabilities that agree with ``mask`` (None: a negative study)."""
    if mask is None:
        mask = np.zeros(volume.hu.shape, dtype=np.uint8)
    present = {s for s in SUBTYPES if np.any(mask == SUBTYPE_CODE[s])}
    probs = {s: (0.91 if s in present else 0.03) for s in SUBTYPES}
    probs["any"] = 0.97 if present else 0.04
    labels = {name: LabelFinding(probability=probs[name], positive=probs[name] >= 0.5,
                                 threshold=0.5) for name in LABELS}
    return Findings(labels=labels,
                    slice_probabilities=np.zeros((volume.hu.shape[0], 6), dtype=np.float32),
                    mask=mask, lesions=lesions_of(mask, volume.image), model=model,
                    warnings=list(warnings))


def with_blood(volume: Volume, mask: np.ndarray) -> Volume:
    """A copy of ``volume`` whose HU are 70 (fresh blood) under the mask, so previews show it."""
    hu = volume.hu.copy()
    hu[mask > 0] = 70.0
    return replace(volume, hu=hu)


def positive_case(directory: Path, **overrides: object
                  ) -> tuple[list[Dataset], Volume, Findings]:
    """Series on disk, its headers, the volume (with blood) and positive findings."""
    files, _ = write_head_series(directory, **overrides)
    volume = build_volume(files, VolumeConfig())
    mask = bleed_mask(volume)
    return headers(files), with_blood(volume, mask), findings_for(volume, mask)
