"""The preview series: RGB Secondary Capture images (PS3.3 A.8.1) that any PACS can show.

* One summary page first (instance 1): what was analysed, the probability and volume of
  every label, the model and its checksum, notes, and the intended-use statement. A negative
  study gets only this page.
* Then one key image per lesion (its ``largest_slice``; largest lesions first, at most
  ``max_key_images``, shown in slice order): the slice in a brain window, resampled to
  ``preview_width_px`` with the physical aspect ratio kept, every segmented subtype outlined
  in its colour, and a burned-in banner ("AI triage: suspected intracranial hemorrhage
  (...). Not for diagnostic use.").

No patient identifier is burned into the pixels (the header carries the identity);
BurnedInAnnotation is YES because of the banner and the findings text.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from scipy import ndimage

from pipeline.findings import LABELS, SUBTYPE_CODE, SUBTYPES, Findings
from pipeline.volume import Volume
from pipeline.windowing import apply_window
from sr_writer import codes, wording
from sr_writer.config import ResultsConfig
from sr_writer.identity import (
    ResultUids,
    character_set_kwargs,
    date_time,
    restore_character_set,
    stamp_creation,
)
from sr_writer.seg import SourcePlane

LOGGER = logging.getLogger(__name__)

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont
RGB = tuple[int, int, int]

_BANNER_POSITIVE: RGB = (150, 0, 0)
_BANNER_NEGATIVE: RGB = (20, 70, 20)
_TEXT: RGB = (255, 255, 255)
_MUTED: RGB = (190, 190, 190)
_WARN: RGB = (255, 90, 90)
_AXIS_LETTERS = (("R", "L"), ("A", "P"), ("F", "H"))  # (negative, positive) per LPS axis


@dataclass(frozen=True)
class SeriesInfo:
    """What the summary says about the analysed series."""

    description: str
    number: str
    slices: int


def font(size: int) -> Font:
    """Pillow's built-in scalable font (DejaVu Sans, Pillow >= 10.1) at ``size`` px; the
    fixed bitmap font where FreeType is not available."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType
        LOGGER.warning("Pillow has no FreeType support: preview text uses the small "
                       "bitmap font")
        return ImageFont.load_default()


