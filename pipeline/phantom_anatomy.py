"""Head anatomy of the phantom: a random adult head rendered in Hounsfield units.

The head is written once in *template* millimetres (origin near the third
ventricle, +x left, +y posterior, +z superior) and mapped to the patient frame by
:class:`~pipeline.phantom_geometry.Frame` (size, shape, position and rotation).
Slices are rendered in slabs so that the working arrays stay in cache.

Tissue values are drawn per study inside published ranges; nothing here depends on
whether the study will carry a hemorrhage (the lesion stream is separate).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt

from pipeline.phantom_geometry import (
    F32,
    F64,
    Block,
    Frame,
    Grid,
    Points,
    Scalar,
    SmoothField,
    capsule,
    ellipsoid,
    ellipsoid_fast,
    lerp_into,
    ramp,
    ramp_iw,
    rotation_matrix,
    sheet,
    smax,
    smin,
)

LOGGER = logging.getLogger(__name__)

# Tissue classes of the optional tissue map (see ``tissue_stats``).
TISSUE_NAMES: tuple[str, ...] = (
    "air", "soft tissue", "fat", "cortical bone", "diploe", "csf", "grey matter", "white matter",
    "deep grey matter", "brainstem", "dura", "venous blood", "calcification", "acute blood", "oedema",
    "orbit", "sinus air",
)
T_AIR, T_SOFT, T_FAT, T_CORT, T_DIPLOE, T_CSF, T_GM, T_WM, T_DEEP, T_BS, T_DURA, T_VEN, T_CALC, T_BLOOD, \
    T_OEDEMA, T_ORBIT, T_SINUS = range(17)
T_MIXED = 255

BIG = np.float32(1.0e3)
# Template geometry (mm). Cavity: vault ellipsoid cut at the anterior fossa floor, unioned with the
# middle fossae, the posterior fossa and the brainstem channel.
_BASE_Z = -20.0
_SPHERE_C = (0.0, 2.0, 8.0)  # centre of the sulcal pattern
_R0 = 70.0



@dataclass(frozen=True)
class TissueHU:
    """Per-study tissue values (HU)."""

    air: float
    soft: float
    fat: float
    cortical: float
    diploe: float
    csf: float
    gm: float
    wm: float
    deep: float
    brainstem: float
    dura: float
    venous: float
    orbit_fat: float
    globe: float
    lens: float
    petrous: float


@dataclass(frozen=True, eq=False)
class Ell:
    """An ellipsoid in patient space with its bounding box."""

    rows: F64
    p0: F64
    lo: F64
    hi: F64


@dataclass(frozen=True, eq=False)
class Cap:
    """A cone capsule in patient space with its bounding box."""

    a: F64
    b: F64
    ra: float
    rb: float
    lo: F64
    hi: F64


@dataclass(frozen=True, eq=False)
class Calcification:
    """A hard-negative calcification (dense but not blood)."""

    name: str
    shape: Ell
    hu: float


@dataclass(frozen=True, eq=False)
class SphereTables:
    """Random functions of the direction from the head centre, on a (phi, theta) table."""

    sulcus: F32
    depth: F32
    bump: F32
    thick: F32


@dataclass(frozen=True, eq=False)
class HeadModel:
    """Everything needed to render one head on one grid."""

    grid: Grid
    frame: Frame
    scale: float
    thickness: float
    wp: float
    hu: TissueHU
    e1: Ell
    e2: tuple[Ell, Ell]
    e3: Ell
    e4: Ell
    e5: Ell
    face: Ell
    neck: Ell
    gap: float
    sulcal_width: float
    cortex: float
    ihf_half: float
    falx_half: float
    skull_t0: float
    scalp_t: float
    fat_t: float
    temporalis: float
    base_extra: float
    cupping: float
    tex: SmoothField
    fine: SmoothField
    tables: SphereTables
    lat_vent: tuple[tuple[Ell, ...], tuple[Ell, ...]]
    sella: Ell
    mid_vent: tuple[Ell, Ell]
    aqueduct: Cap
    caudate: tuple[Ell, Ell]
    deep_nuclei: tuple[Ell, ...]
    brainstem: tuple[Ell, ...]
    cisterns: tuple[Ell, ...]
    shells: tuple[tuple[Ell, float], ...]
    base_air: tuple[tuple[str, Ell, bool], ...]
    orbits: tuple[Ell, Ell]
    globes: tuple[Ell, Ell]
    lenses: tuple[Ell, Ell]
    optic: tuple[Cap, Cap]
    frontal_sinus: Ell | None
    petrous: tuple[Cap, Cap]
    zygoma: tuple[Cap, Cap]
    ear_canal: tuple[Cap, Cap]
    canal: Cap
    cord: Cap
    calcifications: tuple[Calcification, ...]
    streak_amp: float
    streak_profile: F32
    noise_sigma: float
    noise_tap: float
    head_box: npt.NDArray[np.int64]
    brain_box: npt.NDArray[np.int64]

    @property
    def w_iso(self) -> float:
        """Ramp width (mm) for surfaces of unknown orientation."""
        return math.sqrt(self.wp**2 + (0.5 * self.thickness) ** 2)

    @property
    def w_sheet(self) -> float:
        """Ramp width (mm) for thin radial sheets (sulci)."""
        return math.sqrt(self.wp**2 + (0.4 * self.thickness) ** 2)

    def ell(self, center: tuple[float, float, float], axes: tuple[float, float, float],
            yaw_deg: float = 0.0, margin: float = 4.0) -> Ell:
        """An ellipsoid given in template millimetres."""
        return make_ell(self.frame, self.scale, center, axes, yaw_deg, margin)


def make_ell(frame: Frame, scale: float, center: tuple[float, float, float], axes: tuple[float, float, float],
             yaw_deg: float = 0.0, margin: float = 4.0, pitch_deg: float = 0.0) -> Ell:
    """An ellipsoid given in template millimetres (rotated by yaw, then pitch), mapped through ``frame``."""
    rot = rotation_matrix(yaw_deg, pitch_deg, 0.0) if (yaw_deg or pitch_deg) else None
    rows, p0 = frame.local(center, axes, rot)
    r = max(axes) * scale * 1.15 + margin
    return Ell(rows, p0, p0 - r, p0 + r)


def make_cap(frame: Frame, scale: float, a: tuple[float, float, float], b: tuple[float, float, float],
             ra: float, rb: float, margin: float = 4.0) -> Cap:
    """A cone capsule given in template millimetres."""
    pa, pb = frame.to_patient(a), frame.to_patient(b)
    r = max(ra, rb) * scale + margin
    return Cap(pa, pb, ra * scale, rb * scale, np.minimum(pa, pb) - r, np.maximum(pa, pb) + r)


def _sub(blk: Block, grid: Grid, lo: F64, hi: F64) -> tuple[Block, tuple[slice, slice, slice]] | None:
    box = grid.index_box(lo, hi)
    if box is None:
        return None
    sub = blk.sub(*box)
    if sub.empty:
        return None
    return sub, blk.rel(sub)


# --------------------------------------------------------------------------------------------
# Building a head
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pose:
    """Head size, shape and placement (drawn before the grid exists)."""

    size: tuple[float, float, float]
    yaw: float
    pitch: float
    roll: float
    offset: tuple[float, float]
    jitter: tuple[float, float, float]


def draw_pose(rng: np.random.Generator) -> Pose:
    """Random head size/shape (+-10 %), rotation and in-plane offset."""
    s = float(rng.uniform(0.9, 1.08))
    size = (s * float(rng.uniform(0.94, 1.05)), s * float(rng.uniform(0.95, 1.04)), s * float(rng.uniform(0.95, 1.04)))
    return Pose(
        size=size,
        yaw=float(rng.uniform(-10, 10)),
        pitch=float(rng.uniform(-12, 18)),
        roll=float(rng.uniform(-6, 6)),
        offset=(float(rng.uniform(-12, 12)), float(rng.uniform(-12, 12))),
        jitter=(float(rng.uniform(0.97, 1.03)), float(rng.uniform(0.97, 1.03)), float(rng.uniform(0.97, 1.03))),
    )


def head_frame(pose: Pose, center: tuple[float, float, float]) -> Frame:
    """The template frame of a posed head whose template origin sits at ``center`` (LPS)."""
    rot = rotation_matrix(pose.yaw, pose.pitch, pose.roll)
    a = np.diag(1.0 / np.asarray(pose.size)) @ rot.T
    return Frame(np.asarray(a, dtype=np.float64), np.asarray(center, dtype=np.float64))


def head_z_extent(pose: Pose) -> tuple[float, float]:
    """Patient-z range (relative to the head centre) from the foramen magnum to the vertex scalp."""
    fr = head_frame(pose, (0.0, 0.0, 0.0))
    th = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    pts = []
    for zt, rx, ry in ((88.0, 20.0, 25.0), (80.0, 45.0, 55.0), (60.0, 62.0, 80.0)):
        pts.append(np.stack([rx * np.cos(th), ry * np.sin(th), np.full_like(th, zt)], axis=1))
    pts.append(np.stack([20.0 * np.cos(th), 30 + 20 * np.sin(th), np.full_like(th, -64.0)], axis=1))
    p = fr.to_patient(np.concatenate(pts))
    return float(p[:, 2].min()), float(p[:, 2].max())


_N_THETA = 1024
_N_PHI = 256


def _wave_sum(rng: np.random.Generator, n: tuple[F32, F32, F32], count: int, lam: float,
              grad: bool, flat: float = 1.0) -> tuple[F32, F32 | None]:
    """Sum of ``count`` random plane waves (wavelength ``lam`` mm) on the sphere of radius ``_R0``,
    and the norm of its tangential gradient if asked."""
    nx, ny, nz = n
    g = np.zeros(nx.shape, np.float32)
    gx = np.zeros(nx.shape, np.float32)
    gy = np.zeros(nx.shape, np.float32)
    gz = np.zeros(nx.shape, np.float32)
    for _ in range(count):
        d = rng.standard_normal(3) * np.array([1.0, 1.0, flat])
        d /= np.linalg.norm(d)
        k = (2 * np.pi / lam) * float(rng.uniform(0.85, 1.15))
        w = (k * d).astype(np.float32)
        arg = np.float32(_R0) * (w[0] * nx + w[1] * ny + w[2] * nz) + np.float32(rng.uniform(0, 2 * np.pi))
        g += np.cos(arg)
        if grad:
            s = np.sin(arg)
            gx -= s * w[0]
            gy -= s * w[1]
            gz -= s * w[2]
    if not grad:
        return g, None
    radial = gx * nx + gy * ny + gz * nz
    tang = np.sqrt(np.maximum(gx * gx + gy * gy + gz * gz - radial * radial, 1e-6)).astype(np.float32)
    return g, tang


def _sphere_tables(rng: np.random.Generator) -> SphereTables:
    """Sulcal distance (mm at radius ``_R0``), sulcal depth (mm), inner-table bumps and
    skull-thickness variation (unit std) as functions of direction."""
    th = np.linspace(-np.pi, np.pi, _N_THETA, endpoint=False, dtype=np.float32) + np.float32(np.pi / _N_THETA)
    ph = np.linspace(-np.pi / 2, np.pi / 2, _N_PHI, endpoint=False, dtype=np.float32) + np.float32(np.pi / 2 / _N_PHI)
    cph, sph = np.cos(ph)[:, None], np.sin(ph)[:, None]
    n = (cph * np.cos(th)[None, :], cph * np.sin(th)[None, :], np.broadcast_to(sph, (_N_PHI, _N_THETA)))
    g, tang = _wave_sum(rng, n, 48, float(rng.uniform(20.0, 25.0)), grad=True, flat=0.45)
    assert tang is not None
    sulcus = np.clip(g / tang, -12.0, 12.0)
    # The smooth tables are computed on every 4th row and column and repeated (nearest).
    coarse = (n[0][::4, ::4], n[1][::4, ::4], n[2][::4, ::4])

    def smooth(count: int, lam: float) -> F32:
        val, _ = _wave_sum(rng, coarse, count, lam, grad=False)
        return np.repeat(np.repeat(val, 4, axis=0), 4, axis=1)

    depth = np.clip(11.0 + 2.0 * smooth(8, 70.0), 5.0, 17.0)
    scale = np.float32(1.0 / math.sqrt(5.0))
    bump = smooth(10, 90.0) * scale
    thick = smooth(10, 80.0) * scale
    return SphereTables(
        sulcus.astype(np.float32).ravel(), depth.astype(np.float32).ravel(),
        bump.astype(np.float32).ravel(), thick.astype(np.float32).ravel(),
    )


def _sphere_index(u: tuple[F32, F32, F32]) -> tuple[npt.NDArray[np.int32], F32]:
    """Table index of the direction of template points from the sulcal centre, and their radius (mm)."""
    u0, u1, u2 = u
    uy = u1 - np.float32(_SPHERE_C[1])
    uz = u2 - np.float32(_SPHERE_C[2])
    rxy2 = u0 * u0
    rxy2 += uy * uy
    rxy = np.sqrt(rxy2)
    theta = np.arctan2(uy, u0)
    phi = np.arctan2(uz, rxy)
    rxy2 += uz * uz
    r = np.sqrt(rxy2)
    theta += np.float32(np.pi)
    theta *= np.float32(_N_THETA / (2 * np.pi))
    it = theta.astype(np.int32)
    np.minimum(it, _N_THETA - 1, out=it)
    phi += np.float32(np.pi / 2)
    phi *= np.float32(_N_PHI / np.pi)
    ip = phi.astype(np.int32)
    np.clip(ip, 0, _N_PHI - 1, out=ip)
    ip *= _N_THETA
    ip += it
    return ip, r


def build_head(rng: np.random.Generator, pose: Pose, grid: Grid, center: tuple[float, float, float],
               thickness: float, noise_sigma: float, hard_negatives: bool,
               hard_rng: np.random.Generator) -> HeadModel:
    """Draw one head (tissue values, shape details, calcifications) for ``grid``."""
    frame = head_frame(pose, center)
    scale = float(np.mean(pose.size))
    px = grid.spacing[2]
    wp = math.sqrt(px**2 + 0.35**2)
    atrophy = float(rng.beta(1.6, 2.6))
    gm = float(rng.uniform(37.0, 42.0))
    hu = TissueHU(
        air=-1000.0,
        soft=float(rng.uniform(30.0, 50.0)),
        fat=float(rng.uniform(-105.0, -80.0)),
        cortical=float(rng.uniform(1250.0, 1750.0)),
        diploe=float(rng.uniform(380.0, 650.0)),
        csf=float(rng.uniform(3.0, 10.0)),
        gm=gm,
        wm=min(31.0, max(25.5, gm - float(rng.uniform(8.0, 11.0)))),
        deep=gm - float(rng.uniform(3.0, 5.0)),
        brainstem=gm - float(rng.uniform(5.0, 7.5)),
        dura=float(rng.uniform(48.0, 62.0)),
        venous=float(rng.uniform(42.0, 55.0)),
        orbit_fat=float(rng.uniform(-100.0, -75.0)),
        globe=float(rng.uniform(5.0, 15.0)),
        lens=float(rng.uniform(90.0, 120.0)),
        petrous=float(rng.uniform(1700.0, 2200.0)),
    )
    jx, jy, jz = pose.jitter

    def ell(c: tuple[float, float, float], ax: tuple[float, float, float], yaw: float = 0.0,
            margin: float = 4.0, pitch: float = 0.0) -> Ell:
        return make_ell(frame, scale, c, ax, yaw, margin, pitch)

    def cap(a: tuple[float, float, float], b: tuple[float, float, float], ra: float, rb: float) -> Cap:
        return make_cap(frame, scale, a, b, ra, rb)

    e1 = ell((0.0, 2.0, 14.0), (66.0 * jx, 86.0 * jy, 60.0 * jz), margin=30.0)
    e2 = (ell((34.0, -4.0, -22.0), (22.0, 33.0, 24.0), margin=30.0),
          ell((-34.0, -4.0, -22.0), (22.0, 33.0, 24.0), margin=30.0))
    e3 = ell((0.0, 40.0, -34.0), (50.0, 32.0, 27.0), margin=30.0)
    e4 = ell((0.0, 18.0, -40.0), (18.0, 16.0, 26.0), margin=30.0)
    e5 = ell((0.0, -9.0, -21.0), (19.0, 15.0, 7.0), margin=30.0)
    face = ell((0.0, -48.0, -56.0), (56.0, 50.0, 40.0), margin=8.0)
    neck = ell((0.0, 16.0, -100.0), (52.0, 56.0, 56.0), margin=8.0)

    vs = 0.8 + 0.7 * atrophy + (float(rng.uniform(0.2, 0.5)) if rng.random() < 0.06 else 0.0)
    spread = 1.0 + 0.45 * (vs - 1.0)
    lat = []
    for sd in (1.0, -1.0):
        parts = (
            # centre, semi-axes (x, y, z), yaw, pitch: frontal horn, body, atrium, occipital and temporal horn
            ((7.5, -19.0, 12.0), (6.5, 13.0, 10.0), -14.0, 0.0),
            ((11.0, 4.0, 17.0), (6.0, 17.0, 8.0), 6.0, 0.0),
            ((20.0, 25.0, 9.0), (8.0, 9.5, 10.0), 0.0, 0.0),
            ((16.0, 40.0, 5.0), (4.0, 11.0, 4.5), -18.0, 0.0),
            ((28.5, 8.0, -13.0), (3.6, 15.0, 4.0), 0.0, 33.0),
        )
        lat.append(tuple(
            ell((sd * c[0] * spread, c[1], c[2]), (a[0] * vs, a[1] * (0.85 + 0.15 * vs), a[2] * vs), sd * yaw, 4.0, pitch)
            for c, a, yaw, pitch in parts
        ))
    mid_vent = (ell((0.0, 3.0, -3.0), (1.6 * vs**0.8, 12.0, 8.0)),
                ell((0.0, 35.0, -33.0), (6.5 * vs**0.5, 4.5 * vs**0.5, 7.5)))
    aqueduct = cap((0.0, 16.0, -9.0), (0.0, 31.0, -27.0), 1.0, 1.2)
    caudate = (ell((12.5 * spread, -14.0, 10.0), (5.5, 9.0, 9.0)),
               ell((-12.5 * spread, -14.0, 10.0), (5.5, 9.0, 9.0)))
    deep = (ell((23.0, -1.0, 1.0), (6.0, 15.0, 10.0), -12.0), ell((-23.0, -1.0, 1.0), (6.0, 15.0, 10.0), 12.0),
            ell((10.0, 12.0, 2.0), (8.0, 12.0, 8.0)), ell((-10.0, 12.0, 2.0), (8.0, 12.0, 8.0)))
    brainstem = (ell((0.0, 13.0, -13.0), (13.0, 11.0, 10.0)), ell((0.0, 15.0, -31.0), (16.0, 13.0, 13.0)),
                 ell((0.0, 20.0, -52.0), (9.0, 9.0, 14.0)))
    sylv = 0.9 + 1.3 * atrophy
    cisterns = (
        ell((0.0, -8.0, -18.0), (12.0, 8.0, 5.0)),
        ell((0.0, 29.0, -5.0), (8.0, 6.0, 5.0)),
        ell((0.0, 62.0, -54.0), (10.0, 7.0, 7.0)),
        ell((27.0, -5.0, -8.0), (13.0, sylv, 8.0), 13.0),
        ell((-27.0, -5.0, -8.0), (13.0, sylv, 8.0), -13.0),
    )
    shells = ((brainstem[0], 1.2 + 1.2 * atrophy), (brainstem[1], 1.0 + 1.0 * atrophy))
    sella = ell((0.0, -10.0, -31.0), (20.0, 12.0, 7.0))
    fs = float(rng.uniform(0.0, 1.2))
    base_air = (
        ("ethmoid", ell((0.0, -56.0, -32.0), (12.0, 20.0, 13.0)), True),
        ("sphenoid", ell((0.0, -20.0, -39.0), (13.0, 12.0, 10.0)), False),
        ("nasal", ell((0.0, -62.0, -62.0), (9.0, 24.0, 18.0)), False),
        ("maxillary", ell((24.0, -52.0, -68.0), (14.0, 16.0, 15.0)), False),
        ("maxillary", ell((-24.0, -52.0, -68.0), (14.0, 16.0, 15.0)), False),
        ("nasopharynx", ell((0.0, -22.0, -68.0), (12.0, 9.0, 9.0)), False),
        ("mastoid", ell((50.0, 28.0, -42.0), (11.0, 13.0, 13.0)), True),
        ("mastoid", ell((-50.0, 28.0, -42.0), (11.0, 13.0, 13.0)), True),
    )
    orbits = (ell((30.0, -59.0, -33.0), (17.0, 23.0, 16.0)), ell((-30.0, -59.0, -33.0), (17.0, 23.0, 16.0)))
    globes = (ell((31.0, -71.0, -29.0), (11.5, 11.5, 11.5)), ell((-31.0, -71.0, -29.0), (11.5, 11.5, 11.5)))
    lenses = (ell((31.0, -82.0, -29.0), (4.0, 1.8, 4.0)), ell((-31.0, -82.0, -29.0), (4.0, 1.8, 4.0)))
    optic = (cap((31.0, -60.0, -29.0), (10.0, -24.0, -20.0), 2.2, 2.0),
             cap((-31.0, -60.0, -29.0), (-10.0, -24.0, -20.0), 2.2, 2.0))
    y_front = 2.0 - 86.0 * jy * math.sqrt(max(0.0, 1.0 - (11.0 / (60.0 * jz)) ** 2))
    frontal_sinus = ell((0.0, y_front - 5.0, -1.0), (11.0 * fs, 3.2, 7.0 * fs)) if fs > 0.3 else None
    petrous = (cap((52.0, 24.0, -40.0), (15.0, -3.0, -33.0), 6.5, 3.5),
               cap((-52.0, 24.0, -40.0), (-15.0, -3.0, -33.0), 6.5, 3.5))
    zygoma = (cap((52.0, -45.0, -46.0), (62.0, 2.0, -42.0), 3.0, 3.0),
              cap((-52.0, -45.0, -46.0), (-62.0, 2.0, -42.0), 3.0, 3.0))
    ear_canal = (cap((72.0, 10.0, -40.0), (52.0, 13.0, -37.0), 3.5, 3.0),
                 cap((-72.0, 10.0, -40.0), (-52.0, 13.0, -37.0), 3.5, 3.0))
    canal = cap((0.0, 22.0, -50.0), (0.0, 26.0, -130.0), 13.0, 11.0)
    cord = cap((0.0, 22.0, -52.0), (0.0, 26.0, -130.0), 6.5, 6.0)

    tables = _sphere_tables(rng)
    fields_rng = np.random.default_rng(rng.integers(0, 2**63))
    calcs = _calcifications(hard_rng, frame, scale, lat, hard_negatives)
    prof = hard_rng.standard_normal(1440).astype(np.float32)
    prof *= (hard_rng.random(1440) < 0.12).astype(np.float32) * 2.0
    prof = (prof + np.roll(prof, 1) * 0.5 + np.roll(prof, -1) * 0.5) / 1.5
    noise_tap = 0.5 if px < 0.7 else (0.25 if px < 1.2 else 0.0)
    empty = np.zeros((grid.shape[0], 4), np.int64)
    model = HeadModel(
        grid=grid, frame=frame, scale=scale, thickness=thickness, wp=wp, hu=hu, e1=e1, e2=e2, e3=e3, e4=e4, e5=e5,
        face=face, neck=neck, gap=1.0 + 2.4 * atrophy, sulcal_width=1.0 + 2.6 * atrophy,
        cortex=float(rng.uniform(2.4, 3.0)), ihf_half=0.5 + 1.0 * atrophy, falx_half=float(rng.uniform(0.45, 0.7)),
        skull_t0=float(rng.uniform(4.5, 7.0)), scalp_t=float(rng.uniform(4.0, 7.0)),
        fat_t=float(rng.uniform(0.8, 2.5)), temporalis=float(rng.uniform(3.0, 6.0)),
        base_extra=float(rng.uniform(1.5, 4.0)), cupping=float(rng.uniform(0.0, 4.0)),
        tex=SmoothField.random(fields_rng, grid, 7.0), fine=SmoothField.random(fields_rng, grid, 2.6),
        tables=tables, lat_vent=(lat[0], lat[1]), sella=sella, mid_vent=mid_vent, aqueduct=aqueduct, caudate=caudate,
        deep_nuclei=deep, brainstem=brainstem, cisterns=cisterns, shells=shells, base_air=base_air, orbits=orbits,
        globes=globes, lenses=lenses, optic=optic, frontal_sinus=frontal_sinus, petrous=petrous,
        zygoma=zygoma, ear_canal=ear_canal, canal=canal, cord=cord, calcifications=calcs,
        streak_amp=float(hard_rng.uniform(8.0, 22.0)), streak_profile=prof.astype(np.float32),
        noise_sigma=noise_sigma, noise_tap=noise_tap, head_box=empty, brain_box=empty,
    )
    head_box, brain_box = _slice_boxes(model)
    return replace(model, head_box=head_box, brain_box=brain_box)


def _slice_boxes(m: HeadModel) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Per-slice in-plane boxes [j0, j1, i0, i1] that hold the head and the cranial cavity."""
    g = m.grid
    nz, ny, nx = g.shape
    step = max(1, int(round(4.0 / g.spacing[2])))
    jj = np.unique(np.clip(np.arange(0, ny + step, step), 0, ny - 1))
    ii = np.unique(np.clip(np.arange(0, nx + step, step), 0, nx - 1))
    zz, yy, xx = np.meshgrid(g.axis(2), g.axis(1)[jj], g.axis(0)[ii], indexing="ij")
    pts = np.stack([xx.ravel(), yy.ravel(), zz.ravel()], axis=1)
    d_cav = points_cavity(m, pts, bump=False)
    pc = Points.of(pts)
    t_max = m.skull_t0 * 1.5 + m.base_extra + m.scalp_t + m.temporalis + 4.0
    d_head = d_cav - np.float32(t_max)
    for e in (m.face, m.neck):
        _, de, _ = ellipsoid(pc, e.rows, e.p0)
        d_head = np.minimum(d_head, de)
    margin = 2.0 * step * g.spacing[2]
    head = (d_head < margin).reshape(nz, jj.size, ii.size)
    brain = (d_cav < 6.0 + margin).reshape(nz, jj.size, ii.size)
    out = []
    for mask in (head, brain):
        box = np.zeros((nz, 4), np.int64)
        for k in range(nz):
            rows = np.flatnonzero(mask[k].any(axis=1))
            cols = np.flatnonzero(mask[k].any(axis=0))
            if rows.size == 0:
                continue
            box[k] = (max(0, jj[rows[0]] - step), min(ny, jj[rows[-1]] + step + 1),
                      max(0, ii[cols[0]] - step), min(nx, ii[cols[-1]] + step + 1))
        out.append(box)
    return out[0], out[1]


