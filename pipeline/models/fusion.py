"""Series decisions from both networks: a small logistic model per label (stacking).

The classifier sees the whole series at a coarse size; the segmenter sees each slice at a
finer one. Each can be right where the other is weak (on the phantom's held-out set, with
classifier 0.1.0, the segmenter's volume separated subdural series with AUC 0.987 against
the classifier's 0.955). A fusion file combines, per label, four numbers of one series
into one probability::

    p = sigmoid(w . [logit(series probability), logit(highest slice probability),
                     log(1 + mL of the label's largest region),
                     log(1 + mL of the largest region of any blood)] + b)

("any" uses any blood for both volumes). A region is a 26-connected component of the
segmenter's argmax before the mask gate and the lesion-size filter, after each epidural or
subdural collection got the one subtype most of its voxels carry
(:func:`pipeline.lesions.one_extra_axial_subtype`, as in the lesion table; fusion 0.2.0
read the argmax before that, so a subdural collection could count half as epidural).
Only the largest region counts, so scattered false specks add little (summing every marked voxel, as fusion
0.1.0 did, let a coarse 128-px negative study reach about 10 mL and a fused "any" of
0.53). Weights ``w``, ``b`` and the operating points of
the fused probability are fitted on validation series by :func:`fit_fusion` (L2-penalised
logistic regression, Newton steps, weights kept >= 0; operating points by Youden's
index), for one pair of
weights files: the file names their sha256 and :func:`check_fusion` refuses any other
pair, because the coefficients mean nothing for other networks.

The file is JSON (``pipeline/weights/fusion.json`` for the shipped demo weights, used by
default: ``models.fusion: auto``)::

    {"format": 1, "kind": "fusion", "name", "version", "demo", "classifier_sha256",
     "segmenter_sha256", "features", "coefficients": {label: [w1, w2, w3, w4, b]},
     "operating_points": {label: t}, "fitted_on", "command", "metrics"}
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import InferenceError
from pipeline.findings import LABELS

FORMAT_VERSION = 1
FEATURES: tuple[str, ...] = ("series_logit", "slice_max_logit", "log1p_label_largest_ml",
                              "log1p_any_largest_ml")
_EPS = 1e-4


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -30, 30)))


@dataclass(frozen=True)
class FusionInputs:
    """What the fusion reads of one series (LABELS order for probabilities; mL per subtype
    in SUBTYPES order)."""

    series_probabilities: np.ndarray  # (6,)
    slice_max: np.ndarray  # (6,) highest slice probability per label
    largest_ml: np.ndarray  # (5,) mL of the largest segmented region per subtype, before any gate
    any_largest_ml: float  # mL of the largest region of any segmented blood

    def features(self) -> np.ndarray:
        """(6, 4) features, one row per label in LABELS order (see the module docstring)."""
        def logit(p: np.ndarray) -> np.ndarray:
            q = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1 - _EPS)
            return np.log(q / (1 - q))

        whole = max(float(self.any_largest_ml), 0.0)
        label_ml = np.concatenate([[whole], np.asarray(self.largest_ml, dtype=np.float64)])
        out = np.empty((len(LABELS), len(FEATURES)))
        out[:, 0] = logit(self.series_probabilities)
        out[:, 1] = logit(self.slice_max)
        out[:, 2] = np.log1p(np.maximum(label_ml, 0.0))
        out[:, 3] = math.log1p(whole)
        return out


@dataclass(frozen=True)
class Fusion:
    """Fitted coefficients and operating points for one classifier/segmenter pair."""

    name: str
    version: str
    classifier_sha256: str
    segmenter_sha256: str
    coefficients: dict[str, list[float]]  # label -> FEATURES weights + bias
    operating_points: dict[str, float]
    demo: bool = True
    fitted_on: str = ""
    command: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    sha256: str = ""  # of the file it was read from ("" when built in memory)

    def probabilities(self, inputs: FusionInputs) -> np.ndarray:
        """Fused probability per label, LABELS order."""
        x = inputs.features()
        z = np.array([float(np.dot(x[i], self.coefficients[name][:-1]))
                      + self.coefficients[name][-1] for i, name in enumerate(LABELS)])
        return _sigmoid(z).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        """JSON form (see the module docstring)."""
        return {"format": FORMAT_VERSION, "kind": "fusion", "name": self.name,
                "version": self.version, "demo": self.demo,
                "classifier_sha256": self.classifier_sha256,
                "segmenter_sha256": self.segmenter_sha256, "features": list(FEATURES),
                "coefficients": self.coefficients, "operating_points": self.operating_points,
                "fitted_on": self.fitted_on, "command": self.command, "metrics": self.metrics}

    @classmethod
    def from_dict(cls, data: dict[str, Any], sha256: str = "") -> Fusion:
        """Inverse of :meth:`to_dict`; ValueError when a label or a coefficient is missing."""
        if data.get("kind") != "fusion":
            raise ValueError(f"kind must be 'fusion', not {data.get('kind')!r}")
        if list(data.get("features", [])) != list(FEATURES):
            raise ValueError(f"features must be {list(FEATURES)}, not {data.get('features')}")
        coefficients = {str(k): [float(x) for x in v] for k, v in data["coefficients"].items()}
        points = {str(k): float(v) for k, v in data["operating_points"].items()}
        for label in LABELS:
            if len(coefficients.get(label, [])) != len(FEATURES) + 1:
                raise ValueError(f"coefficients of '{label}' must be {len(FEATURES) + 1} numbers")
            if not 0.0 < points.get(label, -1.0) < 1.0:
                raise ValueError(f"operating point of '{label}' must be in (0, 1)")
        return cls(name=str(data["name"]), version=str(data["version"]),
                   classifier_sha256=str(data["classifier_sha256"]),
                   segmenter_sha256=str(data["segmenter_sha256"]), coefficients=coefficients,
                   operating_points=points, demo=bool(data.get("demo", True)),
                   fitted_on=str(data.get("fitted_on", "")), command=str(data.get("command", "")),
                   metrics=dict(data.get("metrics", {})), sha256=sha256)


def read_fusion(path: Path) -> Fusion:
    """A fusion file; InferenceError naming the file when it is missing or malformed."""
    try:
        raw = path.read_bytes()
        return Fusion.from_dict(json.loads(raw), hashlib.sha256(raw).hexdigest())
    except FileNotFoundError as exc:
        raise InferenceError(f"fusion file {path} does not exist (set models.fusion to null "
                             "to decide from the classifier alone)") from exc
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InferenceError(f"fusion file {path} is unreadable: {exc}") from exc


def write_fusion(fusion: Fusion, path: Path) -> Path:
    """Write ``fusion`` as JSON to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(fusion.to_dict(), indent=2) + "\n")
    return path


