"""Typed configuration of the pipeline (the ``pipeline:`` section of ``config.yaml``).

Owned by ``pipeline/``; ``node.config`` embeds :class:`PipelineConfig`.
Every model forbids unknown keys so that a typo stops the node at start.
"""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from pipeline.models.config import ModelsConfig
from sr_writer.config import ResultsConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SelectionConfig(_Strict):
    """Rules that choose the series to analyse from the instances of a study.

    The ranking of the series that pass every rule is documented in
    :func:`pipeline.selection.select_series` and ``docs/volume.md``.
    """

    modalities: tuple[str, ...] = Field(
        default=("CT",), description="Accepted Modality (0008,0060) values. Default: CT.")
    sop_classes: tuple[str, ...] = Field(
        default=("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1"),
        description="Accepted SOP Class UIDs. Default: CT Image and Enhanced CT Image Storage; "
        "SR, SEG and Secondary Capture (dose screens) are therefore skipped.")
    axial_max_angle_deg: float = Field(
        default=35.0, ge=0.0, le=90.0,
        description="Degrees; the slice normal may deviate this much from the patient's "
        "feet-head axis and still count as axial (gantry tilt stays below 30). Default: 35.")
    head_pattern: str = Field(
        default=r"HEAD|BRAIN|SKULL|CRAN|CEREB|NEURO|STROKE|KOPF|SCH[AÄ]DEL|CERVEAU|CABEZA|CRANE|CT\s*H\b",
        description="Regex (case-insensitive) searched in BodyPartExamined, StudyDescription, "
        "SeriesDescription and ProtocolName.")
    head_policy: Literal["require", "if_present", "ignore"] = Field(
        default="if_present",
        description="'require': skip a series unless one field matches head_pattern; "
        "'if_present': skip only when some of those fields are filled and none matches "
        "(anonymised data often has none); 'ignore'. Default: if_present.")
    exclude_image_types: tuple[str, ...] = Field(
        default=("LOCALIZER", "SCOUT", "TOPOGRAM", "SECONDARY_CAPTURE", "DOSE_INFO", "SCREEN_SAVE"),
        description="Skip instances whose ImageType (0008,0008) has one of these values.")
    exclude_description_pattern: str = Field(
        default=r"DOSE|SCOUT|LOCALI[SZ]ER|TOPO|SURVIEW|SCANOGRAM|PATIENT PROTOCOL|SCREEN ?SAVE",
        description="Regex (case-insensitive) on SeriesDescription: skip matching series.")
    own_manufacturer: str = Field(
        default="ICH-Node", description="Manufacturer (0008,0070) prefix of our own results: skipped.")
    own_series_description_prefix: str = Field(
        default="AI ICH", description="SeriesDescription prefix of our own results: skipped.")
    prefer_original: bool = Field(
        default=True, description="Rank ImageType ORIGINAL above DERIVED. Default: true.")
    min_slice_thickness_mm: float = Field(
        default=0.4, ge=0.0, description="mm; thinner series are skipped. Default: 0.4.")
    max_slice_thickness_mm: float = Field(
        default=10.0, gt=0.0, description="mm; thicker series are skipped. Default: 10.")
    preferred_slice_thickness_mm: float = Field(
        default=5.0, gt=0.0, description="mm; among equals the closest thickness wins. Default: 5.")
    min_slices: int = Field(
        default=8, ge=2, description="Slices; series with fewer are skipped. Default: 8.")
    bone_kernel_pattern: str = Field(
        default=r"BONE|LUNG|SHARP|DETAIL|EDGE|B6\d|B7\d|B8\d|H6\d|H7\d|H8\d|Hr6|Hr7|YC|YD|FC3\d|FC5\d"
        r"|FC8\d|BR6|BR7|Qr5|Qr6",
        description="Regex (case-insensitive) on ConvolutionKernel for bone/sharp kernels.")
    soft_kernel_pattern: str = Field(
        default=r"STANDARD|SOFT|BRAIN|H2\d|H3\d|H4\d|Hr3\d|Hr4\d|J3\d|J4\d|B2\d|B3\d|B4\d|Br3|Br4|FC2\d"
        r"|FC1\d|UB|UA|FC6\d|Qr3|Qr4|^A$|^B$",
        description="Regex (case-insensitive) on ConvolutionKernel for soft-tissue kernels.")
    orientation_tolerance: float = Field(
        default=1e-3, gt=0.0,
        description="Maximum difference of direction cosines for two instances to share a "
        "stack (dimensionless). Default: 0.001.")


