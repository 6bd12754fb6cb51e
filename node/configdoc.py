"""Render a configuration as commented YAML: every key with its description and default.

``config.yaml`` is this rendering of the defaults (a test keeps the two equal), and
``ich-node config`` prints the effective configuration the same way, so that an admin
sees every key, its unit and its default in one place.
"""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import BaseModel
from pydantic_core import to_jsonable_python

from node.config import NodeConfig

HEADER = """\
# ich-node configuration. Every key is optional; the value shown is the default.
# Precedence: defaults < this file < environment (ICH_NODE__SECTION__KEY=value, e.g.
# ICH_NODE__DICOM__PORT=104) < command-line flags. An unknown key or a wrong value stops
# the node with a message naming it. Regenerate with: ich-node config --defaults
"""

_EXAMPLES = {
    "destinations": [
        "#  - name: pacs                # name used by `ich-node echo` and in logs",
        "#    ae_title: ORTHANC",
        "#    host: 127.0.0.1",
        "#    port: 4242",
        "#    tls: {ca_file: /etc/ich-node/tls/pacs-ca.pem}  # optional; docs/security.md",
    ],
    "peers": [
        "#  - name: ct1                 # N-EVENT-REPORT to this AE when its association closed",
        "#    ae_title: CT_SCANNER_1",
        "#    host: 10.0.0.21",
        "#    port: 104",
    ],
    "webhooks": [
        "#  - name: teams-er            # name used in logs, metrics and status",
        "#    url: https://hooks.example.org/ich",
        "#    headers: {Authorization: 'Bearer ${ICH_WEBHOOK_TOKEN}'}  # ${VAR}: environment",
        "#    timeout_s: 10.0",
        "#    include_patient: false    # true adds patient ID and name (PHI) to the JSON",
    ],
    "hl7": [
        "#  - name: ris                 # name used in logs, metrics and status",
        "#    host: ris.example.org",
        "#    port: 2575",
        "#    sending_application: ICH_NODE",
        "#    sending_facility: RADIOLOGY",
        "#    receiving_application: RIS",
        "#    receiving_facility: HOSPITAL",
        "#    processing_id: P",
        "#    timeout_s: 10.0",
    ],
    "rules": [
        "#  - name: emergency-ct        # logged and stored with the job as its reason",
        "#    priority: 80              # higher runs first",
        "#    calling_aes: [ER_CT]      # sent by the emergency department's scanner",
        "#  - name: stroke-unit",
        "#    priority: 60",
        "#    dicom: {CurrentPatientLocation: ['STROKE*', 'ED*']}  # any case, * and ?",
        "#  - name: overnight",
        "#    priority: 10",
        "#    time_of_day: '22:00-07:00'  # local time; may wrap midnight",
    ],
    "urgent_destinations": [
        "#  - urgent-worklist           # a destination name: every positive result",
        "#  - destination: neuro-oncall # or with conditions (as in rules)",
        "#    calling_aes: [ER_CT]",
    ],
}


def _scalar(value: Any) -> str:
    """One YAML value on one line (flow style for lists and mappings)."""
    plain = to_jsonable_python(value)
    text = yaml.safe_dump(plain, default_flow_style=True, width=10_000, allow_unicode=True)
    return text.strip().removesuffix("...").strip()


def _item(model: BaseModel) -> str:
    dumped = model.model_dump(mode="json", exclude_defaults=True)
    fields = type(model).model_fields
    plain = {k: dumped[k] for k in sorted(dumped, key=lambda k: not fields[k].is_required())}
    text = yaml.safe_dump(plain, default_flow_style=True, width=10_000, allow_unicode=True,
                          sort_keys=False)
    return text.strip().removesuffix("...").strip()


def _comment(description: str | None, default: Any) -> str:
    text = " ".join((description or "").split())
    if "default" not in text.lower():
        text = f"{text}; default {_scalar(default)}" if text else f"default {_scalar(default)}"
    return text


def _render(model: BaseModel, defaults: BaseModel, indent: int, lines: list[str]) -> None:
    pad = "  " * indent
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        default = getattr(defaults, name)
        comment = _comment(field.description, default)
        if isinstance(value, BaseModel):
            about = " ".join((field.description or "").split())
            lines.append(f"{pad}{name}:  # {about}" if about else f"{pad}{name}:")
            _render(value, default, indent + 1, lines)
            continue
        if isinstance(value, list) and value and all(isinstance(v, BaseModel) for v in value):
            # One item a line: its required keys first, then those not at their default.
            lines.append(f"{pad}{name}:  # {comment}")
            lines.extend(f"{pad}  - {_item(v)}" for v in value)
        else:
            lines.append(f"{pad}{name}: {_scalar(value)}  # {comment}")
        lines.extend(pad + example for example in _EXAMPLES.get(name, []))


def render(config: NodeConfig, header: str = HEADER) -> str:
    """*config* as commented YAML; comments give each key's meaning, unit and default."""
    lines: list[str] = []
    _render(config, NodeConfig(), 0, lines)
    return header + "\n".join(lines) + "\n"
