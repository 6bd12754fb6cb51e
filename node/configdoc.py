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
}


def _scalar(value: Any) -> str:
    """One YAML value on one line (flow style for lists and mappings)."""
    plain = to_jsonable_python(value)
    text = yaml.safe_dump(plain, default_flow_style=True, width=10_000, allow_unicode=True)
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
        lines.append(f"{pad}{name}: {_scalar(value)}  # {comment}")
        lines.extend(pad + example for example in _EXAMPLES.get(name, []))


def render(config: NodeConfig, header: str = HEADER) -> str:
    """*config* as commented YAML; comments give each key's meaning, unit and default."""
    lines: list[str] = []
    _render(config, NodeConfig(), 0, lines)
    return header + "\n".join(lines) + "\n"
