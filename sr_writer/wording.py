"""The sentences the SR and the preview images share, so that both say the same thing.

Plain ASCII only: the results inherit the source's Specific Character Set, which may be
Latin-1 or ISO 2022, and our own text must encode in any of them.
"""

from __future__ import annotations

import unicodedata

from pipeline.findings import Findings
from pipeline.volume import Volume

INTENDED_USE = ("Automated triage result, not a diagnosis. Not for diagnostic use: a "
                "radiologist must read the images.")
DEMO_WARNING = "DEMO WEIGHTS trained on synthetic data - not for clinical use."


def plain(text: str) -> str:
    """``text`` in printable ASCII (accents stripped, dashes and quotes simplified, anything
    else replaced by '?'), safe under every Specific Character Set."""
    table = str.maketrans({"\u2013": "-", "\u2014": "-", "\u2018": "'", "\u2019": "'",
                           "\u201c": '"', "\u201d": '"', "\u00b0": " deg", "\u00d7": "x"})
    decomposed = unicodedata.normalize("NFKD", text.translate(table))
    return "".join(ch if 32 <= ord(ch) < 127 else ("" if unicodedata.combining(ch) else "?")
                   for ch in decomposed)


def sentence(text: str) -> str:
    """``text`` as plain ASCII starting with a capital and ending with a full stop."""
    text = plain(text).strip()
    if not text:
        return text
    text = text[0].upper() + text[1:]
    return text if text[-1] in ".!?" else text + "."


def subtype_names(findings: Findings) -> list[str]:
    """Subtypes called positive, in LABELS order (e.g. ['subdural', 'intraparenchymal'])."""
    return list(findings.present_subtypes)


def impression(findings: Findings) -> str:
    """One line: what the AI suggests (the banner and the SR's Impression)."""
    if findings.positive:
        names = subtype_names(findings)
        detail = f" ({', '.join(names)})" if names else ""
        return f"AI triage: suspected intracranial hemorrhage{detail}."
    return "AI triage: no intracranial hemorrhage detected."


def banner(findings: Findings) -> str:
    """The burned-in banner of every preview image."""
    text = f"{impression(findings)} Not for diagnostic use."
    if findings.model.demo:
        text += " DEMO WEIGHTS - not for clinical use."
    return text


def reconstruction_notes(volume: Volume) -> list[str]:
    """What the reconstruction did that a reader should know (gaps, tilt, resampling) and
    its warnings, as sentences."""
    r = volume.report
    notes: list[str] = []
    if r.tilt_corrected:
        notes.append(f"Gantry tilt of {r.tilt_deg:.1f} degrees corrected before analysis "
                     f"(shift up to {r.max_shift_mm:.1f} mm).")
    if r.filled_slices and not any("gap" in w.lower() for w in r.warnings):
        notes.append(f"{len(r.filled_slices)} slice(s) interpolated across gaps in the "
                     "series before analysis.")
    if r.resampled_slices:
        notes.append(f"{len(r.resampled_slices)} slice(s) resampled to uniform spacing "
                     "before analysis.")
    if r.duplicates_dropped:
        notes.append(f"{r.duplicates_dropped} duplicate slice(s) ignored.")
    notes.extend(r.warnings)
    return [plain(n) for n in notes]
