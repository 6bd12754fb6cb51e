"""Synthetic head-CT phantom with the five hemorrhage subtypes and exact labels.

A study is an adult head (skull with diploe, skull base and sinuses, scalp, grey and
white matter with sulci, ventricles, cisterns, falx and tentorium) in a random pose,
scanned with a random protocol and scanner profile, optionally carrying epidural,
intraparenchymal, intraventricular, subarachnoid and subdural hemorrhages of requested
sizes, plus hyperdense mimics in every study (calcified choroid plexus / pineal / falx /
basal ganglia, dense venous sinus and dura, beam-hardening streaks, skull-base partial
volume). Nothing but the lesions themselves differs between positive and negative
studies: the random streams for anatomy, pose, scanner, noise and lesions are separate.

Conventions
    * Arrays are (z, y, x) = (slice, row, column); slice ``k`` is at patient
      ``z = origin[2] + k * spacing_mm[0]`` (ascending, inferior to superior).
    * Coordinates are the DICOM patient frame LPS (+x patient left, +y posterior, +z
      superior). ``origin`` is the LPS (x, y, z) of voxel [0, 0, 0] (the
      ImagePositionPatient of the first slice); ``direction`` is the 3x3 matrix (row
      major) whose columns are the directions of the column, row and slice axes: the
      identity for these axial scans. NIfTI files are written with SimpleITK from this
      LPS geometry (the file's sform/qform are RAS as NIfTI requires; SimpleITK reads
      them back as LPS, nibabel shows the RAS affine ``diag(-dx, -dy, dz)``).
    * ``labels`` codes: 0 none, 1 epidural, 2 intraparenchymal, 3 intraventricular,
      4 subarachnoid, 5 subdural. A voxel is labelled when its centre lies inside the
      painted blood (the HU carry partial volume around it). Where painted regions overlap
      the voxel takes the highest priority: epidural > subdural > intraventricular >
      intraparenchymal > subarachnoid. Oedema around intraparenchymal blood is not labelled.
    * ``slice_labels`` is (z, 6) in RSNA order [any, epidural, intraparenchymal,
      intraventricular, subarachnoid, subdural]; a slice is positive for a subtype iff its
      label map has at least ``MIN_VOXELS_PER_SLICE`` (1) voxel of it.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk

from pipeline.phantom_anatomy import (
    T_MIXED,
    TISSUE_NAMES,
    HeadModel,
    Pose,
    add_noise,
    build_head,
    draw_pose,
    head_z_extent,
    render,
    streaks,
)
from pipeline.phantom_dicom import (
    STUDY_DESCRIPTION,
    ScannerProfile,
    StudyIdentity,
    draw_identity,
    draw_scanner,
    write_series,
)
from pipeline.phantom_geometry import Grid
from pipeline.phantom_lesions import (
    PAINT_ORDER,
    SUBTYPE_CODES,
    SUBTYPES,
    Collector,
    Lesion,
    LesionModel,
    LesionRequest,
    place_lesion,
)

LOGGER = logging.getLogger(__name__)

# Raised whenever the same seed would give other pixels or labels (prepared-data caches key on it).
# 2: blood in CSF spaces replaces the CSF share only, and is labelled only where it shows.
# 3: blood that fills a voxel of pure CSF is labelled (version 2 lost those voxels to float32
#    rounding, so sulcal and ventricular blood was labelled along its edges only, and the
#    lesions grew until the edges alone met the requested volume).
PHANTOM_VERSION = 3

__all__ = [
    "PHANTOM_VERSION", "CTICH_FIRST_PATIENT", "PUBLISHED_HU", "RSNA_LABELS", "SUBTYPES", "SUBTYPE_CODES", "LABEL_PRIORITY",
    "Lesion", "LesionRequest", "PhantomStudy", "ScannerProfile", "StudyIdentity", "StudySummary",
    "generate_study", "generate_volume", "render_gallery", "tissue_stats", "tissue_table", "write_ct_nifti",
    "write_dicom_series", "write_mask_nifti", "write_rsna_labels", "write_studies",
]

RSNA_LABELS: tuple[str, ...] = ("any", *SUBTYPES)
LABEL_PRIORITY: tuple[str, ...] = tuple(reversed(PAINT_ORDER))
MIN_VOXELS_PER_SLICE = 1
THICKNESSES_MM: tuple[float, ...] = (0.625, 1.0, 1.25, 2.0, 2.5, 3.0, 3.75, 5.0)
_PROTOCOLS: tuple[tuple[float, float], ...] = ((5.0, 0.4), (3.0, 0.1), (2.5, 0.15), (1.25, 0.1), (1.0, 0.1),
                                               (0.625, 0.15))
MIN_SLICES, MAX_SLICES = 20, 300
CTICH_FIRST_PATIENT = 49
CTICH_COLUMNS: tuple[str, ...] = ("PatientNumber", "SliceNumber", "Intraventricular", "Intraparenchymal",
                                  "Subarachnoid", "Epidural", "Subdural", "No_Hemorrhage", "Fracture_Yes_No")
# Published CT numbers (HU) of the tissue classes, for docs/phantom.md.
PUBLISHED_HU: Mapping[str, tuple[float, float]] = MappingProxyType({
    "air": (-1000.0, -1000.0),
    "fat": (-120.0, -60.0),
    "soft tissue": (20.0, 60.0),
    "cortical bone": (1000.0, 1800.0),
    "diploe": (300.0, 700.0),
    "csf": (0.0, 15.0),
    "grey matter": (35.0, 45.0),
    "white matter": (25.0, 32.0),
    "deep grey matter": (30.0, 42.0),
    "brainstem": (28.0, 38.0),
    "dura": (40.0, 70.0),
    "venous blood": (40.0, 60.0),
    "calcification": (100.0, 400.0),
    "acute blood": (50.0, 90.0),
    "oedema": (15.0, 25.0),
})


@dataclass(frozen=True, eq=False)
class PhantomStudy:
    """One generated study (see the module docstring for the conventions)."""

    seed: int
    hu: npt.NDArray[np.float32]
    labels: npt.NDArray[np.uint8]
    spacing_mm: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]
    slice_labels: npt.NDArray[np.uint8]
    lesions: tuple[Lesion, ...]
    hard_negatives: tuple[str, ...]
    hard_negative_sites: tuple[tuple[str, tuple[float, float, float]], ...]
    slice_thickness_mm: float
    scanner: ScannerProfile
    identity: StudyIdentity
    tissue: npt.NDArray[np.uint8] | None = None
    lesion_ids: npt.NDArray[np.uint8] | None = field(default=None, repr=False)

    @property
    def subtypes(self) -> tuple[str, ...]:
        """Subtypes present in the label map (in RSNA order)."""
        return tuple(s for s in SUBTYPES if np.any(self.slice_labels[:, RSNA_LABELS.index(s)]))

    def volume_ml(self) -> dict[str, float]:
        """Labelled volume per subtype (mL), measured on the label map."""
        vox = float(np.prod(self.spacing_mm)) / 1000.0
        counts = {s: np.count_nonzero(self.labels == SUBTYPE_CODES[s]) for s in self.subtypes}
        return {s: float(c) * vox for s, c in counts.items() if c}


@dataclass(frozen=True)
class StudySummary:
    """What :func:`write_studies` wrote for one study."""

    study_dir: Path
    image_path: Path
    seed: int
    study_instance_uid: str
    series_instance_uid: str
    n_slices: int
    subtypes: tuple[str, ...]
    volume_ml: dict[str, float]


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------


def _requests(subtypes: Sequence[str | LesionRequest] | None) -> list[LesionRequest] | None:
    if subtypes is None:
        return None
    return [s if isinstance(s, LesionRequest) else LesionRequest.parse(s) for s in subtypes]


def _random_requests(rng: np.random.Generator, negative_fraction: float) -> list[LesionRequest]:
    if rng.random() < negative_fraction:
        return []
    k = int(rng.choice([1, 2, 3], p=[0.6, 0.28, 0.12]))
    weights = np.array([0.15, 0.25, 0.15, 0.25, 0.20])
    chosen = rng.choice(len(SUBTYPES), size=k, replace=False, p=weights / weights.sum())
    return [LesionRequest(SUBTYPES[int(i)]) for i in sorted(chosen)]


def _snap_thickness(nz: int, extent: float) -> float:
    """The standard thickness whose coverage with ``nz`` slices is closest to ``extent`` (mm)."""
    return min(THICKNESSES_MM, key=lambda t: abs(math.log((nz - 1) * t / extent)))


def _plan_grid(rng: np.random.Generator, pose: Pose, scanner: ScannerProfile, nz: int | None, ny: int, nx: int,
               spacing: tuple[float, float, float] | None,
               thickness: float | None) -> tuple[Grid, tuple[float, float, float], float]:
    """Grid (protocol and table position) and the head centre for one study."""
    zlo, zhi = head_z_extent(pose)
    margin = 6.0
    extent = zhi - zlo + 2 * margin
    if spacing is not None:
        dz, dy, dx = (float(v) for v in spacing)
        t = float(thickness) if thickness is not None else dz
    else:
        dx = dy = scanner.fov_mm / nx
        if thickness is not None:
            t = float(thickness)
        elif nz is not None:
            t = _snap_thickness(nz, extent)
        else:
            t = float(rng.choice([p[0] for p in _PROTOCOLS], p=[p[1] for p in _PROTOCOLS]))
        dz = t
    if nz is None:
        nz = int(np.clip(math.ceil(extent / dz) + 1, MIN_SLICES, MAX_SLICES))
    coverage = (nz - 1) * dz
    cz = float(rng.uniform(-150.0, 50.0))
    lo_z, hi_z = cz + zlo - margin, cz + zhi + margin
    if coverage >= extent:
        z0 = lo_z - float(rng.uniform(0.0, coverage - extent))
    else:
        mid = cz + float(rng.uniform(0.0, 25.0))
        z0 = float(np.clip(mid - coverage / 2, lo_z, hi_z - coverage))
    rc = (float(rng.uniform(-2.0, 2.0)), float(rng.uniform(-20.0, 30.0)))
    origin = (rc[0] - nx * dx / 2 + dx / 2, rc[1] - ny * dy / 2 + dy / 2, z0)
    center = (rc[0] + pose.offset[0], rc[1] + pose.offset[1], cz)
    return Grid((nz, ny, nx), (dz, dy, dx), origin), center, t


def _generate(seed: int, nz: int | None, ny: int, nx: int, spacing: tuple[float, float, float] | None,
              thickness: float | None, requests: list[LesionRequest] | None, negative_fraction: float,
              hard_negatives: bool, uid_root: str | None, patient_name: str | None, patient_index: int,
              tissue_map: bool) -> PhantomStudy:
    if seed < 0:
        raise ValueError(f"The seed must be a non-negative integer, not {seed}.")
    if not 0.0 <= negative_fraction <= 1.0:
        raise ValueError(f"negative_fraction must lie in [0, 1], not {negative_fraction}.")
    if nz is not None and not MIN_SLICES <= nz <= MAX_SLICES:
        raise ValueError(f"A study has {MIN_SLICES} to {MAX_SLICES} slices, not {nz}.")
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(9)]
    r_pose, r_anat, r_scan, r_grid, r_id, r_plan, r_les, r_hard, r_noise = streams
    pose = draw_pose(r_pose)
    scanner = draw_scanner(r_scan)
    grid, center, t = _plan_grid(r_grid, pose, scanner, nz, ny, nx, spacing, thickness)
    model = build_head(r_anat, pose, grid, center, t, scanner.noise_sigma, hard_negatives, r_hard)
    reqs = requests if requests is not None else _random_requests(r_plan, negative_fraction)
    placed: list[LesionModel] = []
    for req in reqs:
        placed.append(place_lesion(model, r_les, req, tuple(p.center for p in placed)))
    if requests is None:
        placed += _extensions(model, r_les, placed)
    hu, labels, ids, tissue, final = _render_all(model, placed, r_noise, tissue_map)
    lesions = tuple(final)
    _scanner_output(hu, grid, scanner)
    nzz = grid.shape[0]

    vox_ml = grid.voxel_mm3 / 1000.0
    reported = tuple(
        Lesion(subtype=les.subtype, code=les.code, site=les.site, requested_ml=les.requested_ml,
               volume_ml=float(np.count_nonzero(ids == i + 1)) * vox_ml,
               center_lps=(float(les.center[0]), float(les.center[1]), float(les.center[2])), hu=les.hu)
        for i, les in enumerate(lesions)
    )
    ident = draw_identity(r_id, seed, nzz, uid_root, patient_name, patient_index)
    mimics = tuple(sorted({c.name for c in model.calcifications})) + ("beam-hardening streaks",)
    sites = tuple((c.name, (float(c.shape.p0[0]), float(c.shape.p0[1]), float(c.shape.p0[2])))
                  for c in model.calcifications)
    study = PhantomStudy(
        seed=seed, hu=hu, labels=labels, spacing_mm=grid.spacing, origin=grid.origin,
        direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0), slice_labels=slice_labels(labels),
        lesions=reported, hard_negatives=mimics, hard_negative_sites=sites, slice_thickness_mm=t, scanner=scanner, identity=ident,
        tissue=tissue, lesion_ids=ids,
    )
    LOGGER.debug("Phantom %s: %d slices, lesions %s", ident.study_instance_uid, nzz,
                 [(les.subtype, round(les.volume_ml, 2)) for les in reported])
    return study


def _render_all(model: HeadModel, placed: list[LesionModel], rng: np.random.Generator, tissue_map: bool,
                ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.uint8], npt.NDArray[np.uint8],
                           npt.NDArray[np.uint8] | None, list[LesionModel]]:
    """Render every slab once (anatomy, lesion candidates, streaks, noise), then size the lesions
    and add their blood: streaks and noise are additive, so this equals painting before them."""
    grid = model.grid
    nz = grid.shape[0]
    step = max(1, (1 << 18) // (grid.shape[1] * grid.shape[2]))
    collector = Collector(model, placed)
    hu = np.empty(grid.shape, np.float32)
    labels = np.zeros(grid.shape, np.uint8)
    ids = np.zeros(grid.shape, np.uint8)
    tissue = np.zeros(grid.shape, np.uint8) if tissue_map else None
    for k0 in range(0, nz, step):
        k1 = min(nz, k0 + step)
        blk = grid.block(k0, k1)
        rd = render(model, blk, want_hu=True, tissue=tissue_map)
        assert rd.hu is not None
        collector.add(rd)
        streaks(model, rd)
        add_noise(model, blk, rd.hu, rng)
        hu[k0:k1] = rd.hu
        if tissue is not None and rd.tissue is not None:
            tissue[k0:k1] = rd.tissue
    sized = collector.thresholds()
    collector.paint(sized, hu, labels, ids, tissue)
    return hu, labels, ids, tissue, sized


def _extensions(m: HeadModel, rng: np.random.Generator, placed: list[LesionModel]) -> list[LesionModel]:
    """Random studies only: a deep intraparenchymal bleed sometimes ruptures into the ventricles."""
    out: list[LesionModel] = []
    have = {les.subtype for les in placed}
    for les in placed:
        deep = any(k in les.site for k in ("putamen", "thalamus"))
        if les.subtype == "intraparenchymal" and deep and "intraventricular" not in have and rng.random() < 0.4:
            vol = max(0.2, les.target_ml * float(rng.uniform(0.1, 0.4)))
            out.append(place_lesion(m, rng, LesionRequest("intraventricular", vol)))
            have.add("intraventricular")
    return out


def _scanner_output(hu: npt.NDArray[np.float32], grid: Grid, scanner: ScannerProfile) -> None:
    """Calibration offset, reconstruction circle, clipping to the storable range and integer HU."""
    hu += np.float32(scanner.hu_offset)
    lo, hi = scanner.hu_range
    np.clip(hu, lo, hi, out=hu)
    np.rint(hu, out=hu)
    nz, ny, nx = grid.shape
    x = grid.axis(0)
    y = grid.axis(1)
    cx = grid.origin[0] + (nx - 1) * grid.spacing[2] / 2
    cy = grid.origin[1] + (ny - 1) * grid.spacing[1] / 2
    radius = min(nx * grid.spacing[2], ny * grid.spacing[1]) / 2
    outside = ((x[None, :] - cx) ** 2 + (y[:, None] - cy) ** 2) > radius**2
    if np.any(outside):
        hu[:, outside] = np.float32(scanner.outside_hu)


def slice_labels(labels: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """(z, 6) per-slice labels in RSNA order from a label map (>= ``MIN_VOXELS_PER_SLICE`` voxels)."""
    nz = labels.shape[0]
    out = np.zeros((nz, len(RSNA_LABELS)), np.uint8)
    flat = labels.reshape(nz, -1)
    for j, name in enumerate(SUBTYPES, start=1):
        out[:, j] = (np.count_nonzero(flat == SUBTYPE_CODES[name], axis=1) >= MIN_VOXELS_PER_SLICE)
    out[:, 0] = out[:, 1:].max(axis=1)
    return out


def generate_study(
    seed: int,
    *,
    subtypes: Sequence[str | LesionRequest] | None = None,
    slices: int | None = None,
    matrix: int = 512,
    slice_thickness_mm: float | None = None,
    negative_fraction: float = 0.5,
    hard_negatives: bool = True,
    uid_root: str | None = None,
    patient_name: str | None = None,
    patient_index: int = 1,
    tissue_map: bool = False,
) -> PhantomStudy:
    """Generate one study from ``seed`` (same arguments, same study, byte for byte).

    ``subtypes``: None for a random study (negative with probability ``negative_fraction``),
    ``[]`` for a negative one, or requests such as ``["subdural:25", "intraventricular"]``
    (subtype and optional volume in mL) that the study then carries exactly. ``slices`` and
    ``slice_thickness_mm`` pick the protocol (random if both are None).
    """
    return _generate(seed, slices, matrix, matrix, None, slice_thickness_mm, _requests(subtypes), negative_fraction,
                     hard_negatives, uid_root, patient_name, patient_index, tissue_map)


def generate_volume(
    rng_or_seed: np.random.Generator | int,
    shape: tuple[int, int, int] = (32, 128, 128),
    spacing: tuple[float, float, float] | None = None,
    subtypes: Sequence[str | LesionRequest] | None = None,
    negative_fraction: float = 0.5,
    hard_negatives: bool = True,
    tissue_map: bool = False,
) -> PhantomStudy:
    """In-memory study of a given (z, y, x) ``shape`` for training on the fly (no files).

    ``spacing`` (z, y, x) in mm; if None the field of view is 220-250 mm and the slice
    spacing is chosen to cover the head.
    """
    seed = int(rng_or_seed.integers(0, 2**63)) if isinstance(rng_or_seed, np.random.Generator) else int(rng_or_seed)
    nz, ny, nx = shape
    return _generate(seed, nz, ny, nx, spacing, None, _requests(subtypes), negative_fraction, hard_negatives,
                     None, None, 1, tissue_map)


# --------------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------------


def write_dicom_series(study: PhantomStudy, out_dir: Path, series_number: int = 2) -> list[Path]:
    """Write ``study`` as a CT Image Storage series (one file per slice) into ``out_dir``.

    Returned paths are in slice order (ascending patient z), which need not be the order
    of InstanceNumber (some scanner profiles number from the vertex down).
    """
    return write_series(Path(out_dir), study.hu, study.spacing_mm, study.origin, study.slice_thickness_mm,
                        study.scanner, study.identity, series_number)


def _sitk_image(study: PhantomStudy, array: npt.NDArray[np.generic]) -> sitk.Image:
    img = sitk.GetImageFromArray(array)
    dz, dy, dx = study.spacing_mm
    img.SetSpacing((dx, dy, dz))
    img.SetOrigin(study.origin)
    img.SetDirection(study.direction)
    return img


def write_mask_nifti(study: PhantomStudy, path: Path, binary: bool = False) -> Path:
    """Write the label map (codes 0-5, or 0/1 if ``binary``) as NIfTI with the series geometry."""
    arr = (study.labels > 0).astype(np.uint8) if binary else study.labels
    sitk.WriteImage(_sitk_image(study, arr), str(path), useCompression=str(path).endswith(".gz"))
    return Path(path)


def write_ct_nifti(study: PhantomStudy, path: Path) -> Path:
    """Write the HU volume (int16) as NIfTI with the series geometry."""
    sitk.WriteImage(_sitk_image(study, study.hu.astype(np.int16)), str(path), useCompression=str(path).endswith(".gz"))
    return Path(path)


def rsna_rows(study: PhantomStudy) -> list[tuple[str, int]]:
    """RSNA 2019 rows ``(ID_<SOPInstanceUID>_<label>, 0|1)`` for every slice (RSNA label order)."""
    order = (*SUBTYPES, "any")
    rows: list[tuple[str, int]] = []
    for k, uid in enumerate(study.identity.sop_instance_uids):
        for name in order:
            rows.append((f"ID_{uid}_{name}", int(study.slice_labels[k, RSNA_LABELS.index(name)])))
    return rows


def write_rsna_labels(studies: Sequence[PhantomStudy], path: Path) -> Path:
    """Write the RSNA 2019 label CSV (header ``ID,Label``) of ``studies``."""
    with open(path, "w", newline="", encoding="ascii") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["ID", "Label"])
        for study in studies:
            w.writerows(rsna_rows(study))
    return Path(path)


def _ctich_rows(study: PhantomStudy, number: int) -> list[list[int]]:
    col = {name: RSNA_LABELS.index(name) for name in RSNA_LABELS}
    rows = []
    for k in range(study.slice_labels.shape[0]):
        sl = study.slice_labels[k]
        rows.append([number, k + 1, int(sl[col["intraventricular"]]), int(sl[col["intraparenchymal"]]),
                     int(sl[col["subarachnoid"]]), int(sl[col["epidural"]]), int(sl[col["subdural"]]),
                     int(sl[col["any"]] == 0), 0])
    return rows


def write_studies(
    out_dir: Path,
    n: int,
    seed: int,
    subtypes: Sequence[str] | None = None,
    slices: int | None = None,
    matrix: int = 512,
    layout: str = "dicom",
    negative_fraction: float = 0.5,
    uid_root: str | None = None,
    patient_name: str | None = None,
) -> list[StudySummary]:
    """Generate ``n`` studies from ``seed`` and write them to ``out_dir``.

    ``layout="dicom"``: ``study_NNNN/dicom/IM*.dcm`` (CT series), ``study_NNNN/labels.csv``
    (RSNA 2019 format) and ``study_NNNN/mask.nii.gz`` (label map), plus ``rsna_labels.csv``
    (all studies) and ``manifest.json`` at the top. ``layout="ctich"``: the PhysioNet CT-ICH
    layout, ``ct_scans/NNN.nii`` (HU), ``masks/NNN.nii`` (0/1) and
    ``hemorrhage_diagnosis_raw_ct.csv``, patients numbered from ``CTICH_FIRST_PATIENT``.
    ``subtypes`` (e.g. ``["epidural:30"]``) makes every study carry exactly those; otherwise
    about ``negative_fraction`` of the studies are negative.
    """
    if layout not in ("dicom", "ctich"):
        raise ValueError(f"layout must be 'dicom' or 'ctich', not {layout!r}.")
    if n < 1:
        raise ValueError(f"n must be at least 1, not {n}.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summaries: list[StudySummary] = []
    ctich: list[list[int]] = []
    manifest: list[dict[str, object]] = []
    rsna_path = out / "rsna_labels.csv"
    rsna_fh = open(rsna_path, "w", newline="", encoding="ascii") if layout == "dicom" else None
    try:
        if rsna_fh is not None:
            csv.writer(rsna_fh, lineterminator="\n").writerow(["ID", "Label"])
        for i in range(n):
            study_seed = int(np.random.SeedSequence([seed, i]).generate_state(1, np.uint32)[0])
            study = generate_study(study_seed, subtypes=subtypes, slices=slices, matrix=matrix,
                                   negative_fraction=negative_fraction, uid_root=uid_root,
                                   patient_name=patient_name, patient_index=i + 1)
            if layout == "dicom":
                sdir = out / f"study_{i + 1:04d}"
                image_path = sdir / "dicom"
                write_dicom_series(study, image_path)
                write_rsna_labels([study], sdir / "labels.csv")
                write_mask_nifti(study, sdir / "mask.nii.gz")
                assert rsna_fh is not None
                csv.writer(rsna_fh, lineterminator="\n").writerows(rsna_rows(study))
            else:
                number = CTICH_FIRST_PATIENT + i
                sdir = out
                (out / "ct_scans").mkdir(exist_ok=True)
                (out / "masks").mkdir(exist_ok=True)
                image_path = write_ct_nifti(study, out / "ct_scans" / f"{number:03d}.nii")
                write_mask_nifti(study, out / "masks" / f"{number:03d}.nii", binary=True)
                ctich += _ctich_rows(study, number)
            summary = StudySummary(
                study_dir=sdir, image_path=image_path, seed=study_seed,
                study_instance_uid=study.identity.study_instance_uid,
                series_instance_uid=study.identity.series_instance_uid, n_slices=study.hu.shape[0],
                subtypes=study.subtypes, volume_ml={k: round(v, 3) for k, v in study.volume_ml().items()},
            )
            summaries.append(summary)
            manifest.append({
                "study_dir": str(sdir.relative_to(out)) if sdir != out else ".",
                "image_path": str(image_path.relative_to(out)), "seed": study_seed,
                "study_instance_uid": summary.study_instance_uid,
                "series_instance_uid": summary.series_instance_uid, "n_slices": summary.n_slices,
                "slice_thickness_mm": study.slice_thickness_mm, "subtypes": list(summary.subtypes),
                "volume_ml": summary.volume_ml, "hard_negatives": list(study.hard_negatives),
                "scanner": f"{study.scanner.manufacturer} {study.scanner.model}",
                "lesions": [{"subtype": les.subtype, "site": les.site, "requested_ml": les.requested_ml,
                             "volume_ml": round(les.volume_ml, 3)} for les in study.lesions],
            })
            LOGGER.info("Phantom study %d/%d: %s, %d slices, %s", i + 1, n, summary.study_instance_uid,
                        summary.n_slices, summary.subtypes or "negative")
    finally:
        if rsna_fh is not None:
            rsna_fh.close()
    if layout == "ctich":
        with open(out / "hemorrhage_diagnosis_raw_ct.csv", "w", newline="", encoding="ascii") as fh:
            w = csv.writer(fh, lineterminator="\n")
            w.writerow(CTICH_COLUMNS)
            w.writerows(ctich)
    (out / "manifest.json").write_text(json.dumps({"generator": "pipeline.phantom", "seed": seed,
                                                   "layout": layout, "study_description": STUDY_DESCRIPTION,
                                                   "studies": manifest}, indent=1, sort_keys=True) + "\n")
    return summaries


# --------------------------------------------------------------------------------------------
# Statistics and gallery
# --------------------------------------------------------------------------------------------


def tissue_stats(study: PhantomStudy) -> dict[str, dict[str, float]]:
    """Mean, standard deviation and voxel count of the HU of each tissue class (pure voxels only).

    Needs a study generated with ``tissue_map=True``.
    """
    if study.tissue is None:
        raise ValueError("tissue_stats needs a study generated with tissue_map=True.")
    out: dict[str, dict[str, float]] = {}
    flat_t = study.tissue.ravel()
    flat_h = study.hu.ravel()
    if study.scanner.padding_value is not None:
        flat_t = np.where(flat_h == np.float32(study.scanner.outside_hu), np.uint8(T_MIXED), flat_t)
    order = np.argsort(flat_t, kind="stable")
    t_sorted = flat_t[order]
    bounds = np.searchsorted(t_sorted, np.arange(len(TISSUE_NAMES) + 1))
    for c, name in enumerate(TISSUE_NAMES):
        sel = order[bounds[c]:bounds[c + 1]]
        if sel.size < 20 or c == T_MIXED:
            continue
        vals = flat_h[sel].astype(np.float64)
        out[name] = {"mean": float(vals.mean()), "std": float(vals.std()), "n": float(sel.size)}
    return out


# Rows of the gallery: (title, seed, requests). Seeds were picked once by eye for typical cases.
_GALLERY_ROWS: tuple[tuple[str, int, tuple[str, ...]], ...] = (
    ("epidural", 25, ("epidural:35",)),
    ("subdural", 20, ("subdural:40",)),
    ("intraparenchymal", 6, ("intraparenchymal:25",)),
    ("intraventricular", 1, ("intraventricular:6",)),
    ("subarachnoid", 7, ("subarachnoid:12",)),
    ("negative", 14, ()),
    ("hard negatives", -1, ()),
)
_CONTOUR_COLORS: Mapping[int, str] = MappingProxyType(
    {1: "#ff3b30", 2: "#ffcc00", 3: "#34c759", 4: "#00c7ff", 5: "#ff2dff"})


def _gallery_slices(study: PhantomStudy, title: str) -> list[int]:
    """Three slices to show: through the lesion (largest area and its neighbours), or anatomy levels."""
    nz = study.hu.shape[0]
    area = np.count_nonzero(study.labels.reshape(nz, -1), axis=1)
    if area.any():
        k = int(np.argmax(area))
        pos = np.flatnonzero(area)
        lo, hi = int(pos[0]), int(pos[-1])
        step = max(1, (hi - lo) // 3)
        ks = [max(lo, k - step), k, min(hi, k + step)]
        if len(set(ks)) < 3:
            ks = [max(0, k - 1), k, min(nz - 1, k + 1)]
        return ks
    head = np.count_nonzero(study.hu.reshape(nz, -1) > -500, axis=1)
    z = np.flatnonzero(head > 0.05 * head.max())
    lo, hi = int(z[0]), int(z[-1])
    if title == "hard negatives" and study.hard_negative_sites:
        z0, dz = study.origin[2], study.spacing_mm[0]
        ks = sorted({int(round((site[2] - z0) / dz)) for _, site in study.hard_negative_sites})
        ks = [k for k in ks if 0 <= k < nz][:2]
        return [lo + (hi - lo) // 6, *ks] if len(ks) == 2 else [lo + (hi - lo) // 6, *ks, ks[0] + 1][:3]
    return [lo + (hi - lo) // 5, lo + (hi - lo) * 9 // 20, lo + (hi - lo) * 7 // 10]


def _hard_negative_seed() -> int:
    """A seed whose head carries calcified choroid plexus, pineal and falx."""
    want = {"choroid plexus", "pineal", "falx"}
    for seed in range(1000, 1400):
        st = generate_volume(seed, shape=(MIN_SLICES, 32, 32), subtypes=[])
        if want <= set(st.hard_negatives):
            return seed
    raise RuntimeError("No seed with all calcifications in the searched range.")


def tissue_table(study: PhantomStudy) -> str:
    """Markdown table of :func:`tissue_stats` next to the published ranges (for docs/phantom.md)."""
    stats = tissue_stats(study)
    lines = ["| tissue | mean HU | SD HU | voxels | published range HU |", "|---|---:|---:|---:|---|"]
    for name, (lo, hi) in PUBLISHED_HU.items():
        if name not in stats:
            continue
        st = stats[name]
        rng = f"{lo:g}" if lo == hi else f"{lo:g} to {hi:g}"
        lines.append(f"| {name} | {st['mean']:.1f} | {st['std']:.1f} | {int(st['n'])} | {rng} |")
    return "\n".join(lines)


def render_gallery(path: Path, matrix: int = 512) -> Path:
    """Render ``docs/phantom_gallery.png``: one row per subtype plus a negative and a hard-negative
    row, three slices per row in the brain window (W80/L40) and the middle slice again with the
    labelled voxels outlined. Uses matplotlib's Agg canvas (no global backend change)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from PIL import Image

    panel = 2.35
    fig = Figure(figsize=(4 * panel, len(_GALLERY_ROWS) * panel + 0.5), dpi=100)
    FigureCanvasAgg(fig)
    fig.suptitle("ich-node phantom: W80/L40, 5 mm slices, 512 matrix; last column: labelled voxels outlined",
                 fontsize=9, y=0.995)
    for r, (title, seed, reqs) in enumerate(_GALLERY_ROWS):
        s = _hard_negative_seed() if seed < 0 else seed
        study = generate_study(s, subtypes=list(reqs), slices=36, matrix=matrix, slice_thickness_mm=5.0)
        ks = _gallery_slices(study, title)
        head = study.hu[ks[1]] > -500
        rows, cols = np.flatnonzero(head.any(axis=1)), np.flatnonzero(head.any(axis=0))
        margin = matrix // 40
        r0, r1 = max(0, rows[0] - margin), min(matrix, rows[-1] + margin)
        c0, c1 = max(0, cols[0] - margin), min(matrix, cols[-1] + margin)
        side = max(r1 - r0, c1 - c0)
        r0, c0 = max(0, (r0 + r1 - side) // 2), max(0, (c0 + c1 - side) // 2)
        crop = (slice(r0, r0 + side), slice(c0, c0 + side))
        for c, k in enumerate([*ks, ks[1]]):
            ax = fig.add_subplot(len(_GALLERY_ROWS), 4, r * 4 + c + 1)
            ax.imshow(study.hu[k][crop], cmap="gray", vmin=0, vmax=80, interpolation="antialiased")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 3:
                lab = study.labels[k][crop]
                for code in np.unique(lab[lab > 0]):
                    ax.contour((lab == code).astype(np.uint8), levels=[0.5], colors=_CONTOUR_COLORS[int(code)],
                               linewidths=0.7)
                ax.set_title("mask outline" if study.lesions else "no label", fontsize=7)
            else:
                vol = "".join(f", {v:.0f} mL" for v in study.volume_ml().values())
                label = title if c == 0 else ""
                ax.set_title(f"{label}{vol if c == 0 else ''}  z={k}", fontsize=7)
        if title == "hard negatives":
            fig.axes[-4].set_title("hard negatives: " + ", ".join(study.hard_negatives[:3]), fontsize=6)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.955, bottom=0.005, wspace=0.03, hspace=0.13)
    canvas = fig.canvas
    assert isinstance(canvas, FigureCanvasAgg)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    img = Image.fromarray(rgba[..., :3]).quantize(colors=128, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out, optimize=True)
    LOGGER.info("Wrote the phantom gallery to %s (%d bytes)", out, out.stat().st_size)
    return out
