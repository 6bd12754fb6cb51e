"""One typed configuration, read once and passed in explicitly.

Precedence, lowest first: the defaults below, ``config.yaml``, environment
variables ``ICH_NODE__SECTION__KEY=value`` (value parsed as YAML), command-line
flags. Every model forbids unknown keys, so a typo stops the node at start with
a message that names the key.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from pipeline.config import PipelineConfig

LOGGER = logging.getLogger(__name__)
ENV_PREFIX = "ICH_NODE__"


class ConfigError(Exception):
    """The configuration is invalid; the message names the offending key."""


def _check_ae_title(value: str) -> str:
    """PS3.5 6.2: an AE title is 1-16 characters of the default repertoire, no backslash."""
    stripped = value.strip()
    if not stripped:
        raise ValueError("an AE title must not be empty")
    if len(stripped) > 16:
        raise ValueError(f"AE title {stripped!r} is longer than 16 characters")
    if not all(32 <= ord(c) < 127 for c in stripped) or "\\" in stripped:
        raise ValueError(f"AE title {stripped!r} has characters outside the DICOM default repertoire")
    return stripped


AETitle = Annotated[str, AfterValidator(_check_ae_title)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)



class TlsConfig(_Strict):
    """DICOM over TLS on the listener (PS3.15 Annex B.1, BCP 195 profile: TLS 1.2 or newer)."""

    enabled: bool = Field(False, description="Also listen for DICOM over TLS on dicom.tls.port")
    port: int = Field(2762, ge=0, le=65535, description="TLS listener port (2762 is the registered dicom-tls port); 0 = any free port")
    plain_listener: bool = Field(True, description="Keep the plain-TCP listener on dicom.port as well; false = TLS only")
    cert_file: Path | None = Field(None, description="Our certificate chain (PEM), required when enabled")
    key_file: Path | None = Field(None, description="Private key of cert_file (PEM, unencrypted; keep it mode 0600)")
    ca_file: Path | None = Field(None, description="CA certificates (PEM) that client certificates must chain to; required with require_client_cert")
    require_client_cert: bool = Field(False, description="Refuse TLS connections without a client certificate signed by ca_file")
    min_version: Literal["1.2", "1.3"] = Field("1.2", description="Oldest TLS version accepted: 1.2 or 1.3")
    handshake_timeout_s: float = Field(10.0, gt=0, description="A TLS handshake that takes longer is dropped, seconds")

    @model_validator(mode="after")
    def _files(self) -> TlsConfig:
        if self.enabled and (self.cert_file is None or self.key_file is None):
            raise ValueError("cert_file and key_file are required when TLS is enabled")
        if self.require_client_cert and self.ca_file is None:
            raise ValueError("require_client_cert needs ca_file (the CA that signs client certificates)")
        return self

class DicomConfig(_Strict):
    """The DICOM listener (PS3.8 upper layer, PS3.7 DIMSE)."""

    ae_title: AETitle = Field("ICH_NODE", description="Our AE title, 1-16 characters")
    host: str = Field("0.0.0.0", description="Address to listen on (0.0.0.0: all interfaces)")
    port: int = Field(11112, ge=0, le=65535, description="TCP port to listen on; 0 = any free port")
    max_associations: int = Field(16, ge=1, description="Concurrent inbound associations; more are rejected (local limit)")
    max_pdu_bytes: int = Field(262144, ge=0, description="Largest PDU we receive, bytes; 0 = unlimited")
    acse_timeout_s: float = Field(30.0, gt=0, description="Association negotiation timeout, seconds")
    dimse_timeout_s: float = Field(60.0, gt=0, description="DIMSE message timeout, seconds")
    network_timeout_s: float = Field(60.0, gt=0, description="Idle network timeout, seconds")
    allowed_calling_aes: list[AETitle] = Field(
        default_factory=list, description="Calling AE titles allowed; empty = any"
    )
    allowed_networks: list[str] = Field(
        default_factory=list, description="Source IP networks allowed (CIDR); empty = any"
    )
    other_sop_classes: Literal["refuse", "accept_and_ignore"] = Field(
        "refuse", description="Storage SOP classes other than (Enhanced) CT: refuse at negotiation, or accept_and_ignore"
    )
    tcp_nodelay: bool = Field(True, description="Disable Nagle (TCP_NODELAY) on our sockets, in and out")
    drain_timeout_s: float = Field(
        30.0, ge=0, description="On stop, wait this long for active associations to finish, seconds"
    )
    tls: TlsConfig = Field(default_factory=TlsConfig, description="DICOM over TLS (docs/security.md)")

    @field_validator("allowed_networks")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for net in value:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError as exc:
                raise ValueError(f"{net!r} is not an IP network: {exc}") from exc
        return value


class SpoolConfig(_Strict):
    """Where received instances, state and results live."""

    path: Path = Field(Path("spool"), description="Spool folder: instances, state.db, results, job reports (relative to the working dir)")
    min_free_mb: int = Field(1024, ge=0, description="Refuse new associations below this free space on the spool, MB")
    fsync: bool = Field(True, description="fsync files and folders before answering Success")


class AssemblyConfig(_Strict):
    """When a series counts as complete."""

    quiet_seconds: float = Field(5.0, gt=0, description="A series is complete this long after its last instance, seconds")
    quiet_seconds_by_ae: dict[AETitle, float] = Field(
        default_factory=dict, description="Quiet period per calling AE, seconds (overrides quiet_seconds), e.g. {SLOW_CT: 30}"
    )
    release_grace_seconds: float | None = Field(
        1.0, ge=0, description="Check a series this long after the association that sent it is released, seconds; null = off"
    )
    rerun_on_late_instances: bool = Field(
        True, description="Instances arriving after analysis started cause a re-run"
    )

    def quiet_for(self, calling_ae: str) -> float:
        """The quiet period that applies to instances from *calling_ae*."""
        return self.quiet_seconds_by_ae.get(calling_ae.strip(), self.quiet_seconds)



class DestinationTls(_Strict):
    """TLS towards one peer: the server is always verified (certificate chain and name)."""

    ca_file: Path | None = Field(None, description="CA certificates (PEM) that the peer's certificate must chain to; null = the system CAs")
    cert_file: Path | None = Field(None, description="Our client certificate (PEM), if the peer requires one")
    key_file: Path | None = Field(None, description="Private key of cert_file (PEM, unencrypted)")
    server_name: str | None = Field(None, description="Name the peer's certificate must carry; null = host")
    min_version: Literal["1.2", "1.3"] = Field("1.2", description="Oldest TLS version used: 1.2 or 1.3")

    @model_validator(mode="after")
    def _pair(self) -> DestinationTls:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        return self

class Destination(_Strict):
    """A DICOM peer that receives our results (C-STORE SCP)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="Name used by the CLI")
    ae_title: AETitle
    host: str
    port: int = Field(ge=1, le=65535)
    tls: DestinationTls | None = Field(None, description="DICOM over TLS to this peer; null = plain TCP")


