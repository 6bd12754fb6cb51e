"""Who the results belong to and what they are called: patient/study identity, UIDs, dates.

* Patient and study attributes are copied from the analysed CT instances, with their
  Specific Character Set (PS3.3 C.12.1.1.2), so that the results file next to the images in
  every PACS and the names re-read the same.
* Every UID is derived from the input (source series UID, the sorted SOP Instance UIDs, the
  model weights' sha256), the kind of object and its index, under the configured root
  (:func:`pydicom.uid.generate_uid` with ``entropy_srcs``): a job that is re-run after a
  crash produces the same UIDs, and PACS replaces instead of duplicating.
* Content dates/times come from the ``now`` the caller passes (the node passes the job's
  start time); only they and InstanceCreationDate/Time differ between re-runs.
"""

from __future__ import annotations

import copy
import datetime
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from highdicom.enum import SpecificCharacterSetValues
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pydicom.valuerep import DA, TM

from pipeline.findings import Findings
from pipeline.volume import Volume
from sr_writer.config import ResultsConfig

LOGGER = logging.getLogger(__name__)

# Type 2 attributes of the Patient and General Study modules that highdicom copies from
# the source: absent ones are written empty (PS3.3 C.7.1.1, C.7.2.1).
_TYPE2_IDENTITY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                   "StudyDate", "StudyTime", "AccessionNumber", "ReferringPhysicianName",
                   "StudyID")


def package_version() -> str:
    """The installed ich-node version (setup.cfg), or '0+unknown' when run from a checkout."""
    try:
        return metadata.version("ich-node")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def software_versions(findings: Findings) -> list[str]:
    """SoftwareVersions (0018,1020, LO 1-n): the writer package, the model's name and
    version, and the weights checksum prefix, one value each (a value of 64 characters
    would lose the checksum to the LO limit). Name and version share a value when it fits
    in 64 characters, else each gets its own (the bundle's combined name is longer: one
    value cut at 64 lost the end of the version)."""
    model = findings.model
    both = f"{model.name} {model.version}"
    named = [both] if len(both) <= 64 else [model.name[:64], model.version[:64]]
    return [f"ich-node {package_version()}"[:64], *named, f"sha256:{model.sha256[:16]}"]


def device_serial_number(config: ResultsConfig) -> str:
    """DeviceSerialNumber: the configured value or one derived from the package version."""
    return config.device_serial_number or f"ich-node-{package_version()}"


@dataclass(frozen=True)
class ResultUids:
    """Deterministic UIDs of one analysis' results."""

    root: str
    entropy: tuple[str, ...]

    @classmethod
    def for_analysis(cls, volume: Volume, findings: Findings, config: ResultsConfig,
                     sop_uids: Sequence[str]) -> ResultUids:
        """UIDs keyed on the source series, its SOP Instance UIDs and the model weights."""
        return cls(config.uid_root,
                   (volume.series_uid, *sorted(set(sop_uids)), findings.model.sha256))

    def make(self, kind: str, index: int = 0) -> str:
        """The UID of object ``kind`` number ``index`` (e.g. ``('preview', 3)``)."""
        # The separator keeps ('a', 'bc') and ('ab', 'c') apart.
        return str(generate_uid(prefix=self.root,
                                entropy_srcs=[f"{s}\x1f" for s in (*self.entropy, kind,
                                                                   str(index))]))


def study_header(datasets: Sequence[Dataset]) -> Dataset:
    """A copy of the first source header with every Type 2 identity attribute present.

    highdicom reads PatientID, AccessionNumber, StudyID... from its source datasets as
    attributes; anonymised or minimal CT headers often lack them.
    """
    if not datasets:
        raise ValueError("At least one source dataset is required.")
    return patched_header(datasets[0])


def patched_header(ds: Dataset) -> Dataset:
    """A deep copy of ``ds`` (no pixels) with missing Type 2 identity attributes set empty."""
    out = copy.deepcopy(ds)
    if "PixelData" in out:
        del out.PixelData
    for keyword in _TYPE2_IDENTITY:
        if keyword not in out or out[keyword].value is None:
            setattr(out, keyword, "")
    return out


def source_character_set(ds: Dataset) -> str | list[str] | None:
    """SpecificCharacterSet of the source exactly as it is (None: default repertoire)."""
    value = ds.get("SpecificCharacterSet")
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return value
    values = [str(v) for v in value]
    return values[0] if len(values) == 1 else values


def character_set_kwargs(ds: Dataset) -> dict[str, Any]:
    """``specific_character_set`` for a highdicom constructor.

    highdicom validates the value against its list of defined terms and refuses the common
    Japanese form ``\\ISO 2022 IR 87`` (an empty first value, which PS3.3 C.12.1.1.2 defines
    as ISO 2022 IR 6). The equivalent ``ISO 2022 IR 6\\ISO 2022 IR 87`` is passed instead,
    None where highdicom knows no equivalent; :func:`restore_character_set` then writes the
    source's value verbatim.
    """
    value = source_character_set(ds)
    if isinstance(value, list):
        value = [v or "ISO 2022 IR 6" for v in value]
    known = {e.value for e in SpecificCharacterSetValues}
    parts = [value] if isinstance(value, str) else (value or [])
    return {"specific_character_set": value if parts and set(parts) <= known else None}


def restore_character_set(out: Dataset, source: Dataset) -> None:
    """Give ``out`` the source's SpecificCharacterSet verbatim (text is encoded on write)."""
    value = source_character_set(source)
    if value is None:
        if "SpecificCharacterSet" in out:
            del out.SpecificCharacterSet
    else:
        out.SpecificCharacterSet = value


def date_time(now: datetime.datetime) -> tuple[DA, TM]:
    """DICOM DA and TM (whole seconds) for ``now``."""
    return DA(now.date()), TM(now.time().replace(microsecond=0))


def stamp_creation(ds: Dataset, now: datetime.datetime) -> None:
    """Overwrite InstanceCreationDate/Time (highdicom sets the wall clock) with ``now``."""
    da, tm = date_time(now)
    ds.InstanceCreationDate = da
    ds.InstanceCreationTime = tm


def device_uid(config: ResultsConfig, findings: Findings) -> str:
    """Device Observer UID (TID 1004): stable for one installation and one set of weights,
    the same for every study it reports on."""
    return str(generate_uid(prefix=config.uid_root,
                            entropy_srcs=["device-observer\x1f", f"{config.manufacturer}\x1f",
                                          f"{device_serial_number(config)}\x1f",
                                          findings.model.sha256]))