def _boxed(blk: Block, boxes: npt.NDArray[np.int64]) -> Block | None:
    """The part of ``blk`` inside the union of the per-slice ``boxes`` of its slices."""
    b = boxes[blk.k0:blk.k1]
    b = b[b[:, 1] > b[:, 0]]
    if b.size == 0:
        return None
    sub = blk.sub(blk.k0, blk.k1, int(b[:, 0].min()), int(b[:, 1].max()), int(b[:, 2].min()), int(b[:, 3].max()))
    return None if sub.empty else sub


def _calcifications(rng: np.random.Generator, frame: Frame, scale: float, lat: list[tuple[Ell, ...]],
                    enabled: bool) -> tuple[Calcification, ...]:
    """Hard negatives: calcified choroid plexus, pineal, falx, basal ganglia (drawn for every study)."""
    out: list[Calcification] = []
    draws = rng.random(4)
    sizes = rng.uniform(0.7, 1.3, 4)
    hus = rng.uniform(0, 1, 4)
    if not enabled:
        return ()
    if draws[0] < 0.6:
        for side in (0, 1):
            atrium = frame.to_template(lat[side][2].p0)
            c = (float(atrium[0]) * 0.95, float(atrium[1]) + 1.0, float(atrium[2]) - 1.0)
            out.append(Calcification("choroid plexus", make_ell(frame, scale, c, (3.0 * sizes[0], 4.5 * sizes[0],
                                                                                  3.0 * sizes[0])),
                                     110.0 + 200.0 * float(hus[0])))
    if draws[1] < 0.55:
        out.append(Calcification("pineal", make_ell(frame, scale, (0.0, 23.0, 1.0), (3.0 * sizes[1], 3.5 * sizes[1],
                                                                                      3.0 * sizes[1])),
                                 120.0 + 250.0 * float(hus[1])))
    if draws[2] < 0.3:
        y = float(rng.uniform(-45, 35))
        z = float(rng.uniform(35, 55))
        out.append(Calcification("falx", make_ell(frame, scale, (0.0, y, z), (1.3, 7.0 * sizes[2], 3.0 * sizes[2])),
                                 180.0 + 400.0 * float(hus[2])))
    if draws[3] < 0.15:
        for sign in (1.0, -1.0):
            out.append(Calcification("basal ganglia", make_ell(frame, scale, (17.0 * sign, -1.0, 0.0),
                                                               (2.2 * sizes[3], 3.5 * sizes[3], 2.2 * sizes[3])),
                                     90.0 + 110.0 * float(hus[3])))
    return tuple(out)


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------




# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class Fields:
    """Anatomy fields on the cavity block, used by the lesion models (arrays of one shape)."""

    u: tuple[F32, F32, F32]
    d_cav: F32
    w: F32
    f_cav: F32
    f_brain: F32
    depth: F32
    f_par: F32
    f_sas: F32
    d_vent: F32
    f_vent: F32
    d_e3: F32
    tex: F32
    # Weight of CSF in each voxel's final HU (the derivative of the painted HU by the CSF HU),
    # after everything painted over it (dura, sinus, bone, calcifications); None until painted.
    w_csf: F32 | None = None


@dataclass(eq=False)
class Rendered:
    """One rendered block: the HU canvas (before lesions and noise), and the anatomy fields
    on ``brain``, the sub-block that holds the cranial cavity (None where there is none)."""

    block: Block
    brain: Block | None
    fields: Fields | None
    hu: F32 | None
    tissue: npt.NDArray[np.uint8] | None


class Painter:
    """HU canvas (and optional tissue map) painted back to front with partial-volume fractions."""

    def __init__(self, shape: tuple[int, int, int], air: float, tissue: bool) -> None:
        self.v = np.full(shape, air, dtype=np.float32)
        # The CSF share of each voxel: blood that displaces CSF (subarachnoid, intraventricular)
        # changes a voxel by this share times (blood - CSF) HU.
        self.w_csf = np.zeros(shape, dtype=np.float32)
        self.cls: npt.NDArray[np.uint8] | None = np.zeros(shape, np.uint8) if tissue else None
        self.pure: npt.NDArray[np.bool_] | None = np.ones(shape, bool) if tissue else None

    def paint(self, target: F32 | Scalar, f: F32, cls: int, sl: tuple[slice, slice, slice] | None = None) -> None:
        """Paint material ``target`` (HU) of class ``cls`` with fraction ``f`` on region ``sl``."""
        region = (slice(None),) * 3 if sl is None else sl
        lerp_into(self.v[region], target, f)
        lerp_into(self.w_csf[region], np.float32(1.0 if cls == T_CSF else 0.0), f)
        if self.cls is not None and self.pure is not None:
            self.cls[region][f >= 0.5] = cls
            self.pure[region] &= ~((f > 0.03) & (f < 0.97))

    def classes(self) -> npt.NDArray[np.uint8]:
        """Tissue classes, ``T_MIXED`` where a voxel holds more than one material."""
        assert self.cls is not None and self.pure is not None
        return np.where(self.pure, self.cls, np.uint8(T_MIXED)).astype(np.uint8)


