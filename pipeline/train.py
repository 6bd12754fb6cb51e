"""Training of the classifier and the segmenter: ``train(kind, data, fmt, out, ...)``.

``ich-node train {classifier,segmenter} --data DIR --format {phantom,rsna,ctich} --out DIR``
calls :func:`train`. What it does:

* Data: studies of the folder (see :mod:`pipeline.datasets`) split by a hash of their id
  into train/validation, or, for ``fmt='phantom'`` without a folder, ``n_train`` and
  ``n_val`` phantom studies generated in memory from disjoint seeds. Each study is
  prepared once on the model grid (windows stored as uint8, masks by majority vote).
* Classifier: batches of ``batch`` series, each a random run of ``seq_len`` consecutive
  slices (left-right flips, small shifts); loss = BCE per slice + BCE per series (the
  series label of a run is the OR of its slices) + where a mask exists, BCE of the
  encoder's training-only region head against the labels present in each 8x8 block
  (dense supervision: far fewer steps to learn what blood looks like); labels weighted
  as in the RSNA metric
  (any x2) and ``pos_weight`` = sqrt(negatives/positives) per label (clipped to 1..10).
* Segmenter: batches of ``batch`` slices, ``positive_fraction`` of them with blood;
  a class is drawn first, so thin and rare subtypes are sampled as often as large ones;
  loss = class-weighted cross-entropy + soft Dice over the subtypes present in the batch
  + soft Dice of all blood. CT-ICH voxels of unknown subtype count as blood in the last term and are
  ignored by the other two (MONAI's DiceCELoss has no ignore label, hence our own).
* Each epoch: validation on whole series, ``out/last.pt`` (everything needed to resume)
  and, when the validation score improves, ``out/best.pt`` + ``out/best.json`` (a
  weights file that :func:`pipeline.models.weights.load_weights` accepts). Classifier
  operating points on the validation series go into the metadata (per label the largest
  Youden index, or the highest threshold reaching ``min_sensitivity`` when given).
  ``resume=True`` continues from ``out/last.pt``.
* CUDA: fp16 autocast with a GradScaler; CPU: fp32.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from multiprocessing import Pool
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from pipeline.datasets import (
    UNKNOWN_SUBTYPE,
    DataFormat,
    Study,
    iter_studies,
    phantom_studies,
    phantom_version,
)
from pipeline.errors import InferenceError, PipelineError
from pipeline.evaluate import dice, operating_point, roc_auc, weighted_log_loss
from pipeline.findings import LABELS
from pipeline.inference import cpu_threads
from pipeline.models.classifier import ClassifierArch, SliceSeriesClassifier, build_classifier
from pipeline.models.inputs import (
    MODEL_WINDOWS,
    InputSpec,
    ModelGrid,
    classifier_spec,
    segmenter_spec,
    slice_inputs,
    windows_on_grid,
)
from pipeline.models.segmenter import N_CLASSES, Segmenter, SegmenterArch, build_segmenter
from pipeline.models.weights import ModelKind, WeightsMeta, load_weights, read_meta, save_weights

LOGGER = logging.getLogger(__name__)

Kind = Literal["classifier", "segmenter"]
MODEL_VERSION = "0.6.0"


class TrainingError(PipelineError):
    """Training cannot start or continue (bad data, incompatible checkpoint)."""


@dataclass(frozen=True)
class TrainOptions:
    """Everything that defines a training run (stored in checkpoints and metadata)."""

    kind: Kind
    fmt: DataFormat
    data: str | None
    epochs: int = 20
    batch: int = 4
    lr: float = 2e-3
    seed: int = 0
    size: int = 128
    neighbours: int = 1
    seq_len: int = 24
    steps_per_epoch: int = 0  # 0: one pass over the training studies (classifier) / slices
    n_train: int = 120  # phantom studies generated in memory
    n_val: int = 24
    matrix: int = 128  # phantom in-plane pixels
    val_fraction: float = 0.2
    positive_fraction: float = 0.6
    crop: int = 0  # segmenter: train on crops of crop x crop pixels of the size grid; 0: whole
    min_sensitivity: float | None = None  # operating points: None = Youden, else this sensitivity
    max_minutes: float = 0.0  # 0: no limit; else stop after the epoch that passes it
    device: Literal["auto", "cpu", "cuda"] = "auto"
    command: str = ""
    phantom_options: dict[str, Any] = field(default_factory=dict)
    cache: str | None = None  # folder for prepared in-memory phantom data, shared by runs
    init: str | None = None  # weights file (.pt + sidecar) to start from (fine-tuning)

    @property
    def tile(self) -> int:
        """The crop size when the segmenter trains on crops (smaller than ``size``), else 0;
        the network then runs on tiles of this size (:attr:`SegmenterArch.tile`)."""
        return self.crop if 0 < self.crop < self.size else 0


@dataclass
class Prepared:
    """A study on the model grid, ready for batching."""

    study_id: str
    windows: np.ndarray  # (z, 3, s, s) uint8, value = round(255 * window)
    slice_labels: np.ndarray  # (z, 6) uint8
    mask: np.ndarray | None  # (z, s, s) uint8 codes 0..5 / UNKNOWN_SUBTYPE


@dataclass
class TrainResult:
    """Where the run left its files and how good the best epoch was."""

    out: Path
    best: Path
    last: Path
    best_epoch: int
    best_score: float
    epochs_run: int
    history: list[dict[str, Any]]


# --------------------------------------------------------------------------- networks


def new_network(kind: ModelKind, size: int, neighbours: int, tile: int = 0
                ) -> tuple[nn.Module, InputSpec, dict[str, Any]]:
    """A fresh network of ``kind`` for the given input, with its spec and architecture."""
    if kind == "classifier":
        spec = classifier_spec(size, neighbours)
        c_arch = ClassifierArch.for_size(size, spec.channels)
        return build_classifier(c_arch), spec, c_arch.to_dict()
    spec = segmenter_spec(size, neighbours)
    s_arch = SegmenterArch(in_channels=spec.channels, tile=tile)
    return build_segmenter(s_arch), spec, s_arch.to_dict()


def network_for(kind: ModelKind, arch: dict[str, Any]) -> nn.Module:
    """The network of ``kind`` built from a stored architecture (weights or checkpoint)."""
    if kind == "classifier":
        return build_classifier(ClassifierArch.from_dict(arch))
    return build_segmenter(SegmenterArch.from_dict(arch))


def init_from(net: nn.Module, spec: InputSpec, arch: dict[str, Any], kind: ModelKind,
              path: Path) -> tuple[nn.Module, dict[str, Any]]:
    """Load the state of weights file ``path`` into ``net`` (fine-tuning): its sha256, kind
    and input spec are checked as at inference, and its architecture must be ``arch``;
    TrainingError otherwise. Returns the network and architecture to train.

    One exception: a classifier may start from weights trained at another input size. Its
    encoder is convolutional up to a global pooling, so the same weights run at any size;
    the run then keeps the architecture of the start (not the default for the new size)
    and fine-tunes it at the new size, which is how a larger input is reached without
    training from scratch.
    """
    try:
        expected = spec
        if kind == "classifier":
            stored = read_meta(path).spec
            if stored.size != spec.size:
                expected = replace(spec, size=stored.size)
        state, meta = load_weights(path, expected, kind)
    except InferenceError as exc:
        raise TrainingError(f"--init: {exc}") from exc
    if expected is not spec:
        LOGGER.warning("--init: %s was trained at %d px; fine-tuning it at %d px with its "
                       "own architecture", path, expected.size, spec.size)
        net, arch = network_for(kind, meta.architecture), dict(meta.architecture)
    if meta.architecture != arch:
        raise TrainingError(f"--init: {path} holds architecture {meta.architecture}, this run "
                            f"builds {arch}")
    net.load_state_dict(state)
    LOGGER.info("starting from %s %s %s (sha256 %s)", path, meta.name, meta.version,
                meta.sha256[:12])
    return net, arch


# --------------------------------------------------------------------------- data


def prepare(study: Study, size: int) -> Prepared:
    """Windows and mask of ``study`` on the model grid."""
    grid = ModelGrid.for_shape(study.hu.shape, size)
    win = windows_on_grid(study.hu, grid, MODEL_WINDOWS)
    windows = (win * 255.0).round_().to(torch.uint8).numpy()
    mask = None
    if study.mask is not None:
        mask = downsample_mask(study.mask, grid)
    return Prepared(study.study_id, windows, study.slice_labels.astype(np.uint8), mask)


PhantomJob = tuple[int, dict[str, Any]]  # (seed, options of pipeline.phantom.generate_volume)


def _prepare_job(args: tuple[PhantomJob, int, int]) -> Prepared:
    (seed, options), matrix, size = args
    torch.set_num_threads(1)
    return prepare(next(phantom_studies(1, seed, matrix, **options)), size)


def prepare_phantom(jobs: Sequence[PhantomJob], matrix: int, size: int, processes: int,
                    chunksize: int = 4) -> list[Prepared]:
    """The phantom studies of ``jobs`` at ``matrix`` px on the ``size`` grid, in order,
    generated by ``processes`` worker processes of one torch thread each: how the recipes
    in ``pipeline/weights/recipes`` build their training and validation sets."""
    with Pool(processes) as pool:
        return pool.map(_prepare_job, [(job, matrix, size) for job in jobs],
                        chunksize=chunksize)


def downsample_mask(mask: np.ndarray, grid: ModelGrid) -> np.ndarray:
    """Subtype codes to the model grid by majority vote (area-averaged one-hot + argmax);
    :data:`UNKNOWN_SUBTYPE` is its own class."""
    out = np.empty((mask.shape[0], grid.size, grid.size), np.uint8)
    codes = mask.astype(np.int64)
    codes[codes == UNKNOWN_SUBTYPE] = N_CLASSES
    for a in range(0, mask.shape[0], 16):
        part = torch.from_numpy(codes[a:a + 16])
        onehot = F.one_hot(part, N_CLASSES + 1).permute(0, 3, 1, 2).float()
        small = grid.to_model(onehot).argmax(dim=1).to(torch.uint8)
        small[small == N_CLASSES] = UNKNOWN_SUBTYPE
        out[a:a + 16] = small.numpy()
    return out


def _is_validation(study_id: str, fraction: float) -> bool:
    h = int(hashlib.sha256(study_id.encode()).hexdigest()[:8], 16)
    return (h % 10_000) < fraction * 10_000


def load_data(opts: TrainOptions) -> tuple[list[Prepared], list[Prepared]]:
    """Prepared training and validation studies."""
    def prep(studies: Any, desc: str) -> list[Prepared]:
        return [prepare(s, opts.size) for s in tqdm(studies, desc=desc, unit="study",
                                                    disable=None)]
    if opts.data is None:
        if opts.fmt != "phantom":
            raise TrainingError(f"format {opts.fmt!r} needs --data")
        cached = _cache_file(opts)
        if cached is not None and cached.is_file():
            LOGGER.info("prepared phantom data from %s", cached)
            return _load_prepared(cached)
        # Disjoint seeds: training from seed*10^6, validation from seed*10^6 + 500000.
        base = opts.seed * 1_000_000
        train = prep(iter_studies(None, "phantom", n=opts.n_train, seed=base,
                                  matrix=opts.matrix, **opts.phantom_options), "phantom train")
        val = prep(iter_studies(None, "phantom", n=opts.n_val, seed=base + 500_000,
                                matrix=opts.matrix, **opts.phantom_options), "phantom val")
        if cached is not None:
            _save_prepared(cached, train, val)
    else:
        train, val = [], []
        for study in tqdm(iter_studies(Path(opts.data), opts.fmt), desc="prepare",
                          unit="study", disable=None):
            (val if _is_validation(study.study_id, opts.val_fraction) else train).append(
                prepare(study, opts.size))
    return train, val


def _cache_file(opts: TrainOptions) -> Path | None:
    """Where prepared phantom data of these options is kept (None: no cache)."""
    if opts.cache is None:
        return None
    key = json.dumps([opts.seed, opts.n_train, opts.n_val, opts.matrix, opts.size,
                      opts.phantom_options, phantom_version()], sort_keys=True, default=str)
    return Path(opts.cache) / f"phantom-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"


def _save_prepared(path: Path, train: list[Prepared], val: list[Prepared]) -> None:
    arrays: dict[str, np.ndarray] = {}
    for split, items in (("t", train), ("v", val)):
        for i, p in enumerate(items):
            arrays[f"{split}{i}_w"] = p.windows
            arrays[f"{split}{i}_l"] = p.slice_labels
            if p.mask is not None:
                arrays[f"{split}{i}_m"] = p.mask
            arrays[f"{split}{i}_id"] = np.array(p.study_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, allow_pickle=False, **arrays)
    tmp.replace(path)


def _load_prepared(path: Path) -> tuple[list[Prepared], list[Prepared]]:
    with np.load(path) as data:
        out: tuple[list[Prepared], list[Prepared]] = ([], [])
        for split, items in (("t", out[0]), ("v", out[1])):
            i = 0
            while f"{split}{i}_w" in data:
                m = data[f"{split}{i}_m"] if f"{split}{i}_m" in data else None
                items.append(Prepared(str(data[f"{split}{i}_id"]), data[f"{split}{i}_w"],
                                      data[f"{split}{i}_l"], m))
                i += 1
    return out


def _as_float(windows: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(windows)).float().div_(255.0)


def _augment(x: torch.Tensor, rng: np.random.Generator, y: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same left-right flip and in-plane shift (up to 4 % of the side) for input
    (..., H, W) and target (..., H, W)."""
    max_shift = round(0.04 * x.shape[-1])
    if rng.random() < 0.5:
        x = x.flip(-1)
        y = y.flip(-1) if y is not None else None
    dy, dx = (int(v) for v in rng.integers(-max_shift, max_shift + 1, size=2))
    x = torch.roll(x, shifts=(dy, dx), dims=(-2, -1))
    y = torch.roll(y, shifts=(dy, dx), dims=(-2, -1)) if y is not None else None
    return x, y


