"""Typed configuration of the DICOM result writers (the ``results:`` section of ``config.yaml``).

Owned by ``sr_writer/``; the node embeds :class:`ResultsConfig`. Unknown keys are refused so
that a typo stops the node at start.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipeline.findings import SUBTYPES

_UID_ROOT = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*\.$")

DEFAULT_COLORS: dict[str, tuple[int, int, int]] = {
    "epidural": (255, 200, 0),  # amber
    "intraparenchymal": (255, 40, 40),  # red
    "intraventricular": (0, 200, 255),  # cyan
    "subarachnoid": (40, 255, 40),  # green
    "subdural": (255, 0, 255),  # magenta
}


class ResultsConfig(BaseModel):
    """Identity and appearance of the SR, SEG and preview series (see ``docs/results.md``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    uid_root: str = Field(
        default="1.2.826.0.1.3680043.8.498.",
        description="UID prefix (digits and dots, ending in a dot, at most 40 characters) for "
        "every UID the writers create. The default is the pydicom root, fine for tests only: "
        "a site uses its own registered root. Default: 1.2.826.0.1.3680043.8.498.")
    sr_series_number: int = Field(
        default=9901, ge=1, le=2**31 - 1,
        description="SeriesNumber of the TID 1500 SR. Default: 9901.")
    seg_series_number: int = Field(
        default=9902, ge=1, le=2**31 - 1,
        description="SeriesNumber of the Segmentation. Default: 9902.")
    preview_series_number: int = Field(
        default=9903, ge=1, le=2**31 - 1,
        description="SeriesNumber of the Secondary Capture preview series. Default: 9903.")
    sr_series_description: str = Field(
        default="AI ICH triage report", max_length=64,
        description="SeriesDescription of the SR. Keep the 'AI ICH' prefix: series selection "
        "skips our own results by it. Default: 'AI ICH triage report'.")
    seg_series_description: str = Field(
        default="AI ICH segmentation", max_length=64,
        description="SeriesDescription of the SEG. Default: 'AI ICH segmentation'.")
    preview_series_description: str = Field(
        default="AI ICH triage preview", max_length=64,
        description="SeriesDescription of the preview images. Default: 'AI ICH triage preview'.")
    manufacturer: str = Field(
        default="ICH-Node", max_length=64,
        description="Manufacturer (0008,0070) of every result. Series selection skips "
        "instances whose Manufacturer starts with pipeline.selection.own_manufacturer "
        "('ICH-Node'), so keep the two equal. Default: 'ICH-Node'.")
    manufacturer_model_name: str = Field(
        default="ich-node", max_length=64,
        description="ManufacturerModelName (0008,1090). Default: 'ich-node'.")
    device_serial_number: str = Field(
        default="", max_length=64,
        description="DeviceSerialNumber (0018,1000); empty: 'ich-node-<package version>'. "
        "Default: empty.")
    institution_name: str | None = Field(
        default=None, max_length=64,
        description="InstitutionName (0008,0080) written into the results; None: not written. "
        "Default: None.")
    content_creator: str = Field(
        default="ICH^AI^NODE", max_length=64,
        description="ContentCreatorName (PN) of the SEG. Default: 'ICH^AI^NODE'.")
    segment_colors: dict[str, tuple[int, int, int]] = Field(
        default_factory=lambda: dict(DEFAULT_COLORS),
        description="sRGB colour (0-255 each) per subtype, for the SEG's "
        "RecommendedDisplayCIELabValue and the preview outlines. Default: epidural amber, "
        "intraparenchymal red, intraventricular cyan, subarachnoid green, subdural magenta.")
    preview_width_px: int = Field(
        default=512, ge=256, le=2048,
        description="Width in pixels of every preview image (the slice is resampled to it "
        "keeping the physical aspect ratio). Default: 512.")
    preview_window: tuple[float, float] = Field(
        default=(40.0, 80.0),
        description="(centre, width) in HU of the preview window. Default: brain, 40/80.")
    max_key_images: int = Field(
        default=8, ge=1, le=64,
        description="Most key-slice previews per series (largest lesions first). Default: 8.")

    @field_validator("uid_root")
    @classmethod
    def _check_root(cls, value: str) -> str:
        if len(value) > 40 or not _UID_ROOT.match(value):
            raise ValueError(
                f"uid_root must be digits and dots without leading zeros, end with '.', and "
                f"be at most 40 characters long (got {value!r})")
        return value

    @field_validator("segment_colors")
    @classmethod
    def _check_colors(cls, value: dict[str, tuple[int, int, int]]
                      ) -> dict[str, tuple[int, int, int]]:
        missing = [s for s in SUBTYPES if s not in value]
        unknown = [s for s in value if s not in SUBTYPES]
        if missing or unknown:
            raise ValueError(f"segment_colors needs exactly the subtypes {list(SUBTYPES)} "
                             f"(missing {missing}, unknown {unknown})")
        for name, rgb in value.items():
            if not all(0 <= int(c) <= 255 for c in rgb):
                raise ValueError(f"segment_colors[{name!r}] must be three values 0-255, got {rgb}")
        return value

    @field_validator("preview_window")
    @classmethod
    def _check_window(cls, value: tuple[float, float]) -> tuple[float, float]:
        if value[1] <= 0:
            raise ValueError(f"preview_window width must be positive, got {value[1]}")
        return value
