"""Hemorrhage models of the phantom: placement, size calibration and painting.

Every lesion is a scalar field ``h`` over the voxels plus an anatomical constraint
(inside the cavity, inside the ventricles, in the subarachnoid space, ...): the lesion
is ``{h <= s and constraint}``. Because the shape grows monotonically with ``s``, the
threshold that gives exactly ``N`` voxels is the N-th smallest ``h`` on the lesion's
block, so requested volumes are met to within one voxel (unless the compartment is too
small, e.g. a 40 mL intraventricular bleed in small ventricles: then it is clamped and
logged). The label of a voxel is decided on its centre; the HU carry partial volume.

Shapes (template millimetres, scaled by ``s``):

* epidural: a lens (ellipsoid centred on the inner table, thickness ~1/3.5 of its
  diameter) cut by the inner table: biconvex, does not spread along the convexity.
* subdural: a crescent between the inner table and the brain whose thickness tapers
  from the centre (``T (1 - q)``), along the convexity, the falx or the tentorium.
* subarachnoid: the subarachnoid CSF (sulci, fissures, basal cisterns) inside a region.
  Blood in a CSF space (subarachnoid, intraventricular) replaces the CSF share of each
  voxel and nothing else; a voxel is labelled where that share is at least half, so the
  falx, sinus, bone and calcifications painted over the CSF are never labelled as blood.
* intraparenchymal: an irregular ellipsoid in the parenchyma (ventricles excluded) with
  a hypodense oedema rim that is not labelled.
* intraventricular: blood that layers dependently (largest patient y: the patient lies
  supine) with a horizontal fluid level, or a cast of part of the ventricles.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType

import numpy as np
import numpy.typing as npt

from pipeline.phantom_anatomy import (
    T_BLOOD,
    T_MIXED,
    T_OEDEMA,
    Fields,
    HeadModel,
    Rendered,
    _sub,
    _z_falx,
    points_cavity,
    render,
)
from pipeline.phantom_geometry import F32, F64, Block, lerp_into, ramp, rotation_matrix

LOGGER = logging.getLogger(__name__)

SUBTYPES: tuple[str, ...] = ("epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural")
SUBTYPE_CODES: Mapping[str, int] = MappingProxyType({name: i + 1 for i, name in enumerate(SUBTYPES)})
# Shapes of blood that fills a CSF space and displaces only the CSF there.
CSF_KINDS: frozenset[str] = frozenset({"sah", "cast", "layer"})
# Painting order, lowest priority first: where painted regions overlap, the later one wins.
PAINT_ORDER: tuple[str, ...] = ("subarachnoid", "intraparenchymal", "intraventricular", "subdural", "epidural")
# Log-uniform volume ranges (mL) used when a size is not requested.
DEFAULT_ML: Mapping[str, tuple[float, float]] = MappingProxyType({
    "epidural": (3.0, 80.0),
    "intraparenchymal": (0.5, 60.0),
    "intraventricular": (0.3, 12.0),
    "subarachnoid": (1.0, 25.0),
    "subdural": (3.0, 80.0),
})
_CENTER = (0.0, 2.0, 10.0)


@dataclass(frozen=True)
class LesionRequest:
    """One requested hemorrhage: a subtype and optionally its volume (mL)."""

    subtype: str
    volume_ml: float | None = None

    def __post_init__(self) -> None:
        if self.subtype not in SUBTYPE_CODES:
            raise ValueError(f"Hemorrhage subtype must be one of {', '.join(SUBTYPES)}, not {self.subtype!r}.")
        if self.volume_ml is not None and not (0.01 <= self.volume_ml <= 200.0):
            raise ValueError(f"Requested volume must be between 0.01 and 200 mL, not {self.volume_ml}.")

    @classmethod
    def parse(cls, text: str) -> LesionRequest:
        """``"subdural"`` or ``"subdural:25"`` (25 mL)."""
        name, _, vol = text.strip().partition(":")
        return cls(name.strip().lower(), float(vol) if vol else None)


@dataclass(frozen=True, eq=False)
class LesionModel:
    """A placed lesion: its field ``h``, threshold ``s`` and appearance."""

    subtype: str
    kind: str
    site: str
    center: F64  # patient LPS of the anchor point
    rows: F64  # rows of the shape frame (normalised by the unit axes)
    p0: F64  # origin of the shape frame (patient)
    extent: float  # mm at s = 1 (for the bounding box)
    side: float
    t0: float
    hu: float
    swirl: bool
    irregular: float
    oedema_mm: float
    requested_ml: float | None
    target_ml: float
    s: float = 1.0

    @property
    def code(self) -> int:
        return SUBTYPE_CODES[self.subtype]

    def box(self, m: HeadModel) -> tuple[F64, F64]:
        """Patient bounding box at the current threshold."""
        if self.kind == "layer":
            lo = np.min([e.lo for chain in m.lat_vent for e in chain] + [e.lo for e in m.mid_vent], axis=0)
            hi = np.max([e.hi for chain in m.lat_vent for e in chain] + [e.hi for e in m.mid_vent], axis=0)
            return lo, hi
        r = self._radius(self.s) * m.scale + 6.0 + self.oedema_mm
        return self.center - r, self.center + r

    def _radius(self, s: float) -> float:
        """Radius (template mm) that holds ``{h <= s}``."""
        root = math.sqrt(max(s, 1e-9))
        if self.kind in ("crescent", "falx", "tent"):
            return self.extent * root * 1.1 + self.t0 * root
        if self.kind == "blob":
            return self.extent * s / (1.0 - 1.5 * self.irregular)
        return self.extent * s * 1.05


@dataclass(frozen=True)
class Lesion:
    """A painted hemorrhage as reported to callers (volumes measured on the label map)."""

    subtype: str
    code: int
    site: str
    requested_ml: float | None
    volume_ml: float
    center_lps: tuple[float, float, float]
    hu: float


# --------------------------------------------------------------------------------------------
# Placement
# --------------------------------------------------------------------------------------------


def _direction(theta_deg: float, phi_deg: float) -> F64:
    t, p = math.radians(theta_deg), math.radians(phi_deg)
    return np.array([math.cos(p) * math.cos(t), math.cos(p) * math.sin(t), math.sin(p)])


def surface_point(m: HeadModel, direction_t: F64) -> tuple[F64, F64]:
    """Inner-table point (patient) along a template direction from the brain centre, and the
    outward normal there (patient)."""
    c = np.asarray(_CENTER, dtype=np.float64)
    ts = np.linspace(20.0, 130.0, 111)
    pts_t = c[None, :] + ts[:, None] * direction_t[None, :]
    d = points_cavity(m, m.frame.to_patient(pts_t))
    i = int(np.argmax(d > 0)) if np.any(d > 0) else len(ts) - 1
    lo, hi = ts[max(i - 1, 0)], ts[i]
    for _ in range(20):
        mid = 0.5 * (lo + hi)
        dm = points_cavity(m, m.frame.to_patient((c + mid * direction_t)[None, :]))[0]
        lo, hi = (mid, hi) if dm < 0 else (lo, mid)
    p = m.frame.to_patient(c + 0.5 * (lo + hi) * direction_t)
    eps = 0.5
    offs = np.eye(3) * eps
    grad = (points_cavity(m, p[None, :] + offs) - points_cavity(m, p[None, :] - offs)) / (2 * eps)
    n = grad.astype(np.float64)
    n /= np.linalg.norm(n) + 1e-9
    return np.asarray(p, dtype=np.float64), n


def _tangent_frame(n: F64) -> F64:
    """Columns (n, t1, t2): the normal, a horizontal tangent and the third axis."""
    up = np.array([0.0, 0.0, 1.0])
    t1 = np.cross(up, n)
    if np.linalg.norm(t1) < 1e-3:
        t1 = np.array([1.0, 0.0, 0.0])
    t1 /= np.linalg.norm(t1)
    t2 = np.cross(n, t1)
    return np.stack([n, t1, t2], axis=1)


def _rows(axes_cols: F64, unit: tuple[float, float, float]) -> F64:
    return np.asarray(axes_cols.T / np.asarray(unit)[:, None], dtype=np.float64)


def _side_name(m: HeadModel, p: F64) -> str:
    u = m.frame.to_template(p)
    if abs(u[0]) < 6:
        return "midline"
    return "left" if u[0] > 0 else "right"


def _in_range(m: HeadModel, p: F64, margin: float) -> bool:
    g = m.grid
    z0 = g.origin[2]
    z1 = z0 + (g.shape[0] - 1) * g.spacing[0]
    return z0 + margin <= float(p[2]) <= z1 - margin


def place_lesion(m: HeadModel, rng: np.random.Generator, req: LesionRequest,
                 avoid: tuple[F64, ...] = ()) -> LesionModel:
    """Choose a site and a shape for one requested lesion (not yet calibrated), away from the
    centres in ``avoid`` (40 mm) when possible and inside the scanned slab."""
    vol = req.volume_ml
    if vol is None:
        lo, hi = DEFAULT_ML[req.subtype]
        vol = float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    margin = min(15.0, 0.25 * m.grid.shape[0] * m.grid.spacing[0])
    best: LesionModel | None = None
    best_score = -math.inf
    for _ in range(40):
        les = _draw_shape(m, rng, req.subtype, vol)
        gap = min((float(np.linalg.norm(les.center - a)) for a in avoid), default=1e9)
        score = (1e6 if _in_range(m, les.center, margin) else 0.0) + min(gap, 40.0)
        if les.kind == "layer":
            score += 40.0
        if score > best_score:
            best, best_score = les, score
        if best_score >= 1e6 + 40.0:
            break
    assert best is not None
    return replace(best, requested_ml=req.volume_ml, target_ml=vol)


def _mk(subtype: str, kind: str, site: str, p: F64, rows: F64, extent: float, hu: float, side: float,
        vol: float, t0: float = 1.0, swirl: bool = False, irregular: float = 0.0,
        oedema_mm: float = 0.0) -> LesionModel:
    return LesionModel(subtype=subtype, kind=kind, site=site, center=np.asarray(p, dtype=np.float64),
                       rows=np.asarray(rows, dtype=np.float64), p0=np.asarray(p, dtype=np.float64), extent=extent,
                       side=side, t0=t0, hu=hu, swirl=swirl, irregular=irregular, oedema_mm=oedema_mm,
                       requested_ml=None, target_ml=vol)


def _draw_shape(m: HeadModel, rng: np.random.Generator, subtype: str, vol: float) -> LesionModel:
    side = 1.0 if rng.random() < 0.5 else -1.0
    blood = float(rng.uniform(60.0, 82.0))
    if subtype == "epidural":
        region = rng.choice(["temporal", "frontal", "parietal", "occipital"], p=[0.45, 0.2, 0.25, 0.1])
        theta = {"temporal": 0.0, "frontal": -60.0, "parietal": 20.0, "occipital": 70.0}[str(region)]
        theta += float(rng.uniform(-25, 25))
        phi = {"temporal": (-5, 20), "frontal": (5, 35), "parietal": (30, 55), "occipital": (0, 25)}[str(region)]
        if side < 0:
            theta = 180.0 - theta
        p, n = surface_point(m, _direction(theta, float(rng.uniform(*phi))))
        frame = _tangent_frame(n)
        unit = (10.0, 34.0 * float(rng.uniform(0.85, 1.15)), 30.0 * float(rng.uniform(0.85, 1.15)))
        return _mk(subtype, "lens", f"{_side_name(m, p)} {region} convexity", p, _rows(frame, unit), max(unit),
                   blood, side, vol, swirl=bool(rng.random() < 0.25))
    if subtype == "subdural":
        variant = rng.choice(["convexity", "falx", "tentorium"], p=[0.75, 0.15, 0.10])
        if variant == "convexity":
            theta = float(rng.uniform(-60, 60)) + (0.0 if side > 0 else 180.0)
            p, n = surface_point(m, _direction(theta, float(rng.uniform(0, 45))))
            frame = _tangent_frame(n)
            unit = (1.0, 62.0 * float(rng.uniform(0.85, 1.15)), 50.0 * float(rng.uniform(0.85, 1.15)))
            return _mk(subtype, "crescent", f"{_side_name(m, p)} convexity", p, _rows(frame, unit), max(unit),
                       blood - 4.0, side, vol, t0=10.0, swirl=bool(rng.random() < 0.2))
        if variant == "falx":
            c_t = np.array([side * 1.0, float(rng.uniform(-40, 30)), float(rng.uniform(30, 50))])
            p = m.frame.to_patient(c_t)
            return _mk(subtype, "falx", f"{'left' if side > 0 else 'right'} parafalcine", p, np.eye(3), 45.0,
                       blood - 4.0, side, vol, t0=5.0)
        c_t = np.array([side * float(rng.uniform(12, 28)), float(rng.uniform(35, 50)), -12.0])
        p = m.frame.to_patient(c_t)
        return _mk(subtype, "tent", f"{'left' if side > 0 else 'right'} tentorial", p, np.eye(3), 35.0,
                   blood - 4.0, side, vol, t0=4.0)
    if subtype == "subarachnoid":
        variant = rng.choice(["basal", "sylvian", "convexity", "interhemispheric"], p=[0.35, 0.2, 0.35, 0.1])
        hu = float(rng.uniform(50.0, 70.0))
        if variant == "basal":
            c_t, unit = np.array([0.0, -2.0, -14.0]), (30.0, 28.0, 18.0)
        elif variant == "sylvian":
            c_t, unit = np.array([side * 28.0, -5.0, -8.0]), (20.0, 14.0, 14.0)
        elif variant == "interhemispheric":
            c_t, unit = np.array([0.0, -35.0, 28.0]), (8.0, 30.0, 25.0)
        else:
            theta = float(rng.uniform(-70, 70)) + (0.0 if side > 0 else 180.0)
            ps, n = surface_point(m, _direction(theta, float(rng.uniform(10, 50))))
            c_t = m.frame.to_template(ps - 6.0 * n)
            unit = (22.0, 22.0, 22.0)
        p = m.frame.to_patient(c_t)
        rows = np.diag(1.0 / np.asarray(unit)) @ m.frame.A
        name = f"{_side_name(m, p)} {variant}" if variant in ("sylvian", "convexity") else str(variant)
        return _mk(subtype, "sah", f"{name} subarachnoid", p, rows, max(unit), hu, side, vol)
    if subtype == "intraparenchymal":
        variant = rng.choice(["putamen", "thalamus", "lobar", "cerebellar", "pontine"],
                             p=[0.3, 0.15, 0.35, 0.12, 0.08])
        if variant == "putamen":
            c_t = np.array([side * 24.0, -1.0, 2.0])
        elif variant == "thalamus":
            c_t = np.array([side * 12.0, 13.0, 3.0])
        elif variant == "cerebellar":
            c_t = np.array([side * 22.0, 46.0, -38.0])
        elif variant == "pontine":
            c_t = np.array([0.0, 15.0, -31.0])
        else:
            theta = float(rng.uniform(-80, 80)) + (0.0 if side > 0 else 180.0)
            ps, n = surface_point(m, _direction(theta, float(rng.uniform(5, 45))))
            c_t = m.frame.to_template(ps - float(rng.uniform(14, 26)) * n)
        p = m.frame.to_patient(c_t)
        rot = rotation_matrix(float(rng.uniform(-180, 180)), float(rng.uniform(-30, 30)), float(rng.uniform(-30, 30)))
        ua, ub, uc = (10.0 * float(v) for v in rng.uniform(0.75, 1.3, 3))
        unit = (ua, ub, uc)
        rows = (rot.T @ m.frame.A) / np.asarray(unit)[:, None]
        return _mk(subtype, "blob", f"{_side_name(m, p)} {variant}", p, rows, max(unit),
                   float(rng.uniform(62.0, 85.0)), side, vol, irregular=float(rng.uniform(0.06, 0.22)),
                   oedema_mm=float(rng.uniform(1.5, 5.0)))
    # intraventricular
    if rng.random() < 0.7:
        atria = [m.lat_vent[0][3].p0, m.lat_vent[1][3].p0]
        p = np.asarray((atria[0] + atria[1]) / 2, dtype=np.float64)
        return _mk(subtype, "layer", "dependent (occipital horns)", p, np.eye(3), 60.0,
                   float(rng.uniform(56.0, 78.0)), side, vol)
    choice = int(rng.integers(0, 3))
    part = [m.mid_vent[0], m.lat_vent[0 if side > 0 else 1][1], m.mid_vent[1]][choice]
    name = ["third ventricle", f"{'left' if side > 0 else 'right'} lateral ventricle", "fourth ventricle"][choice]
    p = np.asarray(part.p0, dtype=np.float64)
    unit = (14.0, 14.0, 14.0)
    rows = np.diag(1.0 / np.asarray(unit)) @ m.frame.A
    return _mk(subtype, "cast", f"{name} cast", p, rows, 14.0, float(rng.uniform(60.0, 80.0)), side, vol)


# --------------------------------------------------------------------------------------------
# Fields
# --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class LesionField:
    """``h`` with its constraint on a block, the blood fraction factor and mm per unit of ``h``."""

    h: F32
    ok: npt.NDArray[np.bool_]
    factor: F32
    kappa: F32 | None


def lesion_field(m: HeadModel, les: LesionModel, blk: Block, f: Fields) -> LesionField:
    """Evaluate ``h`` of ``les`` on ``blk`` given the anatomy fields ``f`` of that block."""
    sx = np.float32(m.scale)
    inf = np.float32(np.inf)
    if les.kind in ("lens", "blob", "sah", "cast"):
        h, kappa_e = _ell_f_kappa(blk, les)
        kappa: F32 | None = kappa_e
        if les.kind == "blob":
            h *= np.float32(1.0) + np.float32(les.irregular) * np.clip(f.tex, -1.5, 1.5)
            ok = (f.d_cav + np.float32(m.gap) < 0) & (f.d_vent > 0)
            factor = f.f_brain * (np.float32(1.0) - f.f_vent)
        elif les.kind == "lens":
            ok = f.d_cav < 0
            factor = f.f_cav
        elif les.kind == "sah":
            factor = csf_share(f, f.f_sas)
            ok = factor >= 0.5
            kappa = None
        else:
            factor, ok = _ventricle_blood(f)
            kappa = None
        return LesionField(h, ok, factor.astype(np.float32), kappa)
    if les.kind == "crescent":
        qt1 = blk.lin(les.rows[1], les.p0)
        qt2 = blk.lin(les.rows[2], les.p0)
        qn = blk.lin(les.rows[0] * float(np.linalg.norm(les.rows[1])), les.p0)
        q0 = qt1 * qt1 + qt2 * qt2 + qn * qn
        delta = np.maximum(-f.d_cav, 0.0) * np.float32(1.0 / les.t0)
        inv_r = 0.5 * float(np.linalg.norm(les.rows[1]) + np.linalg.norm(les.rows[2]))
        h, kappa = _crescent_h(delta, q0, les.t0, inv_r)
        ok = f.d_cav < 0
        h = np.where(ok, h, np.float32(np.inf))
        return LesionField(h.astype(np.float32), ok, f.f_cav, kappa.astype(np.float32))
    u0, u1, u2 = f.u
    c_t = m.frame.to_template(les.center)
    if les.kind == "falx":
        off = np.float32(les.side) * u0 * sx - np.float32(0.7)
        dy = (u1 - np.float32(c_t[1])) * np.float32(1 / 40.0)
        dz = (u2 - np.float32(c_t[2])) * np.float32(1 / 20.0)
        q0 = dy * dy + dz * dz
        zf = _z_falx(u1)
        ok = (f.d_cav < 0) & (off > 0) & (u2 > zf) & (f.d_e3 > 0)
        delta = np.maximum(off, 0.0) * np.float32(1.0 / les.t0)
    else:  # tentorium
        above = f.d_e3 - np.float32(0.7)
        dx = (u0 - np.float32(c_t[0])) * np.float32(1 / 30.0)
        dy = (u1 - np.float32(c_t[1])) * np.float32(1 / 30.0)
        q0 = dx * dx + dy * dy
        ok = (f.d_cav < 0) & (above > 0) & (u1 > 12.0) & (u2 > -34.0)
        delta = np.maximum(above, 0.0) * np.float32(1.0 / les.t0)
    h, kappa = _crescent_h(delta, q0, les.t0, 1.0 / (30.0 if les.kind == "tent" else 28.0))
    h = np.where(ok, h, inf).astype(np.float32)
    return LesionField(h, ok, f.f_cav, kappa)


def csf_share(f: Fields, part: F32) -> F32:
    """The share of each voxel held by the CSF of one space (``part``: the subarachnoid or the
    ventricular fraction): the painted CSF weight split between the two spaces. Blood in that
    space replaces this share; a voxel is labelled when the share is at least half (so dura,
    falx, sinus, bone and calcifications painted over the CSF are never labelled as blood)."""
    assert f.w_csf is not None, "the anatomy was rendered without its HU canvas"
    total = f.f_sas + f.f_vent
    share = np.where(total > np.float32(1e-4), part / np.maximum(total, np.float32(1e-4)), np.float32(0.0))
    return (share * f.w_csf).astype(np.float32)


def _ventricle_blood(f: Fields) -> tuple[F32, npt.NDArray[np.bool_]]:
    """Intraventricular blood (cast or layer): the ventricular CSF share it replaces, and
    where it may be labelled (centre in a ventricle, share at least half)."""
    factor = csf_share(f, f.f_vent)
    return factor, (f.d_vent < 0) & (factor >= 0.5)


# Mean HU above which the rest of a voxel (what is not CSF) counts as bone or calcification.
_DENSE_REST_HU = 100.0
# HU of slack in that test (far below the 100 HU it separates, far above float32 rounding).
_REST_TOLERANCE_HU = 0.5


def _soft_rest(clean: F32, share: F32, csf_hu: float) -> npt.NDArray[np.bool_]:
    """Voxels whose part outside the CSF ``share`` is soft tissue (mean HU below
    ``_DENSE_REST_HU``; ``clean`` is the HU before blood, streaks and noise). Blood that fills
    half a voxel next to bone (a 5 mm slab under the vertex) or a calcification reads as
    bone, so it is painted but not labelled."""
    rest = clean - share * np.float32(csf_hu)
    # The tolerance keeps a voxel that is all CSF (share 1, rest 0 up to float32 rounding,
    # which can come out a few 1e-5 HU above 0) on the soft side: without it, blood that
    # fills a sulcus or ventricle was painted but labelled only along the edges.
    limit = (np.float32(1.0) - share) * np.float32(_DENSE_REST_HU) + np.float32(_REST_TOLERANCE_HU)
    return np.asarray(rest <= limit)


def _crescent_h(delta: F32, q0: F32, t0: float, inv_r: float) -> tuple[F32, F32]:
    """``h`` of a layer whose thickness ``t0 sqrt(s) (1 - q0 / s)`` tapers over a patch of radius
    ``r sqrt(s)``: the root of ``s - q0 = delta sqrt(s)``; and ``1 / |grad h|`` in mm."""
    root = np.sqrt(delta * delta + np.float32(4.0) * q0)
    x = (delta + root) * np.float32(0.5)
    h = x * x
    inv_root = np.float32(1.0) / (root + np.float32(1e-6))
    dh_depth = x * (np.float32(1.0) + delta * inv_root) * np.float32(1.0 / t0)
    dh_tan = np.float32(4.0 * inv_r) * x * inv_root * np.sqrt(q0)
    grad = np.sqrt(dh_depth * dh_depth + dh_tan * dh_tan) + np.float32(1e-4)
    return h.astype(np.float32), (np.float32(1.0) / grad).astype(np.float32)


def _ell_f_kappa(blk: Block, les: LesionModel) -> tuple[F32, F32]:
    """Normalised radius ``F`` of the lesion ellipsoid and ``F / |grad F|`` (mm per unit of ``F``)."""
    q = [blk.lin(les.rows[i], les.p0) for i in range(3)]
    norms = [float(np.linalg.norm(les.rows[i])) for i in range(3)]
    f2 = q[0] * q[0] + q[1] * q[1] + q[2] * q[2]
    g2 = (q[0] * norms[0]) ** 2 + (q[1] * norms[1]) ** 2 + (q[2] * norms[2]) ** 2
    f = np.sqrt(f2)
    kappa = (f + np.float32(1e-6)) / (np.sqrt(g2) + np.float32(1e-6 * min(norms)))
    return f.astype(np.float32), kappa.astype(np.float32)


def _layer_h(blk: Block) -> F32:
    """``-y`` (mm) with a negligible tilt that breaks ties between voxels of one row."""
    y = blk.y[None, :, None].astype(np.float32)
    tie = np.float32(1e-3) * (blk.x[None, None, :] + blk.z[:, None, None])
    return np.asarray(-(y + tie), dtype=np.float32)


# --------------------------------------------------------------------------------------------
# Calibration and painting
# --------------------------------------------------------------------------------------------


def _n_target(m: HeadModel, les: LesionModel) -> int:
    return max(1, int(round(les.target_ml * 1000.0 / m.grid.voxel_mm3)))


def _s_guess(les: LesionModel) -> float:
    if les.kind == "layer":
        return 1.0
    power = 2.0 / 3.0 if les.kind in ("crescent", "falx", "tent") else 1.0 / 3.0
    return float((les.target_ml / _unit_volume_ml(les)) ** power)


def _threshold(vals: F32, n_target: int) -> float | None:
    if vals.size <= n_target:
        return None
    part = np.partition(vals, [n_target - 1, n_target])
    return 0.5 * (float(part[n_target - 1]) + float(part[n_target]))


def _clamped(m: HeadModel, les: LesionModel, vals: F32) -> LesionModel:
    if vals.size == 0:
        LOGGER.warning("No room for a %s hemorrhage at %s; it is left out.", les.subtype, les.site)
        return replace(les, s=math.nan)
    LOGGER.warning("A %s hemorrhage of %.2f mL does not fit at %s (%.2f mL available); clamped.",
                   les.subtype, les.target_ml, les.site, vals.size * m.grid.voxel_mm3 / 1000.0)
    return replace(les, s=float(vals.max()) * (1 + 1e-6) + 1e-6)


def _slice_fields(f: Fields, sl: tuple[slice, slice, slice]) -> Fields:
    return Fields(u=(f.u[0][sl], f.u[1][sl], f.u[2][sl]), d_cav=f.d_cav[sl], w=f.w[sl], f_cav=f.f_cav[sl],
                  f_brain=f.f_brain[sl], depth=f.depth[sl], f_par=f.f_par[sl], f_sas=f.f_sas[sl],
                  d_vent=f.d_vent[sl], f_vent=f.f_vent[sl], d_e3=f.d_e3[sl], tex=f.tex[sl],
                  w_csf=None if f.w_csf is None else f.w_csf[sl])


def _unit_volume_ml(les: LesionModel) -> float:
    """Rough volume at s = 1 (only used to size the calibration block)."""
    if les.kind in ("lens", "blob", "sah", "cast"):
        axes = 1.0 / np.linalg.norm(les.rows, axis=1)
        v = 4.0 / 3.0 * math.pi * float(np.prod(axes)) / 1000.0
        return {"lens": 0.5 * v, "blob": v, "sah": 0.06 * v, "cast": 0.15 * v}[les.kind]
    return {"crescent": 47.0, "falx": 6.0, "tent": 3.0}[les.kind]


# --------------------------------------------------------------------------------------------
# Single-pass sizing and painting (the default): candidates are collected while the anatomy
# is rendered, thresholds are found afterwards and the blood is added as a delta.
# --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Cand:
    """Candidate voxels of one lesion (flat volume indices and what painting needs)."""

    idx: npt.NDArray[np.int64]
    h: F32
    ok: npt.NDArray[np.bool_]
    factor: F32
    kappa: F32 | None
    w: F32
    tex: F32
    f_par: F32
    clean: F32
    fine: F32 | None


# First-box size over the rough guess of ``s``, per shape: above the largest ratio seen over
# many seeds and sizes, so that a second pass is rarely needed.
_BOX_FACTOR: Mapping[str, float] = MappingProxyType({
    "lens": 1.7, "blob": 1.35, "sah": 1.6, "cast": 1.6, "crescent": 2.0, "falx": 1.6, "tent": 1.6, "layer": 1.0})


class Collector:
    """Collects, slab by slab, the voxels each lesion may occupy at its generous box ``s_box``."""

    def __init__(self, m: HeadModel, lesions: list[LesionModel]) -> None:
        self.m = m
        self.lesions = lesions
        self.s_box = [_BOX_FACTOR[les.kind] * _s_guess(les) + 0.02 for les in lesions]
        self.parts: list[list[_Cand]] = [[] for _ in lesions]

    def add(self, rd: Rendered) -> None:
        """Record the candidates of every lesion in the rendered block (before streaks and noise)."""
        for i in range(len(self.lesions)):
            self._add_one(i, rd)

    def _add_one(self, i: int, rd: Rendered) -> None:
        if rd.brain is None or rd.fields is None or rd.hu is None:
            return
        g = self.m.grid
        ny, nx = g.shape[1], g.shape[2]
        les = self.lesions[i]
        lo, hi = replace(les, s=self.s_box[i]).box(self.m)
        loc = _sub(rd.brain, g, lo, hi)
        if loc is None:
            return
        sb, sl = loc
        f = _slice_fields(rd.fields, sl)
        kappa: F32 | None
        full = rd.block.rel(sb)
        if les.kind == "layer":
            factor, ok = _ventricle_blood(f)
            h, kappa = _layer_h(sb), np.full(sb.shape, 1.0, np.float32)
        else:
            lf = lesion_field(self.m, les, sb, f)
            h, ok, factor, kappa = lf.h, lf.ok, lf.factor, lf.kappa
        if les.kind in CSF_KINDS:
            ok = ok & _soft_rest(rd.hu[full], factor, self.m.hu.csf)
        if les.kind == "layer":
            keep = ok | (factor > 0)
        elif kappa is None:
            keep = ok & (h <= np.float32(self.s_box[i]))
        else:
            reach = (np.float32(les.oedema_mm) + f.w) / kappa
            keep = (h <= np.float32(self.s_box[i]) + reach) & (factor > 0)
        w = np.full(sb.shape, g.spacing[1], np.float32) if les.kind == "layer" else f.w
        kk, jj, ii = np.nonzero(keep)
        if kk.size == 0:
            return
        idx = ((kk + sb.k0).astype(np.int64) * ny + (jj + sb.j0)) * nx + (ii + sb.i0)
        fine = self.m.fine.on(sb)[keep] if les.swirl else None
        self.parts[i].append(_Cand(idx, h[keep], ok[keep], factor[keep], None if kappa is None else kappa[keep],
                                   w[keep], f.tex[keep], f.f_par[keep], rd.hu[full][keep], fine))

    def _values(self, i: int) -> F32:
        parts = self.parts[i]
        vals = np.concatenate([c.h[c.ok] for c in parts]) if parts else np.zeros(0, np.float32)
        vals = vals[np.isfinite(vals)]
        if self.lesions[i].kind != "layer":
            vals = vals[vals <= np.float32(self.s_box[i])]
        return vals

    def _regrow(self, i: int) -> None:
        """Grow the box of lesion ``i`` and collect it again, rendering only that box (without noise)."""
        g = self.m.grid
        self.s_box[i] *= 1.7
        self.parts[i] = []
        box = g.index_box(*replace(self.lesions[i], s=self.s_box[i]).box(self.m))
        if box is None:
            return
        step = max(1, (1 << 18) // max(1, (box[3] - box[2]) * (box[5] - box[4])))
        for ka in range(box[0], box[1], step):
            rd = render(self.m, g.box(ka, min(box[1], ka + step), *box[2:]), want_hu=True)
            self._add_one(i, rd)

    def thresholds(self) -> list[LesionModel]:
        """The lesions with their thresholds ``s`` (a box that proves too small is grown and collected
        again; a compartment that cannot hold the requested volume is filled and logged)."""
        out = []
        for i, les in enumerate(self.lesions):
            n_target = _n_target(self.m, les)
            for attempt in range(6):
                vals = self._values(i)
                s = _threshold(vals, n_target)
                # The box at s_box holds {h <= s_box} plus the ramp margin, so any s below it is exact.
                if s is not None and (les.kind == "layer" or s < 0.98 * self.s_box[i]):
                    out.append(replace(les, s=s))
                    break
                if les.kind == "layer" or attempt == 5:
                    out.append(_clamped(self.m, les, vals))
                    break
                self._regrow(i)
        return out

    def paint(self, lesions: list[LesionModel], hu: F32, labels: npt.NDArray[np.uint8],
              lesion_id: npt.NDArray[np.uint8], tissue: npt.NDArray[np.uint8] | None) -> None:
        """Add the blood (and oedema) of ``lesions`` to ``hu`` and write the labels, in priority order."""
        cands = [_merge(p) for p in self.parts]
        present = [c for c in cands if c is not None]
        if not present:
            return
        union, first = np.unique(np.concatenate([c.idx for c in present]), return_index=True)
        clean0 = np.concatenate([c.clean for c in present])[first]
        value_now = clean0.copy()
        order = sorted(range(len(lesions)), key=lambda i: PAINT_ORDER.index(lesions[i].subtype))
        hu_flat, lab_flat, id_flat = hu.reshape(-1), labels.reshape(-1), lesion_id.reshape(-1)
        tis_flat = tissue.reshape(-1) if tissue is not None else None
        for i in order:
            les, c = lesions[i], cands[i]
            if c is None or not math.isfinite(les.s):
                continue
            pos = np.searchsorted(union, c.idx)
            cur = value_now[pos]
            s = np.float32(les.s)
            inside = (c.h <= s) & c.ok
            frac: F32
            if c.kappa is None:
                frac = np.where(c.h <= s, c.factor, np.float32(0.0)).astype(np.float32)
            else:
                dist = (c.h - s) * c.kappa
                frac = ramp(dist, c.w) * c.factor
                if les.oedema_mm > 0:
                    rim = ramp(dist - np.float32(les.oedema_mm), np.float32(self.m.w_iso))
                    rim *= np.float32(1.0) - ramp(dist, c.w)
                    rim *= c.f_par
                    lerp_into(cur, np.float32(self.m.hu.wm) - np.float32(9.0) + c.tex, rim)
                    if tis_flat is not None:
                        _classify_flat(tis_flat, c.idx, rim, T_OEDEMA)
            value = np.float32(les.hu) + np.float32(2.0) * c.tex
            if les.swirl and c.fine is not None:
                value = value - np.float32(22.0) * ramp(np.float32(0.9) - c.fine, np.float32(0.4))
            if les.kind in CSF_KINDS:
                # Blood displaces the CSF share (frac) of the voxel and nothing else.
                value -= np.float32(self.m.hu.csf)
            else:
                value -= np.clip(cur, np.float32(-20.0), np.float32(60.0))
            value *= frac
            cur += value
            value_now[pos] = cur
            lab_flat[c.idx[inside]] = np.uint8(les.code)
            id_flat[c.idx[inside]] = np.uint8(i + 1)
            if tis_flat is not None:
                _classify_flat(tis_flat, c.idx, frac, T_BLOOD)
        hu_flat[union] += value_now - clean0


def _merge(parts: list[_Cand]) -> _Cand | None:
    if not parts:
        return None
    kap = None if parts[0].kappa is None else np.concatenate([p.kappa for p in parts if p.kappa is not None])
    fine = None if parts[0].fine is None else np.concatenate([p.fine for p in parts if p.fine is not None])
    return _Cand(np.concatenate([p.idx for p in parts]), np.concatenate([p.h for p in parts]),
                 np.concatenate([p.ok for p in parts]), np.concatenate([p.factor for p in parts]), kap,
                 np.concatenate([p.w for p in parts]), np.concatenate([p.tex for p in parts]),
                 np.concatenate([p.f_par for p in parts]), np.concatenate([p.clean for p in parts]), fine)


def _classify_flat(tissue: npt.NDArray[np.uint8], idx: npt.NDArray[np.int64], frac: F32, cls: int) -> None:
    tissue[idx[frac >= 0.97]] = cls
    tissue[idx[(frac > 0.03) & (frac < 0.97)]] = T_MIXED
