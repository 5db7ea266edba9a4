"""config.yaml, validated: every key has a default and a reason, every error says where it is.

Priority, highest first: ``STREETBRAIN_<SECTION>__<KEY>`` environment variables (pydantic-settings'
nested convention, e.g. ``STREETBRAIN_INCIDENTS__URL``), then the YAML file, then the defaults
below. Secrets (broker password, Influx token, API tokens) belong in the environment.
"""

from __future__ import annotations

import csv
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from gateway.schemas import KINDS, fields_of
from rules.model import KindProfile

ENV_PREFIX = "STREETBRAIN_"
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"
ZONE_CLASSES = ("0", "1", "2", "3", "4a", "4b")
SEVERITIES = ("info", "warning", "major", "critical")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TlsConfig(Section):
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    insecure: bool = Field(default=False, description="skip hostname verification (test rigs only)")


class BrokerConfig(Section):
    url: str | None = Field(
        default=None,
        description="mqtt://host:port; empty starts Mosquitto on a free loopback port",
    )
    username: str | None = None
    password: SecretStr | None = None
    tls: TlsConfig | None = None
    embedded_tls: bool = Field(default=False, description="the embedded broker listens with TLS only, with "
                               "certificates from a local CA made in state_dir/tls (ca.crt is what devices trust)")
    client_id: str = Field(default="streetbrain-gateway", pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    session_expiry_s: int = Field(default=86400, ge=0, le=2**32 - 1)
    keepalive_s: int = Field(default=30, ge=5, le=3600)
    receive_maximum: int = Field(
        default=65535, ge=1, le=65535,
        description="unacknowledged QoS 1 messages the broker may send us at once: the ingest queue bound",
    )

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        parse_broker_url(value)
        return value


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool

    @property
    def is_loopback(self) -> bool:
        return self.host in ("localhost", "::1") or self.host.startswith("127.")

    def __str__(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def parse_broker_url(url: str) -> BrokerAddress:
    match = re.fullmatch(r"(mqtts?)://(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.\-]+)(?::(\d{1,5}))?/?", url.strip())
    if not match:
        raise ValueError(f"broker URL {url!r} is not mqtt://HOST:PORT or mqtts://HOST:PORT")
    scheme, host, port = match.groups()
    tls = scheme == "mqtts"
    port_number = int(port) if port else (8883 if tls else 1883)
    if not 0 < port_number < 65536:
        raise ValueError(f"broker port {port_number} is out of range 1-65535")
    return BrokerAddress(host.strip("[]"), port_number, tls)


class Team(Section):
    id: str = Field(pattern=ID_PATTERN)
    name: str
    name_en: str = ""
    role: Literal["patrol", "fire_station", "command"] = "patrol"
    members: list[str] = Field(default_factory=list)
    lat: float | None = Field(default=None, ge=-90, le=90)
    lon: float | None = Field(default=None, ge=-180, le=180)


class Site(Section):
    id: str = Field(pattern=ID_PATTERN)
    name: str
    name_en: str = ""
    community: str = ""
    grid: str = ""
    lat: float = Field(ge=-90, le=90)
    lon: float = Field(ge=-180, le=180)
    team: str = Field(description="team id of the squad responsible for this site's roads")
    fire_station: str | None = Field(default=None, description="team id of the nearest micro fire station")


class Device(Section):
    """One registered device. A city is 300,000 of them, so a device is immutable after validation and
    shares what repeats between devices (which fields were given, site and kind names, no tags): half of
    its memory otherwise (pydantic keeps a set of the given field names per instance: 728 bytes)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=ID_PATTERN)
    kind: Literal["smoke", "ev_charger", "noise", "meter"]
    site: str
    lat: float = Field(ge=-90, le=90)
    lon: float = Field(ge=-180, le=180)
    name: str = ""
    address: str = ""
    zone_class: Literal["0", "1", "2", "3", "4a", "4b"] | None = Field(
        default=None, description="GB 3096-2008 acoustic zone class (noise points)"
    )
    ports: int | None = Field(default=None, ge=1, le=256, description="charging ports (ev_charger)")
    rated_power_w: float | None = Field(default=None, gt=0, le=20000, description="per-port rating")
    tags: tuple[str, ...] = ()

    @field_validator("zone_class", mode="before")
    @classmethod
    def _zone_as_text(cls, value: object) -> object:
        # YAML reads `zone_class: 1` as an integer; the class is a label, "4a" included.
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @model_validator(mode="after")
    def _share_what_repeats(self) -> Device:
        given = frozenset(self.__pydantic_fields_set__)
        object.__setattr__(self, "__pydantic_fields_set__", _SHARED.setdefault(given, given))
        values = self.__dict__
        for name in ("site", "kind", "zone_class"):
            if values[name] is not None:
                values[name] = sys.intern(values[name])
        values["tags"] = _SHARED.setdefault(values["tags"], values["tags"])
        return self


_SHARED: dict[Any, Any] = {}  # one copy of each field-name set and tag tuple that devices have


class StageTargets(Section):
    dispatch_s: float = Field(gt=0)
    arrive_s: float = Field(gt=0)
    resolve_s: float = Field(gt=0)


class InhibitRule(Section):
    """An open incident of a source rule holds back new alerts of the target rules (Alertmanager's
    inhibit_rules): they are recorded as inhibited, and open no incident of their own."""

    source_rules: list[str] = Field(min_length=1)
    target_rules: list[str] = Field(min_length=1)
    equal: list[Literal["device_id", "site"]] = Field(default_factory=lambda: ["device_id"])
    source_group_only: bool = Field(default=False,
                                    description="only a storm (a group incident) inhibits, e.g. a site's link down")
    description: str = ""


class GroupingConfig(Section):
    """Storms: when ``min_devices`` devices of one site raise the same rule within ``window_s``, one
    group incident holds them all (Alertmanager's group_by site and rule)."""

    window_s: float = Field(default=60.0, gt=0)
    min_devices: int = Field(default=5, ge=2)
    exclude_rules: list[str] = Field(default_factory=lambda: ["smoke_alarm"],
                                     description="rules whose every alert stays its own incident")


class IncidentsConfig(Section):
    url: str = Field(default="sqlite:///var/incidents.db", pattern=r"^(sqlite:///.+|postgres(ql)?://.+)$")
    grouping: GroupingConfig = Field(default_factory=GroupingConfig)
    inhibit: list[InhibitRule] = Field(default_factory=list)
    fire_kinds: list[str] = Field(default_factory=lambda: ["smoke", "ev_charger"],
                                  description="incidents of these kinds also name the nearest micro fire station")
    escalation_team: str | None = Field(default="command", description="notified when an SLA is breached")
    sla_check_interval_s: float = Field(default=1.0, gt=0, description="how often SLA clocks are checked; a check "
                                        "reads only the incidents with a warning or deadline due")


class InfluxConfig(Section):
    url: str | None = Field(default=None, pattern=r"^(https?://.+)?$",
                            description="InfluxDB 2/3 or any server of its v2 write API; empty: none")
    org: str = "streetbrain"
    bucket: str = "streetbrain"
    token: SecretStr | None = None
    batch_size: int = Field(default=5000, ge=1, le=100000, description="points per write")
    flush_interval_s: float = Field(default=1.0, gt=0)
    timeout_s: float = Field(default=10.0, gt=0)
    max_pending: int = Field(default=200000, ge=1000, description="readings queued in memory before the oldest drop")
    spool_max_bytes: int = Field(default=256 * 2**20, ge=2**16, description="disk spool while the store is away")
    max_string_bytes: int = Field(default=4096, ge=16, description="longer string fields are refused")

    @field_validator("url")
    @classmethod
    def _empty(cls, value: str | None) -> str | None:
        return value or None


class Operator(Section):
    operator: str = Field(min_length=1, max_length=64)
    role: Literal["viewer", "dispatcher", "admin"]


class ApiConfig(Section):
    listen: str = Field(default="127.0.0.1:8080", pattern=r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.\-]+):\d{1,5}$")
    tokens: dict[str, Operator] = Field(
        default_factory=dict, description="bearer token → operator; give it as JSON in STREETBRAIN_API__TOKENS"
    )


class IngestConfig(Section):
    max_payload_bytes: int = Field(default=65536, ge=256, le=16 * 2**20)
    max_readings_per_message: int = Field(default=1000, ge=1, le=100000)
    max_future_s: float = Field(default=300.0, ge=0, description="device clocks may run this far ahead")
    auto_register: bool = Field(default=False, description="accept devices that are not in the registry")
    batch_max: int = Field(default=5000, ge=1, description="messages handed to detection at once")
    batch_max_bytes: int = Field(default=4 * 2**20, ge=1024, description="payload bytes handed to detection "
                                 "at once: a batch of 100-reading messages is done within ~0.1 s, and a fire that "
                                 "arrives meanwhile waits no longer than that")
    decode_ahead: bool = Field(default=True, description="decode {\"readings\": [...]} batches in a second "
                               "process while they wait in the receive buffer (started on the first batch)")
    smoke_hint_lane: bool = Field(default=True, description="smoke detectors' telemetry also comes by a clean "
                                  "QoS 0 connection of its own, taken first, so that a fire does not wait in the "
                                  "broker behind bulk telemetry (gateway/hints.py)")
    device_rate_per_s: float = Field(default=10.0, ge=0, description="messages a device may send per second "
                                     "on average (a batch is one message); 0: no limit")
    device_burst: int = Field(default=100, ge=1, description="messages a device may send at once")
    flood_quiet_s: float = Field(default=60.0, gt=0, description="a flooding alert clears after this long within limits")


class DetectionConfig(Section):
    snapshot_interval_s: float = Field(default=1.0, gt=0,
                                       description="detector state is written to state_dir this often and at exit; "
                                                   "readings are acknowledged to the broker once a snapshot holds them")
    offline_check_interval_s: float = Field(default=5.0, gt=0,
                                            description="staleness is checked this often (gateway clock)")
    replay_late: bool = Field(default=True, description="a late reading (within the kind's lateness_s) rewinds its "
                                                        "series and replays it in device-time order; false: it is "
                                                        "applied in arrival order (half the detection CPU)")
    replay_max_pending: int = Field(default=500_000, ge=1000,
                                    description="readings of a kind held for replay at most (memory: ~60 bytes "
                                                "each); beyond, the oldest are settled early and a reading later "
                                                "than them is applied in arrival order")


class LoggingConfig(Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["logfmt", "json"] = "logfmt"
    stats_interval_s: float = Field(default=60.0, gt=0, description="per-kind counters logged this often")


class Config(BaseSettings):
    """The whole deployment. Unknown keys are errors: a typo must not silently fall back to a default."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", case_sensitive=False, extra="forbid",
    )

    state_dir: Path = Field(default=Path("var"), description="snapshots, broker data, the SQLite store")
    broker: BrokerConfig = Field(default_factory=BrokerConfig)
    sites: list[Site] = Field(default_factory=list)
    teams: list[Team] = Field(default_factory=list)
    kinds: dict[str, KindProfile] = Field(default_factory=dict)
    devices: list[Device] = Field(default_factory=list)
    registry_file: Path | None = None
    incidents: IncidentsConfig = Field(default_factory=IncidentsConfig)
    influx: InfluxConfig = Field(default_factory=InfluxConfig)
    api: ApiConfig = Field(default_factory=ApiConfig)
    sla: dict[str, dict[str, StageTargets]] = Field(default_factory=dict)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    detection: DetectionConfig = Field(default_factory=DetectionConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The YAML file arrives as init kwargs; the environment must win over it.
        return (env_settings, init_settings)

    # -- lookups used across the gateway ------------------------------------------------------
    def site(self, site_id: str) -> Site | None:
        return next((s for s in self.sites if s.id == site_id), None)


# --------------------------------------------------------------------------------------------
# Loading and error reporting


@dataclass(frozen=True)
class ConfigIssue:
    where: str  # "config.yaml:12" or "env STREETBRAIN_API__LISTEN" or "registry.csv:40"
    key: str  # dotted key path, e.g. "kinds.smoke.rules.smoke_alarm.raise.critical"
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.key}: {self.message}" if self.key else f"{self.where}: {self.message}"


class ConfigError(Exception):
    """Every problem found in a configuration, each with where it is and what is wrong."""

    def __init__(self, issues: list[ConfigIssue]):
        self.issues = issues
        super().__init__("\n".join(str(i) for i in issues))


def key_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


class _LineIndex:
    """Maps a key path to the line of the YAML file it came from."""

    def __init__(self, text: str):
        try:
            self.root = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.YAMLError:
            self.root = None

    def line(self, loc: tuple[Any, ...]) -> int | None:
        """The line of the deepest part of ``loc`` found: a mapping key's own line, a list item's first."""
        node, best = self.root, None
        for part in loc:
            if isinstance(node, yaml.MappingNode):
                pair = next(((k, v) for k, v in node.value if k.value == str(part)), None)
                if pair is None:
                    break
                best, node = pair[0].start_mark.line + 1, pair[1]
            elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
                node = node.value[part]
                best = node.start_mark.line + 1
            else:
                break
        if best is None and self.root is not None:
            best = self.root.start_mark.line + 1
        return best


def _env_names(loc: tuple[Any, ...]) -> list[str]:
    """Environment variables that could have set the value at ``loc`` (most specific last)."""
    names, parts = [], [str(p).upper() for p in loc if not isinstance(p, int)]
    for n in range(1, len(parts) + 1):
        names.append(ENV_PREFIX + "__".join(parts[:n]))
    return names


def _where(loc: tuple[Any, ...], source: str, lines: _LineIndex, env: dict[str, str]) -> str:
    upper_env = {k.upper() for k in env}
    for name in reversed(_env_names(loc)):
        if name in upper_env:
            return f"env {name}"
    line = lines.line(loc)
    return f"{source}:{line}" if line else source


def load_config(path: str | Path | None, env: dict[str, str] | None = None) -> Config:
    """Read, validate and cross-check a config file (``None``: defaults and environment only).

    Raises :class:`ConfigError` listing every problem found.
    """
    env = dict(os.environ if env is None else env)
    text, source, base = "", "<defaults>", Path.cwd()
    if path is not None:
        path = Path(path)
        source, base = str(path), path.parent
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError([ConfigIssue(source, "", "file not found; pass --config FILE")]) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError([ConfigIssue(source, "", f"cannot read: {exc}")]) from None
    try:
        data = yaml.safe_load(text) if text.strip() else {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([ConfigIssue(where, "", f"YAML syntax error: {problem}")]) from None
    if not isinstance(data, dict):
        raise ConfigError([ConfigIssue(source, "", "the top level must be a mapping of sections")])

    lines = _LineIndex(text)
    saved = _swap_environ(env)
    try:
        config = Config(**data)
    except ValidationError as exc:
        issues = [
            ConfigIssue(_where(e["loc"], source, lines, env), key_path(e["loc"]), _message(e))
            for e in exc.errors()
        ]
        raise ConfigError(issues) from None
    finally:
        _swap_environ(saved)

    issues: list[ConfigIssue] = []
    inline_count, registry_lines, registry_path = len(config.devices), [], Path()
    if config.registry_file is not None:
        registry_path = config.registry_file if config.registry_file.is_absolute() else base / config.registry_file
        devices, registry_lines, registry_issues = load_registry_csv(registry_path)
        issues += registry_issues
        config.devices = [*config.devices, *devices]
    if not config.state_dir.is_absolute():
        config.state_dir = base / config.state_dir
    sqlite_path = config.incidents.url.removeprefix("sqlite:///")
    if sqlite_path != config.incidents.url and not Path(sqlite_path).is_absolute():
        config.incidents.url = f"sqlite:///{(base / sqlite_path).resolve()}"

    def where(loc: tuple[Any, ...]) -> str:
        if loc[:1] == ("devices",) and len(loc) > 1 and loc[1] >= inline_count:
            return f"{registry_path}:{registry_lines[loc[1] - inline_count]}"
        return _where(loc, source, lines, env)

    issues += cross_check(config, where)
    if issues:
        raise ConfigError(issues)
    return config


def _swap_environ(env: dict[str, str]) -> dict[str, str]:
    """pydantic-settings reads os.environ; make it read ``env`` (tests pass their own)."""
    saved = dict(os.environ)
    if env != saved:
        os.environ.clear()
        os.environ.update(env)
    return saved


def _message(error: dict[str, Any]) -> str:
    msg = error["msg"]
    if error["type"] == "extra_forbidden":
        return "unknown key (a typo? every accepted key is documented in config.yaml)"
    if error["type"] == "missing":
        return "required key is missing"
    if "input" in error and error["type"] not in ("model_type", "dict_type", "list_type"):
        shown = repr(error["input"])
        if "secret" not in msg.lower() and "password" not in str(error["loc"]) and "token" not in str(error["loc"]):
            msg += f" (got {shown[:60]})"
    return msg


REGISTRY_COLUMNS = ("id", "kind", "site", "lat", "lon", "name", "address", "zone_class", "ports",
                    "rated_power_w", "tags")


def load_registry_csv(path: Path) -> tuple[list[Device], list[int], list[ConfigIssue]]:
    """The device registry as a CSV file (one device per row), the form a command centre keeps.

    Returns the devices, the file line of each, and the problems found.
    """
    issues: list[ConfigIssue] = []
    devices: list[Device] = []
    device_lines: list[int] = []
    try:
        handle = path.open(newline="", encoding="utf-8")
    except OSError as exc:
        return [], [], [ConfigIssue(str(path), "registry_file", f"cannot read the registry: {exc}")]
    with handle:
        text_lines = handle.read().splitlines(keepends=True)
    # Leading "#" lines are a header comment; line numbers in errors still count them.
    skip = next((i for i, text in enumerate(text_lines) if not text.startswith("#")), len(text_lines))
    reader = csv.DictReader(text_lines[skip:])
    unknown = set(reader.fieldnames or ()) - set(REGISTRY_COLUMNS)
    if unknown or not {"id", "kind", "site", "lat", "lon"} <= set(reader.fieldnames or ()):
        return [], [], [ConfigIssue(
            str(path), "registry_file",
            f"header must name columns from {', '.join(REGISTRY_COLUMNS)} (id, kind, site, lat, lon required)"
            + (f"; unknown: {', '.join(sorted(unknown))}" if unknown else ""),
        )]
    for row in reader:
        line = reader.line_num + skip
        fields: dict[str, Any] = {k: v for k, v in row.items() if v not in (None, "")}
        if "tags" in fields:
            fields["tags"] = [t for t in fields["tags"].split(";") if t]
        try:
            devices.append(Device.model_validate(fields))
            device_lines.append(line)
        except ValidationError as exc:
            for e in exc.errors():
                issues.append(ConfigIssue(f"{path}:{line}", key_path(e["loc"]), _message(e)))
    return devices, device_lines, issues


def cross_check(config: Config, where: Any) -> list[ConfigIssue]:
    """References between sections: every site, team, kind and field named must exist."""
    issues: list[ConfigIssue] = []

    def problem(loc: tuple[Any, ...], message: str) -> None:
        issues.append(ConfigIssue(where(loc), key_path(loc), message))

    team_ids = _unique([t.id for t in config.teams], ("teams",), "team", problem)
    site_ids = _unique([s.id for s in config.sites], ("sites",), "site", problem)
    for i, site in enumerate(config.sites):
        if site.team not in team_ids:
            problem(("sites", i, "team"), f"team {site.team!r} is not defined under teams")
        if site.fire_station is not None and site.fire_station not in team_ids:
            problem(("sites", i, "fire_station"), f"team {site.fire_station!r} is not defined under teams")
    for kind, profile in config.kinds.items():
        if kind not in KINDS:
            problem(("kinds", kind), f"unknown device kind; expected one of {', '.join(KINDS)}")
            continue
        for rule_id, rule in profile.rules.items():
            if not re.fullmatch(r"[a-z][a-z0-9_]{0,63}", rule_id):
                problem(("kinds", kind, "rules", rule_id), "rule ids are lower_snake_case")
            if rule.field not in fields_of(kind):
                problem(("kinds", kind, "rules", rule_id, "field"),
                        f"{kind} readings have no field {rule.field!r}; fields: {', '.join(fields_of(kind))}")
    rule_ids = {rule_id for profile in config.kinds.values() for rule_id in profile.rules} | {"offline", "flooding"}
    for i, inhibit in enumerate(config.incidents.inhibit):
        for side in ("source_rules", "target_rules"):
            for rule_id in set(getattr(inhibit, side)) - rule_ids:
                problem(("incidents", "inhibit", i, side), f"no rule {rule_id!r} is configured under kinds")
    if config.incidents.escalation_team is not None and config.incidents.escalation_team not in team_ids:
        problem(("incidents", "escalation_team"), f"team {config.incidents.escalation_team!r} is not defined under teams")
    for kind, severities in config.sla.items():
        if kind not in KINDS:
            problem(("sla", kind), f"unknown device kind; expected one of {', '.join(KINDS)}")
        for severity in severities:
            if severity not in SEVERITIES:
                problem(("sla", kind, severity), f"unknown severity; expected one of {', '.join(SEVERITIES)}")
    _unique([d.id for d in config.devices], ("devices",), "device", problem)
    for i, device in enumerate(config.devices):
        loc: tuple[Any, ...] = ("devices", i)
        if device.site not in site_ids:
            problem((*loc, "site"), f"device {device.id}: site {device.site!r} is not defined under sites")
        if device.kind == "noise" and device.zone_class is None:
            problem((*loc, "zone_class"), f"noise point {device.id} needs its GB 3096 zone class "
                                          f"({', '.join(ZONE_CLASSES)})")
        if device.kind == "ev_charger" and (device.ports is None or device.rated_power_w is None):
            problem(loc, f"charging point {device.id} needs ports and rated_power_w")
    return issues


def _unique(ids: list[str], loc: tuple[Any, ...], what: str, problem: Any) -> set[str]:
    seen: set[str] = set()
    for i, ident in enumerate(ids):
        if ident in seen:
            problem((*loc, i, "id"), f"{what} id {ident!r} is defined twice")
        seen.add(ident)
    return seen