class OutboundConfig(_Strict):
    """Retries of the outbound C-STORE queue."""

    max_attempts: int = Field(8, ge=1, description="Delivery attempts per study and destination before the dead letter")
    backoff_initial_s: float = Field(5.0, gt=0, description="First retry delay, doubled each attempt, seconds")
    backoff_max_s: float = Field(600.0, gt=0, description="Longest retry delay, seconds")
    calling_ae_title: AETitle | None = Field(None, description="Calling AE title when sending; null = dicom.ae_title")


class RetentionConfig(_Strict):
    """Deletion of processed data, so that the disk never fills by design."""

    done_hours: float = Field(24.0, gt=0, description="Delete finished series and sent results after, hours")
    failed_days: float = Field(14.0, gt=0, description="Keep failed series and dead-lettered results for, days")
    sweep_interval_s: float = Field(600.0, gt=0, description="How often retention runs, seconds")


class WorkerConfig(_Strict):
    """The analysis worker process."""

    poll_interval_s: float = Field(0.5, gt=0, description="Job queue poll interval, seconds")
    max_job_attempts: int = Field(3, ge=1, description="A job interrupted this often (crash, kill) fails instead of running again")
    shutdown_grace_s: float = Field(30.0, ge=0, description="On stop, wait this long for the running job, seconds; then it is re-queued")


