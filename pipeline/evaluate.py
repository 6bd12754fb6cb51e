"""Evaluation of weights on a labelled dataset: ``metrics.json`` and plots.

Metrics (numpy implementations; scikit-learn is not a dependency):

* ROC AUC per label, per slice and per series (Mann-Whitney U with average ranks for ties);
* sensitivity and specificity per label at the operating point (per series), and the best
  per-series sensitivity at a specificity of at least 0.95;
* the RSNA 2019 weighted log loss (weight 2 for "any", 1 for each subtype; probabilities
  clipped to [1e-7, 1 - 1e-7]), per slice as in the challenge and per series;
* Dice per subtype and for all blood, per series, on the volume's grid, for the series
  whose reference volume of that class is at least ``dice_min_ml`` (1 mL) and over all
  series where either side is non-empty; volume error (mL) per subtype and in total.

Series probabilities are the ones the node decides with: fused when the configuration
has a fusion file (:mod:`pipeline.models.fusion`), the classifier's otherwise; slice
probabilities are the classifier's. :func:`fuse` fits a fusion file on labelled series.

Plots (matplotlib Agg): ROC per label (series and slice), calibration (reliability) per
label for series and slices, with the Brier score of each (also in metrics.json),
Bland-Altman of total blood volume.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import rankdata
from tqdm import tqdm

from pipeline.datasets import UNKNOWN_SUBTYPE, DataFormat, Study, iter_studies, phantom_version
from pipeline.findings import LABELS, SUBTYPE_CODE, SUBTYPES
from pipeline.inference import Models, decide, fusion_inputs, load_models, predict_volume
from pipeline.lesions import voxel_volume_ml
from pipeline.models.config import ModelsConfig
from pipeline.models.fusion import Fusion, fit_fusion, write_fusion

LOGGER = logging.getLogger(__name__)

RSNA_WEIGHTS = np.array([2.0, 1.0, 1.0, 1.0, 1.0, 1.0])


# --------------------------------------------------------------------------- metrics


def roc_auc(y: np.ndarray, p: np.ndarray) -> float | None:
    """Area under the ROC curve; None when ``y`` holds one class only."""
    y = np.asarray(y).astype(bool).ravel()
    p = np.asarray(p, dtype=np.float64).ravel()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(p)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_curve(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate, thresholds), thresholds descending."""
    y = np.asarray(y).astype(bool).ravel()
    p = np.asarray(p, dtype=np.float64).ravel()
    order = np.argsort(-p, kind="mergesort")
    p, y = p[order], y[order]
    distinct = np.r_[np.flatnonzero(np.diff(p)), y.size - 1]
    tps = np.cumsum(y)[distinct]
    fps = 1 + distinct - tps
    tpr = np.r_[0.0, tps / max(int(y.sum()), 1)]
    fpr = np.r_[0.0, fps / max(int((~y).sum()), 1)]
    return fpr, tpr, np.r_[np.inf, p[distinct]]


def weighted_log_loss(y: np.ndarray, p: np.ndarray) -> float:
    """RSNA 2019 metric: weighted binary cross-entropy over the six labels, averaged over rows."""
    y = np.asarray(y, dtype=np.float64).reshape(-1, len(LABELS))
    p = np.clip(np.asarray(p, dtype=np.float64).reshape(-1, len(LABELS)), 1e-7, 1 - 1e-7)
    bce = -(y * np.log(p) + (1 - y) * np.log(1 - p))
    return float(((bce * RSNA_WEIGHTS).sum(axis=1) / RSNA_WEIGHTS.sum()).mean())


def sensitivity_specificity(y: np.ndarray, p: np.ndarray, threshold: float
                            ) -> tuple[float | None, float | None]:
    """At ``p >= threshold``; None where there are no positives / negatives."""
    y = np.asarray(y).astype(bool).ravel()
    call = np.asarray(p).ravel() >= threshold
    sens = float((call & y).sum() / y.sum()) if y.any() else None
    spec = float((~call & ~y).sum() / (~y).sum()) if (~y).any() else None
    return sens, spec