def region_targets(mask: torch.Tensor, stride: int) -> torch.Tensor:
    """(n, s, s) subtype codes -> (n, 6, s/stride, s/stride) presence of each label in each
    block (LABELS order; unknown-subtype voxels count for 'any' only)."""
    planes = [mask > 0] + [mask == code for code in range(1, N_CLASSES)]
    onehot = torch.stack(planes, dim=1).float()
    return F.max_pool2d(onehot, kernel_size=stride, stride=stride)


def classifier_batch(studies: list[Prepared], spec: InputSpec, opts: TrainOptions,
                     rng: np.random.Generator, augment: bool = True, aux_stride: int = 8
                     ) -> tuple[torch.Tensor, ...]:
    """(x (B, Z, C, s, s), valid (B, Z), slice targets (B, Z, 6), series targets (B, 6),
    region targets (B, Z, 6, s/aux_stride, s/aux_stride), has_mask (B,))."""
    picks = [studies[int(i)] for i in rng.integers(0, len(studies), size=opts.batch)]
    runs = []
    for p in picks:
        z = p.windows.shape[0]
        n = min(opts.seq_len, z)
        start = int(rng.integers(0, z - n + 1))
        lo, hi = max(0, start - spec.neighbours), min(z, start + n + spec.neighbours)
        win = _as_float(p.windows[lo:hi])
        x = slice_inputs(win, spec, np.arange(start - lo, start - lo + n))
        m = (torch.from_numpy(p.mask[start:start + n].astype(np.int64))
             if p.mask is not None else None)
        if augment:
            x, m = _augment(x, rng, m)
        region = region_targets(m, aux_stride) if m is not None else None
        runs.append((x, torch.from_numpy(p.slice_labels[start:start + n]).float(), region))
    zmax = max(r[0].shape[0] for r in runs)
    b = len(runs)
    side = spec.size // aux_stride
    x = torch.zeros((b, zmax, spec.channels, spec.size, spec.size))
    valid = torch.zeros((b, zmax), dtype=torch.bool)
    ys = torch.zeros((b, zmax, len(LABELS)))
    regions = torch.zeros((b, zmax, len(LABELS), side, side))
    has_mask = torch.zeros(b, dtype=torch.bool)
    for i, (xi, yi, ri) in enumerate(runs):
        x[i, :len(xi)] = xi
        valid[i, :len(xi)] = True
        ys[i, :len(yi)] = yi
        if ri is not None:
            regions[i, :len(ri)] = ri
            has_mask[i] = True
    return x, valid, ys, ys.amax(dim=1), regions, has_mask