class HttpConfig(_Strict):
    """The HTTP endpoint: status page (/), /metrics and /healthz."""

    host: str = Field("127.0.0.1", description="Address of the status page, /metrics and /healthz; keep it local unless firewalled")
    port: int = Field(9110, ge=0, le=65535, description="Port of the status page, /metrics and /healthz; 0 = disabled")
    page_refresh_s: int = Field(15, ge=0, description="The status page reloads itself this often, seconds; 0 = never")
    page_series: int = Field(50, ge=1, le=1000, description="Most recent series listed on the status page")


class AuditConfig(_Strict):
    """The audit log (JSON lines: received, selected, analysed, sent, notified; no PHI)."""

    path: Path | None = Field(None, description="Audit log file; null = <spool.path>/audit.jsonl")
    max_mb: int = Field(64, ge=1, description="Rotate the audit log at this size, MB")
    keep: int = Field(10, ge=1, description="Rotated audit files kept (audit.jsonl.1 .. .N)")


class LoggingConfig(_Strict):
    """Log output."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="DEBUG, INFO, WARNING or ERROR")
    format: Literal["text", "json"] = Field(
        "text", description="text, or json (one JSON object per line)")


_HHMM = r"([01]\d|2[0-3]):[0-5]\d"
_TARGET_NAME = r"^[A-Za-z0-9_.-]{1,64}$"
_HL7_TEXT = r"^[^|~\\&\r\n]*$"  # no HL7 field, repetition, escape or subcomponent separator


class NotifyWhen(_Strict):
    """Which finished studies cause notifications."""

    findings: Literal["positive", "all"] = Field(
        "positive", description="positive: only studies with suspected hemorrhage; all: every analysed study")
    hours: str | None = Field(
        None, pattern=rf"^{_HHMM}-{_HHMM}$", description='Only studies finished in this local-time window, "HH:MM-HH:MM" (may span midnight, e.g. "22:00-07:00"); null = any time')

    @field_validator("hours")
    @classmethod
    def _not_empty(cls, value: str | None) -> str | None:
        if value is not None and value[:5] == value[6:]:
            raise ValueError(f"{value!r} starts and ends at the same time; use null for any time")
        return value


class WebhookTarget(_Strict):
    """An HTTP endpoint that receives a JSON POST per notification."""

    name: str = Field(pattern=_TARGET_NAME, description="Name used in logs, metrics and status")
    url: str = Field(pattern=r"^https?://\S+$", description="http:// or https:// URL")
    headers: dict[str, str] = Field(
        default_factory=dict, description="Extra HTTP headers, e.g. {Authorization: 'Bearer ${ICH_WEBHOOK_TOKEN}'}; ${VAR} is read from the environment when sending")
    timeout_s: float = Field(10.0, gt=0, description="Connect and response timeout, seconds")
    include_patient: bool = Field(
        False, description="Also send patient ID and name (PHI); study UID and accession number are always sent")


class Hl7Target(_Strict):
    """A RIS or worklist that receives HL7 v2.5 ORU^R01 over MLLP."""

    name: str = Field(pattern=_TARGET_NAME, description="Name used in logs, metrics and status")
    host: str
    port: int = Field(ge=1, le=65535)
    sending_application: str = Field("ICH_NODE", pattern=_HL7_TEXT, description="MSH-3 (HD; ^ separates components)")
    sending_facility: str = Field("", pattern=_HL7_TEXT, description="MSH-4")
    receiving_application: str = Field("", pattern=_HL7_TEXT, description="MSH-5")
    receiving_facility: str = Field("", pattern=_HL7_TEXT, description="MSH-6")
    processing_id: Literal["P", "T", "D"] = Field("P", description="MSH-11: P production, T training, D debugging")
    timeout_s: float = Field(10.0, gt=0, description="Connect timeout, and how long to wait for the ACK, seconds")


class NotificationsConfig(_Strict):
    """Alerts for finished studies (webhook, HL7 ORU^R01), retried like the outbound queue."""

    when: NotifyWhen = Field(default_factory=NotifyWhen, description="Which studies notify")
    webhooks: list[WebhookTarget] = Field(default_factory=list, description="HTTP POST targets; none by default")
    hl7: list[Hl7Target] = Field(default_factory=list, description="HL7 v2 MLLP targets; none by default")
    max_attempts: int = Field(8, ge=1, description="Delivery attempts per notification before the dead letter")
    backoff_initial_s: float = Field(5.0, gt=0, description="First retry delay, doubled each attempt, seconds")
    backoff_max_s: float = Field(600.0, gt=0, description="Longest retry delay, seconds")

    @field_validator("hl7")
    @classmethod
    def _unique_names(cls, value: list[Hl7Target], info: ValidationInfo) -> list[Hl7Target]:
        names = [t.name for t in info.data.get("webhooks", [])] + [t.name for t in value]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise ValueError(f"notification target names must be unique, repeated: {sorted(dupes)}")
        return value


def _check_time_window(value: str | None) -> str | None:
    """``HH:MM-HH:MM`` in the node's local time; the end may be before the start (overnight)."""
    if value is None:
        return None
    match = re.fullmatch(r"\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*", value)
    if not match or int(match[1]) > 23 or int(match[3]) > 23 or int(match[2]) > 59 \
            or int(match[4]) > 59:
        raise ValueError(f"{value!r} is not a time window HH:MM-HH:MM (e.g. 22:00-07:00)")
    if (int(match[1]), int(match[2])) == (int(match[3]), int(match[4])):
        raise ValueError(f"time window {value!r} starts and ends at the same minute")
    return f"{int(match[1]):02d}:{match[2]}-{int(match[3]):02d}:{match[4]}"