def check_fusion(fusion: Fusion, classifier_sha256: str, segmenter_sha256: str,
                 path: Path) -> None:
    """InferenceError unless ``fusion`` was fitted for these two weights files."""
    wrong = [f"{kind} sha256 {want[:12]}..., loaded {have[:12]}..."
             for kind, want, have in (("classifier", fusion.classifier_sha256, classifier_sha256),
                                      ("segmenter", fusion.segmenter_sha256, segmenter_sha256))
             if want != have]
    if wrong:
        raise InferenceError(f"fusion file {path} was fitted for other weights ({'; '.join(wrong)}): "
                             "fit one for these weights with 'ich-node fuse' or set "
                             "models.fusion to null")


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1.0, steps: int = 50,
                 nonnegative: bool = True) -> np.ndarray:
    """Weights and bias (last) of an L2-penalised logistic regression (bias not penalised),
    by Newton's method; ``x`` (n, k), ``y`` (n,) of 0/1.

    ``nonnegative``: every feature is evidence of blood, so a negative weight can only be
    noise of a small fitting set; the most negative one is dropped (weight 0) and the rest
    refitted until none is left.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    keep = list(range(x.shape[1]))
    while True:
        x1 = np.concatenate([x[:, keep], np.ones((len(x), 1))], axis=1)
        penalty = np.diag(np.r_[np.full(len(keep), l2), 0.0])
        w = np.zeros(len(keep) + 1)
        for _ in range(steps):
            p = _sigmoid(x1 @ w)
            grad = x1.T @ (p - y) + penalty @ w
            hess = (x1 * (p * (1 - p))[:, None]).T @ x1 + penalty + 1e-9 * np.eye(len(w))
            step = np.linalg.solve(hess, grad)
            w -= step
            if float(np.abs(step).max()) < 1e-8:
                break
        if not nonnegative or not keep or w[:-1].min() >= 0:
            break
        keep.pop(int(np.argmin(w[:-1])))
    out = np.zeros(x.shape[1] + 1)
    out[keep] = w[:-1]
    out[-1] = w[-1]
    return out


def fit_fusion(inputs: list[FusionInputs], labels: np.ndarray, classifier_sha256: str,
               segmenter_sha256: str, *, name: str = "ich-fusion", version: str = "0.1.0",
               demo: bool = True, l2: float = 1.0, fitted_on: str = "", command: str = ""
               ) -> Fusion:
    """Fit per-label coefficients on series ``inputs`` with series ``labels`` (n, 6), then the
    operating points of the fused probabilities (Youden). A label with one class only in
    ``labels`` cannot be fitted: ValueError."""
    from pipeline.evaluate import operating_point, roc_auc

    y = np.asarray(labels).astype(bool)
    if y.ndim != 2 or y.shape != (len(inputs), len(LABELS)):
        raise ValueError(f"labels must be (n, {len(LABELS)}) for {len(inputs)} series, not {y.shape}")
    feats = np.stack([i.features() for i in inputs])  # (n, 6, 4)
    coefficients: dict[str, list[float]] = {}
    points: dict[str, float] = {}
    aucs: dict[str, float | None] = {}
    for j, label in enumerate(LABELS):
        if y[:, j].all() or not y[:, j].any():
            raise ValueError(f"the fitting series are all {'positive' if y[:, j].all() else 'negative'} "
                             f"for '{label}': fusion needs both")
        w = fit_logistic(feats[:, j], y[:, j], l2)
        coefficients[label] = [round(float(v), 6) for v in w]
        fused = _sigmoid(feats[:, j] @ w[:-1] + w[-1])
        points[label] = operating_point(y[:, j], fused)
        aucs[label] = roc_auc(y[:, j], fused)
    return Fusion(name=name, version=version, classifier_sha256=classifier_sha256,
                  segmenter_sha256=segmenter_sha256, coefficients=coefficients,
                  operating_points=points, demo=demo, fitted_on=fitted_on, command=command,
                  metrics={"series": len(inputs), "positives": y.sum(0).astype(int).tolist(),
                           "l2": l2, "auc_fit": aucs})
