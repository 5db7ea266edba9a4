"""Scenario files: what happens to which device when, and what the gateway should make of it.

A scenario (YAML) names a fleet, a stretch of device time (a local start time in Asia/Shanghai and
a duration), the events of ``simulators.models`` on named or random devices, fault injections, and
the thresholds that ``streetbrain evaluate`` holds the result to::

    name: bad-day
    start: "18:00"            # local time of day the scenario's device time starts at
    duration: 6h              # device time; 90s, 20m, 6h and plain seconds all work
    speed: 600                # device seconds per wall second (0: as fast as the gateway takes them)
    fleet: {per_kind: {smoke: 40}}            # or {devices: 100000}; default: the configured street
    events:
      - {at: 10m, event: flaming_fire, device: random}
      - {at: 1h, event: cooking, device: random, count: 5, every: 20m}
    faults:
      - {at: 5m, fault: malformed_json, device: random, kind: smoke, count: 3}
    expect: {min_recall_critical: 1.0, max_false_critical: 0}

Device time is laid out so that the scenario's last reading is no later than the moment it is sent:
an accelerated run replays a past stretch of time that ends now, so no reading is "from the future".
A gateway that has already seen newer readings of the same devices rejects these as too late: give
each accelerated run a gateway of its own (``streetbrain evaluate`` starts one).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from simulators.models import EVENT_KINDS, MODELS

_DURATION = re.compile(r"^(?:\d+(?:\.\d+)?(?:ms|s|min|m|h|d))+$|^\d+(?:\.\d+)?$")
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|min|m|h|d)?")
_UNIT_S = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: object) -> float:
    """``90``, ``"90s"``, ``"20m"``, ``"6h"``, ``"1h30m"``, ``"1d"`` → seconds."""
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or text like 90s, 20m, 6h")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str) and _DURATION.match(value.replace(" ", "")):
        seconds = sum(float(n) * _UNIT_S[unit or None] for n, unit in _PART.findall(value.replace(" ", "")))
    else:
        raise ValueError(f"{value!r} is not a duration (like 90, 90s, 20m, 6h, 1d)")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FleetSpec(Strict):
    devices: int | None = Field(default=None, ge=1, le=1_000_000,
                                description="a synthetic fleet of this size in the street's proportions")
    kinds: list[Literal["smoke", "ev_charger", "noise", "meter"]] | None = None
    per_kind: dict[Literal["smoke", "ev_charger", "noise", "meter"], int] | None = Field(
        default=None, description="only the first N devices of each kind listed (a small street for tests)")
    heartbeat_s: Duration = Field(default=14400.0, gt=0, description="smoke detectors' quiet-time heartbeat")


class EventSpec(Strict):
    at: Duration
    event: str
    device: str = Field(default="random", description="a device id, or random (a device of the event's kind)")
    kind: Literal["smoke", "ev_charger", "noise", "meter"] | None = None
    port: int | None = Field(default=None, ge=1, description="charging point port (default: a random one)")
    duration: Duration | None = None
    count: int = Field(default=1, ge=1, le=10000)
    every: Duration | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _known(self) -> EventSpec:
        kinds = EVENT_KINDS.get(self.event)
        if kinds is None:
            raise ValueError(f"unknown event {self.event!r}; events: {', '.join(sorted(EVENT_KINDS))}")
        if self.kind is not None and self.kind not in kinds:
            raise ValueError(f"{self.kind} devices have no event {self.event!r} (it happens to {', '.join(kinds)})")
        if self.count > 1 and self.every is None:
            raise ValueError("count > 1 needs every: the device time between two of them")
        return self


FAULTS: dict[str, str] = {
    # fault: what the gateway should do with it (a dead-letter reason, a rule, or a counter)
    "malformed_json": "deadletter:bad_json",
    "wrong_type": "deadletter:wrong_type",
    "missing_field": "deadletter:missing_field",
    "non_finite": "deadletter:non_finite",
    "oversized": "deadletter:oversized",
    "future_ts": "deadletter:future_ts",
    "late": "deadletter:too_late",
    "device_mismatch": "deadletter:device_mismatch",
    "unknown_device": "deadletter:unknown_device",
    "duplicate": "counted:duplicate",
    "out_of_order": "accepted",
    "clock_skew": "accepted",
    "connection_drop": "rule:offline",
    "flood": "rule:flooding",
}


class FaultSpec(Strict):
    at: Duration
    fault: str
    device: str = "random"
    kind: Literal["smoke", "ev_charger", "noise", "meter"] | None = None
    count: int = Field(default=1, ge=1, le=100000, description="messages (flood: messages sent at once)")
    duration: Duration | None = Field(default=None, description="connection_drop and clock_skew: how long")
    skew_s: float = Field(default=120.0, description="clock_skew: how far the device clock runs ahead")

    @model_validator(mode="after")
    def _known(self) -> FaultSpec:
        if self.fault not in FAULTS:
            raise ValueError(f"unknown fault {self.fault!r}; faults: {', '.join(FAULTS)}")
        if self.fault == "flood" and self.count < 2:
            raise ValueError("a flood needs count: the messages sent at once (more than the gateway's burst, e.g. 500)")
        return self


class Expect(Strict):
    """Thresholds; ``streetbrain evaluate`` exits 1 when one is missed. Each is optional."""

    min_recall_critical: float | None = Field(default=None, ge=0, le=1,
                                              description="share of events expected to be critical that are caught")
    min_recall: float | None = Field(default=None, ge=0, le=1, description="share of all expected (event, rule)s")
    max_false_critical: int | None = Field(default=None, ge=0)
    max_false_alerts: int | None = Field(default=None, ge=0)
    max_false_alerts_per_device_day: float | None = Field(default=None, ge=0)
    max_latency_p95_s: dict[str, float] = Field(default_factory=dict, description="per rule, device time")
    max_e2e_latency_p95_s: float | None = Field(default=None, gt=0, description="publish → alert, wall time")
    min_incident_recall: float | None = Field(default=None, ge=0, le=1)
    max_unexpected_incidents: int | None = Field(default=None, ge=0)
    min_faults_handled: float | None = Field(default=None, ge=0, le=1)


class Scenario(Strict):
    name: str
    description: str = ""
    seed: int = 1
    start: str = Field(default="09:00", pattern=r"^(([01]\d|2[0-3]):[0-5]\d|now)$",
                       description="local time of day (Asia/Shanghai) the device time starts at, or now "
                                   "(a live run at speed 1 or slower)")
    duration: Duration = Field(gt=0)
    speed: float = Field(default=60.0, ge=0, description="device seconds per wall second; 0: as fast as possible")
    rate: float | None = Field(default=None, gt=0, description="at most this many messages per wall second")
    grace: Duration = Field(default=900.0, description="an alert raised this long after its event still counts")
    fleet: FleetSpec = Field(default_factory=FleetSpec)
    events: list[EventSpec] = Field(default_factory=list)
    faults: list[FaultSpec] = Field(default_factory=list)
    expect: Expect = Field(default_factory=Expect)

    @model_validator(mode="after")
    def _within(self) -> Scenario:
        for where, items in (("events", self.events), ("faults", self.faults)):
            for i, item in enumerate(items):
                if item.at >= self.duration:
                    raise ValueError(f"{where}[{i}].at {item.at:g} s is not within the duration {self.duration:g} s")
        return self


class ScenarioError(ValueError):
    pass


def load_scenario(path: str | Path) -> Scenario:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ScenarioError(f"{path}: cannot read the scenario: {exc.strerror}") from None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ScenarioError(f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(document, dict):
        raise ScenarioError(f"{path}: a scenario is a mapping with name, duration, events…")
    try:
        return Scenario.model_validate(document)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'scenario'}: {e['msg']}" for e in exc.errors())
        raise ScenarioError(f"{path}: {problems}") from None


@dataclass(frozen=True)
class Planned:
    """One event or fault occurrence, resolved to a device."""

    index: int
    what: str          # the event or fault name
    is_fault: bool
    device_id: str
    port: int
    at: float          # device seconds from the scenario's start
    duration_s: float
    spec: Any


def plan(scenario: Scenario, devices: dict[str, Any], rng: random.Random) -> list[Planned]:
    """Resolve every event and fault of the scenario to a device (``devices``: id → DeviceSpec)."""
    by_kind: dict[str, list[str]] = {}
    for device in devices.values():
        by_kind.setdefault(device.kind, []).append(device.id)
    planned: list[Planned] = []
    used: set[str] = set()  # random picks prefer devices with nothing else going on
    for where, items, is_fault in (("events", scenario.events, False), ("faults", scenario.faults, True)):
        for i, item in enumerate(items):
            if is_fault:
                kinds = [item.kind] if item.kind else list(MODELS)
                repeats = [(item.at, item.duration or 0.0)]
            else:
                kinds = [item.kind] if item.kind else EVENT_KINDS[item.event]
                model = MODELS[kinds[0]]
                default_s, min_s = model.EVENTS[item.event]
                lasts = item.duration if item.duration is not None else default_s
                if lasts < min_s:
                    raise ScenarioError(f"{where}[{i}]: {item.event} lasts at least {min_s:g} s for its signs to show "
                                        f"(duration {lasts:g} s)")
                repeats = [(item.at + k * (item.every or 0.0), lasts) for k in range(item.count)]
            for at, lasts in repeats:
                if at >= scenario.duration:
                    break
                device_id = _pick(item.device, kinds, devices, by_kind, rng, f"{where}[{i}]", used)
                used.add(device_id)
                device = devices[device_id]
                if not is_fault and device.kind not in EVENT_KINDS[item.event]:
                    raise ScenarioError(f"{where}[{i}]: {device_id} is a {device.kind}; {item.event} happens to "
                                        f"{', '.join(EVENT_KINDS[item.event])}")
                port = 0
                if device.kind == "ev_charger" and not is_fault:
                    port = item.port or rng.randint(1, device.ports or 1)
                    if port > (device.ports or 1):
                        raise ScenarioError(f"{where}[{i}]: {device_id} has {device.ports or 1} ports, not {port}")
                planned.append(Planned(len(planned), item.event if not is_fault else item.fault, is_fault,
                                       device_id, port, at, lasts, item))
    return planned


def _pick(choice: str, kinds: list[str], devices: dict[str, Any], by_kind: dict[str, list[str]],
          rng: random.Random, where: str, used: set[str]) -> str:
    if choice != "random":
        if choice not in devices:
            raise ScenarioError(f"{where}: device {choice!r} is not in the fleet")
        return choice
    pool = [d for kind in kinds for d in by_kind.get(kind, [])]
    if not pool:
        raise ScenarioError(f"{where}: the fleet has no {' or '.join(kinds)} device")
    fresh = [d for d in pool if d not in used]
    return rng.choice(fresh or pool)


#: what the demo injects: events whose alerts show within a minute, so a newcomer sees the street react
DEMO_EVENTS: tuple[tuple[str, str | None], ...] = (
    ("flaming_fire", None), ("hushed_alarm", None), ("overload", "ev_charger"), ("leakage", "ev_charger"),
    ("leakage", "meter"), ("tamper", None), ("fault", None), ("modified_charger", None), ("overheating", None),
)


def live_scenario(duration_s: float, event_every_s: float, seed: int) -> Scenario:
    """A live street (device time is now, speed 1) with an event on a random device every
    ``event_every_s`` seconds on average, for ``streetbrain demo``."""
    rng = random.Random(seed)
    events = []
    at = event_every_s * 0.3
    while at < duration_s and len(events) < 100_000:
        name, kind = rng.choice(DEMO_EVENTS)
        events.append(EventSpec(at=at, event=name, kind=kind))
        at += rng.expovariate(1 / event_every_s)
    return Scenario(name="demo", start="now", duration=duration_s, speed=1.0, seed=seed, events=events)