def operating_point(y: np.ndarray, p: np.ndarray, min_sensitivity: float | None = None
                    ) -> float:
    """A threshold chosen on labelled scores, placed halfway between two adjacent distinct
    scores so that it is not on a sample; 0.5 when ``y`` has one class only.

    ``min_sensitivity=None``: the threshold with the largest Youden index (sensitivity +
    specificity - 1), the lowest such one on ties. Otherwise the highest threshold whose
    sensitivity reaches ``min_sensitivity``.
    """
    y = np.asarray(y).astype(bool).ravel()
    p = np.asarray(p, dtype=np.float64).ravel()
    if not y.any() or y.all():
        return 0.5
    if min_sensitivity is None:
        fpr, tpr, cuts = roc_curve(y, p)
        j = tpr - fpr
        best = int(np.flatnonzero(j == j.max())[-1])
        t = float(cuts[max(best, 1)])
    else:
        pos = np.sort(p[y])[::-1]
        k = int(np.ceil(min_sensitivity * pos.size)) - 1
        t = float(pos[max(k, 0)])
    lower = p[p < t]
    below = float(lower.max()) if lower.size else 0.0
    return float(min(max((t + below) / 2.0, 1e-4), 1 - 1e-4))


def sensitivity_at_specificity(y: np.ndarray, p: np.ndarray, min_specificity: float
                               ) -> float | None:
    """The best sensitivity of any threshold whose specificity is at least
    ``min_specificity``; None with one class only."""
    y = np.asarray(y).astype(bool).ravel()
    if not y.any() or y.all():
        return None
    fpr, tpr, _ = roc_curve(y, p)
    ok = (1.0 - fpr) >= min_specificity - 1e-12
    return float(tpr[ok].max()) if ok.any() else 0.0


def dice(a: np.ndarray, b: np.ndarray) -> float | None:
    """Dice of two boolean arrays; None when both are empty."""
    total = int(a.sum()) + int(b.sum())
    if total == 0:
        return None
    return float(2.0 * np.logical_and(a, b).sum() / total)


# --------------------------------------------------------------------------- evaluation


@dataclass
class SeriesResult:
    """What one evaluated series contributes to the metrics."""

    study_id: str
    slice_labels: np.ndarray
    slice_probabilities: np.ndarray
    series_labels: np.ndarray
    series_probabilities: np.ndarray
    positive: np.ndarray  # (6,) decisions at the operating point
    ref_ml: dict[str, float] | None  # per subtype + "all"; None without a reference mask
    pred_ml: dict[str, float]
    dice: dict[str, float | None]


def evaluate_study(study: Study, models: Models, config: ModelsConfig) -> SeriesResult:
    """Run the models on one study and compare with its reference."""
    raw = predict_volume(study.hu, study.image, models, config)
    findings = decide(raw, study.image, models, config)
    vox = voxel_volume_ml(study.image)
    pred = findings.mask
    pred_ml = {s: float((pred == c).sum()) * vox for s, c in SUBTYPE_CODE.items()}
    pred_ml["all"] = float((pred > 0).sum()) * vox
    ref_ml = None
    dices: dict[str, float | None] = {}
    if study.mask is not None:
        ref = study.mask
        ref_ml = {s: float((ref == c).sum()) * vox for s, c in SUBTYPE_CODE.items()}
        ref_ml["all"] = float((ref > 0).sum()) * vox
        known = ref != UNKNOWN_SUBTYPE
        for s, c in SUBTYPE_CODE.items():
            dices[s] = dice((ref == c), (pred == c) & known)
        dices["all"] = dice(ref > 0, pred > 0)
    return SeriesResult(
        study.study_id, study.slice_labels, raw.slice_probabilities, study.series_labels,
        np.array([findings.labels[name].probability for name in LABELS], dtype=np.float32),
        np.array([findings.labels[name].positive for name in LABELS]), ref_ml, pred_ml, dices)


