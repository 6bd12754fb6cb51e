"""What the networks see: windows, in-plane resizing and neighbour channels.

The same functions prepare training batches and inference inputs, so that the two
cannot drift apart. A slice is windowed at its own resolution (brain 40/80, subdural
80/200, bone 600/2800 HU, see :mod:`pipeline.windowing`), padded square with air and
resized to ``size x size`` (area averaging when shrinking, bilinear when growing).
Outputs on the model grid go back with :meth:`ModelGrid.to_volume` (bilinear on
logits, then the padding is cropped), so masks come out on the volume's grid.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.findings import LABELS
from pipeline.windowing import apply_window

LOGGER = logging.getLogger(__name__)

# (centre, width) in HU: brain, subdural, bone. Fixed by the trained weights, not by the
# display windows of config.yaml.
MODEL_WINDOWS: tuple[tuple[float, float], ...] = ((40.0, 80.0), (80.0, 200.0), (600.0, 2800.0))

NeighbourWindows = Literal["brain", "all"]


@dataclass(frozen=True)
class InputSpec:
    """The input a network was trained on; stored with its weights and checked at load."""

    size: int  # in-plane pixels (square)
    windows: tuple[tuple[float, float], ...]  # (centre, width) HU, in channel order
    neighbours: int  # slices on each side added as extra channels
    neighbour_windows: NeighbourWindows  # 'brain': the first window only; 'all': every window
    labels: tuple[str, ...] = LABELS

    @property
    def channels(self) -> int:
        """Input channels per slice."""
        per_neighbour = 1 if self.neighbour_windows == "brain" else len(self.windows)
        return len(self.windows) + 2 * self.neighbours * per_neighbour

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"size": self.size, "windows": [list(w) for w in self.windows],
                "neighbours": self.neighbours, "neighbour_windows": self.neighbour_windows,
                "labels": list(self.labels), "channels": self.channels}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InputSpec:
        """Inverse of :meth:`to_dict` (``channels`` is derived, not read)."""
        nw = str(data["neighbour_windows"])
        if nw not in ("brain", "all"):
            raise ValueError(f"neighbour_windows must be 'brain' or 'all', not {nw!r}")
        return cls(size=int(data["size"]),
                   windows=tuple((float(c), float(w)) for c, w in data["windows"]),
                   neighbours=int(data["neighbours"]),
                   neighbour_windows="brain" if nw == "brain" else "all",
                   labels=tuple(str(s) for s in data["labels"]))

    def differences(self, other: InputSpec) -> list[str]:
        """Human-readable differences ``field: self vs other``; empty when equal."""
        out = []
        for name in ("size", "windows", "neighbours", "neighbour_windows", "labels"):
            a, b = getattr(self, name), getattr(other, name)
            if a != b:
                out.append(f"{name}: {a!r} vs {b!r}")
        return out


def classifier_spec(size: int, neighbours: int) -> InputSpec:
    """Classifier input: three windows + the brain window of ``neighbours`` slices each side."""
    return InputSpec(size=size, windows=MODEL_WINDOWS, neighbours=neighbours,
                     neighbour_windows="brain")


def segmenter_spec(size: int, neighbours: int) -> InputSpec:
    """Segmenter input (2.5D): three windows of the slice and of ``neighbours`` each side."""
    return InputSpec(size=size, windows=MODEL_WINDOWS, neighbours=neighbours,
                     neighbour_windows="all")


@dataclass(frozen=True)
class ModelGrid:
    """How a (z, h, w) volume maps onto the square model grid and back."""

    shape: tuple[int, int, int]  # (z, h, w) of the volume
    side: int  # padded square side, pixels
    pad: tuple[int, int]  # (top, left) padding, pixels
    size: int  # model grid side, pixels

    @classmethod
    def for_shape(cls, shape: tuple[int, ...], size: int) -> ModelGrid:
        """Geometry for a volume of ``shape`` (z, h, w)."""
        z, h, w = (int(s) for s in shape)
        side = max(h, w)
        return cls((z, h, w), side, ((side - h) // 2, (side - w) // 2), size)

    def to_model(self, planes: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """(n, c, h, w) on the volume grid -> (n, c, size, size): pad square, resize."""
        _, h, w = self.shape
        top, left = self.pad
        if (h, w) != (self.side, self.side):
            planes = F.pad(planes, (left, self.side - w - left, top, self.side - h - top),
                           value=fill)
        if self.side == self.size:
            return planes
        if self.side > self.size:
            return F.interpolate(planes, size=(self.size, self.size), mode="area")
        return F.interpolate(planes, size=(self.size, self.size), mode="bilinear",
                             align_corners=False)

    def to_volume(self, planes: torch.Tensor) -> torch.Tensor:
        """(n, c, size, size) on the model grid -> (n, c, h, w) on the volume grid."""
        _, h, w = self.shape
        top, left = self.pad
        if self.side != self.size:
            planes = F.interpolate(planes, size=(self.side, self.side), mode="bilinear",
                                   align_corners=False)
        return planes[:, :, top:top + h, left:left + w]


def windows_on_grid(hu: np.ndarray, grid: ModelGrid,
                    windows: tuple[tuple[float, float], ...] = MODEL_WINDOWS,
                    chunk: int = 32, device: torch.device | None = None) -> torch.Tensor:
    """(z, h, w) HU -> (z, len(windows), size, size) float32 in [0, 1] on the model grid.

    Windowing happens at the volume's resolution, ``chunk`` slices at a time, so memory
    stays at a few slices of full-resolution windows. With a CUDA ``device`` the HU go to
    the GPU as they are and the windows and the resize run there (the result stays there);
    the arithmetic is :func:`pipeline.windowing.apply_window`'s, in float32.
    """
    if hu.ndim != 3:
        raise ValueError(f"expected a (z, y, x) volume, got shape {hu.shape}")
    on_gpu = device is not None and device.type == "cuda"
    out = torch.empty((hu.shape[0], len(windows), grid.size, grid.size), dtype=torch.float32,
                      device=device if on_gpu else None)
    for start in range(0, hu.shape[0], chunk):
        part = hu[start:start + chunk]
        if on_gpu:
            raw = torch.from_numpy(np.ascontiguousarray(part)).to(device).float()
            stack = torch.stack([((raw - float(np.float32(c - w / 2.0))) * float(np.float32(1.0 / w)))
                                 .clamp_(0.0, 1.0) for c, w in windows], dim=1)
        else:
            stack = torch.from_numpy(np.stack([apply_window(part, c, w) for c, w in windows],
                                              axis=1))
        out[start:start + chunk] = grid.to_model(stack)
    return out


def neighbour_index(n_slices: int, neighbours: int) -> np.ndarray:
    """(n_slices, 2 * neighbours + 1) slice indices, edge slices repeated at the ends;
    column ``neighbours`` is the slice itself, then -k..-1 and +1..+k around it."""
    offsets = np.arange(-neighbours, neighbours + 1)
    return np.clip(np.arange(n_slices)[:, None] + offsets[None, :], 0, n_slices - 1)


def slice_inputs(windows: torch.Tensor, spec: InputSpec, index: np.ndarray | None = None
                 ) -> torch.Tensor:
    """Network inputs for the slices ``index`` (default: all) of a windowed stack.

    ``windows`` is (z, W, s, s) from :func:`windows_on_grid`; the result is
    (len(index), spec.channels, s, s): the slice's windows, then the neighbours from the
    most inferior to the most superior (brain window only, or all windows).
    """
    z = windows.shape[0]
    rows = np.arange(z) if index is None else np.asarray(index)
    table = neighbour_index(z, spec.neighbours)[rows]
    parts = [windows[torch.from_numpy(table[:, spec.neighbours])]]
    keep = slice(0, 1) if spec.neighbour_windows == "brain" else slice(None)
    for j in range(2 * spec.neighbours + 1):
        if j == spec.neighbours:
            continue
        parts.append(windows[torch.from_numpy(table[:, j])][:, keep])
    return torch.cat(parts, dim=1)
