"""Shared fixtures: a node on a free loopback port with a tmp spool."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from node.app import Node
from node.config import NodeConfig, load_config
from tests.helpers.net import free_port

TEST_ANALYZER = "tests.helpers.analyzers:summary"


def node_config(spool_dir: Path, **sections: Any) -> NodeConfig:
    """A config for tests: free ports, short quiet period, small disk watermark."""
    base: dict[str, Any] = {
        "dicom": {"port": 0, "host": "127.0.0.1"},
        "spool": {"path": str(spool_dir), "min_free_mb": 1},
        "http": {"port": 0},
        "assembly": {"quiet_seconds": 1.0, "release_grace_seconds": 0.3},
        "worker": {"poll_interval_s": 0.1, "shutdown_grace_s": 10},
        "outbound": {"backoff_initial_s": 0.2, "backoff_max_s": 1.0, "max_attempts": 4},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return load_config(None, base, environ={})


@pytest.fixture
def make_node(tmp_path: Path) -> Iterator[Callable[..., Node]]:
    """Start nodes (in this process, worker in its own) and stop them at teardown."""
    nodes: list[Node] = []

    def _make(analyzer: str = TEST_ANALYZER, spool_dir: Path | None = None,
              **sections: Any) -> Node:
        cfg = node_config(spool_dir or tmp_path / "spool", **sections)
        node = Node(cfg, analyzer=analyzer)
        node.start()
        nodes.append(node)
        return node

    yield _make
    for node in nodes:
        node.stop()


@pytest.fixture
def port() -> int:
    """A free TCP port."""
    return free_port()
