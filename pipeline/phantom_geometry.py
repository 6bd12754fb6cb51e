"""Analytic building blocks of the head phantom: grids, distance fields, smooth noise.

Everything is evaluated in the DICOM patient frame (LPS: +x patient left, +y
posterior, +z superior), in millimetres, on float32 arrays. Shapes are analytic
(ellipsoids, cone capsules) with a first-order signed distance, so that partial
volume can be rendered as a linear ramp of the distance (the exact box filter of
a plane) and the masks are the voxels whose centre lies inside.

Two kinds of coordinate sets share one interface (:class:`Coords`): a
:class:`Block` (a box of grid voxels, evaluated by broadcasting 1-D axes) and
:class:`Points` (scattered points, for placing lesions).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

LOGGER = logging.getLogger(__name__)

# Arrays are float32 at run time; the alias accepts any float dtype so that numpy's scalar
# promotion rules in the stubs do not need casts everywhere.
F32 = npt.NDArray[np.floating[Any]]
F64 = npt.NDArray[np.float64]
Scalar = float | np.floating[Any]
Vec3 = tuple[float, float, float]


def rotation_matrix(yaw_deg: float, pitch_deg: float, roll_deg: float) -> F64:
    """Rotation about z (yaw), then y (roll), then x (pitch), as one 3x3 matrix."""
    yz, px, ry = (math.radians(v) for v in (yaw_deg, pitch_deg, roll_deg))
    rz = np.array([[math.cos(yz), -math.sin(yz), 0.0], [math.sin(yz), math.cos(yz), 0.0], [0.0, 0.0, 1.0]])
    rx = np.array([[1.0, 0.0, 0.0], [0.0, math.cos(px), -math.sin(px)], [0.0, math.sin(px), math.cos(px)]])
    rr = np.array([[math.cos(ry), 0.0, math.sin(ry)], [0.0, 1.0, 0.0], [-math.sin(ry), 0.0, math.cos(ry)]])
    return np.asarray(rz @ rr @ rx, dtype=np.float64)


@dataclass(frozen=True)
class Grid:
    """An axial image grid: ``shape`` and ``spacing`` are (z, y, x); ``origin`` is the LPS
    (x, y, z) position of voxel [0, 0, 0]; the direction is the identity."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]

    @property
    def voxel_mm3(self) -> float:
        """Volume of one voxel in mm^3."""
        return float(self.spacing[0] * self.spacing[1] * self.spacing[2])

    def axis(self, which: int) -> F64:
        """Patient coordinates along image axis ``which`` (0: x/columns, 1: y/rows, 2: z/slices)."""
        n = self.shape[2 - which]
        step = self.spacing[2 - which]
        return self.origin[which] + step * np.arange(n, dtype=np.float64)

    def block(self, k0: int = 0, k1: int | None = None) -> Block:
        """The block of slices ``k0:k1`` over the full in-plane matrix."""
        nz, ny, nx = self.shape
        return self.box(k0, nz if k1 is None else k1, 0, ny, 0, nx)

    def box(self, k0: int, k1: int, j0: int, j1: int, i0: int, i1: int) -> Block:
        """The block of voxels [k0:k1, j0:j1, i0:i1]."""
        return Block(
            k0, k1, j0, j1, i0, i1,
            self.axis(0)[i0:i1].astype(np.float32),
            self.axis(1)[j0:j1].astype(np.float32),
            self.axis(2)[k0:k1].astype(np.float32),
        )

    def index_box(self, lo: F64, hi: F64) -> tuple[int, int, int, int, int, int] | None:
        """Voxel index ranges (k0, k1, j0, j1, i0, i1) covering the LPS box [lo, hi], or None."""
        nz, ny, nx = self.shape
        sz, sy, sx = self.spacing
        ox, oy, oz = self.origin
        i0 = max(0, math.floor((lo[0] - ox) / sx))
        i1 = min(nx, math.ceil((hi[0] - ox) / sx) + 1)
        j0 = max(0, math.floor((lo[1] - oy) / sy))
        j1 = min(ny, math.ceil((hi[1] - oy) / sy) + 1)
        k0 = max(0, math.floor((lo[2] - oz) / sz))
        k1 = min(nz, math.ceil((hi[2] - oz) / sz) + 1)
        if i0 >= i1 or j0 >= j1 or k0 >= k1:
            return None
        return k0, k1, j0, j1, i0, i1