def slices_by_class(studies: list[Prepared]) -> dict[int, list[tuple[int, int]]]:
    """(study, slice) pairs per mask code present in the slice (UNKNOWN_SUBTYPE included)."""
    out: dict[int, list[tuple[int, int]]] = {}
    for si, p in enumerate(studies):
        assert p.mask is not None
        for k in np.flatnonzero(np.asarray((p.mask > 0).any(axis=(1, 2)))):
            for code in np.unique(p.mask[k]):
                if code:
                    out.setdefault(int(code), []).append((si, int(k)))
    return out


def segmenter_batch(studies: list[Prepared], spec: InputSpec, opts: TrainOptions,
                    rng: np.random.Generator, positives: dict[int, list[tuple[int, int]]],
                    everything: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(x (B, C, s, s), target (B, s, s) int64 with UNKNOWN_SUBTYPE kept).

    ``positive_fraction`` of the slices have blood: a class drawn uniformly among those
    present (:func:`slices_by_class`), then a slice that has it, so that thin and rare
    subtypes are seen as often as large ones; crops centre on that class."""
    xs, ys = [], []
    codes = sorted(positives)
    for _ in range(opts.batch):
        code: int | None = None
        if codes and rng.random() < opts.positive_fraction:
            code = codes[int(rng.integers(0, len(codes)))]
            pool = positives[code]
        else:
            pool = everything
        si, k = pool[int(rng.integers(0, len(pool)))]
        p = studies[si]
        assert p.mask is not None
        lo, hi = max(0, k - spec.neighbours), min(p.windows.shape[0], k + spec.neighbours + 1)
        x = slice_inputs(_as_float(p.windows[lo:hi]), spec, np.array([k - lo]))[0]
        y = torch.from_numpy(p.mask[k].astype(np.int64))
        if opts.tile:
            x, y = crop_around_blood(x, y, opts.tile, rng, code)
        x, y2 = _augment(x, rng, y)
        assert y2 is not None
        xs.append(x)
        ys.append(y2)
    return torch.stack(xs), torch.stack(ys)


def crop_around_blood(x: torch.Tensor, y: torch.Tensor, crop: int, rng: np.random.Generator,
                      code: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``crop`` x ``crop`` window of input (C, s, s) and target (s, s): around a random
    blood pixel (of class ``code`` when given; anywhere in the window) when the slice has
    such blood, else anywhere.

    Training on crops costs what a whole slice of ``crop`` pixels costs, at the resolution
    of the ``s`` grid; a fully convolutional network then runs on whole slices."""
    side = y.shape[-1]
    blood = torch.nonzero(y > 0 if code is None else y == code)
    if len(blood):
        cy, cx = (int(v) for v in blood[int(rng.integers(0, len(blood)))])
        top = int(rng.integers(cy - crop + 1, cy + 1))
        left = int(rng.integers(cx - crop + 1, cx + 1))
    else:
        top, left = (int(v) for v in rng.integers(0, side - crop + 1, size=2))
    top, left = min(max(top, 0), side - crop), min(max(left, 0), side - crop)
    return x[..., top:top + crop, left:left + crop], y[top:top + crop, left:left + crop]


# --------------------------------------------------------------------------- losses


def label_weights() -> torch.Tensor:
    """RSNA metric weights (any x2), normalised to sum to the number of labels."""
    w = torch.tensor([2.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    return w * len(w) / w.sum()


def pos_weights(studies: list[Prepared]) -> tuple[torch.Tensor, torch.Tensor]:
    """BCE pos_weight per label: sqrt(negatives / positives), clipped to [1, 10], per slice
    and per series (the square root keeps rare labels from dominating the gradient noise)."""
    sl = np.concatenate([p.slice_labels for p in studies]).astype(np.float64)
    se = np.stack([p.slice_labels.max(axis=0) for p in studies]).astype(np.float64)

    def ratio(y: np.ndarray) -> torch.Tensor:
        pos = y.sum(axis=0)
        neg = len(y) - pos
        return torch.tensor(np.clip(np.sqrt(neg / np.maximum(pos, 1.0)), 1.0, 10.0),
                            dtype=torch.float32)
    return ratio(sl), ratio(se)


def classifier_loss(slice_logits: torch.Tensor, series_logits: torch.Tensor,
                    valid: torch.Tensor, y_slice: torch.Tensor, y_series: torch.Tensor,
                    pw_slice: torch.Tensor, pw_series: torch.Tensor,
                    aux: torch.Tensor | None = None, regions: torch.Tensor | None = None,
                    has_mask: torch.Tensor | None = None, aux_weight: float = 1.0
                    ) -> torch.Tensor:
    """Weighted BCE per slice (valid slices only) + weighted BCE per series + (where the
    study has a mask) weighted BCE of the region logits against block-wise presence."""
    lw = label_weights().to(slice_logits.device)
    per = F.binary_cross_entropy_with_logits(slice_logits, y_slice, pos_weight=pw_slice,
                                             reduction="none")
    slice_term = (per * lw).mean(-1)[valid].mean()
    ser = F.binary_cross_entropy_with_logits(series_logits, y_series, pos_weight=pw_series,
                                             reduction="none")
    loss = slice_term + (ser * lw).mean()
    if aux is not None and regions is not None and has_mask is not None and bool(has_mask.any()):
        keep = valid & has_mask[:, None]
        dense = F.binary_cross_entropy_with_logits(
            aux.float()[keep], regions[keep], reduction="none",
            pos_weight=torch.full((len(LABELS), 1, 1), 4.0, device=aux.device))
        loss = loss + aux_weight * (dense.mean(dim=(-1, -2)) * lw).mean()
    return loss


def class_weights(studies: list[Prepared]) -> torch.Tensor:
    """Cross-entropy class weights: inverse square root of voxel frequency, background 1,
    capped at 20."""
    counts = np.zeros(N_CLASSES)
    for p in studies:
        assert p.mask is not None
        counts += np.bincount(p.mask.ravel()[p.mask.ravel() < N_CLASSES],
                              minlength=N_CLASSES)[:N_CLASSES]
    freq = counts / max(counts.sum(), 1.0)
    w = np.sqrt(freq[0] / np.maximum(freq, 1e-9))
    w[counts == 0] = 1.0
    return torch.tensor(np.clip(w, 1.0, 20.0), dtype=torch.float32)


def segmenter_loss(logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor,
                   smooth: float = 1.0) -> torch.Tensor:
    """Class-weighted CE (unknown-subtype voxels ignored) + mean soft Dice of the subtypes
    (over known voxels) + soft Dice of all blood (unknown voxels count as blood)."""
    logits = logits.float()
    known = target != UNKNOWN_SUBTYPE
    ce = F.cross_entropy(logits, target.masked_fill(~known, -100), weight=weights.to(
        logits.device), ignore_index=-100)
    prob = torch.softmax(logits, dim=1)
    onehot = F.one_hot(target.clamp(max=N_CLASSES - 1) * known, N_CLASSES).permute(0, 3, 1, 2)
    k = known[:, None].float()
    inter = (prob[:, 1:] * onehot[:, 1:] * k).sum(dim=(0, 2, 3))
    present = (onehot[:, 1:] * k).sum(dim=(0, 2, 3))
    denom = (prob[:, 1:] * k).sum(dim=(0, 2, 3)) + present
    # Only the subtypes present in the batch: the Dice of an absent class only pushes its
    # probability to zero everywhere, which silenced thin, rare subarachnoid blood (the
    # cross-entropy still penalises false positives of every class).
    sub_dice = (1.0 - (2.0 * inter + smooth) / (denom + smooth))[present > 0]
    fg_p = 1.0 - prob[:, 0]
    fg_t = (target > 0).float()
    fg_dice = 1.0 - (2.0 * (fg_p * fg_t).sum() + smooth) / (fg_p.sum() + fg_t.sum() + smooth)
    return ce + (sub_dice.mean() if len(sub_dice) else ce.new_zeros(())) + fg_dice


# --------------------------------------------------------------------------- validation


@torch.no_grad()
def validate_classifier(model: SliceSeriesClassifier, studies: list[Prepared],
                        spec: InputSpec, device: torch.device, min_sensitivity: float | None,
                        batch: int = 32) -> dict[str, Any]:
    """Whole-series validation: AUCs, weighted log loss and operating points."""
    model.eval()
    sp, sy, pp, py = [], [], [], []
    for p in studies:
        win = _as_float(p.windows)
        z = win.shape[0]
        emb = torch.cat([model.encode(slice_inputs(win, spec, np.arange(a, min(a + batch, z)))
                                      .to(device)) for a in range(0, z, batch)])
        sl, se = model.sequence(emb[None])
        pp.append(torch.sigmoid(sl[0]).cpu().numpy())
        py.append(p.slice_labels)
        sp.append(torch.sigmoid(se[0]).cpu().numpy())
        sy.append(p.slice_labels.max(axis=0))
    ps, ys, pl, yl = np.stack(sp), np.stack(sy), np.concatenate(pp), np.concatenate(py)
    out: dict[str, Any] = {"auc_series": {}, "auc_slice": {}, "operating_points": {}}
    for i, name in enumerate(LABELS):
        out["auc_series"][name] = roc_auc(ys[:, i], ps[:, i])
        out["auc_slice"][name] = roc_auc(yl[:, i], pl[:, i])
        out["operating_points"][name] = operating_point(ys[:, i], ps[:, i], min_sensitivity)
    out["weighted_log_loss_slice"] = weighted_log_loss(yl, pl)
    out["weighted_log_loss_series"] = weighted_log_loss(ys, ps)
    aucs = [v for v in out["auc_series"].values() if v is not None]
    aucs += [v for v in out["auc_slice"].values() if v is not None]
    out["score"] = float(np.mean(aucs)) - 0.01 * out["weighted_log_loss_slice"] if aucs else \
        -out["weighted_log_loss_slice"]
    return out


@torch.no_grad()
def validate_segmenter(model: Segmenter, studies: list[Prepared], spec: InputSpec,
                       device: torch.device, batch: int = 32) -> dict[str, Any]:
    """Dice per class on the model grid, pooled over the validation studies."""
    model.eval()
    dices: dict[str, list[float]] = {name: [] for name in (*LABELS[1:], "all")}
    for p in studies:
        assert p.mask is not None
        win = _as_float(p.windows)
        z = win.shape[0]
        pred = torch.cat([model.predict(slice_inputs(win, spec, np.arange(a, min(a + batch, z)))
                                        .to(device)).argmax(1).cpu() for a in range(0, z, batch)])
        ref = torch.from_numpy(p.mask.astype(np.int64))
        known = ref != UNKNOWN_SUBTYPE
        for code, name in enumerate(LABELS[1:], start=1):
            d = dice((ref == code).numpy(), ((pred == code) & known).numpy())
            if d is not None and (ref == code).any():
                dices[name].append(d)
        d = dice((ref > 0).numpy(), (pred > 0).numpy())
        if d is not None and (ref > 0).any():
            dices["all"].append(d)
    out: dict[str, Any] = {"dice": {k: (float(np.mean(v)) if v else None)
                                    for k, v in dices.items()}}
    sub = [v for k, v in out["dice"].items() if v is not None and k != "all"]
    out["score"] = float(np.mean(sub)) if sub else 0.0
    return out


# --------------------------------------------------------------------------- loop


def learning_rate(step: int, total: int, peak: float, warmup: float = 0.1) -> float:
    """Linear warm-up over the first ``warmup`` of ``total`` steps, then cosine decay to
    1 % of ``peak``; a run resumed with more epochs continues on the longer schedule."""
    total = max(total, 1)
    ramp = max(int(warmup * total), 1)
    if step < ramp:
        return peak * (0.04 + 0.96 * step / ramp)
    t = min((step - ramp) / max(total - ramp, 1), 1.0)
    return peak * (0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * t)))


def _device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise TrainingError("--device cuda but torch sees no CUDA device")
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda o: o.item() if hasattr(o, "item")
                                 else str(o)))


