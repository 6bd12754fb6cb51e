"""Weights files: a ``.pt`` state dict and a JSON sidecar with what it is.

The sidecar (``<name>.json`` beside ``<name>.pt``) carries the name, version, sha256 of
the ``.pt`` file, kind, architecture, input spec (size, windows, neighbours, label
order), operating points, the training data and command, and the metrics. Loading
checks the sha256 and the input spec against what the config expects and raises
:class:`~pipeline.errors.InferenceError` naming the mismatch otherwise.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch

from pipeline.errors import InferenceError
from pipeline.findings import LABELS
from pipeline.models.inputs import InputSpec

LOGGER = logging.getLogger(__name__)

ModelKind = Literal["classifier", "segmenter"]
StateDict = dict[str, torch.Tensor]
FORMAT_VERSION = 1


@dataclass(frozen=True)
class WeightsMeta:
    """The JSON sidecar of a weights file."""

    kind: ModelKind
    name: str
    version: str
    spec: InputSpec
    architecture: dict[str, Any]
    sha256: str = ""
    demo: bool = True
    operating_points: dict[str, float] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON form (``format`` and ``label_order`` added for readers of the file)."""
        return {"format": FORMAT_VERSION, "kind": self.kind, "name": self.name,
                "version": self.version, "sha256": self.sha256, "demo": self.demo,
                "label_order": list(self.spec.labels), "input_spec": self.spec.to_dict(),
                "architecture": self.architecture, "operating_points": self.operating_points,
                "training": self.training, "metrics": self.metrics}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WeightsMeta:
        """Inverse of :meth:`to_dict`."""
        kind = str(data["kind"])
        if kind not in ("classifier", "segmenter"):
            raise ValueError(f"kind must be 'classifier' or 'segmenter', not {kind!r}")
        return cls(kind="classifier" if kind == "classifier" else "segmenter",
                   name=str(data["name"]), version=str(data["version"]),
                   spec=InputSpec.from_dict(data["input_spec"]),
                   architecture=dict(data["architecture"]), sha256=str(data["sha256"]),
                   demo=bool(data.get("demo", True)),
                   operating_points={str(k): float(v)
                                     for k, v in data.get("operating_points", {}).items()},
                   training=dict(data.get("training", {})),
                   metrics=dict(data.get("metrics", {})))


def sidecar_path(path: Path) -> Path:
    """``x.pt`` -> ``x.json``."""
    return path.with_suffix(".json")


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _atomic_write_bytes(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)


def save_weights(state: StateDict, path: Path, meta: WeightsMeta) -> WeightsMeta:
    """Write ``path`` (state dict, float32 on CPU) and its sidecar; returns the metadata
    with the sha256 of the written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    cpu = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    _atomic_write_bytes(path, lambda fh: torch.save(cpu, fh))
    meta = replace(meta, sha256=file_sha256(path))
    text = json.dumps(meta.to_dict(), indent=2, sort_keys=False) + "\n"
    _atomic_write_bytes(sidecar_path(path), lambda fh: fh.write(text.encode()))
    LOGGER.info("wrote %s weights %s (sha256 %s)", meta.kind, path, meta.sha256[:12])
    return meta


def weights_from_git(commit: str, kind: ModelKind, dest: Path) -> Path:
    """Copy ``pipeline/weights/{kind}.pt`` and its sidecar as they were at ``commit`` into
    the folder ``dest`` (``git show``, run from the repository root): how the training
    recipes in ``pipeline/weights/recipes`` start from an earlier shipped version. Returns
    the ``.pt`` path."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in (f"{kind}.pt", f"{kind}.json"):
        blob = subprocess.run(["git", "show", f"{commit}:pipeline/weights/{name}"],
                              check=True, capture_output=True).stdout
        (dest / name).write_bytes(blob)
    return dest / f"{kind}.pt"


def read_meta(path: Path) -> WeightsMeta:
    """The sidecar of weights file ``path``; InferenceError when missing or malformed."""
    side = sidecar_path(path)
    try:
        return WeightsMeta.from_dict(json.loads(side.read_text()))
    except FileNotFoundError as exc:
        raise InferenceError(f"weights metadata {side} is missing: every weights file needs "
                             "its JSON sidecar") from exc
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InferenceError(f"weights metadata {side} is unreadable: {exc}") from exc


def load_weights(path: Path, expected_spec: InputSpec, kind: ModelKind | None = None
                 ) -> tuple[StateDict, WeightsMeta]:
    """Read a weights file after checking its sha256, kind and input spec.

    Raises :class:`InferenceError` when the file or its sidecar is missing, the sha256 of
    the file differs from the sidecar's, the kind differs, the label order is not
    :data:`pipeline.findings.LABELS`, or the input spec differs from ``expected_spec``.
    """
    if not path.is_file():
        raise InferenceError(f"weights file {path} does not exist")
    meta = read_meta(path)
    actual = file_sha256(path)
    if actual != meta.sha256:
        raise InferenceError(f"weights file {path} has sha256 {actual}, its metadata says "
                             f"{meta.sha256}: the file was changed or corrupted")
    if kind is not None and meta.kind != kind:
        raise InferenceError(f"weights file {path} holds a {meta.kind}, expected a {kind}")
    if meta.spec.labels != LABELS:
        raise InferenceError(f"weights file {path} has label order {list(meta.spec.labels)}, "
                             f"the pipeline expects {list(LABELS)}")
    diffs = meta.spec.differences(expected_spec)
    if diffs:
        raise InferenceError(f"weights file {path} was trained for another input than the "
                             f"config asks for (weights vs config): {'; '.join(diffs)}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError) as exc:
        raise InferenceError(f"weights file {path} cannot be read by torch: {exc}") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                              for v in state.values()):
        raise InferenceError(f"weights file {path} is not a state dict of tensors")
    return state, meta
