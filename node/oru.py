"""HL7 v2.5 ORU^R01 result messages over MLLP, for RIS and worklist systems (python-hl7).

The message (HL7 v2.5 chapter 7, ORU^R01; UTF-8, declared in MSH-18):

- ``MSH``: our sending application and facility, the target's receiving ones, control id
  = the notification id (stable across retries, so a receiver can drop duplicates);
- ``PID``: patient ID (with its issuer) and name, birth date and sex from the DICOM header;
- ``OBR``: the accession number as placer and filler order number, result status ``P``
  (preliminary: an AI triage result, not a report); ``NTE``: the not-a-diagnosis notice;
- ``OBX``: study and series UID (DCM 110180, 112002), the overall decision, one
  probability per label with the decision as abnormal flag (``A``/``N``), one volume per
  subtype (mL), a free-text impression marked as AI triage, the triage priority, the model
  identity and, for demo weights, the not-for-clinical-use warning. Codes of our own are
  in the local coding system ``99ICH``.

Delivery waits for the ACK (original mode): ``AA`` (or ``CA``) is success, ``AE``/``AR``,
a control id that does not match, or no ACK within ``timeout_s`` is a failure (retried).
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Sequence

import hl7
from hl7.mllp import InvalidBlockError, open_hl7_connection

from node.config import Hl7Target
from node.notify import AI_NOTICE, DEMO_WARNING, NodeIdentity, Notification, NotifyError

CODING = "99ICH"
DCM = "DCM"
ENCODING = "utf-8"
_ESCAPES = {"\\": "\\E\\", "|": "\\F\\", "~": "\\R\\", "^": "\\S\\", "&": "\\T\\",
            "\r": "\\.br\\", "\n": "\\.br\\"}
ACCEPTED = ("AA", "CA")


def escape(text: object) -> str:
    """HL7 v2 escape sequences (2.7.4) for the separators of ``|^~\\&``. Other characters
    stay as they are: the message is UTF-8 (python-hl7's ``escape`` writes non-ASCII as
    ``\\X..\\`` code points, which is not the UTF-8 hex that MSH-18 would call for)."""
    return "".join(_ESCAPES.get(c, c) for c in str(text))


def _components(*parts: object) -> str:
    """One field of escaped components, trailing empty components dropped."""
    return "^".join(escape(p) for p in parts).rstrip("^")


def _segment(name: str, fields: Sequence[str]) -> str:
    return "|".join([name, *fields]).rstrip("|")


def control_id(note: Notification) -> str:
    """MSH-10 (ST, at most 20 characters in v2.5): from the notification id."""
    return note.uid.replace("-", "")[:20].upper()


def _xpn(dicom_name: str) -> str:
    """DICOM PN (family^given^middle^prefix^suffix, alphabetic group) as HL7 XPN
    (family^given^middle^suffix^prefix)."""
    parts = (dicom_name.split("=")[0].split("^") + [""] * 5)[:5]
    family, given, middle, prefix, suffix = parts
    return _components(family, given, middle, suffix, prefix)


def _dtm(date: str, time: str) -> str:
    """DICOM DA + TM as HL7 DTM (seconds precision; fractions dropped)."""
    digits = "".join(c for c in time.split(".")[0] if c.isdigit())[:6]
    return date + digits if date else ""


def _number(value: object) -> str:
    return f"{float(value):.6g}" if isinstance(value, (int, float)) else ""


def build(note: Notification, target: Hl7Target, node: NodeIdentity,
          at: dt.datetime | None = None) -> str:
    """The ORU^R01 of *note* for *target*, segments separated by CR."""
    now = (at or dt.datetime.now()).strftime("%Y%m%d%H%M%S")
    ctx = note.context or {}
    findings = note.findings
    positive = findings.get("positive") is True
    model = findings.get("model") or {}
    demo = bool(model.get("demo", False))
    accession = escape(ctx.get("accession_number", ""))
    segments = [
        _segment("MSH", ["^~\\&", target.sending_application, target.sending_facility,
                         target.receiving_application, target.receiving_facility, now, "",
                         "ORU^R01^ORU_R01", control_id(note), target.processing_id, "2.5",
                         "", "", "", "", "", "UNICODE UTF-8"]),
        _segment("PID", ["1", "", _components(ctx.get("patient_id", ""), "", "",
                                              ctx.get("issuer_of_patient_id", "")),
                         "", _xpn(ctx.get("patient_name", "")), "",
                         escape(ctx.get("patient_birth_date", "")),
                         escape(ctx.get("patient_sex", ""))]),
        _segment("OBR", ["1", accession, accession,
                         _components("ICH_TRIAGE", "AI intracranial hemorrhage triage", CODING),
                         "", "", _dtm(ctx.get("study_date", ""), ctx.get("study_time", "")),
                         *[""] * 14, now, "", "CT", "P"]),
        _segment("NTE", ["1", "L", escape(AI_NOTICE)]),
    ]
    observations: list[tuple[str, str, str, str, str, str]] = [
        ("ST", _components("110180", "Study Instance UID", DCM), "", escape(note.study_uid),
         "", ""),
        ("ST", _components("112002", "Series Instance UID", DCM), "", escape(note.series_uid),
         "", ""),
        ("CWE", _components("ICH", "Intracranial hemorrhage", CODING), "",
         _components("POS", "Suspected intracranial hemorrhage", CODING) if positive
         else _components("NEG", "No intracranial hemorrhage found", CODING), "",
         "A" if positive else "N"),
    ]
    for label, result in (findings.get("labels") or {}).items():
        observations.append((
            "NM", _components(f"{label.upper()}_P", f"{label} hemorrhage probability", CODING),
            escape(label), _number(result.get("probability")), "",
            "A" if result.get("positive") else "N"))
    for subtype, volume in (findings.get("volumes_ml") or {}).items():
        observations.append((
            "NM", _components(f"{subtype.upper()}_VOL", f"{subtype} hemorrhage volume",
                              CODING),
            escape(subtype), _number(volume), _components("mL", "milliliter", "UCUM"), ""))
    observations += [
        ("TX", _components("IMPRESSION", "AI triage impression", CODING), "",
         escape(impression(findings)), "", "A" if positive else "N"),
        ("NM", _components("PRIORITY", "Triage priority", CODING), "", str(note.priority),
         "", ""),
        ("ST", _components("MODEL", "AI model", CODING), "",
         escape(" ".join(str(model.get(k, "")) for k in ("name", "version", "sha256")).strip()
                or "unknown"), "", ""),
    ]
    if demo:
        observations.append(("ST", _components("DEMO", "Demo weights warning", CODING), "",
                             escape(DEMO_WARNING.upper()), "", ""))
    equipment = _components(node.ae_title, node.hostname)
    for index, (vtype, code, sub_id, value, units, flag) in enumerate(observations, start=1):
        segments.append(_segment("OBX", [str(index), vtype, code, sub_id, value, units, "",
                                         flag, "", "", "P", "", "", now, "", "", "",
                                         equipment]))
    return "\r".join(segments) + "\r"


def impression(findings: dict[str, object]) -> str:
    """The free-text impression: what was found, marked as AI triage, with the demo warning."""
    volumes = findings.get("volumes_ml") or {}
    labels = findings.get("labels") or {}
    assert isinstance(volumes, dict) and isinstance(labels, dict)
    if findings.get("positive") is True:
        found = [f"{name} {float(volumes.get(name, 0.0)):.1f} mL" for name, res in labels.items()
                 if name != "any" and isinstance(res, dict) and res.get("positive")]
        text = "AI TRIAGE: suspected intracranial hemorrhage" + (
            f" ({', '.join(found)})" if found else "") + "."
    else:
        text = "AI TRIAGE: no intracranial hemorrhage found."
    model = findings.get("model")
    if isinstance(model, dict) and model.get("demo"):
        text += f" {DEMO_WARNING.upper()}."
    return f"{text} {AI_NOTICE}"


async def _exchange(target: Hl7Target, data: bytes) -> hl7.Message:
    reader, writer = await asyncio.wait_for(
        open_hl7_connection(target.host, target.port, encoding=ENCODING), target.timeout_s)
    try:
        writer.writeblock(data)
        await writer.drain()
        return await asyncio.wait_for(reader.readmessage(), target.timeout_s)
    finally:
        writer.close()


def send(target: Hl7Target, message: str) -> str:
    """Send *message* over MLLP and wait for its ACK; returns the ACK code (AA or CA),
    raises NotifyError for a negative ACK, a mismatched one, or none."""
    sent_id = str(hl7.parse(message).segment("MSH")(10))
    try:
        ack = asyncio.run(_exchange(target, message.encode(ENCODING)))
    except TimeoutError as exc:
        raise NotifyError(f"{target.name}: no ACK within {target.timeout_s:g} s") from exc
    except asyncio.IncompleteReadError as exc:
        raise NotifyError(f"{target.name}: connection closed without an ACK") from exc
    except (OSError, InvalidBlockError, ValueError, hl7.HL7Exception) as exc:
        raise NotifyError(f"{target.name}: {type(exc).__name__}: {exc}") from exc
    try:
        msa = ack.segment("MSA")
    except KeyError as exc:
        raise NotifyError(f"{target.name}: the answer has no MSA segment") from exc
    code, acked_id, text = str(msa(1)), str(msa(2)), str(msa(3)) if len(msa) > 3 else ""
    if acked_id != sent_id:
        raise NotifyError(f"{target.name}: ACK for message {acked_id!r}, not {sent_id!r}")
    if code not in ACCEPTED:
        raise NotifyError(f"{target.name}: ACK {code}" + (f" ({text[:200]})" if text else ""))
    return code
