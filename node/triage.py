"""Triage: which job runs first, and who else receives a positive result.

Priority (``triage.rules``): when the assembler turns a complete series into a job (on
a scheduler thread, never on an association thread) the rules are checked in order and
the first whose conditions all hold sets the job's priority; its name is logged and
stored with the job as the reason. No match: ``triage.default_priority``. The worker
claims the highest priority first, then the oldest.

Conditions (all optional, all must hold): DICOM attribute values read from one instance
header of the series (``stop_before_pixels``; a keyword missing at the top level is also
looked for in the items of RequestAttributesSequence, where modalities copy
RequestedProcedurePriority from the worklist, PS3.4 K.6), the calling AE title, and a
time window in the node's local time (``22:00-07:00`` wraps midnight).

Urgent routing (``triage.urgent_destinations``): when a job's findings are positive
(``findings["positive"] is True``) the worker marks the job urgent, its outbound rows go
first in the sender's order, and every urgent destination whose conditions hold gets the
results in addition to the ordinary destinations. A destination named there is never
sent a negative result.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence

from node.config import NodeConfig, TriageConditions, TriageConfig
from node.db import StateDB

LOGGER = logging.getLogger(__name__)

Clock = Callable[[], datetime]
HeaderLoader = Callable[[], Dataset | None]

DEFAULT_REASON = "default"


@dataclass(frozen=True)
class Decision:
    """A job's priority and why (the matching rule's name, or ``default``)."""

    priority: int
    reason: str


def in_window(window: str, moment: datetime) -> bool:
    """Whether *moment* (local time) is in ``HH:MM-HH:MM``; the end is excluded, and an
    end before the start means the window wraps midnight."""
    start_text, end_text = window.split("-")
    start = _minutes(start_text)
    end = _minutes(end_text)
    now = moment.hour * 60 + moment.minute
    if start < end:
        return start <= now < end
    return now >= start or now < end


def _minutes(text: str) -> int:
    hours, minutes = text.strip().split(":")
    return int(hours) * 60 + int(minutes)


def _strings(value: Any) -> list[str]:
    if value is None or isinstance(value, Sequence):
        return []
    if isinstance(value, MultiValue | list | tuple):
        return [str(v).strip() for v in value]
    return [str(value).strip()]


def attribute_values(header: Dataset, keyword: str) -> list[str]:
    """Values of *keyword* at the top level and in each RequestAttributesSequence item."""
    found = _strings(header[keyword].value) if keyword in header else []
    for item in header.get("RequestAttributesSequence", None) or []:
        if keyword in item:
            found.extend(_strings(item[keyword].value))
    return found


def _value_matches(values: Iterable[str], accepted: Iterable[str]) -> bool:
    patterns = [p.strip().upper() for p in accepted]
    return any(fnmatchcase(v.upper(), p) for v in values for p in patterns)


def conditions_hold(cond: TriageConditions, header: Dataset | None, calling_ae: str,
                    moment: datetime) -> bool:
    """Whether every condition of *cond* holds (an absent header matches no DICOM
    condition). AE titles compare exactly, attribute values case-insensitively."""
    if cond.calling_aes and calling_ae.strip() not in cond.calling_aes:
        return False
    if cond.time_of_day is not None and not in_window(cond.time_of_day, moment):
        return False
    for keyword, accepted in cond.dicom.items():
        if header is None or not _value_matches(attribute_values(header, keyword), accepted):
            return False
    return True


def needs_header(conditions: Iterable[TriageConditions]) -> bool:
    """Whether any of *conditions* reads DICOM attributes."""
    return any(c.dicom for c in conditions)


def prioritize(config: TriageConfig, header: Dataset | None, calling_ae: str,
               moment: datetime) -> Decision:
    """The first rule that holds decides; else the default priority."""
    for rule in config.rules:
        if conditions_hold(rule, header, calling_ae, moment):
            return Decision(rule.priority, rule.name)
    return Decision(config.default_priority, DEFAULT_REASON)


def route(config: NodeConfig, positive: bool, calling_ae: str, load_header: HeaderLoader,
          moment: datetime) -> list[str]:
    """Names of the destinations for a job's results: every destination not named in
    ``triage.urgent_destinations``, plus, for a positive result, each urgent destination
    whose conditions hold (the header is read only if a condition needs it)."""
    urgent_only = config.triage.urgent_names
    names = [d.name for d in config.destinations if d.name not in urgent_only]
    if not positive:
        return names
    header: Dataset | None = None
    if needs_header(config.triage.urgent_destinations):
        header = load_header()
    for target in config.triage.urgent_destinations:
        if target.destination not in names and conditions_hold(target, header, calling_ae,
                                                               moment):
            names.append(target.destination)
    return names


def is_positive(findings: dict[str, Any]) -> bool:
    """A result is positive only when the analyzer said so explicitly."""
    return findings.get("positive") is True


def read_header(path: Path) -> Dataset | None:
    """One instance header without pixel data; None (logged) if it cannot be read."""
    try:
        return dcmread(path, stop_before_pixels=True)
    except (OSError, InvalidDicomError) as exc:
        LOGGER.warning("triage: cannot read the header of %s (DICOM conditions will not "
                       "match): %s", path.name, exc)
        return None


def first_instance(series_dir: Path) -> Path | None:
    """The first instance file of a spooled series folder, if any."""
    return next(iter(sorted(Path(series_dir).glob("*.dcm"))), None)


def series_header(series_dir: Path) -> Dataset | None:
    """The header of the first instance in *series_dir* (None if none is readable)."""
    path = first_instance(series_dir)
    return read_header(path) if path is not None else None


class Triage:
    """The node's priority decisions at job creation; :meth:`update` swaps the rules on
    reload (a plain attribute assignment, safe against the scheduler threads)."""

    def __init__(self, config: TriageConfig, db: StateDB, clock: Clock = datetime.now) -> None:
        self.config = config
        self.db = db
        self.clock = clock

    def update(self, config: TriageConfig) -> None:
        """Use *config* for the jobs created from now on."""
        self.config = config

    def for_series(self, series_uid: str, calling_ae: str) -> Decision:
        """Decide the priority of a complete series (reads one header if a rule needs it)."""
        config = self.config
        header: Dataset | None = None
        unreadable = False
        if needs_header(config.rules):
            rows = self.db.query("SELECT path FROM instances WHERE series_uid = ?"
                                 " ORDER BY received_at LIMIT 1", (series_uid,))
            header = read_header(Path(rows[0]["path"])) if rows else None
            unreadable = header is None
        decision = prioritize(config, header, calling_ae, self.clock())
        if unreadable:
            decision = Decision(decision.priority, f"{decision.reason} (header unreadable)")
        return decision
