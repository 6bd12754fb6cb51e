"""The one call the node makes: ``analyze(series_dir, config) -> Results``.

Selection → volume → classifier and segmenter → SR, SEG and preview series. The node's
worker builds one :class:`Analyzer` per process (the models load once) and calls it for
every job; :func:`analyze` is the same thing for a single call (``ich-node analyze``).
Results are deterministic for the same input (same findings, same result UIDs), so a
job re-run after a crash creates no duplicate objects in PACS.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from pydicom import Dataset, dcmread

from pipeline.config import PipelineConfig
from pipeline.findings import ModelIdentity

LOGGER = logging.getLogger(__name__)


@dataclass
class Results:
    """What one analysis produced: DICOM objects to send and JSON-serialisable findings."""

    datasets: list[Dataset] = field(default_factory=list)
    findings: dict[str, Any] = field(default_factory=dict)


def model_identity(config: PipelineConfig | None = None) -> ModelIdentity | None:
    """Name, version and sha256 of the configured weights, read from their metadata
    without loading them; None when no weights are installed."""
    from pipeline.errors import InferenceError
    from pipeline.inference import bundle_identity, load_fusion
    from pipeline.models.weights import read_meta

    models = (config or PipelineConfig()).models
    try:
        c_meta, s_meta = read_meta(models.classifier_path), read_meta(models.segmenter_path)
        return bundle_identity(c_meta, s_meta, load_fusion(models, c_meta, s_meta))
    except InferenceError:
        return None


def check_models(config: PipelineConfig) -> ModelIdentity:
    """Check at start-up that the configured weights exist, match their sha256 and their
    metadata's input spec, and that the fusion file (if any) was fitted for them, without
    building the networks; raises InferenceError naming the file and the rule."""
    from pipeline.inference import bundle_identity, load_fusion
    from pipeline.models.inputs import classifier_spec, segmenter_spec
    from pipeline.models.weights import load_weights

    models = config.models
    _, c_meta = load_weights(models.classifier_path,
                             classifier_spec(models.classifier_input_size, models.classifier_neighbours),
                             "classifier")
    _, s_meta = load_weights(models.segmenter_path,
                             segmenter_spec(models.segmenter_input_size, models.segmenter_neighbours),
                             "segmenter")
    return bundle_identity(c_meta, s_meta, load_fusion(models, c_meta, s_meta))


class Analyzer:
    """Analyses series with models loaded once (one per worker process)."""

    def __init__(self, config: PipelineConfig) -> None:
        from pipeline.inference import load_models

        self.config = config
        self.models = load_models(config.models)
        self._warm_up()

    def _warm_up(self) -> None:
        """One pass of both networks on a small air volume and the import of the result
        writers, so that the first real series is not also the slowest: the first call of
        each torch operator and the highdicom import cost seconds (bench/latency.py,
        "cold")."""
        import numpy as np

        from pipeline.inference import predict
        from sr_writer import results  # noqa: F401  (imports highdicom once, here)

        t0 = time.perf_counter()
        predict(np.full((3, 64, 64), -1000.0, np.float32), self.models,
                self.config.models.batch_size)
        LOGGER.info("models warmed up in %.2f s", time.perf_counter() - t0)

    def __call__(self, series_dir: Path, config: PipelineConfig | None = None) -> Results:
        """Analyse the CT series in *series_dir*; raises a PipelineError naming the rule
        that the series broke (no usable series, volume, inference, result objects)."""
        from pipeline.inference import run_models
        from pipeline.volume import load_volume
        from sr_writer.results import write_results

        cfg = config or self.config
        started = datetime.now()
        t0 = time.perf_counter()
        volume, selection = load_volume(Path(series_dir), cfg)
        t_volume = time.perf_counter() - t0
        findings = run_models(volume, self.models, cfg.models)
        findings.warnings = [*volume.report.warnings, *findings.warnings]
        headers = [dcmread(path, stop_before_pixels=True) for path in selection.files]
        datasets = write_results(headers, volume, findings, cfg.results, now=started)
        findings.timings_s.update(volume=round(t_volume, 4),
                                  total=round(time.perf_counter() - t0, 4))
        summary = findings.to_json()
        summary["series"] = {"study_uid": volume.study_uid, "series_uid": volume.series_uid,
                             "description": selection.description,
                             "slices": int(volume.hu.shape[0]),
                             "skipped": [s.__dict__ for s in selection.skipped]}
        summary["timings_s"] = dict(findings.timings_s)
        summary["outputs"] = {"sr": str(datasets[0].SOPInstanceUID),
                              "seg": next((str(d.SOPInstanceUID) for d in datasets
                                           if d.Modality == "SEG"), None),
                              "preview": [str(d.SOPInstanceUID) for d in datasets
                                          if d.Modality not in ("SR", "SEG")]}
        LOGGER.info("series %s analysed in %.2f s: %s, %d result objects", volume.series_uid,
                    findings.timings_s["total"], "POSITIVE" if findings.positive else "negative",
                    len(datasets))
        return Results(datasets, summary)


def analyze(series_dir: Path, config: PipelineConfig) -> Results:
    """Analyse the CT series in *series_dir* (loads the models for this one call)."""
    return Analyzer(config)(series_dir, config)


def analyze_command(input_dir: Path, out_dir: Path, as_json: bool, config: PipelineConfig
                    ) -> int:
    """``ich-node analyze INPUT_DIR --out OUT_DIR [--json]``: the whole pipeline on a folder
    of DICOM files, no network; writes the SR, SEG and preview files and prints the findings
    (``--json``: the public shape of :meth:`pipeline.findings.Findings.to_json`). Returns 0,
    or 1 with the reason when the series cannot be analysed."""
    import json

    from pipeline.errors import PipelineError, print_error

    try:
        results = analyze(input_dir, config)
    except PipelineError as exc:
        return print_error(exc, as_json)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for index, ds in enumerate(results.datasets):
        kind = {"SR": "sr", "SEG": "seg"}.get(str(ds.Modality), "preview")
        path = out_dir / f"{index:02d}_{kind}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths[str(ds.SOPInstanceUID)] = path
    findings = dict(results.findings)
    uids = findings["outputs"]
    findings["outputs"] = {
        "sr": str(paths[uids["sr"]]),
        "seg": str(paths[uids["seg"]]) if uids["seg"] else None,
        "preview": [str(paths[uid]) for uid in uids["preview"]],
    }
    if as_json:
        print(json.dumps(findings, indent=2))
    else:
        print(format_findings(findings))
    return 0


def format_findings(findings: dict[str, Any]) -> str:
    """A terminal summary of the findings JSON."""
    model = findings["model"]
    lines = [f"series {findings['series']['series_uid']} ({findings['series']['description']}, "
             f"{findings['series']['slices']} slices)",
             f"result: {'POSITIVE: suspected intracranial hemorrhage' if findings['positive'] else 'no hemorrhage found'}",
             f"model: {model['name']} {model['version']} sha256 {model['sha256'][:16]}"
             + (" (DEMO weights trained on synthetic data, not for clinical use)"
                if model.get("demo") else ""),
             "", f"{'label':<18} {'probability':>11}  {'call':<8} {'volume mL':>9}"]
    for name, label in findings["labels"].items():
        volume = findings["volumes_ml"].get(name)
        lines.append(f"{name:<18} {label['probability']:>11.3f}  "
                     f"{'positive' if label['positive'] else '-':<8} "
                     f"{'' if volume is None else f'{volume:.2f}':>9}")
    for warning in findings["warnings"]:
        lines.append(f"warning: {warning}")
    outputs = findings["outputs"]
    lines += ["", f"SR:      {outputs['sr']}", f"SEG:     {outputs['seg'] or '(none: negative)'}"]
    lines += [f"preview: {p}" for p in outputs["preview"]]
    return "\n".join(lines)