def train(kind: Kind, data: Path | None, fmt: DataFormat, out: Path, *, epochs: int = 20,
          batch: int = 4, lr: float = 2e-3, seed: int = 0, size: int = 128,
          resume: bool = False, neighbours: int = 1, seq_len: int = 24,
          steps_per_epoch: int = 0, n_train: int = 120, n_val: int = 24, matrix: int = 128,
          max_minutes: float = 0.0, device: Literal["auto", "cpu", "cuda"] = "auto",
          command: str = "", phantom_options: dict[str, Any] | None = None,
          cache: Path | None = None, crop: int = 0, init: Path | None = None,
          studies: Sequence[Study] | None = None, val_studies: Sequence[Study] | None = None
          ) -> TrainResult:
    """Train ``kind`` and write ``out/last.pt``, ``out/best.pt`` and ``out/best.json``.

    See the module docstring; ``phantom_options`` go to the phantom generator.
    ``studies`` / ``val_studies`` replace the data source (tests, notebooks); ``cache``
    keeps prepared in-memory phantom data in a folder so that a second run with the same
    seed, counts and sizes skips the generation. ``init`` starts from a weights file of the
    same architecture and input spec (fine-tuning; a resumed checkpoint takes precedence).
    Raises :class:`TrainingError` when the data or a checkpoint to resume is unusable.
    """
    opts = TrainOptions(kind=kind, fmt=fmt, data=str(data) if data else None, epochs=epochs,
                        batch=batch, lr=lr, seed=seed, size=size, neighbours=neighbours,
                        seq_len=seq_len, steps_per_epoch=steps_per_epoch, n_train=n_train,
                        n_val=n_val, matrix=matrix, max_minutes=max_minutes, device=device,
                        command=command, phantom_options=dict(phantom_options or {}),
                        cache=str(cache) if cache else None, crop=crop,
                        init=str(init) if init else None)
    given = None
    if studies is not None:
        given = ([prepare(s, size) for s in studies],
                 [prepare(s, size) for s in (val_studies if val_studies is not None
                                             else studies)])
    return run_training(opts, out, resume, given)


