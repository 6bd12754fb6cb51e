"""The durable instance spool: bytes on disk before Success (PS3.4 B.2.3).

Layout under ``spool.path``::

    state.db                         the state database (node.db)
    tmp/                             partial writes; anything here was never acknowledged
    instances/<study>/<series>/<sop>.dcm
    results/<job id>/                DICOM results of a job, waiting to be sent
    jobs/<job id>.json               the job report (findings, or the reason it failed)

A store is: write to ``tmp/``, fsync the file (``fdatasync``), rename it into place,
fsync the folder, record the arrival in the state database, and only then report
success. The spool's database connection commits with ``synchronous=NORMAL`` (WAL):
the file and its folder are already on disk, and start-up recovery re-indexes any
spooled file whose row a power cut lost. File names come from UIDs only after
:func:`safe_name` has checked them.

Everything under the spool is the owner's only (patient data): folders 0700, files
0600, whatever the process umask (``ich-node run`` also sets umask 077).
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import logging
import os
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from node.db import StateDB, now

Buffer = bytes | bytearray | memoryview

LOGGER = logging.getLogger(__name__)

_UID_LIKE = re.compile(r"^[0-9]+(\.[0-9]+)*$")

DIR_MODE = 0o700  # spool folders: owner only
FILE_MODE = 0o600  # spool files: owner only


def owner_only(path: str, flags: int) -> int:
    """``open(..., opener=owner_only)``: a new file is created with mode 0600."""
    return os.open(path, flags, FILE_MODE)


def private_dir(folder: Path) -> None:
    """Create *folder* with mode 0700, or tighten it to 0700 if it exists."""
    folder.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    if folder.stat().st_mode & 0o777 != DIR_MODE:
        LOGGER.warning("tightening %s to mode 0700 (it holds patient data)", folder)
        folder.chmod(DIR_MODE)


def safe_name(uid: str) -> str:
    """A file-system name for *uid*: the UID itself when it is digits and dots (<= 64
    characters, PS3.5 9.1), otherwise ``x`` + a hash, so that no received value can
    name a path outside the spool."""
    if len(uid) <= 64 and _UID_LIKE.match(uid):
        return uid
    return "x" + hashlib.sha256(uid.encode("utf-8", "surrogateescape")).hexdigest()[:40]


def fsync_dir(path: Path) -> None:
    """fsync a folder, so that a rename or a new entry in it is durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes | Sequence[Buffer], tmp_dir: Path,
                  fsync: bool = True) -> None:
    """Write *data* (bytes, or chunks written in order) to *path* atomically: temp file,
    fsync (``fdatasync``: the data and the size, which is all a new file needs), rename,
    fsync the folder (and the parents of folders it had to create).

    This runs once per received instance, so it uses plain ``os`` calls: the folder is
    created only when the rename says it is missing (no ``stat`` per file)."""
    tmp = os.path.join(tmp_dir, f"{uuid.uuid4().hex}.part")
    chunks = [data] if isinstance(data, bytes) else data
    created: list[Path] = []
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
        try:
            for chunk in chunks:
                _write_all(fd, chunk)
            if fsync:
                _datasync(fd)
        finally:
            os.close(fd)
        try:
            os.replace(tmp, path)
        except FileNotFoundError:  # the folder does not exist (yet, or any more)
            created = _makedirs(path.parent)
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):  # it may not have been created
            os.unlink(tmp)
        raise
    if fsync:
        for folder in [path.parent, *created]:
            fsync_dir(folder)


_datasync = getattr(os, "fdatasync", os.fsync)  # macOS has no fdatasync


def _write_all(fd: int, chunk: Buffer) -> None:
    with memoryview(chunk) as view:
        written = 0
        while written < len(view):
            written += os.write(fd, view[written:])