class VolumeConfig(_Strict):
    """How the slices of the chosen series become one HU volume (see docs/volume.md)."""

    orientation_tolerance: float = Field(
        default=1e-3, gt=0.0,
        description="Maximum difference of direction cosines within one volume. Default: 0.001.")
    mixed_geometry: Literal["largest", "reject"] = Field(
        default="largest",
        description="Slices of several orientations or matrix sizes: keep the largest stack and "
        "report the others ('largest') or raise VolumeError ('reject'). Default: largest.")
    duplicate_tolerance_mm: float = Field(
        default=0.01, ge=0.0,
        description="mm; slices closer than this along the normal are duplicates. Default: 0.01.")
    gap_factor: float = Field(
        default=1.5, gt=1.0,
        description="A gap larger than gap_factor x the median spacing means missing slices. "
        "Default: 1.5.")
    missing_slices: Literal["reject", "fill"] = Field(
        default="fill",
        description="'reject': VolumeError; 'fill': linear interpolation, filled slices are "
        "flagged in the report and have no source SOP Instance UID. Default: fill.")
    spacing_tolerance_mm: float = Field(
        default=0.05, ge=0.0,
        description="mm; gaps within this of the median are uniform; otherwise the volume is "
        "resampled to uniform spacing. Default: 0.05.")
    tilt_tolerance_mm: float = Field(
        default=0.05, ge=0.0,
        description="mm; in-plane offset of a slice position from the normal through the first "
        "one above which the stack is sheared (gantry tilt) and corrected. Default: 0.05.")
    max_tilt_deg: float = Field(
        default=45.0, ge=0.0, le=89.0,
        description="Degrees; larger shear angles are rejected as inconsistent. Default: 45.")
    min_slices: int = Field(
        default=2, ge=1, description="Slices; fewer after clean-up raise VolumeError. Default: 2.")
    padding_fill: Literal["air", "minimum"] = Field(
        default="air",
        description="Value for PixelPaddingValue pixels: 'air' (air_hu) or the minimum HU of "
        "the slice's other pixels. Default: air.")
    air_hu: float = Field(
        default=-1000.0, description="HU used for padding and for regions outside a slice. Default: -1000.")
    wrapped_unsigned_floor_hu: float = Field(
        default=-1024.0,
        description="HU; unsigned data whose RescaleIntercept cannot encode air (> -100) holds "
        "two's-complement values: they are unwrapped into [floor, floor + 2^BitsStored). "
        "Default: -1024.")
    monochrome1: Literal["modality_lut", "invert_stored"] = Field(
        default="modality_lut",
        description="'modality_lut': HU = slope*stored+intercept whatever the photometric "
        "interpretation (PS3.3 C.11.1: MONOCHROME1 only affects display); 'invert_stored': "
        "invert stored values first, as GDCM/ITK does. Default: modality_lut.")
    read_threads: int = Field(
        default=4, ge=1, le=64, description="Threads reading and decoding files. Default: 4.")


class WindowsConfig(_Strict):
    """Display windows (centre/width in HU) and brain-mask thresholds."""

    brain: tuple[float, float] = Field(
        default=(40.0, 80.0), description="Brain window (centre, width) in HU. Default: 40/80.")
    subdural: tuple[float, float] = Field(
        default=(80.0, 200.0), description="Subdural window (centre, width) in HU. Default: 80/200.")
    bone: tuple[float, float] = Field(
        default=(600.0, 2800.0), description="Bone window (centre, width) in HU. Default: 600/2800.")
    mask_low_hu: float = Field(
        default=-20.0, description="HU; lowest value of intracranial tissue in the mask. Default: -20.")
    mask_high_hu: float = Field(
        default=120.0, description="HU; highest value of intracranial tissue (blood < 100). Default: 120.")
    bone_hu: float = Field(
        default=300.0, description="HU; voxels above are skull. Default: 300.")
    erosion_mm: float = Field(
        default=3.0, ge=0.0,
        description="mm; erosion that detaches brain from scalp/neck before the largest "
        "component is taken (dilated back afterwards). Default: 3.")


class PipelineConfig(_Strict):
    """Settings of series selection, volume reconstruction and analysis."""

    selection: SelectionConfig = Field(
        default=SelectionConfig(), description="Series selection rules.")
    volume: VolumeConfig = Field(
        default=VolumeConfig(), description="Volume reconstruction.")
    windows: WindowsConfig = Field(
        default=WindowsConfig(), description="Display windows and brain mask.")
    models: ModelsConfig = Field(
        default=ModelsConfig(), description="Classifier and segmenter weights and inference.")
    results: ResultsConfig = Field(
        default=ResultsConfig(), description="Identity and appearance of the SR, SEG and preview.")