def _wrap(draw: ImageDraw.ImageDraw, text: str, fnt: Font, width: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        words = paragraph.split()
        line = ""
        for word in words:
            trial = f"{line} {word}".strip()
            if not line or draw.textlength(trial, font=fnt) <= width:
                line = trial
            else:
                lines.append(line)
                line = word
        lines.append(line)
    return lines


def _line_height(fnt: Font) -> int:
    box = fnt.getbbox("Ag")
    return int(box[3] - box[1]) + max(4, int(box[3] - box[1]) // 3)


def _banner(text: str, width: int, color: RGB) -> Image.Image:
    size = max(14, width // 28)
    fnt = font(size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines = _wrap(probe, text, fnt, width - 2 * (size // 2))
    step = _line_height(fnt)
    img = Image.new("RGB", (width, step * len(lines) + size // 2 + 4), color)
    draw = ImageDraw.Draw(img)
    y = size // 4 + 2
    for line in lines:
        draw.text((size // 2, y), line, fill=_TEXT, font=fnt)
        y += step
    return img


def orientation_letter(vector: Sequence[float] | np.ndarray) -> str:
    """The patient direction (L/R/A/P/H/F) closest to an LPS direction vector."""
    v = np.asarray(vector, dtype=float)
    axis = int(np.argmax(np.abs(v)))
    return _AXIS_LETTERS[axis][1 if v[axis] > 0 else 0]


def _image_size(volume: Volume, width: int) -> tuple[int, int]:
    _, ny, nx = volume.hu.shape
    _, sy, sx = volume.spacing
    height = int(round(width * (ny * sy) / (nx * sx)))
    return width, int(min(max(height, 64), 2 * width))


def _outlined_slice(volume: Volume, findings: Findings, k: int,
                    config: ResultsConfig) -> tuple[Image.Image, list[str]]:
    """Slice ``k`` in the preview window with every subtype outlined; and the subtypes shown."""
    width, height = _image_size(volume, config.preview_width_px)
    centre, window = config.preview_window
    gray = (apply_window(volume.hu[k], centre, window) * 255.0 + 0.5).astype(np.uint8)
    base = np.asarray(Image.fromarray(gray, mode="L").resize((width, height),
                                                             Image.Resampling.BILINEAR))
    rgb = np.repeat(base[..., None], 3, axis=2).astype(np.float32)
    labels = np.asarray(Image.fromarray(findings.mask[k].astype(np.uint8), mode="L")
                        .resize((width, height), Image.Resampling.NEAREST))
    thickness = max(2, width // 256)
    shown = []
    for subtype in SUBTYPES:
        region = labels == SUBTYPE_CODE[subtype]
        if not region.any():
            continue
        shown.append(subtype)
        color = np.asarray(config.segment_colors[subtype], dtype=np.float32)
        rgb[region] = 0.8 * rgb[region] + 0.2 * color  # faint tint inside
        edge = region & ~ndimage.binary_erosion(region, iterations=thickness,
                                                border_value=0)
        rgb[edge] = color
    image = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), mode="RGB")
    direction = np.asarray(volume.image.GetDirection(), dtype=float).reshape(3, 3)
    draw = ImageDraw.Draw(image)
    fnt = font(max(12, width // 36))
    left = orientation_letter(-direction[:, 0])
    top = orientation_letter(-direction[:, 1])
    draw.text((6, height // 2), left, fill=_MUTED, font=fnt, anchor="lm")
    draw.text((width // 2, 6), top, fill=_MUTED, font=fnt, anchor="mt")
    return image, shown


def _legend(volume: Volume, findings: Findings, k: int, shown: Sequence[str],
            config: ResultsConfig, width: int) -> Image.Image:
    size = max(12, width // 34)
    fnt = font(size)
    step = _line_height(fnt)
    volumes = findings.volumes_ml()
    lines: list[tuple[str, RGB | None]] = [
        (f"Slice {k + 1} of {volume.hu.shape[0]}", None)]
    lines += [(f"{codes.SUBTYPE_LABELS[s]}: {volumes[s]:.1f} mL in the series",
               config.segment_colors[s]) for s in shown]
    img = Image.new("RGB", (width, step * len(lines) + size), (0, 0, 0))
    draw = ImageDraw.Draw(img)
    y = size // 2
    for text, color in lines:
        x = size // 2
        if color is not None:
            draw.rectangle((x, y + 2, x + size - 2, y + size), fill=color)
            x += size + 6
        draw.text((x, y), text, fill=_TEXT, font=fnt)
        y += step
    return img


def _stack(parts: Sequence[Image.Image]) -> np.ndarray:
    width = max(p.width for p in parts)
    out = Image.new("RGB", (width, sum(p.height for p in parts)), (0, 0, 0))
    y = 0
    for part in parts:
        out.paste(part, (0, y))
        y += part.height
    return np.asarray(out, dtype=np.uint8).copy()


def render_key_image(volume: Volume, findings: Findings, k: int,
                     config: ResultsConfig) -> np.ndarray:
    """The key image of slice ``k``: banner, outlined slice, legend. (H, W, 3) uint8."""
    image, shown = _outlined_slice(volume, findings, k, config)
    color = _BANNER_POSITIVE if findings.positive else _BANNER_NEGATIVE
    return _stack([_banner(wording.banner(findings), image.width, color), image,
                   _legend(volume, findings, k, shown, config, image.width)])


def render_summary(volume: Volume, findings: Findings, series: SeriesInfo,
                   config: ResultsConfig, notes: Sequence[str]) -> np.ndarray:
    """The summary page: what was analysed, the table of findings, model, notes."""
    width = config.preview_width_px
    size = max(13, width // 34)
    fnt, bold = font(size), font(int(size * 1.25))
    margin = size
    text_width = width - 2 * margin
    color = _BANNER_POSITIVE if findings.positive else _BANNER_NEGATIVE
    banner = _banner(wording.banner(findings), width, color)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    sx, sy, sz = volume.image.GetSpacing()
    volumes = findings.volumes_ml()
    # Each line: cells (text, x offset in px), colour, font. Tables use fixed columns.
    columns = (0, int(text_width * 0.46), int(text_width * 0.64), int(text_width * 0.80))
    lines: list[tuple[list[tuple[str, int]], RGB, Font]] = []

    def paragraph(text: str, row_color: RGB = _TEXT, row_font: Font = fnt) -> None:
        for line in _wrap(probe, wording.plain(text), row_font, text_width):
            lines.append(([(line, 0)], row_color, row_font))

    paragraph("AI ICH triage summary", row_font=bold)
    paragraph(f"Series {series.number}: {series.description or '(no description)'}")
    paragraph(f"{series.slices} slices analysed, voxel {sx:.2f} x {sy:.2f} x {sz:.2f} mm",
              _MUTED)
    paragraph("")
    lines.append((list(zip(("Finding", "Prob.", "Call", "Volume"), columns, strict=True)),
                  _MUTED, fnt))
    for label in LABELS:
        f = findings.labels[label]
        name = "Any hemorrhage" if label == "any" else label.capitalize()
        vol = sum(volumes.values()) if label == "any" else volumes[label]
        row_color = (config.segment_colors[label] if label != "any" and f.positive
                     else (_WARN if f.positive else _TEXT))
        values = (name, f"{f.probability:.2f}", "YES" if f.positive else "no", f"{vol:.1f} mL")
        lines.append((list(zip(values, columns, strict=True)), row_color, fnt))
    paragraph("")
    if findings.lesions:
        paragraph(f"{len(findings.lesions)} lesion(s) segmented; key images follow in this "
                  "series.")
    else:
        paragraph("No hemorrhage was segmented.")
    paragraph(f"Model: {findings.model.name} {findings.model.version}")
    paragraph(f"Weights sha256: {findings.model.sha256[:32]}", _MUTED)
    if findings.model.demo:
        paragraph(wording.DEMO_WARNING, _WARN)
    for note in notes:
        paragraph(f"Note: {wording.sentence(note)}", _MUTED)
    paragraph("")
    paragraph(wording.INTENDED_USE, _WARN)
    needed = margin + sum(_line_height(row_font) for _, _, row_font in lines) + margin
    body = Image.new("RGB", (width, max(width - banner.height, needed)), (0, 0, 0))
    draw = ImageDraw.Draw(body)
    y = margin
    for cells, row_color, row_font in lines:
        for text, x in cells:
            draw.text((margin + x, y), text, fill=row_color, font=row_font)
        y += _line_height(row_font)
    return _stack([banner, body])


def key_slices(findings: Findings, limit: int) -> list[int]:
    """Largest cross-section slice of each lesion (largest lesions first, at most ``limit``
    distinct slices), returned in slice order."""
    chosen: list[int] = []
    for lesion in sorted(findings.lesions, key=lambda les: (-les.volume_ml, les.largest_slice)):
        if lesion.largest_slice not in chosen:
            chosen.append(lesion.largest_slice)
        if len(chosen) == limit:
            break
    return sorted(chosen)


def source_plane_of_slice(volume: Volume, planes: Sequence[SourcePlane],
                          k: int) -> SourcePlane | None:
    """The source frame that volume slice ``k`` was taken from (None for interpolated
    slices): the frame of its SOP instance nearest to the slice along the slice normal."""
    sop = volume.source_sop_uids[k]
    if sop is None:
        return None
    direction = np.asarray(volume.image.GetDirection(), dtype=float).reshape(3, 3)
    point = np.asarray(volume.image.TransformIndexToPhysicalPoint((0, 0, k)), dtype=float)
    candidates = [p for p in planes if p.sop_uid == sop]
    if not candidates:
        return None
    return min(candidates,
               key=lambda p: abs(float((p.position - point) @ direction[:, 2])))


def _sc(pixels: np.ndarray, ref: Dataset, number: int, kind: str, config: ResultsConfig,
        uids: ResultUids, now: datetime.datetime, orientation: tuple[str, str],
        description: str, source: SourcePlane | None) -> hd.sc.SCImage:
    da, tm = date_time(now)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=ref,
        pixel_array=pixels,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=uids.make("preview-series"),
        series_number=config.preview_series_number,
        sop_instance_uid=uids.make(f"preview-{kind}", number),
        instance_number=number,
        manufacturer=config.manufacturer,
        patient_orientation=orientation,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=config.preview_series_description,
        manufacturer_model_name=config.manufacturer_model_name,
        content_date=da,
        content_time=tm,
        series_date=da,
        series_time=tm,
        institution_name=config.institution_name,
        **character_set_kwargs(ref),
    )
    restore_character_set(sc, ref)
    sc.ConversionType = "WSD"  # workstation: rendered, not digitised
    sc.DateOfSecondaryCapture = da
    sc.TimeOfSecondaryCapture = tm
    # General Series: without BodyPartExamined a validator cannot tell that Laterality
    # (Type 2C, paired structures only) is not needed.
    sc.BodyPartExamined = str(ref.get("BodyPartExamined", "") or "HEAD")[:16]
    sc.BurnedInAnnotation = "YES"
    sc.RecognizableVisualFeatures = "NO"
    sc.LossyImageCompression = "00"
    sc.ImageComments = description
    sc.DerivationDescription = description
    if source is not None:
        item = Dataset()
        item.ReferencedSOPClassUID = source.dataset.SOPClassUID
        item.ReferencedSOPInstanceUID = source.dataset.SOPInstanceUID
        if source.frame is not None:
            item.ReferencedFrameNumber = source.frame + 1
        sc.SourceImageSequence = [item]
    stamp_creation(sc, now)
    return sc


def build_previews(ref: Dataset, planes: Sequence[SourcePlane], volume: Volume,
                   findings: Findings, series: SeriesInfo, config: ResultsConfig,
                   uids: ResultUids, now: datetime.datetime,
                   notes: Sequence[str]) -> list[hd.sc.SCImage]:
    """Summary page then key images, as Secondary Capture instances of one series."""
    direction = np.asarray(volume.image.GetDirection(), dtype=float).reshape(3, 3)
    orientation = (orientation_letter(direction[:, 0]), orientation_letter(direction[:, 1]))
    out = [_sc(render_summary(volume, findings, series, config, notes), ref, 1, "summary",
               config, uids, now, orientation,
               wording.plain(f"AI ICH triage summary. {wording.banner(findings)}"), None)]
    for number, k in enumerate(key_slices(findings, config.max_key_images), start=2):
        source = source_plane_of_slice(volume, planes, k)
        out.append(_sc(render_key_image(volume, findings, k, config), ref, number, "key",
                       config, uids, now, orientation,
                       wording.plain(f"AI ICH key image, slice {k + 1} of "
                                     f"{volume.hu.shape[0]}. {wording.banner(findings)}"),
                       source))
    LOGGER.info("preview series: %d image(s) (%d key image(s))", len(out), len(out) - 1)
    return out