def _z_falx(u1: F32) -> F32:
    """Lower edge (template z) of the falx / interhemispheric fissure along template y."""
    ya = u1 - np.float32(5.0)
    ya2 = ya * ya
    front = np.float32(24.0) - np.float32(44.0 / 75.0**2) * ya2
    back = np.float32(24.0) - np.float32(60.0 / 60.0**2) * ya2
    return np.where(ya < 0, front, back).astype(np.float32)


def _local_ells(blk: Block, grid: Grid, ells: tuple[Ell, ...], out: F32, combine: str, w: float | None) -> None:
    """Combine ellipsoid distances (``w`` None) or fractions (``w`` given) into ``out`` by min or max."""
    for e in ells:
        loc = _sub(blk, grid, e.lo, e.hi)
        if loc is None:
            continue
        sb, sl = loc
        de = ellipsoid_fast(sb, e.rows, e.p0)
        val = de if w is None else ramp(de, w)
        if combine == "min":
            np.minimum(out[sl], val, out=out[sl])
        else:
            np.maximum(out[sl], val, out=out[sl])


def _cavity(m: HeadModel, hb: Block, u2: F32, bump: F32) -> tuple[F32, F32, F32]:
    """Signed distance to the inner table (mm), the z-component of its normal, and the signed
    distance to the posterior-fossa ellipsoid (the tentorium; BIG away from it) on ``hb``."""
    g = m.grid
    sx = np.float32(m.scale)
    _, d_cav, nz = ellipsoid(hb, m.e1.rows, m.e1.p0, want_nz=True)
    assert nz is not None
    cut = (np.float32(_BASE_Z) - u2) * sx
    h = np.float32(0.5) + np.float32(0.5 / 3.0) * (d_cav - cut)
    np.clip(h, 0.0, 1.0, out=h)
    d_cav = smax(d_cav, cut, 3.0)
    nz -= np.float32(-m.frame.A[2, 2])
    nz *= h
    nz += np.float32(-m.frame.A[2, 2])
    d_e3 = np.full(hb.shape, BIG, np.float32)
    for e in (*m.e2, m.e3, m.e4, m.e5):
        loc = _sub(hb, g, e.lo, e.hi)
        if loc is None:
            continue
        sb, sl = loc
        _, dl, nl = ellipsoid(sb, e.rows, e.p0, want_nz=True)
        assert nl is not None
        if e is m.e3:
            d_e3[sl] = dl
        da = d_cav[sl]
        hh = np.float32(0.5) + np.float32(0.5 / 6.0) * (da - dl)
        np.clip(hh, 0.0, 1.0, out=hh)
        nz[sl] = nz[sl] * (1 - hh) + nl * hh
        d_cav[sl] = smin(dl, da, 6.0)
    d_cav += np.float32(1.3) * bump
    return d_cav, nz, d_e3


