"""The CLI as a subprocess, like pynetdicom tests its apps: run, status, echo, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import yaml

from tests.helpers.ctseries import write_series
from tests.helpers.net import free_port, pynetdicom_send, wait_until
from tests.helpers.receiver import Receiver

REPO = Path(__file__).resolve().parents[2]
ICH_NODE = [sys.executable, "-m", "node.cli"]


def _run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*ICH_NODE, *args], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout)


def test_invalid_config_exits_2_naming_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("dicom:\n  ae_title: WAY_TOO_LONG_AE_TITLE\nspool:\n  colour: red\n")
    result = _run("run", "--config", str(cfg))
    assert result.returncode == 2
    assert "dicom.ae_title" in result.stderr and "spool.colour: unknown key" in result.stderr


def test_status_without_a_spool_says_so(tmp_path: Path) -> None:
    result = _run("status", "--spool", str(tmp_path / "nothing"))
    assert result.returncode == 1 and "no node state" in result.stderr


def test_echo_a_configured_destination(tmp_path: Path) -> None:
    receiver = Receiver(free_port()).start()
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"destinations": [
        {"name": "up", "ae_title": "RESULTS", "host": "127.0.0.1", "port": receiver.port},
        {"name": "down", "ae_title": "NOBODY", "host": "127.0.0.1", "port": free_port()}]}))
    try:
        ok = _run("echo", "up", "--config", str(cfg))
        assert ok.returncode == 0 and "status 0x0000" in ok.stdout
        down = _run("echo", "down", "--config", str(cfg))
        assert down.returncode == 1 and "association failed" in down.stderr
        unknown = _run("echo", "nope", "--config", str(cfg))
        assert unknown.returncode == 2 and "known: up, down" in unknown.stderr
    finally:
        receiver.stop()


def test_run_wires_the_real_pipeline_end_to_end(tmp_path: Path) -> None:
    """``ich-node run`` with the shipped config and the real pipeline: a phantom study in,
    SR + SEG + previews out to the destination in the source study; a series that breaks a
    selection rule becomes a failed job with its reason; ``status`` works while the node runs
    and after; metrics and health answer; SIGTERM exits 0."""
    from pipeline.phantom import write_studies

    port, http_port = free_port(), free_port()
    receiver = Receiver(free_port()).start()
    spool = tmp_path / "spool"
    proc = subprocess.Popen(
        [*ICH_NODE, "run", "--config", str(REPO / "config.yaml"), "--port", str(port),
         "--spool", str(spool), "--quiet-seconds", "1", "--ae-title", "NODE_UNDER_TEST",
         "--destination", f"RESULTS@127.0.0.1:{receiver.port}"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=dict(os.environ, ICH_NODE__HTTP__PORT=str(http_port),
                 ICH_NODE__SPOOL__MIN_FREE_MB="1"))
    try:
        [study] = write_studies(tmp_path / "ph", 1, seed=17, subtypes=["intraparenchymal:20"],
                                slices=24, matrix=128)
        files = sorted((study.study_dir / "dicom").glob("*.dcm"))
        too_short = write_series(tmp_path / "in", 4, rows=32, seed=61)  # < min_slices
        wait_until(lambda: _can_send(port, files), 60, what="node listening")
        assert _can_send(port, too_short.files)
        wait_until(lambda: '"done": 1' in _run("status", "--spool", str(spool), "--json").stdout
                   and '"failed": 1' in _run("status", "--spool", str(spool), "--json").stdout,
                   120, what="one job done and one failed")
        wait_until(lambda: receiver.total() >= 3, 60, what="results at the destination")
        modalities = sorted({str(ds.Modality) for ds in receiver.datasets.values()})  # type: ignore[attr-defined]
        assert "SR" in modalities and "OT" in modalities
        for ds in receiver.datasets.values():
            assert ds.StudyInstanceUID == study.study_instance_uid  # type: ignore[attr-defined]
        status = json.loads(_run("status", "--spool", str(spool), "--json").stdout)
        failed = next(s for s in status["series"] if s["series_uid"] == too_short.series_uid)
        assert failed["state"] == "failed" and "min_slices" in failed["last_error"]
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics").read().decode()
        assert 'ich_node_instances_received_total{outcome="stored"} 28.0' in metrics
        assert 'ich_node_failed_jobs{kind="SeriesRejected"} 1.0' in metrics
        health = urllib.request.urlopen(f"http://127.0.0.1:{http_port}/healthz").read()
        assert health == b"ok\n"
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
        receiver.stop()
    assert proc.returncode == 0, output
    assert "listening as NODE_UNDER_TEST" in output and "DEMO weights" in output
    assert "stopped" in output
    text = _run("status", "--spool", str(spool)).stdout  # works with the node stopped
    assert study.series_instance_uid[-44:] in text


def _can_send(port: int, files: list[Path]) -> bool:
    try:
        return pynetdicom_send(port, files, calling_ae="CLI_TEST") == [0] * len(files)
    except AssertionError:
        return False


def test_volume_verb_writes_nifti_and_reports(tmp_path: Path) -> None:
    import SimpleITK as sitk

    series = write_series(tmp_path / "in", 12, rows=32, seed=62)
    out = tmp_path / "vol.nii.gz"
    result = _run("volume", str(tmp_path / "in"), "--out", str(out), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert series.series_uid in json.dumps(report["selection"])
    image = sitk.ReadImage(str(out))
    assert image.GetSize() == (32, 32, 12)
    assert image.GetSpacing() == (1.0, 1.0, 5.0)
    empty = tmp_path / "empty"
    empty.mkdir()
    failed = _run("volume", str(empty), "--out", str(tmp_path / "x.nii.gz"))
    assert failed.returncode == 1 and "SeriesRejected" in failed.stderr


def test_phantom_verb_writes_studies_that_the_volume_verb_reads(tmp_path: Path) -> None:
    result = _run("phantom", "--out", str(tmp_path / "ph"), "--n", "1", "--seed", "5",
                  "--slices", "24", "--matrix", "128", "--subtypes", "subdural")
    assert result.returncode == 0, result.stderr
    assert "24 slices, subdural" in result.stdout
    study = next(p for p in sorted((tmp_path / "ph").iterdir()) if p.is_dir())
    volume = _run("volume", str(study), "--out", str(tmp_path / "v.nii.gz"), "--json")
    assert volume.returncode == 0, volume.stderr
    assert json.loads(volume.stdout)["volume"]["shape_zyx"] == [24, 128, 128]