def run_training(opts: TrainOptions, out: Path, resume: bool = False,
                 data: tuple[list[Prepared], list[Prepared]] | None = None) -> TrainResult:
    """:func:`train` with its options gathered (``data``: prepared studies to use)."""
    t_start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    dev = _device(opts.device)
    if dev.type == "cpu":
        torch.set_num_threads(cpu_threads())
    torch.manual_seed(opts.seed)
    rng = np.random.default_rng(opts.seed)
    last_path, best_path = out / "last.pt", out / "best.pt"
    resuming = resume and last_path.is_file()
    net, spec, arch = new_network(opts.kind, opts.size, opts.neighbours, opts.tile)
    ckpt: dict[str, Any] | None = None
    if resuming:
        ckpt = torch.load(last_path, map_location="cpu", weights_only=False)
        if ckpt.get("architecture", arch) != arch:  # fine-tuned from another size's weights
            arch = dict(ckpt["architecture"])
            net = network_for(opts.kind, arch)
    elif opts.init:
        net, arch = init_from(net, spec, arch, opts.kind, Path(opts.init))
    net.to(dev)
    train_set, val_set = data if data is not None else load_data(opts)
    if opts.kind == "segmenter":
        train_set = [p for p in train_set if p.mask is not None]
        val_set = [p for p in val_set if p.mask is not None]
    if not train_set or not val_set:
        raise TrainingError(f"need training and validation studies for the {opts.kind}, got "
                            f"{len(train_set)} and {len(val_set)} (segmenter: only studies "
                            "with masks)")
    LOGGER.info("%s: %d training and %d validation studies, %d + %d slices", opts.kind,
                len(train_set), len(val_set), sum(len(p.slice_labels) for p in train_set),
                sum(len(p.slice_labels) for p in val_set))

    positives: dict[int, list[tuple[int, int]]] = {}
    everything: list[tuple[int, int]] = []
    if opts.kind == "classifier":
        steps = opts.steps_per_epoch or math.ceil(len(train_set) / opts.batch)
        pw_slice, pw_series = (t.to(dev) for t in pos_weights(train_set))
    else:
        everything = [(si, k) for si, p in enumerate(train_set) for k in range(len(p.slice_labels))]
        positives = slices_by_class(train_set)
        n_positive = len({pair for pairs in positives.values() for pair in pairs})
        steps = opts.steps_per_epoch or math.ceil(n_positive / opts.batch)
        cw = class_weights(train_set).to(dev)
    optimizer = torch.optim.AdamW(net.parameters(), lr=opts.lr, weight_decay=1e-4)
    use_amp = dev.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    first_epoch, best_score, best_epoch, global_step = 0, -math.inf, -1, 0
    history: list[dict[str, Any]] = []
    if ckpt is not None:
        saved = ckpt.get("options", {})
        for key in ("kind", "size", "neighbours", "crop"):
            if saved.get(key, 0) != getattr(opts, key):
                raise TrainingError(f"{last_path}: checkpoint has {key}={saved.get(key, 0)!r},"
                                    f" this run asks for {getattr(opts, key)!r}")
        net.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        first_epoch, best_score, best_epoch = ckpt["epoch"] + 1, ckpt["best_score"], \
            ckpt["best_epoch"]
        global_step = int(ckpt["global_step"])
        history = list(ckpt["history"])
        rng = np.random.default_rng()
        rng.bit_generator.state = ckpt["rng"]
        torch.set_rng_state(ckpt["torch_rng"])
        LOGGER.info("resumed from %s at epoch %d (best %.4f at epoch %d)", last_path,
                    first_epoch, best_score, best_epoch)
    elif resume:
        LOGGER.warning("--resume: %s does not exist, starting afresh", last_path)

    epoch = first_epoch - 1
    for epoch in range(first_epoch, opts.epochs):
        net.train()
        t0 = time.perf_counter()
        losses = []
        bar = tqdm(range(steps), desc=f"{opts.kind} epoch {epoch + 1}/{opts.epochs}",
                   unit="step", disable=None)
        for _ in bar:
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(global_step, opts.epochs * steps, opts.lr)
            global_step += 1
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device_type=dev.type, dtype=torch.float16, enabled=use_amp):
                if isinstance(net, SliceSeriesClassifier):
                    x, valid, ys, yser, regions, has_mask = classifier_batch(
                        train_set, spec, opts, rng, aux_stride=net.arch.aux_stride)
                    sl, se, aux = net.forward_train(x.to(dev), valid.to(dev))
                    loss = classifier_loss(sl, se, valid.to(dev), ys.to(dev), yser.to(dev),
                                           pw_slice, pw_series, aux, regions.to(dev),
                                           has_mask.to(dev))
                else:
                    assert isinstance(net, Segmenter)
                    x, y = segmenter_batch(train_set, spec, opts, rng, positives, everything)
                    loss = segmenter_loss(net(x.to(dev)), y.to(dev), cw)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(net.parameters(), 5.0)
            scaler.step(optimizer)
            scaler.update()
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
        if isinstance(net, SliceSeriesClassifier):
            val = validate_classifier(net, val_set, spec, dev, opts.min_sensitivity)
        else:
            assert isinstance(net, Segmenter)
            val = validate_segmenter(net, val_set, spec, dev)
        record = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)),
                  "seconds": round(time.perf_counter() - t0, 1), **_jsonable(val)}
        history.append(record)
        improved = val["score"] > best_score
        if improved:
            best_score, best_epoch = float(val["score"]), epoch + 1
            _save_best(net, spec, arch, opts, val, record, train_set, val_set, best_path)
        torch.save({"model": net.state_dict(), "optimizer": optimizer.state_dict(),
                    "global_step": global_step, "scaler": scaler.state_dict(),
                    "epoch": epoch, "best_score": best_score, "best_epoch": best_epoch,
                    "history": history, "rng": rng.bit_generator.state,
                    "torch_rng": torch.get_rng_state(), "options": asdict(opts),
                    "spec": spec.to_dict(), "architecture": arch},
                   out / ".last.pt.tmp")
        (out / ".last.pt.tmp").replace(last_path)
        (out / "history.json").write_text(json.dumps(history, indent=2) + "\n")
        LOGGER.info("%s epoch %d: loss %.4f, score %.4f%s (%.0fs)", opts.kind, epoch + 1,
                    record["train_loss"], val["score"], " (best)" if improved else "",
                    record["seconds"])
        if opts.max_minutes and time.perf_counter() - t_start > 60.0 * opts.max_minutes:
            LOGGER.warning("stopping after epoch %d: max_minutes %.1f reached", epoch + 1,
                           opts.max_minutes)
            break
    return TrainResult(out, best_path, last_path, best_epoch, best_score,
                       epoch + 1, history)