def _check_dicom_match(value: dict[str, Any]) -> dict[str, list[str]]:
    """Keywords must be DICOM keywords; each value a string or a list of strings."""
    from pydicom.datadict import tag_for_keyword

    out: dict[str, list[str]] = {}
    for keyword, accepted in value.items():
        if tag_for_keyword(str(keyword)) is None:
            raise ValueError(f"{keyword!r} is not a DICOM attribute keyword (e.g. "
                             "RequestedProcedurePriority, InstitutionalDepartmentName)")
        items = accepted if isinstance(accepted, list) else [accepted]
        if not items or not all(isinstance(v, str | int) for v in items):
            raise ValueError(f"{keyword}: give a value or a list of values")
        out[str(keyword)] = [str(v) for v in items]
    return out


class TriageConditions(_Strict):
    """Conditions of a triage rule; all optional, all must hold (an empty rule always holds)."""

    dicom: Annotated[dict[str, Any], AfterValidator(_check_dicom_match)] = Field(
        default_factory=dict, description="DICOM keyword -> accepted value(s), read from one "
        "instance header of the series (also inside RequestAttributesSequence); "
        "case-insensitive, * and ? wildcards")
    calling_aes: list[AETitle] = Field(
        default_factory=list, description="The series came from one of these calling AE titles")
    time_of_day: Annotated[str | None, AfterValidator(_check_time_window)] = Field(
        None, description="Local time window HH:MM-HH:MM, may wrap midnight (22:00-07:00)")