def _ventricles(m: HeadModel, bb: Block, ax: F32) -> F32:
    """Signed distance (mm) to the ventricular system on ``bb``."""
    g = m.grid
    d_vent = np.full(bb.shape, BIG, np.float32)
    for side, chain in enumerate(m.lat_vent):
        lo = np.min([c.lo for c in chain], axis=0)
        hi = np.max([c.hi for c in chain], axis=0)
        loc = _sub(bb, g, lo, hi)
        if loc is None:
            continue
        sb, sl = loc
        dl = np.full(sb.shape, BIG, np.float32)
        for c in chain:
            l2 = _sub(sb, g, c.lo, c.hi)
            if l2 is None:
                continue
            sb2, sl2 = l2
            dc = ellipsoid_fast(sb2, c.rows, c.p0)
            dl[sl2] = smin(dc, dl[sl2], 3.0)
        cd = m.caudate[side]
        l2 = _sub(sb, g, cd.lo, cd.hi)
        if l2 is not None:
            sb2, sl2 = l2
            dcd = ellipsoid_fast(sb2, cd.rows, cd.p0)
            np.maximum(dl[sl2], -dcd, out=dl[sl2])
        np.maximum(dl, np.float32(1.1) - ax[sl], out=dl)
        np.minimum(d_vent[sl], dl, out=d_vent[sl])
    _local_ells(bb, g, m.mid_vent, d_vent, "min", None)
    loc = _sub(bb, g, m.aqueduct.lo, m.aqueduct.hi)
    if loc is not None:
        sb, sl = loc
        da, _ = capsule(sb, m.aqueduct.a, m.aqueduct.b, m.aqueduct.ra, m.aqueduct.rb)
        np.minimum(d_vent[sl], da, out=d_vent[sl])
    return d_vent