def operating_point_rule(min_sensitivity: float | None) -> str:
    """How the operating points were chosen, in words (stored in the metadata)."""
    if min_sensitivity is None:
        return "per label, the threshold with the largest Youden index on the validation series"
    return (f"per label, the highest threshold with validation sensitivity >= "
            f"{min_sensitivity} per series")


def _save_best(net: nn.Module, spec: InputSpec, arch: dict[str, Any], opts: TrainOptions,
               val: dict[str, Any], record: dict[str, Any], train_set: list[Prepared],
               val_set: list[Prepared], path: Path) -> WeightsMeta:
    if opts.data is None:
        data = (f"synthetic phantom version {phantom_version()} (pipeline.phantom) generated in memory: "
                f"{len(train_set)} training studies from seed {opts.seed * 1_000_000}, "
                f"{len(val_set)} validation studies from seed {opts.seed * 1_000_000 + 500_000}, "
                f"{opts.matrix} px matrix")
    else:
        data = (f"{opts.fmt} data in {opts.data}: {len(train_set)} training / {len(val_set)} "
                "validation series (split by sha256 of the series id)")
    metrics = {k: v for k, v in record.items() if k not in ("operating_points",)}
    meta = WeightsMeta(
        kind=opts.kind, name=f"ich-{'demo-' if opts.fmt == 'phantom' else ''}{opts.kind}",
        version=MODEL_VERSION, spec=spec, architecture=arch, demo=opts.fmt == "phantom",
        operating_points=({k: float(v) for k, v in val["operating_points"].items()}
                          if "operating_points" in val else {}),
        training={"data": data, "format": opts.fmt, "command": opts.command,
                  "options": _jsonable(asdict(opts)), "epoch": record["epoch"],
                  "torch": torch.__version__,
                  "operating_point_rule": operating_point_rule(opts.min_sensitivity)},
        metrics={"validation": _jsonable(metrics)})
    return save_weights(net.state_dict(), path, meta)