def _nan_to_none(value: float | None) -> float | None:
    return None if value is None or not np.isfinite(value) else round(float(value), 6)


def summarize(results: list[SeriesResult], thresholds: dict[str, float],
              dice_min_ml: float = 1.0) -> dict[str, Any]:
    """metrics.json content from per-series results."""
    ys = np.stack([r.series_labels for r in results])
    ps = np.stack([r.series_probabilities for r in results])
    calls = np.stack([r.positive for r in results])
    yl = np.concatenate([r.slice_labels for r in results])
    pl = np.concatenate([r.slice_probabilities for r in results])
    out: dict[str, Any] = {"series": len(results), "slices": int(len(yl)), "labels": {}}
    for i, name in enumerate(LABELS):
        sens, spec = sensitivity_specificity(ys[:, i], calls[:, i].astype(float), 0.5)
        out["labels"][name] = {
            "series_positive": int(ys[:, i].sum()),
            "slice_positive": int(yl[:, i].sum()),
            "auc_series": _nan_to_none(roc_auc(ys[:, i], ps[:, i])),
            "auc_slice": _nan_to_none(roc_auc(yl[:, i], pl[:, i])),
            "threshold": round(thresholds[name], 6),
            "sensitivity": _nan_to_none(sens), "specificity": _nan_to_none(spec),
            "sensitivity_at_specificity_0.95": _nan_to_none(
                sensitivity_at_specificity(ys[:, i], ps[:, i], 0.95)),
            "brier_series": round(brier(ys[:, i], ps[:, i]), 6),
            "brier_slice": round(brier(yl[:, i], pl[:, i]), 6)}
    out["weighted_log_loss_slice"] = round(weighted_log_loss(yl, pl), 6)
    out["weighted_log_loss_series"] = round(weighted_log_loss(ys, ps), 6)
    seg = [r for r in results if r.ref_ml is not None]
    if seg:
        out["segmentation"] = {"series_with_reference": len(seg), "dice_min_ml": dice_min_ml,
                               "classes": {}}
        for name in (*SUBTYPES, "all"):
            big = [d for r in seg if r.ref_ml is not None and r.ref_ml[name] >= dice_min_ml
                   and (d := r.dice[name]) is not None]
            every = [d for r in seg if (d := r.dice[name]) is not None]
            err = np.array([r.pred_ml[name] - r.ref_ml[name] for r in seg
                            if r.ref_ml is not None])
            out["segmentation"]["classes"][name] = {
                "series_ref_ge_min": len(big),
                "dice_mean_ref_ge_min": _nan_to_none(float(np.mean(big)) if big else None),
                "dice_median_ref_ge_min": _nan_to_none(float(np.median(big)) if big else None),
                "dice_mean_nonempty": _nan_to_none(float(np.mean(every)) if every else None),
                "volume_error_ml_mean": round(float(err.mean()), 4),
                "volume_error_ml_mean_abs": round(float(np.abs(err).mean()), 4)}
    return out


def brier(y: np.ndarray, p: np.ndarray) -> float:
    """Mean squared difference between probabilities and 0/1 labels (0 is perfect)."""
    y = np.asarray(y, dtype=np.float64).ravel()
    p = np.asarray(p, dtype=np.float64).ravel()
    return float(np.mean((p - y) ** 2)) if y.size else float("nan")


def reliability(y: np.ndarray, p: np.ndarray, bins: int = 10, least: int = 5
                ) -> tuple[list[float], list[float]]:
    """Points of a reliability curve: per equal-width probability bin with at least
    ``least`` samples, the mean probability and the observed frequency of positives."""
    y = np.asarray(y, dtype=np.float64).ravel()
    p = np.asarray(p, dtype=np.float64).ravel()
    idx = np.clip((p * bins).astype(int), 0, bins - 1)
    xs, fr = [], []
    for b in range(bins):
        sel = idx == b
        if sel.sum() >= least:
            xs.append(float(p[sel].mean()))
            fr.append(float(y[sel].mean()))
    return xs, fr


