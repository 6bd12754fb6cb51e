"""CNN-GRU slice/series classifier for the six RSNA 2019 labels.

Each slice (three windows, optionally the brain window of its neighbours) goes through
a small 2D CNN to an embedding; a bidirectional GRU reads the embeddings in slice order
and gives per-slice logits; series logits come from learned attention pooling over the
slices, one attention head per label, whose scores start as the slice logits themselves
(a soft maximum: a series is positive when a slice is) and learn a context term.
Label order is :data:`pipeline.findings.LABELS`.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import torch
from monai.networks.blocks import Convolution
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from pipeline.findings import LABELS

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClassifierArch:
    """Hyperparameters that build :class:`SliceSeriesClassifier` (stored with the weights)."""

    in_channels: int = 5
    widths: tuple[int, ...] = (16, 32, 64, 96, 128)
    embedding: int = 128
    hidden: int = 96
    labels: int = len(LABELS)
    aux_stage: int = 2  # stage (0-based) whose features feed the training-only dense head

    @property
    def aux_level(self) -> int:
        """The stage that feeds the auxiliary head (the last one if aux_stage is beyond)."""
        return min(self.aux_stage, len(self.widths) - 1)

    @property
    def aux_stride(self) -> int:
        """Down-sampling factor of the auxiliary head's output."""
        return int(2 ** (self.aux_level + 1))

    @classmethod
    def for_size(cls, size: int, in_channels: int) -> ClassifierArch:
        """The default network for ``size``-pixel input: above 128 pixels, one narrow
        stride-2 stage in front per doubling, so that the rest of the network (and its
        cost) is that of the 128-pixel one while the first stage sees every pixel."""
        base = cls(in_channels=in_channels)
        extra = 0
        while size > 128 * 2 ** extra:
            extra += 1
        stem = tuple(max(8, base.widths[0] // 2 ** (extra - k)) for k in range(extra))
        return cls(in_channels=in_channels, widths=stem + base.widths,
                   aux_stage=base.aux_stage + extra)

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        d = asdict(self)
        d["widths"] = list(self.widths)
        d["name"] = "cnn-bigru-attention"
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClassifierArch:
        """Inverse of :meth:`to_dict`."""
        return cls(in_channels=int(data["in_channels"]),
                   widths=tuple(int(w) for w in data["widths"]),
                   embedding=int(data["embedding"]), hidden=int(data["hidden"]),
                   labels=int(data["labels"]), aux_stage=int(data.get("aux_stage", 2)))


class SliceEncoder(nn.Module):
    """2D CNN: per stage a strided and a plain 3x3 convolution (batch norm, ReLU), then
    global average and max pooling and a linear projection to the embedding.

    A 1x1 convolution on the features of stage ``aux_stage`` gives coarse per-region
    logits of the six labels; it is trained where masks exist (dense supervision makes
    the encoder learn what blood looks like in far fewer steps) and unused at inference.
    """

    def __init__(self, arch: ClassifierArch) -> None:
        super().__init__()
        stages: list[nn.Module] = []
        c_in = arch.in_channels
        for width in arch.widths:
            stages.append(nn.Sequential(
                Convolution(2, c_in, width, strides=2, kernel_size=3, norm="batch", act="relu"),
                Convolution(2, width, width, strides=1, kernel_size=3, norm="batch", act="relu")))
            c_in = width
        self.stages = nn.ModuleList(stages)
        self.aux_stage = arch.aux_level
        self.aux_head = nn.Conv2d(arch.widths[arch.aux_level], arch.labels, kernel_size=1)
        self.project = nn.Sequential(nn.Linear(2 * c_in, arch.embedding),
                                     nn.LayerNorm(arch.embedding))

    def forward_with_aux(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, C, H, W) -> (embedding (n, E), region logits (n, L, H/s, W/s))."""
        aux = x
        for k, stage in enumerate(self.stages):
            x = stage(x)
            if k == self.aux_stage:
                aux = self.aux_head(x)
        pooled = torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)
        out: torch.Tensor = self.project(pooled)
        return out, aux

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(n, C, H, W) -> (n, embedding)."""
        for stage in self.stages:
            x = stage(x)
        pooled = torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)
        out: torch.Tensor = self.project(pooled)
        return out


class SliceSeriesClassifier(nn.Module):
    """Per-slice and per-series logits for the six labels.

    ``forward(x, valid)`` takes (B, Z, C, H, W) and an optional (B, Z) bool mask of real
    (not padded) slices and returns ``(slice_logits (B, Z, 6), series_logits (B, 6))``.
    For long series use :meth:`encode` in batches then :meth:`sequence`.
    """

    def __init__(self, arch: ClassifierArch) -> None:
        super().__init__()
        self.arch = arch
        self.encoder = SliceEncoder(arch)
        self.rnn = nn.GRU(arch.embedding, arch.hidden, batch_first=True, bidirectional=True)
        ctx = 2 * arch.hidden + arch.embedding
        self.slice_head = nn.Linear(ctx, arch.labels)
        self.attention = nn.Linear(ctx, arch.labels)
        self.sharpness = nn.Parameter(torch.ones(arch.labels))
        self.series_bias = nn.Parameter(torch.zeros(arch.labels))
        nn.init.zeros_(self.attention.weight)
        nn.init.zeros_(self.attention.bias)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(n, C, H, W) slices -> (n, embedding)."""
        out: torch.Tensor = self.encoder(x)
        return out

    def sequence(self, emb: torch.Tensor, valid: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, Z, E) embeddings in slice order -> (slice logits (B, Z, L), series (B, L)).

        ``valid`` marks the real slices; they must come first in each row (padding at the
        end), and padded slices influence neither direction of the GRU nor the pooling.
        """
        if valid is not None and not bool(valid.all()):
            lengths = valid.sum(dim=1).cpu()
            packed = pack_padded_sequence(emb, lengths, batch_first=True, enforce_sorted=False)
            out, _ = self.rnn(packed)
            ctx_rnn, _ = pad_packed_sequence(out, batch_first=True, total_length=emb.shape[1])
        else:
            ctx_rnn, _ = self.rnn(emb)
        ctx = torch.cat([ctx_rnn, emb], dim=-1)
        slice_logits = self.slice_head(ctx).float()
        # Attention per label over slices: scores from the slice's own logit (a soft maximum,
        # learned sharpness) plus a learned term of its context; the series logit is the
        # attention-weighted mean of the slice logits plus a bias.
        scores = self.sharpness.float() * slice_logits + self.attention(ctx).float()
        if valid is not None:
            scores = scores.masked_fill(~valid[:, :, None], float("-inf"))
        weights = torch.softmax(scores, dim=1)
        series_logits = (weights * slice_logits).sum(dim=1) + self.series_bias.float()
        return slice_logits, series_logits

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, Z, C, H, W) -> (slice logits (B, Z, L), series logits (B, L))."""
        b, z = x.shape[:2]
        emb = self.encode(x.reshape(b * z, *x.shape[2:])).reshape(b, z, -1)
        return self.sequence(emb, valid)

    def forward_train(self, x: torch.Tensor, valid: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`forward` plus the auxiliary region logits (B, Z, L, H/s, W/s)."""
        b, z = x.shape[:2]
        emb, aux = self.encoder.forward_with_aux(x.reshape(b * z, *x.shape[2:]))
        sl, se = self.sequence(emb.reshape(b, z, -1), valid)
        return sl, se, aux.reshape(b, z, *aux.shape[1:])


def build_classifier(arch: ClassifierArch) -> SliceSeriesClassifier:
    """A fresh classifier."""
    return SliceSeriesClassifier(arch)