class Coords(Protocol):
    """A set of patient-space points on which fields are evaluated."""

    def lin(self, row: F64 | tuple[float, float, float], p0: F64 | tuple[float, float, float]) -> F32:
        """``row . (p - p0)`` at every point."""
        ...

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the arrays returned by :meth:`lin`."""
        ...

    def gy(self) -> F32:
        """Patient y at every point (broadcastable to :attr:`shape`)."""
        ...


@dataclass(frozen=True, eq=False)
class Block:
    """A box of voxels [k0:k1, j0:j1, i0:i1] with its 1-D patient coordinates."""

    k0: int
    k1: int
    j0: int
    j1: int
    i0: int
    i1: int
    x: F32
    y: F32
    z: F32

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.k1 - self.k0, self.j1 - self.j0, self.i1 - self.i0)

    def lin(self, row: F64 | tuple[float, float, float], p0: F64 | tuple[float, float, float]) -> F32:
        ax = (self.x - np.float32(p0[0])) * np.float32(row[0])
        ay = (self.y - np.float32(p0[1])) * np.float32(row[1])
        az = (self.z - np.float32(p0[2])) * np.float32(row[2])
        # (y + z) + x for every voxel, whatever the block: values never depend on how blocks are cut.
        yz = ay[None, :, None] + az[:, None, None]
        return np.asarray(yz + ax[None, None, :], dtype=np.float32)

    def gy(self) -> F32:
        return self.y[None, :, None]

    def sub(self, k0: int, k1: int, j0: int, j1: int, i0: int, i1: int) -> Block:
        """A sub-block given by absolute indices (clipped to this block)."""
        k0, k1 = max(k0, self.k0), min(k1, self.k1)
        j0, j1 = max(j0, self.j0), min(j1, self.j1)
        i0, i1 = max(i0, self.i0), min(i1, self.i1)
        return Block(
            k0, k1, j0, j1, i0, i1,
            self.x[i0 - self.i0:i1 - self.i0],
            self.y[j0 - self.j0:j1 - self.j0],
            self.z[k0 - self.k0:k1 - self.k0],
        )

    def rel(self, inner: Block) -> tuple[slice, slice, slice]:
        """Slices that cut ``inner`` out of arrays shaped like this block."""
        return (
            slice(inner.k0 - self.k0, inner.k1 - self.k0),
            slice(inner.j0 - self.j0, inner.j1 - self.j0),
            slice(inner.i0 - self.i0, inner.i1 - self.i0),
        )

    @property
    def empty(self) -> bool:
        return self.k0 >= self.k1 or self.j0 >= self.j1 or self.i0 >= self.i1


@dataclass(frozen=True, eq=False)
class Points:
    """Scattered patient-space points (1-D arrays of equal length)."""

    x: F32
    y: F32
    z: F32

    @classmethod
    def of(cls, pts: F64) -> Points:
        """Points from an (n, 3) array of LPS coordinates."""
        p = np.atleast_2d(np.asarray(pts, dtype=np.float64))
        return cls(p[:, 0].astype(np.float32), p[:, 1].astype(np.float32), p[:, 2].astype(np.float32))

    @property
    def shape(self) -> tuple[int, ...]:
        return self.x.shape

    def lin(self, row: F64 | tuple[float, float, float], p0: F64 | tuple[float, float, float]) -> F32:
        ax = (self.x - np.float32(p0[0])) * np.float32(row[0])
        ay = (self.y - np.float32(p0[1])) * np.float32(row[1])
        az = (self.z - np.float32(p0[2])) * np.float32(row[2])
        return np.asarray((ay + az) + ax, dtype=np.float32)

    def gy(self) -> F32:
        return self.y


@dataclass(frozen=True, eq=False)
class Frame:
    """Head frame: template coordinates ``u = A (p - c)`` of patient point ``p``.

    ``A`` folds the head's rotation and its anisotropic size into one matrix, so that
    every structure can be written once in template millimetres.
    """

    A: F64
    c: F64

    @property
    def inv(self) -> F64:
        return np.asarray(np.linalg.inv(self.A), dtype=np.float64)

    def to_patient(self, u: F64 | tuple[float, float, float]) -> F64:
        """Patient position of template point(s) ``u`` (shape (3,) or (n, 3))."""
        uu = np.asarray(u, dtype=np.float64)
        return np.asarray(self.c + uu @ self.inv.T, dtype=np.float64)

    def to_template(self, p: F64) -> F64:
        """Template position of patient point(s) ``p``."""
        return np.asarray((np.asarray(p, dtype=np.float64) - self.c) @ self.A.T, dtype=np.float64)

    def local(self, center: tuple[float, float, float] | F64, semi_axes: tuple[float, float, float] | F64,
              axes: F64 | None = None) -> tuple[F64, F64]:
        """Rows ``B`` and origin ``p0`` such that ``B (p - p0)`` are the ellipsoid's normalised coordinates.

        ``axes`` (columns, template frame) orients the ellipsoid; identity if None.
        """
        q = np.eye(3) if axes is None else np.asarray(axes, dtype=np.float64)
        rows = (q.T @ self.A) / np.asarray(semi_axes, dtype=np.float64)[:, None]
        return np.asarray(rows, dtype=np.float64), self.to_patient(center)

    def u(self, coords: Coords) -> tuple[F32, F32, F32]:
        """Template coordinates (u0, u1, u2) at every point."""
        return (coords.lin(self.A[0], self.c), coords.lin(self.A[1], self.c), coords.lin(self.A[2], self.c))


def ellipsoid(coords: Coords, rows: F64, p0: F64, want_nz: bool = False) -> tuple[F32, F32, F32 | None]:
    """Normalised radius ``F`` (1 on the surface), signed distance ``d`` (mm, < 0 inside)
    and the z-component of the outward normal (if asked) of an ellipsoid.

    ``d`` is the first-order estimate ``(F - 1) / |grad F|``, exact on the axes.
    """
    q0 = coords.lin(rows[0], p0)
    q1 = coords.lin(rows[1], p0)
    q2 = coords.lin(rows[2], p0)
    n0, n1, n2 = (float(np.linalg.norm(rows[m])) for m in range(3))
    s0 = q0 * q0
    s1 = q1 * q1
    s2 = q2 * q2
    f = s0 + s1
    f += s2
    s0 *= np.float32(n0 * n0)
    s1 *= np.float32(n1 * n1)
    s2 *= np.float32(n2 * n2)
    g = s0 + s1
    g += s2
    np.sqrt(g, out=g)
    g += np.float32(1e-6 * min(n0, n1, n2))
    np.sqrt(f, out=f)
    d = f - np.float32(1.0)
    d *= f + np.float32(1e-6)
    d /= g
    nz = None
    if want_nz:
        nz = q0 * np.float32(rows[0, 2])
        nz += q1 * np.float32(rows[1, 2])
        nz += q2 * np.float32(rows[2, 2])
        nz /= g
    return f, d, nz


def ellipsoid_fast(coords: Coords, rows: F64, p0: F64) -> F32:
    """Cheap signed distance (mm) of an ellipsoid: ``(F^2 - 1) a / 2`` with ``a`` the geometric
    mean semi-axis. The surface (d = 0) is exact; only the distance scale is approximate,
    which only changes the width of partial-volume ramps."""
    a = float(np.prod(1.0 / np.linalg.norm(rows, axis=1)) ** (1.0 / 3.0))
    q = coords.lin(rows[0], p0)
    f2 = q * q
    q = coords.lin(rows[1], p0)
    q *= q
    f2 += q
    q = coords.lin(rows[2], p0)
    q *= q
    f2 += q
    f2 -= np.float32(1.0)
    f2 *= np.float32(0.5 * a)
    return f2


def capsule(coords: Coords, a: F64, b: F64, ra: float, rb: float, want_nz: bool = False) -> tuple[F32, F32 | None]:
    """Signed distance (mm) to a cone capsule from ``a`` (radius ``ra``) to ``b`` (radius ``rb``),
    in patient coordinates, and the z-component of its outward normal if asked."""
    e = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    l2 = float(e @ e)
    t = coords.lin(e / l2, a)
    np.clip(t, 0.0, 1.0, out=t)
    ox = coords.lin((1.0, 0.0, 0.0), a) - t * np.float32(e[0])
    oy = coords.lin((0.0, 1.0, 0.0), a) - t * np.float32(e[1])
    oz = coords.lin((0.0, 0.0, 1.0), a) - t * np.float32(e[2])
    dist = np.sqrt(ox * ox + oy * oy + oz * oz)
    d = dist - (np.float32(ra) + t * np.float32(rb - ra))
    nz = None
    if want_nz:
        nz = oz / (dist + np.float32(1e-6))
    return d.astype(np.float32, copy=False), nz


def ramp(d: F32, w: F32 | Scalar) -> F32:
    """Partial-volume fraction of the region ``d < 0`` for a box filter of width ``w`` (mm)."""
    return ramp_iw(d, np.float32(1.0) / np.asarray(w, dtype=np.float32))


def ramp_iw(d: F32, iw: F32 | Scalar) -> F32:
    """:func:`ramp` given the inverse width ``1 / w`` (cheaper when reused)."""
    out = d * (-iw)
    out += np.float32(0.5)
    np.clip(out, 0.0, 1.0, out=out)
    return out.astype(np.float32, copy=False)


def sheet(dist: F32, half_width: F32 | Scalar, w: F32 | Scalar) -> F32:
    """Fraction of a thin slab ``|dist| < half_width`` after a box filter of width ``w`` (mm).

    The plateau is capped at ``2 * half_width / w`` so that sub-voxel sheets fade
    instead of saturating.
    """
    f = ramp(np.abs(dist) - half_width, w)
    cap = np.float32(2.0) * np.asarray(half_width, dtype=np.float32) / np.asarray(w, dtype=np.float32)
    np.minimum(f, cap, out=f)
    np.maximum(f, 0.0, out=f)
    return f


def smin(a: F32, b: F32, k: float) -> F32:
    """Polynomial smooth minimum of two distances (blend width ``k`` mm)."""
    h = np.float32(0.5) + np.float32(0.5 / k) * (b - a)
    np.clip(h, 0.0, 1.0, out=h)
    out = b + h * (a - b)
    out -= np.float32(k) * h * (np.float32(1.0) - h)
    return out.astype(np.float32, copy=False)


def smax(a: F32, b: F32, k: float) -> F32:
    """Polynomial smooth maximum of two distances."""
    return -smin(-a, -b, k)


def lerp_into(v: F32, target: F32 | Scalar, f: F32) -> None:
    """``v += f * (target - v)`` in place (paint a material with fraction ``f``)."""
    t = np.asarray(target, dtype=np.float32) - v
    t *= f
    v += t


def _bspline_weights(t: F64) -> tuple[npt.NDArray[np.intp], F64]:
    """Indices (n, 4) and weights (n, 4) of the uniform cubic B-spline at fractional positions ``t``."""
    i = np.floor(t).astype(np.intp)
    f = t - i
    f2, f3 = f * f, f * f * f
    w = np.stack(
        [(1 - f) ** 3 / 6, (3 * f3 - 6 * f2 + 4) / 6, (-3 * f3 + 3 * f2 + 3 * f + 1) / 6, f3 / 6], axis=-1
    )
    idx = i[:, None] + np.arange(-1, 3)[None, :]
    return idx, w


@dataclass(frozen=True, eq=False)
class SmoothField:
    """A smooth random field of unit standard deviation: a cubic B-spline whose knots are
    aligned with the voxel grid (knot spacing = an integer number of pixels in-plane).

    On a :class:`Block` it is evaluated by separable 4-tap filtering per pixel phase,
    with element-wise float32 operations only (no BLAS), so a value does not depend on
    the block it is computed in and is identical on every machine.
    """

    coef: F32
    origin: F64
    step: F64
    ratio: tuple[int, int]

    @classmethod
    def random(cls, rng: np.random.Generator, grid: Grid, h: float) -> SmoothField:
        """A new field with knot spacing about ``h`` mm covering ``grid`` with 3 knots of margin."""
        sz, sy, sx = grid.spacing
        rx = max(1, round(h / sx))
        ry = max(1, round(h / sy))
        step = np.array([rx * sx, ry * sy, h], dtype=np.float64)
        origin = np.array(grid.origin, dtype=np.float64) - 3 * step
        nx = grid.shape[2] // rx + 8
        ny = grid.shape[1] // ry + 8
        nz = int(math.ceil(grid.shape[0] * sz / h)) + 8
        coef = rng.standard_normal((nz, ny, nx), dtype=np.float32)
        # A cubic B-spline of i.i.d. unit coefficients has a variance of ~0.4786 per axis.
        coef *= np.float32(1.0 / 0.4786**1.5)
        return cls(coef, origin, step, (int(rx), int(ry)))

    @staticmethod
    def _taps(f: float) -> tuple[float, float, float, float]:
        f2, f3 = f * f, f * f * f
        return ((1 - f) ** 3 / 6, (3 * f3 - 6 * f2 + 4) / 6, (-3 * f3 + 3 * f2 + 3 * f + 1) / 6, f3 / 6)

    def _upsample(self, c: F32, axis: int, start: int, stop: int, r: int) -> F32:
        """Evaluate along ``axis`` of ``c`` at grid indices start..stop-1 (knot position 3 + index / r).

        All ``r`` pixel phases are computed at once by broadcasting (4 taps).
        """
        a0 = start // r
        a1 = -(-stop // r)
        nq = a1 - a0
        taps = np.array([self._taps(p / r) for p in range(r)], dtype=np.float32)  # (r, 4)
        cm = np.moveaxis(c, axis, 0)
        extra = (None,) * (cm.ndim - 1)
        acc: F32 | None = None
        for t in range(4):
            seg = cm[2 + a0 + t:2 + a1 + t][:, None]
            term = seg * taps[(slice(None), t, *extra)]
            acc = term if acc is None else acc + term
        assert acc is not None
        full = acc.reshape(nq * r, *cm.shape[1:])[start - a0 * r:stop - a0 * r]
        return np.ascontiguousarray(np.moveaxis(full, 0, axis))

    def on(self, coords: Coords) -> F32:
        """Values at every point of ``coords`` (a :class:`Block` of the field's grid, or :class:`Points`)."""
        if isinstance(coords, Block):
            iz, wz = _bspline_weights((coords.z.astype(np.float64) - self.origin[2]) / self.step[2])
            iz = np.clip(iz, 0, self.coef.shape[0] - 1)
            cz = np.zeros((coords.shape[0], *self.coef.shape[1:]), np.float32)
            for t in range(4):
                cz += self.coef[iz[:, t]] * wz[:, t, None, None].astype(np.float32)
            cx = self._upsample(cz, 2, coords.i0, coords.i1, self.ratio[0])
            return self._upsample(cx, 1, coords.j0, coords.j1, self.ratio[1])
        assert isinstance(coords, Points)
        out = np.zeros(coords.shape, dtype=np.float64)
        iz, wzp = _bspline_weights((coords.z.astype(np.float64) - self.origin[2]) / self.step[2])
        iy, wyp = _bspline_weights((coords.y.astype(np.float64) - self.origin[1]) / self.step[1])
        ix, wxp = _bspline_weights((coords.x.astype(np.float64) - self.origin[0]) / self.step[0])
        nz, ny, nx = self.coef.shape
        iz, iy, ix = np.clip(iz, 0, nz - 1), np.clip(iy, 0, ny - 1), np.clip(ix, 0, nx - 1)
        for a in range(4):
            for b in range(4):
                for c in range(4):
                    out += wzp[:, a] * wyp[:, b] * wxp[:, c] * self.coef[iz[:, a], iy[:, b], ix[:, c]]
        return out.astype(np.float32)
