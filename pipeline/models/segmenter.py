"""2.5D hemorrhage segmenter: a MONAI ``BasicUNet`` on single slices with neighbours.

Input: the three windows of the slice and of ``neighbours`` slices on each side
(channels = 3 x (2 x neighbours + 1)); output: logits of six classes per pixel,
0 = background and 1..5 = :data:`pipeline.findings.SUBTYPE_CODE`. The network runs on
the model grid (``input_size``); :mod:`pipeline.inference` resizes the logits back to
the volume's in-plane grid before the argmax.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from monai.inferers import sliding_window_inference
from monai.networks.nets import BasicUNet
from torch import nn

from pipeline.findings import SUBTYPES

LOGGER = logging.getLogger(__name__)

N_CLASSES = len(SUBTYPES) + 1  # background + subtypes
TILE_OVERLAP = 0.25  # of a tile, between neighbouring tiles


@dataclass(frozen=True)
class SegmenterArch:
    """Hyperparameters that build :class:`Segmenter` (stored with the weights)."""

    in_channels: int = 9
    features: tuple[int, int, int, int, int, int] = (12, 16, 32, 64, 128, 12)
    classes: int = N_CLASSES
    tile: int = 0  # trained on tile x tile crops: run on such tiles; 0 = whole slices

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"name": "monai-basicunet-2.5d", "in_channels": self.in_channels,
                "features": list(self.features), "classes": self.classes, "tile": self.tile}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SegmenterArch:
        """Inverse of :meth:`to_dict`."""
        f = [int(v) for v in data["features"]]
        if len(f) != 6:
            raise ValueError(f"BasicUNet needs 6 feature sizes, got {f}")
        return cls(in_channels=int(data["in_channels"]),
                   features=(f[0], f[1], f[2], f[3], f[4], f[5]), classes=int(data["classes"]),
                   tile=int(data.get("tile", 0)))


class Segmenter(nn.Module):
    """(n, C, H, W) -> (n, classes, H, W) logits; H and W divisible by 16.

    :meth:`predict` is what inference and validation call: a network trained on crops
    (``arch.tile``) runs on overlapping tiles of that size, blended with Gaussian weights
    (MONAI's sliding-window inferer), because its instance norm learned the statistics
    of a crop, not of a whole slice with its air and skull (whole slices scored a Dice
    of 0.42 where tiles scored 0.53, same weights).
    """

    def __init__(self, arch: SegmenterArch) -> None:
        super().__init__()
        self.arch = arch
        self.net = BasicUNet(spatial_dims=2, in_channels=arch.in_channels,
                             out_channels=arch.classes, features=arch.features,
                             act=("LeakyReLU", {"negative_slope": 0.1, "inplace": True}),
                             norm=("instance", {"affine": True}), dropout=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits per pixel."""
        out: torch.Tensor = self.net(x)
        return out

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Logits per pixel of whole slices, tile by tile where the network was trained so."""
        tile = self.arch.tile
        if not tile or (x.shape[-2] <= tile and x.shape[-1] <= tile):
            return self(x)
        out = sliding_window_inference(x, (tile, tile), sw_batch_size=x.shape[0],
                                       predictor=self, overlap=TILE_OVERLAP, mode="gaussian")
        assert isinstance(out, torch.Tensor)
        return out


def build_segmenter(arch: SegmenterArch) -> Segmenter:
    """A fresh segmenter."""
    return Segmenter(arch)
