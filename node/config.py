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
    """The HTTP endpoint for /metrics and /healthz."""

    host: str = Field("127.0.0.1", description="Address of /metrics and /healthz; keep it local unless firewalled")
    port: int = Field(9110, ge=0, le=65535, description="Port of /metrics and /healthz; 0 = disabled")


class LoggingConfig(_Strict):
    """Log output."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="DEBUG, INFO, WARNING or ERROR")
    format: Literal["text", "json"] = Field(
        "text", description="text, or json (one JSON object per line)")



class CommitmentConfig(_Strict):
    """Storage Commitment Push Model SCP (PS3.4 Annex J): who asked, where to answer."""

    enabled: bool = Field(True, description="Offer Storage Commitment Push Model on the listener")
    same_association: bool = Field(True, description="Answer on the requesting association while it is still open")
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
    http: HttpConfig = Field(default_factory=HttpConfig, description="Metrics and health")
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="Log output")
    commitment: CommitmentConfig = Field(default_factory=CommitmentConfig,
                                         description="Storage commitment (docs/security.md)")
    pipeline: PipelineConfig = Field(
        default_factory=PipelineConfig,
        description="Series selection, volume, windows, models and result objects")

    @field_validator("destinations")
    @classmethod
    def _unique_names(cls, value: list[Destination]) -> list[Destination]:
        names = [d.name for d in value]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise ValueError(f"destination names must be unique, repeated: {sorted(dupes)}")
        return value

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
