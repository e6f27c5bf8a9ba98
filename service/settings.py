"""One typed settings object for the whole node.

Read once at start from ``SONOCASE_*`` environment variables and an optional TOML
file (``SONOCASE_CONFIG`` or ``--config``), then passed in to every stage: nothing
below the entry points reads the environment. The defaults run a complete node on
one machine with no external service.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from service.common.hosts import allowed_networks

#: The repository root, where the shipped model and SR template live.
PROJECT_ROOT = Path(__file__).resolve().parents[1]
ENV_PREFIX = "SONOCASE_"
_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 AE VR: no backslash


def validate_ae_title(value: str) -> str:
    """Return ``value`` stripped, or raise if it is not a valid AE title (PS3.5 6.2)."""
    stripped = value.strip()
    if not _AE_RE.match(stripped):
        raise ValueError(f"{value!r} is not a valid AE title: 1-16 printable characters, no backslash")
    return stripped


class Destination(BaseModel):
    """A DICOM peer that results are sent to (``AE@host:port``)."""

    model_config = {"frozen": True, "extra": "forbid"}

    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    tls: bool = False

    @field_validator("ae_title")
    @classmethod
    def _ae_title(cls, value: str) -> str:
        return validate_ae_title(value)

    @classmethod
    def parse(cls, text: str) -> Destination:
        """Parse ``AE@host:port`` (append ``+tls`` to use DICOM TLS)."""
        match = re.fullmatch(r"\s*([^@]+)@([^:@\s]+):(\d+)(\+tls)?\s*", text)
        if not match:
            raise ValueError(f"{text!r} is not AE@host:port")
        ae, host, port, tls = match.groups()
        return cls(ae_title=ae, host=host, port=int(port), tls=bool(tls))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}" + ("+tls" if self.tls else "")


class DicomWebDestination(BaseModel):
    """A DICOMweb origin server (its base URL, e.g. ``https://archive/dicom-web``):
    results go to it by STOW-RS, the library fill reads it by QIDO-RS and WADO-RS."""

    model_config = {"frozen": True, "extra": "forbid"}

    url: str

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        parts = urlsplit(value.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{value!r} is not an http:// or https:// URL")
        if parts.username is not None or parts.password is not None:
            raise ValueError(
                "a DICOMweb URL must not hold credentials: use dicomweb_token_file or "
                "dicomweb_user + dicomweb_password_file"
            )
        if parts.query or parts.fragment:
            raise ValueError(f"{value!r}: a DICOMweb base URL has no query or fragment")
        return value.strip().rstrip("/")

    @classmethod
    def parse(cls, text: str) -> DicomWebDestination:
        """Parse a base URL; a ``ValueError`` says what is wrong with it."""
        try:
            return cls(url=text)
        except ValidationError as exc:
            raise ValueError(exc.errors()[0]["msg"].removeprefix("Value error, ")) from None

    def __str__(self) -> str:
        return self.url


#: Where results go and where the library is read from: a DICOM peer or a DICOMweb server.
Peer = Destination | DicomWebDestination


def parse_peer(text: str) -> Peer:
    """``AE@host:port[+tls]`` is a DICOM peer; ``http(s)://host[:port]/path`` a
    DICOMweb server (a URL is told apart by its ``://``)."""
    return DicomWebDestination.parse(text) if "://" in text else Destination.parse(text)


#: What a breast node analyses when nothing else is said (setting routing_rules): a
#: study that names the breast, and one that names no body part at all.
BREAST = r"breast|mamm|\bbrust|\bmama\b|\bsein\b|axill|gyn(a)?ecomast|76752008|T-04000"
#: A study that names another body part is stored and not analysed.
OTHER_BODY_PARTS = (
    r"cardi|\bheart|\bTEE\b|\bTTE\b|esophag|thyr|\bneck\b|abdom|liver|hepat|kidney|renal|spleen|pancrea"
    r"|gallbladder|bladder|bowel|appendi|obstet|\bOB\b|fetal|foetal|fetus|pregnan|gestat|gyn(a)?ecol|\bgyn\b"
    r"|pelvi|uter(us|ine)|ovar|endomet|vagin|prostat|scrot|testi(s|cle|cular)|carotid|aort|arter|venous|\bvein"
    r"|\bDVT\b|vascul|muscul|\bMSK\b|tendon|joint|shoulder|elbow|wrist|\bhand\b|\bhip\b|knee|ankle|\bfoot\b"
    r"|brain|\bcran|transcran|ocular|\beye\b|orbit|lung|pleura|spine"
)


def _split_list(value: Any) -> Any:
    """Let scripts write lists as ``a,b,c`` in environment variables."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class RoutingRule(BaseModel):
    """One routing rule (setting ``routing_rules``): conditions on a study's DICOM
    attributes and what follows when they all hold.

    Each condition is a regular expression searched, ignoring case, in the values of
    the study's instances (the first instance of each series); a rule without
    conditions holds for every study. The first rule that holds and has an
    ``action`` decides whether the study is analysed; the first that holds and has
    ``destinations`` decides where its results go. See service.pipeline.routing.
    """

    model_config = {"frozen": True, "extra": "forbid"}

    name: str = Field(min_length=1, description="Shown by 'sonocase status' for the studies it routed")
    action: Literal["analyse", "skip"] | None = None
    destinations: list[Peer] | None = None
    body_part: str | None = Field(
        None,
        description="Any body-part hint: Body Part Examined, Study/Series "
        "Description, Protocol Name, procedure descriptions, Anatomic Region codes",
    )
    modality: str | None = None
    body_part_examined: str | None = None
    study_description: str | None = None
    series_description: str | None = None
    protocol_name: str | None = None
    calling_ae: str | None = None
    anatomic_region: str | None = Field(None, description="Code value or meaning of the Anatomic Region Sequence")

    @field_validator("destinations", mode="before")
    @classmethod
    def _destinations(cls, value: Any) -> Any:
        items = _split_list(value)
        return [parse_peer(v) if isinstance(v, str) else v for v in items] if items is not None else None

    @field_validator(
        "body_part",
        "modality",
        "body_part_examined",
        "study_description",
        "series_description",
        "protocol_name",
        "calling_ae",
        "anatomic_region",
    )
    @classmethod
    def _pattern(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"{value!r} is not a regular expression: {exc}") from None
        return value

    @model_validator(mode="after")
    def _does_something(self) -> RoutingRule:
        if self.action is None and self.destinations is None:
            raise ValueError(f"routing rule {self.name!r} needs an action, destinations or both")
        return self


def default_routing_rules() -> list[RoutingRule]:
    return [
        RoutingRule(name="breast", action="analyse", body_part=BREAST),
        RoutingRule(name="other-body-part", action="skip", body_part=OTHER_BODY_PARTS),
    ]


class Settings(BaseSettings):
    """Every setting of the node; each is ``SONOCASE_<NAME>`` in the environment."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="forbid",
        validate_default=True,
        toml_file=None,
    )

    # --- where state lives -------------------------------------------------
    data_dir: Path = Field(Path("sonocase-data"), description="Spool, ledger, outbox and index")
    ledger_url: str = Field(
        "",
        description="PostgreSQL ledger (postgresql://user@host:port/db) for workers on several hosts; "
        "empty keeps the ledger in a SQLite file under data_dir",
    )

    # --- receiver ----------------------------------------------------------
    ae_title: str = Field("SONOCASE", description="Our own AE title; callers must address it")
    host: str = Field("0.0.0.0", description="Address the DICOM listener binds to")
    port: int = Field(11112, ge=1, le=65535, description="DICOM listener port")
    allowed_callers: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Calling AE titles accepted; empty accepts all"
    )
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Peers accepted: IP addresses, CIDR blocks, host names (resolved at "
        "start); others are disconnected before anything they send is read; empty accepts all",
    )
    max_associations: int = Field(10, ge=1, le=1000, description="Established associations served at once")
    max_associations_per_peer: int = Field(
        4,
        ge=1,
        le=1000,
        description="Of those, at most this many from one peer address, so that a few peers "
        "holding associations open cannot lock the PACS out",
    )
    listen_backlog: int = Field(
        128,
        ge=1,
        le=65535,
        description="Connections the system queues for the DICOM listener before it "
        "accepts them (bursts beyond it wait for SYN retries)",
    )
    max_pending_associations: int = Field(
        16,
        ge=1,
        le=1000,
        description="Connections still negotiating an association; when full, the one waiting longest is closed",
    )
    acse_timeout_s: float = Field(
        5.0,
        gt=0,
        le=300,
        description="A connection must complete association negotiation within this, "
        "else it is closed (also pynetdicom's ACSE timeout)",
    )
    dimse_timeout_s: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="A PDU, once begun, must arrive in full within this (also pynetdicom's DIMSE timeout)",
    )
    network_timeout_s: float = Field(
        60.0, gt=0, le=86400, description="An association with no PDU for this long is aborted"
    )
    max_dataset_mb: int = Field(
        256,
        ge=1,
        le=65536,
        description="Largest data set accepted (a deflated one once inflated); larger ones are refused 0xC003",
    )
    max_in_flight_mb: int = Field(
        256,
        ge=1,
        le=1 << 20,
        description="Memory for data sets being received, all associations "
        "together; beyond it C-STORE is refused 0xA700 (fast engine) or the association aborted (stock)",
    )
    receiver_engine: Literal["fast", "stock"] = Field(
        "fast",
        description="fast: pynetdicom with our receive path (its version only; else stock); stock: plain pynetdicom",
    )
    tls_cert: Path | None = Field(None, description="Server certificate (PEM): turns on DICOM TLS")
    tls_key: Path | None = Field(None, description="Server private key (PEM)")
    tls_ca: Path | None = Field(None, description="CA bundle: when set, clients must present a certificate")
    quiet_period_s: float = Field(
        5.0, gt=0, description="A study is complete after this many seconds without a new instance"
    )
    durability: Literal["fsync", "none"] = Field(
        "fsync", description="fsync: survives power loss; none: survives a process crash only"
    )
    min_free_disk_mb: int = Field(500, ge=0, description="Refuse C-STORE below this much free disk")
    max_pending_studies: int = Field(200, ge=1, description="Refuse C-STORE while more studies wait for analysis")
    retention_spool_days: float = Field(
        7.0, ge=0, description="Keep a done study's received instances this many days (done: sent, or skipped)"
    )
    retention_results_days: float = Field(7.0, ge=0, description="Keep a done study's heatmaps this many days")
    retention_outbox_days: float = Field(30.0, ge=0, description="Keep a done study's result objects this many days")
    purge_when_free_below_mb: int = Field(
        2000, ge=0, description="Below this much free disk, remove done studies' files, longest done first; 0: never"
    )
    purge_until_free_mb: int = Field(4000, ge=0, description="... until this much is free")
    non_ultrasound: Literal["store-ignore", "refuse"] = Field(
        "store-ignore", description="What to do with an instance whose Modality is not US"
    )
    routing_rules: list[RoutingRule] = Field(
        default_factory=default_routing_rules,
        description="Which complete studies are analysed and where their results go (first match wins)",
    )

    # --- queue and worker --------------------------------------------------
    broker_url: str = Field("", description="Celery broker; empty runs the embedded broker under data_dir")
    result_backend: str = Field("", description="Celery result backend; empty keeps results in the ledger only")
    workers: int = Field(1, ge=0, le=64, description="Worker processes that 'serve' starts itself")
    task_max_attempts: int = Field(3, ge=1, le=100)
    task_retry_backoff_s: float = Field(5.0, gt=0)
    task_retry_backoff_max_s: float = Field(600.0, gt=0, description="The longest wait between analysis tries")
    task_lease_s: float = Field(
        20.0,
        gt=0,
        description="A study whose worker stops renewing its lease (every third of this) for this "
        "long, or whose queue message was not taken within it, is queued (or reported) again",
    )
    task_time_limit_s: float = Field(
        900.0, gt=0, description="An analysis still running after this is killed and retried (a hung worker)"
    )
    data_access: Literal["shared", "http"] = Field(
        "shared",
        description="How a worker reaches studies: 'shared' reads and writes data_dir (the node's own, or a "
        "shared volume); 'http' fetches instances from the node at node_url (WADO-RS) and posts its results "
        "back, needing no access to data_dir (distributed mode only)",
    )
    node_url: str = Field("", description="The node's HTTP side (http[s]://host:http_port), for data_access 'http'")
    worker_token: str = Field(
        "",
        description="Bearer secret shared by the node and its 'http' workers; empty: the node serves no worker routes",
    )
    worker_max_result_mb: int = Field(
        1024, ge=1, description="Largest result (heatmaps and output objects) the node takes from one worker"
    )
    model_path: Path = Field(PROJECT_ROOT / "onnx_models" / "sonocase-hybrid.onnx")
    execution_provider: Literal["auto", "cpu", "cuda"] = "auto"
    max_cine_frames: int = Field(8, ge=1, le=1000)
    batch_size: int = Field(8, ge=1, le=256)

    # --- retrieval ---------------------------------------------------------
    index_dir: Path | None = Field(None, description="Similar-case index; default data_dir/index")
    similar_studies: int = Field(5, ge=0, le=50)
    similar_confirmed_only: bool = False
    index_analysed_studies: bool = Field(False, description="Add analysed studies (AI label, unconfirmed) to the index")

    # --- reports and sending ----------------------------------------------
    sr_template: Path = Field(
        PROJECT_ROOT / "dicom_sr_templates" / "default.json",
        description="SR codes and wording; validated when the node starts",
    )
    sc_transfer_syntax: Literal["explicit-little-endian", "jpeg-baseline"] = "explicit-little-endian"
    fast_reports: bool = Field(
        True,
        description="Build result objects without highdicom's copies and re-checks of what the "
        "validation gate checks anyway (service/reports/construction.py), encode them with a lean "
        "writer giving pydicom's bytes (service/reports/encoding.py), and gate them checking "
        "once per process the values every object repeats; off: highdicom's own path",
    )
    pool_wait_unlocked: bool = Field(
        True,
        description="With the embedded queue, pool processes wait for their next study without "
        "holding the lock of the pipe Celery's pool shares between them (service/pipeline/pool.py), "
        "so a pool process killed while it waits does not stop the worker; off: Celery's own pool",
    )
    report_processes: Annotated[int, Field(ge=0, le=256)] | Literal["auto"] = Field(
        "auto",
        description="Processes per worker pool process that build result objects while it analyses "
        "the next studies (service/pipeline/report_lane.py); auto: half the pool process's share of "
        "the cores it may use (none below two), the analysis keeps the rest; the pool process "
        "builds a study's objects itself when each lane holds two; 0: built in the pool "
        "process after each analysis; none with data_access http",
    )
    destinations: Annotated[list[Peer], NoDecode] = Field(
        default_factory=list,
        description="Where results go: AE@host:port[+tls] (C-STORE) or a DICOMweb "
        "base URL http(s)://host[:port]/path (STOW-RS)",
    )
    send_max_attempts: int = Field(10, ge=1, le=1000)
    send_backoff_s: float = Field(5.0, gt=0)
    send_backoff_max_s: float = Field(600.0, gt=0)

    # --- DICOMweb peers (STOW-RS destinations, the archive of `index add --pacs URL`) ---
    dicomweb_token_file: Path | None = Field(None, description="File holding the Bearer token sent to DICOMweb peers")
    dicomweb_user: str = Field("", description="User name for HTTP basic authentication at DICOMweb peers")
    dicomweb_password_file: Path | None = Field(None, description="File holding that user's password")
    dicomweb_ca: Path | None = Field(
        None,
        description="CA bundle that DICOMweb peers' HTTPS certificates are "
        "checked against; unset: REQUESTS_CA_BUNDLE, else certifi's public CAs",
    )
    dicomweb_timeout_s: float = Field(
        60.0, gt=0, description="Seconds to connect, and between bytes of an answer, before a DICOMweb request fails"
    )

    # --- receiving over DICOMweb (STOW-RS on the HTTP side) ---
    stow_max_request_mb: int = Field(
        4096, ge=1, description="Largest STOW-RS request body accepted (MB); larger ones are answered 413"
    )
    stow_max_parts: int = Field(
        10000,
        ge=1,
        le=1_000_000,
        description="Most parts (instances) in one STOW-RS request; a request with more "
        "is answered 413 at the part past it (the ones before are stored)",
    )

    # --- outcomes coming back (HL7 v2 ORU^R01 over MLLP) ---
    hl7_host: str = Field("0.0.0.0", description="Address the HL7 (MLLP) listener binds to")
    hl7_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="HL7 v2 ORU^R01 outcomes over MLLP (2575 is HL7's registered port); 0 turns the listener off",
    )
    hl7_max_message_kb: int = Field(
        1024, ge=1, le=65536, description="Largest HL7 message accepted (KB); a larger one closes the connection"
    )

    # --- watching it -------------------------------------------------------
    http_host: str = "127.0.0.1"
    http_port: int = Field(8080, ge=0, le=65535, description="Health, metrics and status page; 0 turns it off")
    web_token: str = Field("", description="Bearer token for the status page and API; empty turns both off")
    web_review_token: str = Field(
        "", description="Radiologists' token: reads the page and API and gives verdicts, nothing else; empty: none"
    )
    web_session_idle_s: float = Field(1800.0, gt=0, description="A status-page sign-in ends after this long unused")
    web_session_max_s: float = Field(43200.0, gt=0, description="... and this long after signing in, used or not")
    web_login_attempts: int = Field(
        5, ge=1, le=1000, description="Wrong tokens (form or Bearer) one address may send per web_login_window_s"
    )
    web_login_window_s: float = Field(60.0, gt=0)
    web_openapi_public: bool = Field(
        False, description="Serve /api/openapi.json without the web_token (it describes the API, no data)"
    )
    web_max_body_bytes: int = Field(65536, ge=1024, description="Largest request body the page and API accept")
    web_max_connections: int = Field(
        64,
        ge=1,
        le=10000,
        description="Open HTTP connections; a new one past this closes the open one furthest "
        "behind (waiting for a request, or sending a body too slowly), else is closed itself",
    )
    web_max_connections_per_address: int = Field(
        32, ge=1, le=10000, description="... and open HTTP connections from one client address, the same way"
    )
    web_read_timeout_s: float = Field(
        10.0,
        ge=0,
        description="A request's headers must arrive within this, and its body may start this late; "
        "0 runs uvicorn's own protocol (no read deadlines, one plain connection cap)",
    )
    web_min_body_bytes_per_s: int = Field(
        8192,
        ge=1,
        description="A request body must keep up this rate after its first web_read_timeout_s; a "
        "slower one is closed (a byte now and then does not keep it open)",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"

    @field_validator("ae_title")
    @classmethod
    def _ae_title(cls, value: str) -> str:
        return validate_ae_title(value)

    @field_validator("allowed_callers", mode="before")
    @classmethod
    def _callers(cls, value: Any) -> list[str]:
        return [validate_ae_title(v) for v in _split_list(value)]

    @field_validator("allowed_hosts", mode="before")
    @classmethod
    def _hosts(cls, value: Any) -> Any:
        return _split_list(value)

    @field_validator("allowed_hosts")
    @classmethod
    def _resolvable_hosts(cls, value: list[str]) -> list[str]:
        allowed_networks(value)  # raises, naming the entry, if one is no address, block or name
        return value

    @field_validator("destinations", mode="before")
    @classmethod
    def _destinations(cls, value: Any) -> Any:
        items = _split_list(value)
        return [parse_peer(v) if isinstance(v, str) else v for v in items]

    @field_validator("routing_rules")
    @classmethod
    def _unique_rule_names(cls, value: list[RoutingRule]) -> list[RoutingRule]:
        names = [rule.name for rule in value]
        if len(set(names)) != len(names):
            raise ValueError(f"routing rule names must differ: {names}")
        return value

    @field_validator("ledger_url")
    @classmethod
    def _ledger_url(cls, value: str) -> str:
        value = value.strip()
        if value and not re.match(r"postgres(ql)?://", value):
            raise ValueError("must be empty (SQLite under data_dir) or a postgresql://user@host:port/db URL")
        return value

    @field_validator("node_url")
    @classmethod
    def _node_url(cls, value: str) -> str:
        value = value.strip().rstrip("/")
        parts = urlsplit(value)
        if value and (parts.scheme not in ("http", "https") or not parts.hostname):
            raise ValueError("must be empty or the node's http[s]://host:port")
        if parts.username or parts.password:
            raise ValueError("must not hold credentials: the workers authenticate with worker_token")
        return value

    @field_validator("tls_cert", "tls_key", "tls_ca", "dicomweb_token_file", "dicomweb_password_file", "dicomweb_ca")
    @classmethod
    def _existing_file(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"file {value} does not exist")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Command-line values win over the environment, which wins over the TOML file."""
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config = os.environ.get(ENV_PREFIX + "CONFIG")
        if config:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(config)))
        return tuple(sources)

    # --- derived paths -----------------------------------------------------
    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def ledger_path(self) -> Path:
        return self.data_dir / "ledger.sqlite3"

    @property
    def outbox_dir(self) -> Path:
        return self.data_dir / "outbox"

    @property
    def results_dir(self) -> Path:
        return self.data_dir / "results"

    @property
    def effective_index_dir(self) -> Path:
        return self.index_dir or self.data_dir / "index"

    @property
    def embedded_broker(self) -> bool:
        return not self.broker_url


class SettingsError(Exception):
    """Settings that cannot run; the message names each offending setting."""


def load_settings(config: Path | None = None, **overrides: Any) -> Settings:
    """Build the settings once, at start; raise :class:`SettingsError` naming bad settings."""
    if config is not None:
        if not config.is_file():
            raise SettingsError(f"configuration file {config} does not exist")
        os.environ[ENV_PREFIX + "CONFIG"] = str(config)
    env_config = os.environ.get(ENV_PREFIX + "CONFIG")
    if env_config and not Path(env_config).is_file():
        raise SettingsError(f"{ENV_PREFIX}CONFIG: file {env_config} does not exist")
    try:
        settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            name = ".".join(str(p) for p in error["loc"]) or "settings"
            env_name = ENV_PREFIX + str(error["loc"][0]).upper() if error["loc"] else name
            lines.append(f"invalid setting {env_name} ({name}): {error['msg']}")
        raise SettingsError("\n".join(lines)) from None
    if settings.purge_when_free_below_mb and not (
        settings.min_free_disk_mb < settings.purge_when_free_below_mb <= settings.purge_until_free_mb
    ):
        raise SettingsError(
            f"{ENV_PREFIX}PURGE_WHEN_FREE_BELOW_MB must lie above {ENV_PREFIX}MIN_FREE_DISK_MB (the node would refuse "
            f"studies before it removes anything) and at most {ENV_PREFIX}PURGE_UNTIL_FREE_MB"
        )
    if settings.max_in_flight_mb < settings.max_dataset_mb:
        raise SettingsError(
            f"{ENV_PREFIX}MAX_IN_FLIGHT_MB ({settings.max_in_flight_mb}) must be at least "
            f"{ENV_PREFIX}MAX_DATASET_MB ({settings.max_dataset_mb}): a data set that size could "
            "never be received"
        )
    if (settings.tls_cert is None) != (settings.tls_key is None):
        raise SettingsError(f"{ENV_PREFIX}TLS_CERT and {ENV_PREFIX}TLS_KEY must be set together")
    if bool(settings.dicomweb_user) != (settings.dicomweb_password_file is not None):
        raise SettingsError(f"{ENV_PREFIX}DICOMWEB_USER and {ENV_PREFIX}DICOMWEB_PASSWORD_FILE must be set together")
    if settings.dicomweb_user and settings.dicomweb_token_file is not None:
        raise SettingsError(
            f"{ENV_PREFIX}DICOMWEB_TOKEN_FILE and {ENV_PREFIX}DICOMWEB_USER exclude each other: "
            "one kind of authentication"
        )
    if settings.data_access == "http":
        missing = [
            name for name in ("node_url", "worker_token", "broker_url", "ledger_url") if not getattr(settings, name)
        ]
        if missing:
            raise SettingsError(
                f"{ENV_PREFIX}DATA_ACCESS=http needs "
                + ", ".join(ENV_PREFIX + name.upper() for name in missing)
                + ": the worker reaches the node over HTTP, the queue over Redis and the ledger over PostgreSQL"
            )
    if settings.web_review_token and not settings.web_token:
        raise SettingsError(
            f"{ENV_PREFIX}WEB_REVIEW_TOKEN needs {ENV_PREFIX}WEB_TOKEN: without it the page and API are off"
        )
    if settings.web_review_token and settings.web_review_token == settings.web_token:
        raise SettingsError(
            f"{ENV_PREFIX}WEB_REVIEW_TOKEN must differ from {ENV_PREFIX}WEB_TOKEN: a reviewer would be an administrator"
        )
    return settings