def _makedirs(folder: Path) -> list[Path]:
    """Create *folder* and its parents; return the parents of new folders (to fsync)."""
    missing: list[Path] = []
    probe = folder
    while not probe.exists():
        missing.append(probe)
        probe = probe.parent
    for new in reversed(missing):  # top down, each 0700 (mkdir(parents=True) ignores mode
        new.mkdir(mode=DIR_MODE, exist_ok=True)  # for the parents it creates)
    return [m.parent for m in missing]


class StoreOutcome(enum.Enum):
    """What happened to a received instance."""

    STORED = "stored"
    DUPLICATE = "duplicate"  # same SOP Instance UID, same bytes: ignored
    REPLACED = "replaced"  # same SOP Instance UID, different bytes: the newest wins


@dataclass(frozen=True)
class InstanceHeader:
    """The identity of a received instance (no patient data)."""

    sop_uid: str
    sop_class_uid: str
    study_uid: str
    series_uid: str


@dataclass(frozen=True)
class StoreResult:
    """The outcome of :meth:`Spool.store` and whether the series was already analysed."""

    outcome: StoreOutcome
    path: Path
    late: bool


class Spool(Protocol):
    """Durable storage of received instances (the embedded default is :class:`DiskSpool`)."""

    def store(self, header: InstanceHeader, chunks: Sequence[Buffer],
              calling_ae: str) -> StoreResult:
        """Make the file made of *chunks* durable and record it; OSError when the disk fails."""
        ...

    def series_dir(self, study_uid: str, series_uid: str) -> Path:
        """The folder that holds the instances of a series."""
        ...