class PriorityRule(TriageConditions):
    """First matching rule sets a job's priority (higher runs first)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="Logged and stored as "
                      "the reason for the priority")
    priority: int = Field(description="Job priority when the rule matches; higher first")


class UrgentRoute(TriageConditions):
    """A destination that receives positive results only (when its conditions hold)."""

    destination: str = Field(description="Name of a configured destination")

    @model_validator(mode="before")
    @classmethod
    def _name_only(cls, value: Any) -> Any:
        return {"destination": value} if isinstance(value, str) else value


class TriageConfig(_Strict):
    """Job priority and urgent routing of positive results."""

    rules: list[PriorityRule] = Field(
        default_factory=lambda: [
            PriorityRule(name="stat", priority=100,
                         dicom={"RequestedProcedurePriority": ["STAT"]}),
            PriorityRule(name="high", priority=50,
                         dicom={"RequestedProcedurePriority": ["HIGH"]}),
        ],
        description="Priority rules in order: the first whose conditions all hold sets the job's"
        " priority (higher runs first), else default_priority; default: STAT 100, HIGH 50"
        " (RequestedProcedurePriority)")
    default_priority: int = Field(0, description="Priority of a job no rule matches")
    urgent_destinations: list[UrgentRoute] = Field(
        default_factory=list, description="Destinations (names, or {destination, conditions})"
        " that get positive results in addition to the others; never negative ones")

    @field_validator("rules")
    @classmethod
    def _unique_rule_names(cls, value: list[PriorityRule]) -> list[PriorityRule]:
        names = [r.name for r in value]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise ValueError(f"rule names must be unique, repeated: {sorted(dupes)}")
        return value

    @property
    def urgent_names(self) -> set[str]:
        """Destinations that only receive positive results."""
        return {route.destination for route in self.urgent_destinations}


class CommitmentConfig(_Strict):
    """Storage Commitment Push Model SCP (PS3.4 Annex J): who asked, where to answer."""

    enabled: bool = Field(True, description="Offer Storage Commitment Push Model on the listener")
    same_association: bool = Field(True, description="Answer on the requesting association while it is still open")
    same_association_grace_s: float = Field(
        2.0, ge=0, description="Before answering on the requesting association, give the requester this long to release it (one that releases right after the N-ACTION response is then answered on a new association instead of being aborted), seconds")
    same_association_timeout_s: float = Field(
        5.0, gt=0, description="Wait this long for the N-EVENT-REPORT response on the requesting association (a requester that hangs up instead is aborted and answered on a new association), seconds")
    peers: list[Destination] = Field(
        default_factory=list, description="Where to send N-EVENT-REPORT on a new association, by calling AE title (ae_title, host, port, tls)")
    max_attempts: int = Field(20, ge=1, description="Delivery attempts of one N-EVENT-REPORT before it is given up (dead)")
    retry_interval_s: float = Field(30.0, gt=0, description="Wait between delivery attempts, seconds")

    @field_validator("peers")
    @classmethod
    def _unique_peers(cls, value: list[Destination]) -> list[Destination]:
        titles = [p.ae_title for p in value]
        dupes = {t for t in titles if titles.count(t) > 1}
        if dupes:
            raise ValueError(f"one peer per AE title, repeated: {sorted(dupes)}")
        return value

    def peer(self, calling_ae: str) -> Destination | None:
        """The peer that answers for *calling_ae*, if configured."""
        for peer in self.peers:
            if peer.ae_title == calling_ae.strip():
                return peer
        return None

class NodeConfig(_Strict):
    """The whole configuration of one node."""

    dicom: DicomConfig = Field(default_factory=DicomConfig, description="The DICOM listener")
    spool: SpoolConfig = Field(default_factory=SpoolConfig, description="Durable storage")
    assembly: AssemblyConfig = Field(default_factory=AssemblyConfig,
                                     description="When a series is complete")
    destinations: list[Destination] = Field(
        default_factory=list, description="Where results go (C-STORE SCPs); none by default")
    outbound: OutboundConfig = Field(default_factory=OutboundConfig,
                                     description="Retries of result delivery")
    retention: RetentionConfig = Field(default_factory=RetentionConfig,
                                       description="Deletion of processed data")
    worker: WorkerConfig = Field(default_factory=WorkerConfig,
                                 description="The analysis worker process")
    notifications: NotificationsConfig = Field(
        default_factory=NotificationsConfig, description="Alerts for positive studies")
    http: HttpConfig = Field(default_factory=HttpConfig,
                             description="Status page, metrics and health")
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="Log output")
    audit: AuditConfig = Field(default_factory=AuditConfig, description="Audit log")
    commitment: CommitmentConfig = Field(default_factory=CommitmentConfig,
                                         description="Storage commitment (docs/security.md)")
    pipeline: PipelineConfig = Field(
        default_factory=PipelineConfig,
        description="Series selection, volume, windows, models and result objects")
    triage: TriageConfig = Field(default_factory=TriageConfig,
                                 description="Job priority and urgent routing of positives")

    @field_validator("destinations")
    @classmethod
    def _unique_names(cls, value: list[Destination]) -> list[Destination]:
        names = [d.name for d in value]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise ValueError(f"destination names must be unique, repeated: {sorted(dupes)}")
        return value

    @model_validator(mode="after")
    def _urgent_destinations_exist(self) -> NodeConfig:
        names = {d.name for d in self.destinations}
        unknown = [r.destination for r in self.triage.urgent_destinations
                   if r.destination not in names]
        if unknown:
            raise ValueError(f"triage.urgent_destinations: no destination named {unknown} "
                             f"(known: {sorted(names) or 'none configured'})")
        return self

    def destination(self, name: str) -> Destination:
        """The destination called *name*; KeyError names the known ones."""
        for dest in self.destinations:
            if dest.name == name:
                return dest
        known = ", ".join(d.name for d in self.destinations) or "none configured"
        raise KeyError(f"no destination named {name!r} (known: {known})")


def parse_destination(text: str, index: int = 0) -> dict[str, Any]:
    """Parse ``AET@HOST:PORT`` (the ``--destination`` flag) into a destination mapping."""
    match = re.fullmatch(r"([^@]{1,16})@(\[[^\]]+\]|[^:]+):(\d{1,5})", text.strip())
    if not match:
        raise ConfigError(f"--destination {text!r}: expected AET@HOST:PORT")
    ae, host, port = match.groups()
    return {"name": f"{ae.strip()}-{index}" if index else ae.strip(), "ae_title": ae,
            "host": host.strip("[]"), "port": int(port)}


def _deep_merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        keys = [k.lower() for k in name[len(ENV_PREFIX):].split("__") if k]
        if not keys:
            continue
        node = result
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = yaml.safe_load(raw)
    return result


def _format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def load_config(
    path: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> NodeConfig:
    """Read defaults, then *path*, then the environment, then *overrides*; validate once."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: the top level must be a mapping")
        data = loaded or {}
    data = _deep_merge(data, _env_overrides(os.environ if environ is None else environ))
    if overrides:
        data = _deep_merge(data, overrides)
    try:
        return NodeConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from exc


def check_runtime(config: NodeConfig) -> None:
    """Checks that need the file system: the spool must be creatable and writable."""
    spool = config.spool.path
    try:
        spool.mkdir(parents=True, exist_ok=True)
        probe = spool / ".write-probe"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"spool.path: {spool} is not writable: {exc.strerror}") from exc
    free_mb = shutil.disk_usage(spool).free // (1024 * 1024)
    if free_mb < config.spool.min_free_mb:
        # Not fatal: the node starts and refuses associations until space is freed.
        LOGGER.warning(
            "spool %s has %d MB free, below spool.min_free_mb=%d: associations will be refused",
            spool, free_mb, config.spool.min_free_mb,
        )
