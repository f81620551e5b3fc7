"""The settings schema: typed, frozen, validated when constructed.

Every field has its default here and only here; `deploy/gastrolens.example.toml`
documents the same keys for operators. Units are in the field names
(``_seconds``, ``_mb``, ``_days``).
"""

from __future__ import annotations

import ipaddress
import re
import ssl
from enum import Enum
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

AE_TITLE_PATTERN = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # VR AE: no backslash, no control chars

DEFAULT_ACCEPTED_SOP_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.77.1.1",  # VL Endoscopic Image Storage
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image Storage
    "1.2.840.10008.5.1.4.1.1.7.4",  # Multi-frame True Color Secondary Capture Image Storage
    "1.2.840.10008.5.1.4.1.1.77.1.4",  # VL Photographic Image Storage
)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


def _check_ae_title(value: str) -> str:
    if not AE_TITLE_PATTERN.match(value) or not value.strip():
        raise ValueError(f"{value!r} is not a valid AE title (1-16 printable characters, no backslash)")
    return value


AETitle = Annotated[str, Field(min_length=1, max_length=16)]


class TLSSettings(_Section):
    enabled: bool = False
    cert: Path | None = None
    """Server certificate (PEM)."""
    key: Path | None = None
    """Server private key (PEM)."""
    ca: Path | None = None
    """CA bundle (PEM); when set, peers must present a client certificate it signed."""

    @field_validator("cert", "key", "ca")
    @classmethod
    def _readable_when_enabled(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        # Per field, so that errors name the key (dicom.tls.cert), not just the table.
        if not info.data.get("enabled"):
            return value
        if value is None:
            if info.field_name in ("cert", "key"):
                raise ValueError("required when TLS is enabled")
            return value
        try:
            with open(value, "rb"):
                pass
        except OSError as exc:
            raise ValueError(f"cannot read {value}: {exc.strerror}") from exc
        return value

    @model_validator(mode="after")
    def _loadable(self) -> TLSSettings:
        """A readable file that is no PEM certificate (or a key of another one) fails here, not at bind."""
        if not self.enabled or self.cert is None or self.key is None:
            return self
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            ctx.load_cert_chain(self.cert, self.key, password=_no_key_password)
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise ValueError(f"cert {self.cert} and key {self.key} do not load as a PEM certificate chain "
                             f"and its unencrypted private key: {exc}") from exc
        if self.ca is not None:
            try:
                ctx.load_verify_locations(self.ca)
            except (ssl.SSLError, OSError) as exc:
                raise ValueError(f"ca {self.ca} does not load as PEM CA certificates: {exc}") from exc
        return self


def _no_key_password() -> str:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key.
    raise ValueError("the private key is encrypted")


class DicomSettings(_Section):
    ae_title: AETitle = "GASTROLENS"
    bind: str = "127.0.0.1"
    port: int = Field(11112, ge=0, le=65535)
    allowed_calling_aets: tuple[AETitle, ...] = ()
    """Empty: any calling AE title is accepted (logged as a warning at start)."""
    allowed_peers: tuple[str, ...] = ()
    """IP addresses or CIDR networks; empty: any peer."""
    max_associations: int = Field(16, ge=1, le=512)
    max_pdu_bytes: int = Field(0, ge=0)
    """0 means unlimited."""
    accepted_sop_classes: tuple[str, ...] = DEFAULT_ACCEPTED_SOP_CLASSES
    network_timeout_seconds: float = Field(60.0, gt=0)
    acse_timeout_seconds: float = Field(10.0, gt=0)
    """How long a peer may take to complete association negotiation before it is dropped."""
    receiver_processes: int | None = Field(None, ge=1, le=64)
    """Processes serving the DICOM port; unset: one per CPU, at most 8."""
    tls: TLSSettings = TLSSettings()
    peers: tuple[KnownPeer, ...] = ()
    """``[[dicom.peers]]``: the application entities known by address (storage commitment
    reports, C-MOVE destinations); AE titles unique."""
    max_find_results: int = Field(1000, ge=1, le=1_000_000)
    """A C-FIND matching more than this is refused with 0xA700 (out of resources) and no answers."""

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, value: str) -> str:
        return _check_ae_title(value)

    @field_validator("allowed_calling_aets")
    @classmethod
    def _aets(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_check_ae_title(v) for v in value)

    @field_validator("allowed_peers")
    @classmethod
    def _peers(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for peer in value:
            try:
                ipaddress.ip_network(peer, strict=False)
            except ValueError as exc:
                raise ValueError(f"{peer!r} is not an IP address or CIDR network") from exc
        return value

    @field_validator("peers")
    @classmethod
    def _unique_peers(cls, value: tuple[KnownPeer, ...]) -> tuple[KnownPeer, ...]:
        titles = [p.ae_title.strip() for p in value]
        if len(titles) != len(set(titles)):
            raise ValueError("dicom.peers AE titles must be unique")
        return value

    def peer(self, ae_title: str) -> KnownPeer | None:
        """The configured peer with this AE title (trailing spaces ignored), or None."""
        wanted = ae_title.strip()
        return next((p for p in self.peers if p.ae_title.strip() == wanted), None)

    @field_validator("accepted_sop_classes")
    @classmethod
    def _uids(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        from pydicom.uid import UID

        for uid in value:
            if not UID(uid).is_valid:
                raise ValueError(f"{uid!r} is not a valid UID")
        return value


class StorageSettings(_Section):
    root: Path = Path("var/storage")
    """Received instances, outputs and quarantine live below this folder."""
    min_free_mb: int = Field(1024, ge=0)
    """Below this much free space C-STORE answers 0xA700 (out of resources)."""
    fsync: bool = True
    """Turn off only for throw-away test runs: C-STORE success then no longer means durable."""


class DatabaseSettings(_Section):
    url: str = "sqlite:///var/gastrolens.db"
    """SQLAlchemy URL: sqlite:///PATH or postgresql+psycopg://USER@HOST/DB."""

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            url = make_url(value)
        except ArgumentError as exc:
            raise ValueError(f"not a database URL: {exc}") from exc
        if url.get_backend_name() not in ("sqlite", "postgresql"):
            raise ValueError(f"unsupported database {url.get_backend_name()!r}: use sqlite or postgresql")
        return value


class ModelSettings(_Section):
    package: Path | None = None
    """A model package folder; unset: untrained weights, every output marked UNTRAINED."""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N"""
    batch_size: int = Field(16, ge=1, le=512)
    cpu_threads: int = Field(0, ge=0)
    """0: torch's default."""
    fov_crop: bool = True
    """Crop to the endoscope's field of view before resizing."""
    amp: Literal["auto", "off", "fp16", "bf16"] = "auto"
    """Mixed precision on a GPU: auto picks bf16 where the device supports it natively, else fp16;
    off serves in fp32. Ignored on the CPU."""

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
            raise ValueError(f"{value!r} is not one of auto, cpu, cuda, cuda:N")
        return value

    @field_validator("package", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if value == "" else value


class SchedulerSettings(_Section):
    interval_seconds: float = Field(2.0, gt=0)
    study_quiet_seconds: float = Field(30.0, ge=0)
    mpps_grace_seconds: float = Field(300.0, ge=0)
    """After MPPS COMPLETED, how long images it lists may still arrive before the study SR
    is written without them (listing them as missing)."""
    lease_seconds: float = Field(300.0, gt=0)
    """A claim older than this is taken to belong to a dead process and is claimed again."""
    decode_threads: int = Field(2, ge=1, le=64)
    """Threads decoding in the daemon's own process; used only when decode_processes is 0."""
    decode_processes: int | None = Field(None, ge=0, le=64)
    """Worker processes decoding stored images (JPEG decoding holds the GIL);
    unset: one per CPU (at most 32); 0: decode in decode_threads threads of the daemon."""
    output_processes: int | None = Field(None, ge=0, le=64)
    """Worker processes that build SEG/SR/overlay objects (pure Python, GIL-bound);
    unset: one per CPU beyond the first, at most 4; 0: build them in the daemon's own process."""


class DestinationTLS(_Section):
    enabled: bool = False
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None


DestinationName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]


class KnownPeer(_Section):
    """``[[dicom.peers]]``: a DICOM AE that GastroLens knows by address.

    Storage commitment reports that cannot go back on the requesting association are
    sent here, and only these AEs may ask for storage commitment (when
    ``storage_commitment``) or be named as C-MOVE destinations (when ``move_destination``).
    """

    ae_title: AETitle
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    tls: DestinationTLS = DestinationTLS()
    storage_commitment: bool = True
    """May ask for storage commitment (N-ACTION); its reports go to host:port."""
    move_destination: bool = True
    """May be named as a C-MOVE destination."""

    @field_validator("ae_title")
    @classmethod
    def _ae_title(cls, value: str) -> str:
        return _check_ae_title(value)


class DicomPeer(_Section):
    """A DICOM peer that receives the outputs by C-STORE (TLS when configured)."""

    kind: Literal["dicom"] = "dicom"
    name: DestinationName
    ae_title: AETitle
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    tls: DestinationTLS = DestinationTLS()
    associations: int = Field(1, ge=1, le=32)
    """Associations delivery opens to this peer at once, each carrying its share of the due
    objects; 1 (the default): one at a time, strictly oldest first. More only for a peer that
    serves associations concurrently (DCMTK storescp without --fork serves one at a time: a
    second one waits and may time out)."""

    @model_validator(mode="before")
    @classmethod
    def _complete(cls, data: object) -> object:
        # One message naming everything a peer needs, rather than one "Field required" per key.
        if isinstance(data, dict):
            missing = [key for key in ("ae_title", "host", "port") if data.get(key) is None]
            if missing:
                raise ValueError(f"a DICOM peer needs ae_title, host and port (missing: {', '.join(missing)}); "
                                 "a folder destination needs kind = \"folder\" and folder")
        return data

    @field_validator("ae_title")
    @classmethod
    def _ae_title(cls, value: str) -> str:
        return _check_ae_title(value)


class Folder(_Section):
    """A folder that receives the outputs as files: ``<folder>/<Study Instance UID>/<SOP Instance UID>.dcm``."""

    kind: Literal["folder"] = "folder"
    name: DestinationName
    folder: Path


class DicomWeb(_Section):
    """A DICOMweb origin server that receives the outputs by STOW-RS (PS3.18 10.5), one object a request."""

    kind: Literal["dicomweb"]
    name: DestinationName
    url: str = Field(min_length=1)
    """The service's base URL (STOW-RS posts to ``<url>/studies``), for example Orthanc's ``http://pacs:8042/dicom-web``."""
    token: SecretStr | None = None
    """Sent as ``Authorization: Bearer <token>``; unset: no Authorization header."""
    ca: Path | None = None
    """CA bundle (PEM) that an https server's certificate must chain to (https only); unset: the system's."""
    timeout_seconds: float = Field(30.0, gt=0)
    """Connect and read timeout of one request; an expired one is retried later."""

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parsed = urlsplit(value)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"{value!r} is not an http(s) URL with a host")
        if parsed.query or parsed.fragment:
            raise ValueError(f"{value!r}: the base URL takes no query or fragment")
        return value.rstrip("/")

    @field_validator("ca")
    @classmethod
    def _readable(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        # Checked only where it is used: an https URL.
        if value is not None and str(info.data.get("url", "")).startswith("https:") and not value.is_file():
            raise ValueError(f"cannot read {value}")
        return value


HL7_CHARSETS: dict[str, str] = {
    "ASCII": "ascii",
    "8859/1": "iso8859-1",
    "8859/2": "iso8859-2",
    "8859/5": "iso8859-5",
    "8859/7": "iso8859-7",
    "8859/15": "iso8859-15",
    "UNICODE UTF-8": "utf-8",
    "GB 18030-2000": "gb18030",
    "BIG-5": "big5",
}
"""MSH-18 character sets (HL7 table 0211) a destination may name, each with the Python codec that writes it."""

HL7Charset = Literal["ASCII", "8859/1", "8859/2", "8859/5", "8859/7", "8859/15", "UNICODE UTF-8", "GB 18030-2000",
                     "BIG-5"]

HL7Name = Annotated[str, Field(min_length=1, max_length=20, pattern=r"^[^|^~\\&\r\n]+$")]
"""An HD namespace ID (MSH-3..6): no HL7 delimiter, at most 20 characters."""


class HL7(_Section):
    """A reporting system or EHR that receives each study conclusion as an HL7 v2.5.1 ORU^R01 over MLLP."""

    kind: Literal["hl7"]
    name: DestinationName
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    sending_application: HL7Name = "GASTROLENS"
    """MSH-3."""
    sending_facility: HL7Name | None = None
    """MSH-4."""
    receiving_application: HL7Name
    """MSH-5."""
    receiving_facility: HL7Name
    """MSH-6."""
    charset: HL7Charset = "UNICODE UTF-8"
    """MSH-18: how the message is encoded; a patient name it cannot write is a permanent failure."""
    ack_timeout_seconds: float = Field(30.0, gt=0)
    """Connecting and waiting for the ACK; no ACK within it is retried later."""
    processing_id: Literal["P", "T", "D"] = "P"
    """MSH-11: P production, T training, D debugging."""


def _destination_kind(data: object) -> object:
    """Configurations without ``kind`` keep working: a folder key makes a folder, anything else a DICOM peer."""
    if isinstance(data, dict) and "kind" not in data:
        if "folder" in data and any(data.get(key) is not None for key in ("ae_title", "host", "port")):
            raise ValueError("a destination is either a DICOM peer or a folder, not both")
        return {**data, "kind": "folder" if "folder" in data else "dicom"}
    return data


Destination = Annotated[DicomPeer | Folder | DicomWeb | HL7, Field(discriminator="kind"),
                        BeforeValidator(_destination_kind)]
"""Where outputs go; ``kind`` says which (\"dicom\" when absent, unless ``folder`` is given)."""


class DeliverySettings(_Section):
    max_attempts: int = Field(8, ge=1, le=100)
    backoff_seconds: float = Field(5.0, ge=0)
    """First retry delay; doubles each attempt."""
    max_backoff_seconds: float = Field(3600.0, ge=0)


class OutputSettings(_Section):
    seg: bool = True
    sr: bool = True
    overlay: bool = True
    study_priority: tuple[str, ...] = ("egc_hgin", "agc", "smt", "pu", "normal")
    """Which class the study conclusion names when several are found, first wins."""

    @field_validator("study_priority")
    @classmethod
    def _priority(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        from gastrolens.findings import LesionClass

        known = {c.value for c in LesionClass}
        if set(value) != known or len(value) != len(known):
            raise ValueError(f"must list each of {sorted(known)} exactly once")
        return value


class RetentionSettings(_Section):
    enabled: bool = False
    days: int = Field(30, ge=1)
    """Stored inputs and outputs older than this are removed (never undelivered ones)."""


class APIToken(_Section):
    name: str = Field(min_length=1, max_length=64)
    role: Literal["viewer", "auditor", "sender"]
    """viewer: reads; auditor: reads and the audit trail; sender: stores by STOW-RS, reads nothing."""
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class APISettings(_Section):
    enabled: bool = False
    bind: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    open_health: bool = True
    """/healthz without a token."""
    open_metrics: bool = False
    """/metrics without a token."""
    tokens: tuple[APIToken, ...] = ()
    stow_max_body_bytes: int = Field(2 * 1024**3, ge=1)
    """A STOW-RS request body larger than this is refused (413) before anything is stored."""
    stow_max_parts: int = Field(1000, ge=1)
    """A STOW-RS request with more parts (instances) than this is refused (413) before anything is stored."""
    public_url: str = ""
    """The API's address as clients reach it (``https://gastrolens.hospital.example/gl``), used in the
    Retrieve URLs of STOW-RS, QIDO-RS and WADO-RS answers; empty: each request's Host header."""

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, value: str) -> str:
        if value and (urlsplit(value).scheme not in ("http", "https") or not urlsplit(value).netloc):
            raise ValueError(f"{value!r} is not an http:// or https:// URL")
        return value.rstrip("/")


class LoggingSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    patient_details: bool = False
    """Log patient names and IDs; off: only UIDs reach the log."""
    format: Literal["text", "json"] = "text"
    """text: one readable line per record; json: one JSON object per line, for log collectors
    (Kubernetes, journald, Loki); both go to stderr."""


class ServiceRole(str, Enum):
    """What one ``gastrolens serve`` process does; any number of each share one database and storage."""

    ALL = "all"
    """Everything in one process: the embedded default."""
    RECEIVER = "receiver"
    """The DICOM services (C-STORE and the other SCPs) and the API; loads no model, runs no job."""
    WORKER = "worker"
    """Inference, study completion, delivery and retention, and the API; opens no DICOM port."""

    @property
    def receives(self) -> bool:
        return self is not ServiceRole.WORKER

    @property
    def works(self) -> bool:
        return self is not ServiceRole.RECEIVER


class DaemonSettings(_Section):
    role: ServiceRole = ServiceRole.ALL
    """``gastrolens serve --role`` overrides it."""
    migrate_on_start: bool = True
    """Apply pending database migrations when ``serve`` starts. Turn off where many replicas share one
    database: there one job runs ``gastrolens db upgrade`` and ``serve`` refuses an out-of-date schema."""


class Settings(_Section):
    dicom: DicomSettings = DicomSettings()
    storage: StorageSettings = StorageSettings()
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    model: ModelSettings = ModelSettings()
    scheduler: SchedulerSettings = SchedulerSettings()
    destinations: tuple[Destination, ...] = ()
    delivery: DeliverySettings = DeliverySettings()
    outputs: OutputSettings = OutputSettings()
    retention: RetentionSettings = RetentionSettings()
    api: APISettings = APISettings()
    logging: LoggingSettings = LoggingSettings()
    daemon: DaemonSettings = DaemonSettings()

    @field_validator("destinations")
    @classmethod
    def _unique(cls, value: tuple[Destination, ...]) -> tuple[Destination, ...]:
        names = [d.name for d in value]
        if len(names) != len(set(names)):
            raise ValueError("destination names must be unique")
        return value

    def destination_kinds(self) -> dict[str, str]:
        """Each configured destination's name with its kind (dicom, folder, dicomweb, hl7)."""
        return {d.name: d.kind for d in self.destinations}