def _brain_spaces(m: HeadModel, bb: Block, ub: tuple[F32, F32, F32], depth: F32, f_brain: F32, f_vent: F32,
                  f_cav: F32, ax_b: F32, tex_b: F32, idx_b: npt.NDArray[np.int32], r_b: F32,
                  d_e3: F32) -> tuple[F32, F32, dict[str, F32], tuple[slice, slice, slice]]:
    """Sulci, fissure and cisterns: the parenchyma and subarachnoid fractions, plus what the
    painter needs (sulcal geometry, fissure region and the midline band)."""
    g = m.grid
    sx = np.float32(m.scale)
    wi = np.float32(m.w_iso)
    ws = np.float32(m.w_sheet)
    s_dist = np.take(m.tables.sulcus, idx_b)
    s_dist *= r_b
    s_dist *= np.float32(1.0 / _R0)
    s_dist += np.float32(2.6) * tex_b
    np.abs(s_dist, out=s_dist)
    s_depth = np.take(m.tables.depth, idx_b)
    taper = np.clip(depth / s_depth, 0.0, 1.0)
    taper *= np.float32(-0.45 * 0.5 * m.sulcal_width)
    hw = taper + np.float32(0.5 * m.sulcal_width)
    above_tent = ramp(-d_e3, wi)
    hw *= np.float32(0.45) + np.float32(0.55) * above_tent
    f_sulc = sheet(s_dist, hw, ws)
    f_sulc *= ramp(depth - s_depth, ws)
    # Falx, fissure and sagittal sinus only matter within 10 mm of the midline: work on that band.
    cols = np.flatnonzero((ax_b < np.float32(10.0)).any(axis=(0, 1)))
    band = (slice(None), slice(None), slice(int(cols[0]), int(cols[-1]) + 1) if cols.size else slice(0, 0))
    zf = _z_falx(ub[1][band])
    f_fis = ramp((zf - ub[2][band]) * sx, np.float32(2.0))
    f_fis *= above_tent[band]
    f_ihf = sheet(ax_b[band], np.float32(m.ihf_half), np.float32(m.wp))
    f_ihf *= f_fis
    f_cist = np.zeros(bb.shape, np.float32)
    _local_ells(bb, g, m.cisterns, f_cist, "max", m.w_iso)
    for e, thick in m.shells:
        loc = _sub(bb, g, e.lo - thick, e.hi + thick)
        if loc is not None:
            sb, sl = loc
            de = ellipsoid_fast(sb, e.rows, e.p0)
            shell = sheet(de - np.float32(thick / 2), np.float32(thick / 2), wi)
            np.maximum(f_cist[sl], shell, out=f_cist[sl])
    keep = np.float32(1.0) - f_sulc
    keep *= np.float32(1.0) - f_cist
    keep[band] *= np.float32(1.0) - f_ihf
    f_par = f_brain * keep
    f_par *= np.float32(1.0) - f_vent
    f_sas = f_cav - f_par
    f_sas -= f_vent
    np.maximum(f_sas, 0.0, out=f_sas)
    extra = {"s_dist": s_dist, "hw": hw, "s_depth": s_depth, "f_fis": f_fis, "above_tent": above_tent}
    return f_par, f_sas, extra, band


