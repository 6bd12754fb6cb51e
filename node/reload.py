"""Configuration reload (SIGHUP): which keys apply to a running node, which need a restart.

Applied at once: ``destinations``, ``outbound``, ``triage``, ``assembly``, ``retention``,
``worker``, ``logging`` and the allowlists ``dicom.allowed_calling_aes`` /
``dicom.allowed_networks`` (for associations requested from then on). Every other key
(the listener's port, host, AE title, limits and timeouts, the spool, the HTTP endpoint,
the pipeline and its models) keeps its running value and is reported as needing a
restart. The DICOM listener and its open associations are never touched.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from node.config import NodeConfig

RELOADABLE_SECTIONS = ("destinations", "outbound", "triage", "assembly", "retention", "worker",
                       "logging", "notifications")
RELOADABLE_DICOM_KEYS = ("allowed_calling_aes", "allowed_networks")


@dataclass(frozen=True)
class ReloadPlan:
    """The configuration to run with, and what differs from the running one."""

    config: NodeConfig
    applied: list[str]
    needs_restart: list[str]


def changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two ``model_dump()`` trees."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        keys: list[str] = []
        for key in sorted(set(old) | set(new), key=str):
            keys.extend(changed_keys(old.get(key), new.get(key), f"{prefix}{key}."))
        return keys
    return [] if old == new else [prefix.rstrip(".") or "(top level)"]


def plan(running: NodeConfig, loaded: NodeConfig) -> ReloadPlan:
    """Keep the running values of keys that need a restart; take the rest from *loaded*."""
    dicom_update = {k: getattr(loaded.dicom, k) for k in RELOADABLE_DICOM_KEYS}
    effective = loaded.model_copy(update={
        name: getattr(running, name) for name in type(running).model_fields
        if name not in RELOADABLE_SECTIONS and name != "dicom"
    } | {"dicom": running.dicom.model_copy(update=dicom_update)})
    before = running.model_dump(mode="json")
    applied = changed_keys(before, effective.model_dump(mode="json"))
    needs_restart = changed_keys(effective.model_dump(mode="json"),
                                 loaded.model_dump(mode="json"))
    return ReloadPlan(effective, applied, needs_restart)
