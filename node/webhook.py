"""Webhook notifications: one HTTP POST with a JSON body per notification (stdlib only).

Any answer other than 2xx is a failure (redirects are not followed); the status is in
the error. The body carries a ``notification_id`` (also sent as the ``Idempotency-Key``
header) that stays the same across retries: a receiver may get the same notification
twice after a crash and should de-duplicate on it.
"""

from __future__ import annotations

import datetime as dt
import http.client
import json
import os
import re
import urllib.error
import urllib.request
from typing import Any

from node.config import WebhookTarget
from node.notify import AI_NOTICE, DEMO_WARNING, NodeIdentity, Notification, NotifyError

SCHEMA = "ich-node.notification/1"
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat(timespec="seconds")


def payload(note: Notification, node: NodeIdentity, include_patient: bool = False
            ) -> dict[str, Any]:
    """The JSON body of *note* (shape documented in README, "Notifications")."""
    findings = note.findings
    context = note.context or {}
    model = dict(findings.get("model") or {})
    demo = bool(model.get("demo", False))
    study: dict[str, Any] = {
        "study_uid": note.study_uid,
        "series_uid": note.series_uid,
        "accession_number": context.get("accession_number", ""),
        "study_date": context.get("study_date", ""),
        "study_description": context.get("study_description", ""),
    }
    if include_patient:
        study.update(patient_id=context.get("patient_id", ""),
                     patient_name=context.get("patient_name", ""))
    positive = findings.get("positive")
    return {
        "schema": SCHEMA,
        "notification_id": note.uid,
        "created_at": _iso(note.created_at),
        "event": "positive" if positive is True else "finished",
        "priority": note.priority,
        "study": study,
        "result": {
            "decision": ("POSITIVE" if positive else "NEGATIVE") if positive is not None
            else "UNKNOWN",
            "positive": positive,
            "labels": findings.get("labels", {}),
            "volumes_ml": findings.get("volumes_ml", {}),
            "lesions": findings.get("lesions", []),
            "warnings": findings.get("warnings", []),
        },
        "node": node.to_dict(),
        "model": {**model, "demo": demo, "warning": DEMO_WARNING if demo else None},
        "notice": AI_NOTICE,
    }


def _headers(target: WebhookTarget) -> dict[str, str]:
    """The configured headers with ``${VAR}`` read from the environment."""
    out: dict[str, str] = {}
    for name, value in target.headers.items():
        missing = [v for v in _ENV_REF.findall(value) if v not in os.environ]
        if missing:
            raise NotifyError(f"{target.name}: header {name} needs environment variable "
                              f"{missing[0]}, which is not set")
        out[name] = _ENV_REF.sub(lambda m: os.environ[m.group(1)], value)
    return out


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is an answer other than 2xx: a failure, never a silent re-POST elsewhere."""

    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str,
                         headers: Any, newurl: str) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


def post(target: WebhookTarget, body: dict[str, Any], user_agent: str) -> int:
    """POST *body* to *target*; returns the 2xx status, raises NotifyError otherwise."""
    data = json.dumps(body, ensure_ascii=False).encode("utf-8")
    headers = {"Content-Type": "application/json; charset=utf-8", "User-Agent": user_agent,
               "Idempotency-Key": str(body["notification_id"]), **_headers(target)}
    request = urllib.request.Request(target.url, data=data, headers=headers, method="POST")
    try:
        with _OPENER.open(request, timeout=target.timeout_s) as response:
            status = int(response.status)
            response.read()
    except urllib.error.HTTPError as exc:
        raise NotifyError(f"{target.name}: HTTP {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:
        raise NotifyError(f"{target.name}: {exc.reason}") from exc
    except (OSError, http.client.HTTPException) as exc:
        raise NotifyError(f"{target.name}: {type(exc).__name__}: {exc}") from exc
    if not 200 <= status < 300:
        raise NotifyError(f"{target.name}: HTTP {status}")
    return status