class DiskSpool:
    """Instances as files under ``instances/``, their arrival in the state database."""

    def __init__(self, root: Path, db: StateDB, fsync: bool = True,
                 rerun_on_late: bool = True) -> None:
        self.root = Path(root)
        self.db = db
        self.fsync = fsync
        self.rerun_on_late = rerun_on_late
        self.tmp_dir = self.root / "tmp"
        self.instances_dir = self.root / "instances"
        self.results_dir = self.root / "results"
        self.jobs_dir = self.root / "jobs"
        for folder in (self.root, self.tmp_dir, self.instances_dir, self.results_dir,
                       self.jobs_dir):
            private_dir(folder)

    def series_dir(self, study_uid: str, series_uid: str) -> Path:
        """The folder that holds the instances of a series."""
        return self.instances_dir / safe_name(study_uid) / safe_name(series_uid)

    def store(self, header: InstanceHeader, chunks: Sequence[Buffer],
              calling_ae: str) -> StoreResult:
        """Write, fsync, rename, fsync the folder, record. Raises OSError on disk failure.

        A SOP Instance UID seen before is compared byte for byte with the spooled file:
        the same bytes are ignored, different bytes replace it (the newest wins)."""
        series_dir = self.series_dir(header.study_uid, header.series_uid)
        path = series_dir / f"{safe_name(header.sop_uid)}.dcm"
        size = sum(len(c) for c in chunks)
        previous = self.db.query("SELECT path FROM instances WHERE sop_uid = ?",
                                 (header.sop_uid,))
        if previous and _same_bytes(Path(previous[0]["path"]), chunks, size):
            LOGGER.info("duplicate instance ignored (same bytes): sop=%s series=%s from %s",
                        header.sop_uid, header.series_uid, calling_ae)
            return StoreResult(StoreOutcome.DUPLICATE, path, late=False)
        write_durably(path, chunks, self.tmp_dir, self.fsync)
        outcome = StoreOutcome.REPLACED if previous else StoreOutcome.STORED
        if outcome is StoreOutcome.REPLACED:
            LOGGER.warning("instance replaced by newer bytes with the same SOP Instance UID: "
                           "sop=%s series=%s from %s", header.sop_uid, header.series_uid,
                           calling_ae)
        late = self.record(header, path, size, calling_ae)
        return StoreResult(outcome, path, late)

    def record(self, header: InstanceHeader, path: Path, size: int,
               calling_ae: str, received_at: float | None = None) -> bool:
        """Record an arrival and move its series to ``receiving``.

        Returns True when the series had already been queued or analysed (a late
        instance): with ``rerun_on_late`` the series goes back to ``receiving`` so
        that it is analysed again once it is quiet.
        """
        t = now() if received_at is None else received_at
        series_dir = str(path.parent)
        with self.db.transaction() as cur:
            known = cur.execute("SELECT series_uid FROM instances WHERE sop_uid = ?",
                                (header.sop_uid,)).fetchone()
            cur.execute(
                "INSERT OR REPLACE INTO instances (sop_uid, sop_class_uid, study_uid, series_uid,"
                " path, size, calling_ae, received_at) VALUES (?,?,?,?,?,?,?,?)",
                (header.sop_uid, header.sop_class_uid, header.study_uid, header.series_uid,
                 str(path), size, calling_ae, t),
            )
            row = cur.execute("SELECT state, instance_count, job_id FROM series"
                              " WHERE series_uid = ?", (header.series_uid,)).fetchone()
            added = 0 if known is not None and known["series_uid"] == header.series_uid else 1
            if row is None:
                cur.execute(
                    "INSERT INTO series (series_uid, study_uid, calling_ae, series_dir, state,"
                    " instance_count, first_received_at, last_received_at)"
                    " VALUES (?,?,?,?, 'receiving', ?, ?, ?)",
                    (header.series_uid, header.study_uid, calling_ae, series_dir, added, t, t),
                )
                return False
            state = row["state"]
            late = state not in ("receiving", "queued")
            new_state = "receiving" if (late and self.rerun_on_late) else state
            cur.execute(
                "UPDATE series SET instance_count = instance_count + ?, last_received_at = ?,"
                " state = ?, calling_ae = ?, purged_at = NULL WHERE series_uid = ?",
                (added, t, new_state, calling_ae, header.series_uid),
            )
            if state == "queued":
                # The job has not started (claiming moves the series to processing in the
                # same transaction), so it will read this file too: count it in the job.
                cur.execute("UPDATE jobs SET instance_count = instance_count + ?,"
                            " last_received_at = ? WHERE id = ? AND state = 'ready'",
                            (added, t, row["job_id"]))
        if late:
            if self.rerun_on_late:
                LOGGER.warning("late instance for series %s (was %s): series will be analysed "
                               "again", header.series_uid, state)
            else:
                LOGGER.warning("late instance for series %s (was %s) stored but not analysed "
                               "(assembly.rerun_on_late_instances is false)",
                               header.series_uid, state)
        return late

    def recover(self) -> int:
        """Start-up: delete unacknowledged partial writes; record spooled files the
        database does not know (a crash between rename and commit). Returns how many
        files were recovered."""
        for part in self.tmp_dir.iterdir():
            LOGGER.info("removing partial write %s (never acknowledged)", part.name)
            part.unlink()
        known = {r["path"] for r in self.db.query("SELECT path FROM instances")}
        recovered = 0
        for path in sorted(self.instances_dir.glob("*/*/*.dcm")):
            if str(path) in known:
                continue
            header = read_header(path)
            stat = path.stat()
            self.record(header, path, stat.st_size, calling_ae="(recovered)",
                        received_at=stat.st_mtime)
            recovered += 1
            LOGGER.warning("recovered spooled instance not in the state database: sop=%s",
                           header.sop_uid)
        return recovered


def _same_bytes(path: Path, chunks: Sequence[Buffer], size: int) -> bool:
    """Whether the file at *path* holds exactly the bytes of *chunks*."""
    try:
        if path.stat().st_size != size:
            return False
        return path.read_bytes() == b"".join(chunks)
    except FileNotFoundError:
        return False


def read_header(path: Path) -> InstanceHeader:
    """The identity of a spooled file (header only, no pixel data)."""
    from pydicom import dcmread

    ds = dcmread(path, stop_before_pixels=True,
                 specific_tags=["SOPInstanceUID", "SOPClassUID", "StudyInstanceUID",
                                "SeriesInstanceUID"])
    return InstanceHeader(str(ds.SOPInstanceUID), str(ds.SOPClassUID),
                          str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID))