def render(m: HeadModel, blk: Block, want_hu: bool = True, tissue: bool = False) -> Rendered:
    """Anatomy of ``blk``: HU canvas (if ``want_hu``), tissue classes (if ``tissue``) and the fields
    the lesion models need. Work is confined to the per-slice head and cavity boxes."""
    g = m.grid
    hu = m.hu
    canvas = np.full(blk.shape, hu.air, np.float32) if want_hu else None
    classes = np.full(blk.shape, T_AIR, np.uint8) if (want_hu and tissue) else None
    hb = _boxed(blk, m.head_box)
    if hb is None:
        return Rendered(blk, None, None, canvas, classes)
    bb = _boxed(hb, m.brain_box)
    sx = np.float32(m.scale)
    t = np.float32(m.thickness)
    u = m.frame.u(hb)
    u0, u1, u2 = u
    idx, r = _sphere_index(u)
    d_cav, nz, d_e3_h = _cavity(m, hb, u2, np.take(m.tables.bump, idx))
    nz *= t
    nz *= nz
    nz += np.float32(m.wp**2)
    w = np.sqrt(nz)
    iw = np.float32(1.0) / w
    f_cav = ramp_iw(d_cav, iw)
    ax = np.abs(u0)
    ax *= sx
    tex = m.tex.on(hb)
    wi = np.float32(m.w_iso)

    fields: Fields | None = None
    brain_paint: dict[str, F32] = {}
    sl_b: tuple[slice, slice, slice] = (slice(0, 0),) * 3
    midline: tuple[slice, slice, slice] = (slice(0, 0),) * 3
    if bb is not None:
        sl_b = hb.rel(bb)
        ub = (u0[sl_b], u1[sl_b], u2[sl_b])
        d_b, iw_b, ax_b, tex_b = d_cav[sl_b], iw[sl_b], ax[sl_b], tex[sl_b]
        d_e3 = d_e3_h[sl_b]
        depth = -(d_b + np.float32(m.gap))
        f_brain = ramp_iw(-depth, iw_b)
        d_vent = _ventricles(m, bb, ax_b)
        f_vent = ramp(d_vent, wi)
        f_vent *= f_brain
        f_par, f_sas, brain_paint, midline = _brain_spaces(m, bb, ub, depth, f_brain, f_vent, f_cav[sl_b], ax_b,
                                                           tex_b, idx[sl_b], r[sl_b], d_e3)
        fields = Fields(u=ub, d_cav=d_b, w=w[sl_b], f_cav=f_cav[sl_b], f_brain=f_brain, depth=depth, f_par=f_par,
                        f_sas=f_sas, d_vent=d_vent, f_vent=f_vent, d_e3=d_e3, tex=tex_b)
    if canvas is None:
        return Rendered(blk, bb, fields, None, None)

    pt = Painter(hb.shape, hu.air, tissue)
    # Scalp, temporalis and face.
    t_sk = np.take(m.tables.thick, idx)
    t_sk *= np.float32(0.13 * m.skull_t0)
    t_sk += np.float32(m.skull_t0)
    base = (np.float32(-16.0) - u2) * np.float32(1 / 12.0)
    np.clip(base, 0.0, 1.0, out=base)
    front = (np.float32(12.0) - u1) * np.float32(1 / 12.0)
    np.clip(front, 0.0, 1.0, out=front)
    base *= front
    central = (np.float32(32.0) - ax) * np.float32(1 / 12.0)
    np.clip(central, 0.0, 1.0, out=central)
    base *= central
    t_sk += np.float32(m.base_extra) * base
    temporal = (ax - np.float32(38.0)) * np.float32(1 / 14.0)
    np.clip(temporal, 0.0, 1.0, out=temporal)
    tz = (u2 + np.float32(4.0)) * np.float32(1 / 26.0)
    ty = (u1 + np.float32(6.0)) * np.float32(1 / 38.0)
    tz *= tz
    ty *= ty
    bell = np.float32(1.0) - tz - ty
    np.clip(bell, 0.0, 1.0, out=bell)
    temporal *= bell
    t_sk -= np.float32(0.45 * m.skull_t0) * temporal
    if m.frontal_sinus is not None:
        fsn = m.frontal_sinus
        loc = _sub(hb, g, fsn.lo - 12, fsn.hi + 12)
        if loc is not None:
            sb, sl = loc
            dfs = ellipsoid_fast(sb, fsn.rows, fsn.p0)
            t_sk[sl] += np.float32(5.0) * np.clip(np.float32(1.0) - dfs * np.float32(1 / 14.0), 0.0, 1.0)
    d_skin = d_cav - t_sk
    d_skin -= np.float32(m.scalp_t) + np.float32(m.temporalis) * temporal
    for e in (m.face, m.neck):
        loc = _sub(hb, g, e.lo, e.hi)
        if loc is not None:
            sb, sl = loc
            de = ellipsoid_fast(sb, e.rows, e.p0)
            d_skin[sl] = smin(de, d_skin[sl], 10.0)
    pt.paint(hu.soft, ramp_iw(d_skin, iw), T_SOFT)
    fat = ramp_iw(np.float32(1.6) + d_skin, iw)
    fat *= ramp_iw(-d_skin - np.float32(1.6 + m.fat_t), iw)
    pt.paint(hu.fat, fat, T_FAT)

    # Skull: outer table, diploe, inner table; then the skull base.
    d_outer = d_cav - t_sk
    pt.paint(hu.cortical, ramp_iw(d_outer, iw), T_CORT)
    dip = ramp_iw(d_outer + np.float32(1.8), iw)
    dip *= ramp_iw(np.float32(1.5) - d_cav, iw)
    pt.paint(np.float32(hu.diploe) + np.float32(90.0) * tex, dip, T_DIPLOE)
    outside = ramp_iw(np.float32(1.2) - d_cav, iw)
    _skull_base(m, hb, pt, outside, d_outer)
    pt.paint(hu.csf, f_cav, T_CSF)

    if fields is not None:
        _paint_brain(m, bb, sl_b, midline, pt, fields, brain_paint)

    # Dense skull base bone over everything, air in the ear canals, then calcifications.
    for c in (*m.petrous, *m.zygoma):
        loc = _sub(hb, g, c.lo, c.hi)
        if loc is not None:
            sb, sl = loc
            dc, _ = capsule(sb, c.a, c.b, c.ra, c.rb)
            pt.paint(hu.petrous if c in m.petrous else hu.cortical, ramp(dc, wi), T_CORT, sl)
    for c in m.ear_canal:
        loc = _sub(hb, g, c.lo, c.hi)
        if loc is not None:
            sb, sl = loc
            dc, _ = capsule(sb, c.a, c.b, c.ra, c.rb)
            pt.paint(hu.air, ramp(dc, wi), T_SINUS, sl)
    for calc in m.calcifications:
        e = calc.shape
        loc = _sub(hb, g, e.lo, e.hi)
        if loc is not None:
            sb, sl = loc
            de = ellipsoid_fast(sb, e.rows, e.p0)
            pt.paint(calc.hu, ramp(de, wi), T_CALC, sl)
    sl_h = blk.rel(hb)
    canvas[sl_h] = pt.v
    if fields is not None:
        fields.w_csf = pt.w_csf[sl_b].copy()
    if classes is not None:
        classes[sl_h] = pt.classes()
    return Rendered(blk, bb, fields, canvas, classes)


def _paint_brain(m: HeadModel, bb: Block | None, sl_b: tuple[slice, slice, slice],
                 band: tuple[slice, slice, slice], pt: Painter, f: Fields, extra: dict[str, F32]) -> None:
    """Venous sinus, parenchyma (grey/white/deep/brainstem) and dura on the cavity block."""
    assert bb is not None
    g = m.grid
    hu = m.hu
    wi = np.float32(m.w_iso)
    ws = np.float32(m.w_sheet)
    sx = np.float32(m.scale)
    u0, u1, u2 = f.u
    ax = np.abs(u0) * sx
    depth = f.depth
    pd = np.maximum(extra["s_dist"] - extra["hw"], depth - extra["s_depth"])
    np.minimum(pd, depth, out=pd)
    fis_wall = ax[band] - np.float32(m.ihf_half)
    np.minimum(pd[band], np.where(extra["f_fis"] > 0.5, fis_wall, BIG), out=pd[band])
    pd -= np.float32(m.cortex)
    f_gm = ramp(pd, ws)
    v_par = np.float32(hu.gm - hu.wm) * f_gm
    v_par += np.float32(hu.wm)
    f_deep = np.zeros(bb.shape, np.float32)
    _local_ells(bb, g, (*m.deep_nuclei, *m.caudate), f_deep, "max", m.w_iso)
    lerp_into(v_par, hu.deep, f_deep)
    f_bs = np.zeros(bb.shape, np.float32)
    _local_ells(bb, g, m.brainstem, f_bs, "max", m.w_iso)
    lerp_into(v_par, hu.brainstem, f_bs)
    v_par += np.float32(1.2) * f.tex
    cup = np.maximum(depth, 0.0)
    cup *= np.float32(-1 / 7.0)
    np.exp(cup, out=cup)
    cup *= np.float32(m.cupping)
    v_par += cup
    pt.paint(v_par, f.f_par, T_WM, sl_b)
    if pt.cls is not None:
        klass = np.where(f_gm >= 0.5, T_GM, T_WM).astype(np.uint8)
        klass[f_deep >= 0.5] = T_DEEP
        klass[f_bs >= 0.5] = T_BS
        sel = f.f_par >= 0.5
        pt.cls[sl_b][sel] = klass[sel]
        assert pt.pure is not None
        for frac in (f_gm, f_deep, f_bs):
            pt.pure[sl_b] &= ~((frac > 0.03) & (frac < 0.97))

    # Superior sagittal sinus (a dense triangle at the falx attachment) and the falx itself:
    # normal hyperdensities, classic mimics of blood. Both live in the midline band.
    full_band = tuple(slice(a.start + b.start, a.start + b.stop) for a, b in zip(sl_b, (
        slice(0, bb.shape[0]), slice(0, bb.shape[1]), band[2]), strict=True))
    fb = (full_band[0], full_band[1], full_band[2])
    axb = ax[band]
    hw_sss = f.d_cav[band] * np.float32(1 / 6.0)
    hw_sss += np.float32(1.0)
    np.clip(hw_sss, 0.0, 1.0, out=hw_sss)
    hw_sss *= np.float32(4.5)
    sss = sheet(axb, hw_sss, np.float32(m.wp))
    sss *= f.f_cav[band]
    sss *= ramp((np.float32(-8.0) - u2[band]) * sx, np.float32(3.0))
    pt.paint(hu.venous, sss, T_VEN, fb)
    falx = sheet(axb, np.float32(m.falx_half), np.float32(m.wp))
    falx *= extra["f_fis"]
    falx *= f.f_cav[band]
    pt.paint(hu.dura, falx, T_DURA, fb)
    loc = _sub(bb, g, m.e3.lo, m.e3.hi)
    if loc is not None:
        sb, sl = loc
        tent = sheet(f.d_e3[sl] - np.float32(0.6), np.float32(m.falx_half), wi)
        tent *= ramp(np.float32(12.0) - u1[sl], np.float32(3.0))
        tent *= ramp((np.float32(-34.0) - u2[sl]) * sx, np.float32(3.0))
        tent *= f.f_cav[sl]
        full = tuple(slice(a.start + b.start, a.start + b.stop) for a, b in zip(sl_b, sl, strict=True))
        pt.paint(hu.dura, tent, T_DURA, (full[0], full[1], full[2]))


