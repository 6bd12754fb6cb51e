"""The typed configuration: defaults, file, environment, flags; errors name the key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from node.cli import build_parser, config_from_args
from node.config import ConfigError, NodeConfig, load_config
from node.configdoc import render

REPO = Path(__file__).resolve().parents[2]


def test_shipped_config_yaml_equals_the_defaults() -> None:
    assert load_config(REPO / "config.yaml", environ={}) == NodeConfig()


def test_config_yaml_is_the_rendering_of_the_defaults() -> None:
    """Regenerate with ``ich-node config --defaults > config.yaml`` after changing a key."""
    assert (REPO / "config.yaml").read_text() == render(NodeConfig())


def test_every_key_in_config_yaml_has_a_comment_with_its_default() -> None:
    for line in (REPO / "config.yaml").read_text().splitlines():
        if re.match(r"^\s*[a-z_0-9]+: \S", line) and not line.strip().startswith("#"):
            assert "#" in line and "default" in line.lower(), f"undocumented key: {line.strip()}"


def test_rendered_effective_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(None, {"dicom": {"port": 104, "allowed_calling_aes": ["CT_ER"]},
                             "destinations": [{"name": "pacs", "ae_title": "PACS",
                                               "host": "10.0.0.5", "port": 104}]}, environ={})
    path = tmp_path / "effective.yaml"
    path.write_text(render(cfg))
    assert load_config(path, environ={}) == cfg


@pytest.mark.parametrize(("yaml_text", "key"), [
    ("dicom:\n  ae_titel: X\n", "dicom.ae_titel: unknown key"),
    ("dicom:\n  ae_title: THIS_TITLE_IS_TOO_LONG\n", "dicom.ae_title"),
    ("dicom:\n  port: 70000\n", "dicom.port"),
    ("dicom:\n  allowed_networks: [not-a-network]\n", "dicom.allowed_networks"),
    ("pipeline:\n  results:\n    uid_root: 1.2.3\n", "pipeline.results.uid_root"),
    ("destinations:\n  - {name: a, ae_title: A, host: h, port: 1}\n"
     "  - {name: a, ae_title: B, host: h, port: 2}\n", "destinations"),
    ("spool: {fsync: perhaps}\n", "spool.fsync"),
])
def test_invalid_values_stop_with_a_message_naming_the_key(tmp_path: Path, yaml_text: str,
                                                           key: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={})
    assert key in str(err.value)


def test_precedence_defaults_file_environment_flags(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("dicom:\n  port: 2000\n  ae_title: FILE_AE\nassembly:\n  quiet_seconds: 9\n")
    env = {"ICH_NODE__DICOM__PORT": "3000", "ICH_NODE__ASSEMBLY__QUIET_SECONDS": "7"}
    cfg = load_config(path, {"dicom": {"port": 4000}}, environ=env)
    assert cfg.dicom.port == 4000  # flag beats environment
    assert cfg.assembly.quiet_seconds == 7  # environment beats file
    assert cfg.dicom.ae_title == "FILE_AE"  # file beats default
    assert cfg.dicom.max_associations == 16  # default


def test_cli_flags_override_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("dicom:\n  port: 2000\n")
    args = build_parser().parse_args([
        "run", "--config", str(path), "--port", "5000", "--ae-title", "FLAG_AE",
        "--spool", str(tmp_path / "sp"), "--quiet-seconds", "2.5",
        "--destination", "PACS@127.0.0.1:4242", "--destination", "WL@[::1]:104"])
    cfg = config_from_args(args)
    assert (cfg.dicom.port, cfg.dicom.ae_title, cfg.assembly.quiet_seconds) == (5000, "FLAG_AE", 2.5)
    assert cfg.spool.path == tmp_path / "sp"
    assert [(d.ae_title, d.host, d.port) for d in cfg.destinations] == [
        ("PACS", "127.0.0.1", 4242), ("WL", "::1", 104)]


def test_bad_destination_flag_is_refused() -> None:
    args = build_parser().parse_args(["run", "--destination", "nonsense"])
    with pytest.raises(ConfigError, match="AET@HOST:PORT"):
        config_from_args(args)


def test_quiet_period_per_calling_ae() -> None:
    cfg = load_config(None, {"assembly": {"quiet_seconds": 5, "quiet_seconds_by_ae": {"SLOW": 30}}},
                      environ={})
    assert cfg.assembly.quiet_for("SLOW") == 30
    assert cfg.assembly.quiet_for("OTHER") == 5