def write_plots(results: list[SeriesResult], out_dir: Path) -> list[Path]:
    """ROC (series, slice), calibration and Bland-Altman PNGs; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths: list[Path] = []
    ys = np.stack([r.series_labels for r in results])
    ps = np.stack([r.series_probabilities for r in results])
    yl = np.concatenate([r.slice_labels for r in results])
    pl = np.concatenate([r.slice_probabilities for r in results])
    for level, y, p in (("series", ys, ps), ("slice", yl, pl)):
        fig, ax = plt.subplots(figsize=(6, 6))
        for i, name in enumerate(LABELS):
            auc = roc_auc(y[:, i], p[:, i])
            if auc is None:
                continue
            fpr, tpr, _ = roc_curve(y[:, i], p[:, i])
            ax.plot(fpr, tpr, label=f"{name} (AUC {auc:.3f})")
        ax.plot([0, 1], [0, 1], color="grey", lw=0.5, ls="--")
        ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=f"ROC per {level}")
        ax.legend(loc="lower right", fontsize=8)
        paths.append(out_dir / f"roc_{level}.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    fig, axes = plt.subplots(1, 2, figsize=(12, 6))
    # Series: the probabilities the node decides with and reports (few points: 5 bins).
    for ax, level, y, p, bins, least in ((axes[0], "series", ys, ps, 5, 3),
                                         (axes[1], "slice", yl, pl, 10, 5)):
        for i, name in enumerate(LABELS):
            xs, fr = reliability(y[:, i], p[:, i], bins, least)
            ax.plot(xs, fr, marker="o", label=f"{name} (Brier {brier(y[:, i], p[:, i]):.3f})")
        ax.plot([0, 1], [0, 1], color="grey", lw=0.5, ls="--")
        ax.set(xlabel=f"mean predicted probability ({level})", ylabel="observed frequency",
               title=f"Calibration per {level} (n = {len(y)})", xlim=(-0.02, 1.02),
               ylim=(-0.02, 1.02))
        ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    paths.append(out_dir / "calibration.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    seg = [r for r in results if r.ref_ml is not None]
    if seg:
        ref = np.array([r.ref_ml["all"] for r in seg if r.ref_ml is not None])
        pred = np.array([r.pred_ml["all"] for r in seg])
        mean, diff = (ref + pred) / 2.0, pred - ref
        bias, sd = float(diff.mean()), float(diff.std(ddof=1)) if len(diff) > 1 else 0.0
        fig, ax = plt.subplots(figsize=(6, 5))
        ax.scatter(mean, diff, s=12)
        for v, style in ((bias, "-"), (bias + 1.96 * sd, "--"), (bias - 1.96 * sd, "--")):
            ax.axhline(v, color="grey", ls=style, lw=0.8)
        ax.set(xlabel="mean of segmented and reference volume (mL)",
               ylabel="segmented - reference (mL)",
               title=f"Bland-Altman, all blood (bias {bias:.2f} mL, SD {sd:.2f} mL)")
        paths.append(out_dir / "bland_altman.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths


def evaluate(data: Path | None, fmt: DataFormat, out_dir: Path,
             config: ModelsConfig | None = None, *, n: int = 40, seed: int = 10_000,
             matrix: int = 256, models: Models | None = None,
             studies: Iterable[Study] | None = None,
             phantom_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate the weights of ``config`` (default: the shipped ones) on a dataset and
    write ``out_dir/metrics.json``, ``out_dir/series.json`` (per-series results) and the
    plots; returns the metrics.

    ``data=None`` with ``fmt='phantom'`` generates ``n`` phantom studies in memory from
    seeds ``seed .. seed + n - 1`` at ``matrix`` pixels (keep ``seed`` away from the
    training seeds). ``models`` or ``studies`` may be given directly (training, tests).
    """
    cfg = config or ModelsConfig()
    t0 = time.perf_counter()
    mdl = models or load_models(cfg)
    source = studies if studies is not None else iter_studies(
        data, fmt, n=n, seed=seed, matrix=matrix, **(phantom_options or {}))
    results = [evaluate_study(study, mdl, cfg)
               for study in tqdm(source, desc="evaluate", unit="series", disable=None)]
    if not results:
        raise ValueError(f"no studies to evaluate in {data or 'the phantom'}")
    metrics = summarize(results, mdl.thresholds)
    metrics["data"] = {"format": fmt, "path": str(data) if data else None,
                       "phantom_seed": seed if data is None else None,
                       "phantom_version": phantom_version() if data is None else None,
                       "matrix": matrix if data is None else None}
    metrics["model"] = mdl.identity.to_dict()
    metrics["seconds"] = round(time.perf_counter() - t0, 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics["plots"] = [p.name for p in write_plots(results, out_dir)]
    per_series = [{"study": r.study_id, "labels": r.series_labels.tolist(),
                   "probabilities": [round(float(v), 5) for v in r.series_probabilities],
                   "positive": r.positive.tolist(), "reference_ml": r.ref_ml,
                   "segmented_ml": r.pred_ml, "dice": r.dice} for r in results]
    (out_dir / "series.json").write_text(json.dumps(per_series, indent=1) + "\n")
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    LOGGER.info("evaluated %d series in %.1fs: %s", len(results), metrics["seconds"],
                out_dir / "metrics.json")
    return metrics


def fuse(data: Path | None, fmt: DataFormat, out_path: Path,
         config: ModelsConfig | None = None, *, n: int = 60, seed: int = 1_500_000,
         matrix: int = 256, l2: float = 1.0, name: str = "ich-fusion", version: str = "0.1.0",
         command: str = "", models: Models | None = None,
         studies: Iterable[Study] | None = None) -> Fusion:
    """Run both networks of ``config`` (without any fusion) on labelled validation series,
    fit a fusion for them (:func:`pipeline.models.fusion.fit_fusion`) and write it to
    ``out_path``. Phantom data as in :func:`evaluate`; use seeds that are neither training
    nor held-out test seeds. ValueError when a label has one class only in the data."""
    cfg = (config or ModelsConfig()).model_copy(update={"fusion": None})
    t0 = time.perf_counter()
    mdl = models or load_models(cfg)
    source = studies if studies is not None else iter_studies(data, fmt, n=n, seed=seed,
                                                              matrix=matrix)
    inputs, labels = [], []
    for study in tqdm(source, desc="fuse", unit="series", disable=None):
        raw = predict_volume(study.hu, study.image, mdl, cfg)
        inputs.append(fusion_inputs(raw, study.image))
        labels.append(np.asarray(study.series_labels))
    if not inputs:
        raise ValueError(f"no studies to fit the fusion on in {data or 'the phantom'}")
    where = (f"{len(inputs)} phantom series from seed {seed}, {matrix} px matrix, "
             f"phantom version {phantom_version()}"
             if data is None else f"{len(inputs)} series of {data} ({fmt})")
    c, s = mdl.classifier_meta, mdl.segmenter_meta
    fusion = fit_fusion(inputs, np.stack(labels), c.sha256, s.sha256, name=name,
                        version=version, demo=c.demo or s.demo, l2=l2, fitted_on=where,
                        command=command)
    write_fusion(fusion, out_path)
    LOGGER.info("fitted fusion %s %s on %s in %.1fs: %s", name, version, where,
                time.perf_counter() - t0, out_path)
    return fusion