def _skull_base(m: HeadModel, hb: Block, pt: Painter, outside: F32, d_outer: F32) -> None:
    """Orbits, paranasal sinuses, mastoid cells and the spinal canal (outside the cavity)."""
    g = m.grid
    hu = m.hu
    wi = np.float32(m.w_iso)
    loc = _sub(hb, g, m.sella.lo, m.sella.hi)
    if loc is not None:
        sb, sl = loc
        de = ellipsoid_fast(sb, m.sella.rows, m.sella.p0)
        pt.paint(hu.soft + 10.0, ramp(de, wi) * outside[sl], T_SOFT, sl)
    for e in m.orbits:
        loc = _sub(hb, g, e.lo, e.hi)
        if loc is not None:
            sb, sl = loc
            de = ellipsoid_fast(sb, e.rows, e.p0)
            pt.paint(hu.orbit_fat, ramp(de, wi) * outside[sl], T_ORBIT, sl)
    for c in m.optic:
        loc = _sub(hb, g, c.lo, c.hi)
        if loc is not None:
            sb, sl = loc
            dc, _ = capsule(sb, c.a, c.b, c.ra, c.rb)
            pt.paint(hu.soft, ramp(dc, wi) * outside[sl], T_SOFT, sl)
    for group, val in ((m.globes, hu.globe), (m.lenses, hu.lens)):
        for e in group:
            loc = _sub(hb, g, e.lo, e.hi)
            if loc is not None:
                sb, sl = loc
                de = ellipsoid_fast(sb, e.rows, e.p0)
                pt.paint(val, ramp(de, wi) * outside[sl], T_ORBIT, sl)
    sinuses = list(m.base_air)
    if m.frontal_sinus is not None:
        sinuses.append(("frontal", m.frontal_sinus, False))
    for name, e, cells in sinuses:
        loc = _sub(hb, g, e.lo, e.hi)
        if loc is None:
            continue
        sb, sl = loc
        de = ellipsoid_fast(sb, e.rows, e.p0)
        f = ramp(de, wi)
        f *= outside[sl]
        if name == "frontal":
            f *= ramp(d_outer[sl] + np.float32(1.5), wi)
        if cells:
            f *= ramp(np.float32(0.15) - m.fine.on(sb), np.float32(0.35))
        pt.paint(hu.air, f, T_SINUS, sl)
    for c, val, cls in ((m.canal, hu.csf, T_CSF), (m.cord, hu.brainstem, T_BS)):
        loc = _sub(hb, g, c.lo, c.hi)
        if loc is not None:
            sb, sl = loc
            dc, _ = capsule(sb, c.a, c.b, c.ra, c.rb)
            pt.paint(val, ramp(dc, wi) * outside[sl], cls, sl)


def streaks(m: HeadModel, rd: Rendered) -> None:
    """Beam-hardening streaks between the petrous bones (dark band plus radial streaks), added in place."""
    if rd.brain is None or rd.fields is None or rd.hu is None:
        return
    g = m.grid
    apex = [m.frame.to_template(c.b) for c in m.petrous]
    mid = m.frame.to_patient((apex[0] + apex[1]) / 2 + np.array([0.0, 12.0, -2.0]))
    reach = 70.0 * m.scale
    loc = _sub(rd.brain, g, mid - reach, mid + reach)
    if loc is None:
        return
    sb, sl = loc
    zw = np.exp(-(((sb.z - float(mid[2])) / 14.0) ** 2)).astype(np.float32)
    if float(zw.max()) < 0.02:
        return
    dband, _ = capsule(sb, m.petrous[0].b, m.petrous[1].b, 0.0, 0.0)
    dband *= np.float32(1 / 5.0)
    dband *= dband
    band = np.exp(-dband) * np.float32(-m.streak_amp)
    dx = sb.x[None, :] - np.float32(mid[0])
    dy = sb.y[:, None] - np.float32(mid[1])
    theta = np.arctan2(dy, dx)
    rr = np.sqrt(dx * dx + dy * dy)
    n = m.streak_profile.shape[0]
    ii = ((theta + np.float32(np.pi)) * np.float32(n / (2 * np.pi))).astype(np.int32) % n
    rad = np.take(m.streak_profile, ii) * np.float32(0.35 * m.streak_amp) * np.exp(-rr * np.float32(1 / 30.0))
    total = band + rad[None, :, :]
    total *= zw[:, None, None]
    total *= rd.fields.f_cav[sl]
    full = rd.block.rel(sb)
    rd.hu[full] += total


def add_noise(m: HeadModel, blk: Block, v: F32, rng: np.random.Generator) -> None:
    """Correlated quantum noise (sigma ``m.noise_sigma``), stronger near the skull base, added in place."""
    nk, nj, ni = blk.shape
    a = np.float32(m.noise_tap)
    wn = rng.random((nk, nj + 4, ni + 4), dtype=np.float32)
    wn -= np.float32(0.5)
    if a > 0:
        # Two passes of the 3-tap kernel [a, 1, a] along x and y: a 5x5 low-pass (the NPS of a soft kernel).
        for _ in range(2):
            wn = wn[:, :, 1:-1] + a * (wn[:, :, :-2] + wn[:, :, 2:])
            wn = wn[:, 1:-1, :] + a * (wn[:, :-2, :] + wn[:, 2:, :])
        out = wn
    else:
        out = wn[:, 2:-2, 2:-2].copy()
    af = float(a)
    s1 = 2 * af**4 + 8 * af**2 + (1 + 2 * af**2) ** 2 if af > 0 else 1.0
    std = math.sqrt(s1 * s1 / 12.0)
    zt = (blk.z.astype(np.float64) - m.frame.c[2]) / m.scale
    boost = 1.0 + 0.5 * np.exp(-(((zt + 38.0) / 18.0) ** 2))
    factor = (m.noise_sigma / std * boost).astype(np.float32)
    out *= factor[:, None, None]
    v += out


def points_cavity(m: HeadModel, pts: F64, bump: bool = True) -> F32:
    """Signed distance (mm) to the inner table at LPS points ``pts`` (n, 3)."""
    pc = Points.of(pts)
    _, d, _ = ellipsoid(pc, m.e1.rows, m.e1.p0)
    u = m.frame.u(pc)
    d = smax(d, (np.float32(_BASE_Z) - u[2]) * np.float32(m.scale), 3.0)
    for e in (*m.e2, m.e3, m.e4, m.e5):
        _, dl, _ = ellipsoid(pc, e.rows, e.p0)
        d = smin(dl, d, 6.0)
    if bump:
        idx, _ = _sphere_index(u)
        d = d + np.float32(1.3) * np.take(m.tables.bump, idx)
    return d.astype(np.float32)
