"""Site configuration: one TOML file (plus CLI overrides) loaded once into typed, validated objects.

Owns: the config schema (section and key names are public interface — sites and scripts depend
on them; add keys freely, rename only with a compatible alias), defaults, validation with messages
that name the offending key, and the merge of command-line overrides.
Must not: open sockets, touch the data directory, or import protocol code.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DUPLICATE_POLICIES = ("overwrite", "ignore", "reject", "keep")
WORKER_AFFINITY_MODES = ("auto", "on", "off")


class ConfigError(ValueError):
    """An invalid configuration; the message names the key and the problem."""


def validate_ae_title(value: object, key: str) -> str:
    """PS3.5 AE VR: 1–16 characters of the default repertoire, no backslash or control chars,
    not all spaces. Leading/trailing spaces are not significant and are removed."""
    if not isinstance(value, str):
        raise ConfigError(f"{key}: must be a string (an AE title), got {type(value).__name__}")
    stripped = value.strip(" ")
    if not stripped:
        raise ConfigError(f"{key}: an AE title must not be empty or all spaces")
    if len(value) > 16:
        raise ConfigError(f"{key}: AE title {value!r} is longer than 16 characters")
    bad = [c for c in stripped if c == "\\" or ord(c) < 0x20 or ord(c) > 0x7E]
    if bad:
        raise ConfigError(f"{key}: AE title {value!r} contains a forbidden character {bad[0]!r}")
    return stripped


def _port(value: object, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key}: must be an integer port number, got {value!r}")
    if not 0 <= value <= 65535:
        raise ConfigError(f"{key}: port {value} is outside 0..65535")
    return value


def _host(value: object, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{key}: must be a non-empty host name or IP address")
    value = value.strip()
    try:
        ipaddress.ip_address(value)
    except ValueError:
        # A host name: RFC 1123 letters, digits, hyphens and dots.
        if not all(c.isalnum() or c in "-._" for c in value):
            raise ConfigError(
                f"{key}: {value!r} is neither an IP address nor a host name"
            ) from None
    return value


def _bool(value: object, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: must be true or false, got {value!r}")
    return value


def _positive_number(value: object, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ConfigError(f"{key}: must be a positive number of seconds, got {value!r}")
    return float(value)


def _int_range(value: object, key: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key}: must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise ConfigError(f"{key}: {value} is outside {lo}..{hi}")
    return value


def _choice(value: object, key: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(choices)}")
    assert isinstance(value, str)
    return value


def _str(value: object, key: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{key}: must be a string, got {value!r}")
    return value


@dataclass(frozen=True)
class RemoteNode:
    """A known DICOM peer (PS3.8 presentation address + AE title)."""

    name: str
    ae_title: str
    host: str
    port: int


@dataclass(frozen=True)
class DicomConfig:
    ae_title: str = "OPENPACS"
    host: str = "0.0.0.0"
    port: int = 11112
    # Maximum P-DATA-TF PDU length we accept (seed 002 T3.51: 4096..1048576; 0 = unlimited).
    max_pdu: int = 131072
    # Beyond this many established associations: A-ASSOCIATE-RJ transient, local limit exceeded.
    max_associations: int = 32
    require_known_calling_ae: bool = False
    # PS3.8 ARTIM: how long a connection may take to send A-ASSOCIATE-RQ, and to close after
    # release/abort. Also bounds a TCP health check that connects and idles.
    artim_timeout: float = 10.0
    # An established association silent for this long (or a PDU stalled mid-transfer) is aborted.
    network_timeout: float = 60.0
    # On SIGTERM/SIGINT, in-flight operations get this long to finish before connections close.
    shutdown_timeout: float = 30.0
    # TCP connections still negotiating (before A-ASSOCIATE-AC) beyond this are closed at once.
    max_pending_connections: int = 64
    # Processes accepting associations on the listening socket (each has its own interpreter,
    # so ingest uses every core). 0 = one per CPU core.
    workers: int = 0
    # auto: each worker on its own CPU while there are at least as many open associations as
    # workers (see server.WorkerAffinity); on: always; off: the scheduler decides.
    worker_affinity: str = "auto"


@dataclass(frozen=True)
class StorageConfig:
    data_dir: Path = Path("./openpacs-data")
    duplicate_policy: str = "overwrite"
    # fsync blobs and the index before acknowledging. Turning it off trades power-loss
    # durability for speed; a process crash still loses nothing acknowledged.
    fsync: bool = True
    # Blobs of at least this many bytes, received whole in memory, are written with O_DIRECT
    # (past the page cache: much less kernel CPU per fsync for large images). 0 = never.
    direct_io_min_size: int = 256 * 1024
    # After a blob's fsync, drop its pages from the kernel's page cache (they are clean), so
    # ingest does not push the index and recently read studies out of memory, and the next
    # blob is written into pages just freed. Large blobs written with O_DIRECT bypass the
    # cache anyway. Only with fsync on.
    drop_written_pages: bool = True


@dataclass(frozen=True)
class IndexConfig:
    # SQLAlchemy URL. Empty: SQLite in <data_dir>/index.sqlite (WAL).
    url: str = ""
    # How long a write waits for a locked index before the operation fails (A704 for C-STORE).
    busy_timeout: float = 10.0


@dataclass(frozen=True)
class QueryConfig:
    # More matches than this: the query is refused with a failure status naming the limit
    # (never silently empty or truncated — unlike seed 002's hit limit).
    max_results: int = 1000


@dataclass(frozen=True)
class StorageCommitmentConfig:
    # Report on the requesting association when it is still open (seed 002's default); when
    # false, or when it has closed, on a new association to the requester from [[remote]].
    same_association: bool = True


@dataclass(frozen=True)
class WorklistConfig:
    # Specific Character Set of worklist answers when every value fits in it (most modalities
    # know ISO_IR 100, seed 000); answers that do not fit are sent in ISO_IR 192 (UTF-8).
    character_set: str = "ISO_IR 100"


MPPS_VERIFY_KEYS = ("", "study_uid", "accession_number", "requested_procedure_id")


@dataclass(frozen=True)
class MppsConfig:
    # seed 001 §4.3.2.3: refuse (0110) an N-CREATE whose study the worklist does not know, by
    # this key; "" accepts unscheduled steps.
    verify_study: str = ""


@dataclass(frozen=True)
class HttpConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    # CORS: browser origins allowed to call the API and DICOMweb (OHIF Viewer...); an entry
    # "scheme://host:*" allows any port, "*" any origin. Default: pages served from this machine.
    allowed_origins: tuple[str, ...] = ("http://localhost:*", "http://127.0.0.1:*")
    max_request_size: int = 2 << 30  # STOW-RS body limit in bytes (seed 002: 2 GB) → 413
    # the URL clients reach the server by (behind a reverse proxy), for RetrieveURL/BulkDataURI;
    # empty: from the request's Host header
    public_url: str = ""


@dataclass(frozen=True)
class Hl7Config:
    host: str = "0.0.0.0"
    port: int = 2575
    # site choices for the HL7 → worklist mapping (openpacs.hl7.messages.MappingOptions)
    primary_issuer: str = ""
    orm_station_ae_field: str = ""
    default_coding_scheme: str = "L"


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "INFO"


@dataclass(frozen=True)
class Config:
    dicom: DicomConfig = field(default_factory=DicomConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    query: QueryConfig = field(default_factory=QueryConfig)
    storage_commitment: StorageCommitmentConfig = field(default_factory=StorageCommitmentConfig)
    worklist: WorklistConfig = field(default_factory=WorklistConfig)
    mpps: MppsConfig = field(default_factory=MppsConfig)
    mpps_forward: tuple[RemoteNode, ...] = ()
    http: HttpConfig = field(default_factory=HttpConfig)
    hl7: Hl7Config = field(default_factory=Hl7Config)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    remotes: tuple[RemoteNode, ...] = ()
    source: Path | None = None  # the file this came from, for messages

    @property
    def index_url(self) -> str:
        if self.index.url:
            return self.index.url
        return f"sqlite:///{(self.storage.data_dir / 'index.sqlite').resolve()}"

    def remote_by_ae(self, ae_title: str) -> RemoteNode | None:
        for remote in self.remotes:
            if remote.ae_title == ae_title:
                return remote
        return None

    def remote_by_name(self, name: str) -> RemoteNode | None:
        for remote in self.remotes:
            if remote.name == name:
                return remote
        return None


def _check_keys(section: dict[str, Any], allowed: set[str], where: str) -> None:
    for key in section:
        if key not in allowed:
            known = ", ".join(sorted(allowed))
            raise ConfigError(f"{where}.{key}: unknown key (known keys: {known})")


def _section(raw: dict[str, Any], name: str) -> dict[str, Any]:
    value = raw.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"[{name}]: must be a table")
    return value


def _dicom(raw: dict[str, Any]) -> DicomConfig:
    d = DicomConfig()
    _check_keys(raw, {f.name for f in dataclasses.fields(DicomConfig)}, "dicom")
    max_pdu = raw.get("max_pdu", d.max_pdu)
    if (
        isinstance(max_pdu, bool)
        or not isinstance(max_pdu, int)
        or (max_pdu != 0 and not 4096 <= max_pdu <= 1048576)
    ):
        raise ConfigError(
            f"dicom.max_pdu: {max_pdu!r} must be 0 (unlimited) or between 4096 and 1048576"
        )
    return DicomConfig(
        ae_title=validate_ae_title(raw.get("ae_title", d.ae_title), "dicom.ae_title"),
        host=_host(raw.get("host", d.host), "dicom.host"),
        port=_port(raw.get("port", d.port), "dicom.port"),
        max_pdu=max_pdu,
        max_associations=_int_range(
            raw.get("max_associations", d.max_associations), "dicom.max_associations", 1, 10000
        ),
        require_known_calling_ae=_bool(
            raw.get("require_known_calling_ae", d.require_known_calling_ae),
            "dicom.require_known_calling_ae",
        ),
        artim_timeout=_positive_number(
            raw.get("artim_timeout", d.artim_timeout), "dicom.artim_timeout"
        ),
        network_timeout=_positive_number(
            raw.get("network_timeout", d.network_timeout), "dicom.network_timeout"
        ),
        shutdown_timeout=_positive_number(
            raw.get("shutdown_timeout", d.shutdown_timeout), "dicom.shutdown_timeout"
        ),
        max_pending_connections=_int_range(
            raw.get("max_pending_connections", d.max_pending_connections),
            "dicom.max_pending_connections",
            1,
            100000,
        ),
        workers=_int_range(raw.get("workers", d.workers), "dicom.workers", 0, 64),
        worker_affinity=_choice(
            raw.get("worker_affinity", d.worker_affinity),
            "dicom.worker_affinity",
            WORKER_AFFINITY_MODES,
        ),
    )


def _storage(raw: dict[str, Any], base: Path) -> StorageConfig:
    d = StorageConfig()
    _check_keys(raw, {f.name for f in dataclasses.fields(StorageConfig)}, "storage")
    policy = _choice(
        raw.get("duplicate_policy", d.duplicate_policy),
        "storage.duplicate_policy",
        DUPLICATE_POLICIES,
    )
    data_dir = Path(_str(raw.get("data_dir", str(d.data_dir)), "storage.data_dir"))
    if not data_dir.is_absolute() and "data_dir" in raw:
        data_dir = base / data_dir  # relative to the config file, as users expect
    return StorageConfig(
        data_dir=data_dir,
        duplicate_policy=policy,
        fsync=_bool(raw.get("fsync", d.fsync), "storage.fsync"),
        direct_io_min_size=_int_range(
            raw.get("direct_io_min_size", d.direct_io_min_size),
            "storage.direct_io_min_size",
            0,
            1 << 40,
        ),
        drop_written_pages=_bool(
            raw.get("drop_written_pages", d.drop_written_pages), "storage.drop_written_pages"
        ),
    )


def _remotes(raw: object, section: str = "remote") -> tuple[RemoteNode, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError(f"{section}: must be an array of tables ([[{section}]])")
    remotes: list[RemoteNode] = []
    names: set[str] = set()
    for i, entry in enumerate(raw):
        where = f"{section}[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: must be a table")
        _check_keys(entry, {"name", "ae_title", "host", "port"}, where)
        for key in ("ae_title", "host", "port"):
            if key not in entry:
                raise ConfigError(f"{where}.{key}: required key is missing")
        ae = validate_ae_title(entry["ae_title"], f"{where}.ae_title")
        name = _str(entry.get("name", ae), f"{where}.name")
        if name in names:
            raise ConfigError(f"{where}.name: {name!r} is used by another [[{section}]]")
        names.add(name)
        remotes.append(
            RemoteNode(
                name=name,
                ae_title=ae,
                host=_host(entry["host"], f"{where}.host"),
                port=_port(entry["port"], f"{where}.port"),
            )
        )
    return tuple(remotes)


def parse_config(
    raw: dict[str, Any], *, base: Path = Path("."), source: Path | None = None
) -> Config:
    """Validate a parsed TOML document into a :class:`Config`."""
    _check_keys(
        raw,
        {"dicom", "storage", "index", "query", "storage_commitment", "worklist", "mpps",
         "mpps_forward", "http", "hl7", "logging", "remote"},
        "config",
    )  # fmt: skip
    worklist_raw = _section(raw, "worklist")
    _check_keys(worklist_raw, {"character_set"}, "worklist")
    charset = _str(worklist_raw.get("character_set", "ISO_IR 100"), "worklist.character_set")
    if charset not in ("ISO_IR 100", "ISO_IR 192", "ISO_IR 6", ""):
        raise ConfigError(
            f"worklist.character_set: {charset!r} is not ISO_IR 100, ISO_IR 192 or ISO_IR 6"
        )
    mpps_raw = _section(raw, "mpps")
    _check_keys(mpps_raw, {"verify_study"}, "mpps")
    verify = _str(mpps_raw.get("verify_study", ""), "mpps.verify_study")
    if verify not in MPPS_VERIFY_KEYS:
        raise ConfigError(
            f"mpps.verify_study: {verify!r} is not one of "
            + ", ".join(repr(k) for k in MPPS_VERIFY_KEYS)
        )
    commit_raw = _section(raw, "storage_commitment")
    _check_keys(commit_raw, {"same_association"}, "storage_commitment")
    query_raw = _section(raw, "query")
    _check_keys(query_raw, {"max_results"}, "query")
    index_raw = _section(raw, "index")
    _check_keys(index_raw, {"url", "busy_timeout"}, "index")
    http_raw = _section(raw, "http")
    _check_keys(
        http_raw, {"host", "port", "allowed_origins", "max_request_size", "public_url"}, "http"
    )
    public_url = _str(http_raw.get("public_url", ""), "http.public_url").rstrip("/")
    if public_url and not re.fullmatch(r"https?://[^/\s]+(/\S*)?", public_url):
        raise ConfigError(f"http.public_url: {public_url!r} is not an http(s) URL")
    origins = http_raw.get("allowed_origins", list(HttpConfig.allowed_origins))
    if not isinstance(origins, list) or not all(isinstance(o, str) for o in origins):
        raise ConfigError("http.allowed_origins: must be a list of origins such as 'http://host:*'")
    for origin in origins:
        if origin != "*" and not re.fullmatch(r"https?://[^/\s:]+(:(\d+|\*))?", origin):
            raise ConfigError(
                f"http.allowed_origins: {origin!r} is not an origin (scheme://host[:port|:*]) "
                "or '*'"
            )
    hl7_raw = _section(raw, "hl7")
    hl7_keys = {"host", "port", "primary_issuer", "orm_station_ae_field", "default_coding_scheme"}
    _check_keys(hl7_raw, hl7_keys, "hl7")
    station_field = _str(hl7_raw.get("orm_station_ae_field", ""), "hl7.orm_station_ae_field")
    station_field = station_field.upper()
    if station_field and not re.fullmatch(r"(ORC|OBR)-[1-9][0-9]?", station_field):
        raise ConfigError(
            f"hl7.orm_station_ae_field: {station_field!r} is not an ORC or OBR field "
            "such as 'OBR-21'"
        )
    coding_scheme = _str(hl7_raw.get("default_coding_scheme", "L"), "hl7.default_coding_scheme")
    if not coding_scheme or len(coding_scheme) > 16:
        raise ConfigError("hl7.default_coding_scheme: must be 1 to 16 characters (a DICOM SH)")
    log_raw = _section(raw, "logging")
    _check_keys(log_raw, {"level"}, "logging")
    level = _str(log_raw.get("level", "INFO"), "logging.level").upper()
    _choice(level, "logging.level", ("DEBUG", "INFO", "WARNING", "ERROR"))
    return Config(
        dicom=_dicom(_section(raw, "dicom")),
        storage=_storage(_section(raw, "storage"), base),
        index=IndexConfig(
            url=_str(index_raw.get("url", ""), "index.url"),
            busy_timeout=_positive_number(
                index_raw.get("busy_timeout", IndexConfig.busy_timeout), "index.busy_timeout"
            ),
        ),
        http=HttpConfig(
            host=_host(http_raw.get("host", HttpConfig.host), "http.host"),
            port=_port(http_raw.get("port", HttpConfig.port), "http.port"),
            allowed_origins=tuple(origins),
            public_url=public_url,
            max_request_size=_int_range(
                http_raw.get("max_request_size", HttpConfig.max_request_size),
                "http.max_request_size",
                1024,
                1 << 50,
            ),
        ),
        hl7=Hl7Config(
            host=_host(hl7_raw.get("host", Hl7Config.host), "hl7.host"),
            port=_port(hl7_raw.get("port", Hl7Config.port), "hl7.port"),
            primary_issuer=_str(hl7_raw.get("primary_issuer", ""), "hl7.primary_issuer"),
            orm_station_ae_field=station_field,
            default_coding_scheme=coding_scheme,
        ),
        query=QueryConfig(
            max_results=_int_range(
                query_raw.get("max_results", QueryConfig.max_results), "query.max_results", 1, 10**7
            )
        ),
        storage_commitment=StorageCommitmentConfig(
            same_association=_bool(
                commit_raw.get("same_association", True), "storage_commitment.same_association"
            )
        ),
        worklist=WorklistConfig(character_set=charset),
        mpps=MppsConfig(verify_study=verify),
        mpps_forward=_remotes(raw.get("mpps_forward"), "mpps_forward"),
        logging=LoggingConfig(level=level),
        remotes=_remotes(raw.get("remote")),
        source=source,
    )


def load_config(path: Path | None) -> Config:
    """Load and validate a TOML config file (or the defaults when *path* is None)."""
    if path is None:
        return Config()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from exc
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    try:
        return parse_config(raw, base=path.parent, source=path)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def apply_overrides(
    config: Config,
    *,
    data_dir: Path | None = None,
    ae_title: str | None = None,
    dicom_port: int | None = None,
    http_port: int | None = None,
    hl7_port: int | None = None,
    host: str | None = None,
) -> Config:
    """Command-line flags override the file (``openpacs serve --dicom-port …``)."""
    dicom, storage, http, hl7 = config.dicom, config.storage, config.http, config.hl7
    if ae_title is not None:
        dicom = dataclasses.replace(dicom, ae_title=validate_ae_title(ae_title, "--ae-title"))
    if dicom_port is not None:
        dicom = dataclasses.replace(dicom, port=_port(dicom_port, "--dicom-port"))
    if http_port is not None:
        http = dataclasses.replace(http, port=_port(http_port, "--http-port"))
    if hl7_port is not None:
        hl7 = dataclasses.replace(hl7, port=_port(hl7_port, "--hl7-port"))
    if host is not None:
        host = _host(host, "--host")
        dicom = dataclasses.replace(dicom, host=host)
        http = dataclasses.replace(http, host=host)
        hl7 = dataclasses.replace(hl7, host=host)
    if data_dir is not None:
        storage = dataclasses.replace(storage, data_dir=data_dir)
    return dataclasses.replace(config, dicom=dicom, storage=storage, http=http, hl7=hl7)
