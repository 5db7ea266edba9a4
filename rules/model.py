"""Rule profiles per device kind, as configured under ``kinds:`` in config.yaml.

A rule watches one reading field (or a rolling aggregate of it over a window of device time) and
holds a *create* condition per severity plus a separate *clear* condition, so one alert escalates
(warning → major) and de-escalates without being raised again, and hysteresis keeps it from
chattering around a single limit (raise at 75 dB, clear below 72 dB). A condition is a comparison
against a threshold (a number, or a per-device parameter such as the zone's night limit) that may
have to hold for a duration of device time (``for_s``) or a number of readings in a row
(``count``). Rules may be limited to local-time schedules (Asia/Shanghai) and escalate for devices
with given tags (``elderly_alone``). A rule whose state keeps changing is held as *flapping*
(Kapacitor's flapping(low, high)).
"""

from __future__ import annotations

import re
from enum import IntEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SEVERITY_NAMES = ("info", "warning", "major", "critical")
Comparison = Literal[">", ">=", "<", "<="]
Aggregate = Literal["leq", "mean", "max", "min", "p10", "p50", "p90", "range", "rise_per_min", "robust_z"]

_HHMM = r"([01]\d|2[0-3]):([0-5]\d)"


class Severity(IntEnum):
    """Ordered so that ``max()`` picks the worst; 0 means no active alert."""

    none = 0
    info = 1
    warning = 2
    major = 3
    critical = 4


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ParamRef(Strict):
    """A per-series parameter, optionally shifted: ``{param: limit_db, offset: 15}``."""

    param: str
    offset: float = 0.0
    scale: float = 1.0


Threshold = float | ParamRef


class Condition(Strict):
    """``value <op> threshold``, held for ``for_s`` seconds of device time and ``count`` readings in a row.

    A bare number in YAML is the threshold alone.
    """

    threshold: Threshold
    for_s: float = Field(default=0.0, ge=0, description="debounce by duration: must hold this long")
    count: int = Field(default=1, ge=1, le=10000, description="debounce by count: readings in a row")

    @model_validator(mode="before")
    @classmethod
    def _bare_threshold(cls, value: object) -> object:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return {"threshold": value}
        if isinstance(value, dict) and "param" in value:
            return {"threshold": value}
        return value


class Thresholds(Strict):
    """Create condition per severity; a reading raises the worst severity whose condition is met."""

    info: Condition | None = None
    warning: Condition | None = None
    major: Condition | None = None
    critical: Condition | None = None

    def levels(self) -> list[tuple[Severity, Condition]]:
        return [(Severity[name], c) for name in SEVERITY_NAMES if (c := getattr(self, name)) is not None]


class Window(Strict):
    """Replace the raw reading by a rolling aggregate over the last ``seconds`` of device time.

    ``leq`` is the energy average 10·log10(mean(10^(L/10))) of GB 3096 (never an arithmetic mean of
    decibels); ``p10``/``p90`` are the percentile levels (the level exceeded 90 % / 10 % of the time is
    L10 / L90 in acoustics: L10 = p90, L90 = p10); ``rise_per_min`` is the least-squares slope per
    minute (EN 54-5 rate of rise); ``range`` is max − min (a stuck sensor reads a range near zero);
    ``robust_z`` is the reading's distance from the window's median in MADs (×1.4826, so ~σ), an
    outlier score that one wild reading in the history does not distort. The window holds at most
    the kind's ``window_samples`` readings.
    """

    seconds: float = Field(gt=0, le=7 * 86400)
    aggregate: Aggregate
    min_samples: int = Field(default=1, ge=1, description="no value until the window holds this many readings")
    min_span_s: float = Field(default=0.0, ge=0,
                              description="no value until its readings span this much device time (a slope "
                                          "fitted over seconds turns sensor noise into a steep rise)")


class Transform(Strict):
    """Replace the raw reading by a stateful per-series transform of it, stepped once per reading.

    ``rebound``: how far the value climbed back after falling from its session peak (a charge that
    tapered and draws more again: thermal runaway); a reading ≤ 0 ends the session. ``ewma_z``: the
    reading's z-score against the series' own exponentially weighted mean and variance. ``cusum``:
    the two-sided CUSUM of that z-score, for slow drift (a smoke chamber getting dirty).
    ``anomaly``: the anomaly score in [0, 1] of ``detectors/anomaly.py`` (spikes, level shifts, drifts,
    variance changes and patterns never shown before against the series' own history, calibrated on its own score distribution; 0
    during ``warmup``); ``anomaly_score >= 0.6 for 5 minutes`` is ``raise: {warning: {threshold: 0.6,
    for_s: 300}}`` with ``sustain: true``. The score is highest at an anomaly's first reading and
    falls back once the series is past it (one anomaly, one alert); ``sustain`` keeps it up for as
    long as the readings stay unusual, which a raise held ``for_s`` or ``count`` needs (a rule holding
    one without it is a config error).
    """

    kind: Literal["rebound", "ewma_z", "cusum", "anomaly"]
    alpha: float = Field(default=0.05, gt=0, le=1, description="EWMA weight of a new reading")
    k: float = Field(default=0.5, ge=0, description="CUSUM slack, in standard deviations")
    warmup: int = Field(default=20, ge=1, description="readings before a score is given")
    sustain: bool = Field(default=False, description="anomaly only: keep the score up while the readings stay "
                                                     "unusual (for a raise held for_s or count)")

    @model_validator(mode="after")
    def _sustain_is_the_anomaly_scores(self) -> Transform:
        if self.sustain and self.kind != "anomaly":
            raise ValueError(f"sustain applies to the anomaly transform, not {self.kind}")
        return self


class Flapping(Strict):
    """Hold an alert whose level changed on more than ``high`` of its last ``history`` readings; release
    it below ``low``. While held, changes are not sent; the flap itself is (event ``flapping``)."""

    history: int = Field(default=20, ge=4, le=63)
    high: float = Field(default=0.5, gt=0, le=1)
    low: float = Field(default=0.25, ge=0, lt=1)

    @model_validator(mode="after")
    def _ordered(self) -> Flapping:
        if self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        return self


class Message(Strict):
    """Bilingual alert text. ``{device}``, ``{name}``, ``{value}``, ``{threshold}``, ``{unit}`` and
    ``{severity}`` are filled in; an unknown placeholder is a config error, not a crash at alert time."""

    zh: str
    en: str

    @model_validator(mode="after")
    def _placeholders_known(self) -> Message:
        sample = dict(device="d", name="n", value=1.0, threshold=1.0, unit="u", severity="s")
        for lang in ("zh", "en"):
            try:
                getattr(self, lang).format(**sample)
            except (KeyError, IndexError, ValueError) as exc:
                raise ValueError(
                    f"{lang} message has an unknown or broken placeholder ({exc}); "
                    "use {device}, {name}, {value}, {threshold}, {unit} or {severity}"
                ) from None
        return self


def parse_schedule(spans: list[str]) -> list[tuple[int, int]]:
    """``["22:00-06:00", "12:00-14:00"]`` → [(start_s, end_s)] in seconds of the local day."""
    out = []
    for span in spans:
        match = re.fullmatch(rf"{_HHMM}-{_HHMM}", span.strip())
        if not match:
            raise ValueError(f"schedule window {span!r} is not HH:MM-HH:MM")
        h1, m1, h2, m2 = (int(g) for g in match.groups())
        start, end = h1 * 3600 + m1 * 60, h2 * 3600 + m2 * 60
        if start == end:
            raise ValueError(f"schedule window {span!r} is empty; leave out `schedule` for all day")
        out.append((start, end))
    return out


class Rule(Strict):
    """One field (or its window aggregate), one comparison, a create condition per severity, a clear."""

    field: str
    op: Comparison = ">="
    window: Window | None = None
    transform: Transform | None = None
    raise_: Thresholds = Field(alias="raise")
    clear: Condition | None = Field(
        default=None,
        description="for >/>= rules the alert clears when value < clear (for </<=: value > clear); "
                    "without it, as soon as no create threshold is crossed",
    )
    schedule: list[str] | None = Field(default=None, description='local-time windows, e.g. ["22:00-06:00"]')
    escalate_tags: dict[str, int] = Field(default_factory=dict,
                                          description="device tag → severity levels added (elderly_alone: 1)")
    flapping: Flapping | None = Field(default_factory=Flapping)
    unit: str = ""
    message: Message | None = None
    description: str = ""

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            if not value:
                raise ValueError("an empty schedule would never run; leave it out for all day")
            parse_schedule(value)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Rule:
        if self.window is not None and self.transform is not None:
            raise ValueError("a rule takes either a window or a transform of its field, not both")
        levels = self.raise_.levels()
        if not levels:
            raise ValueError("raise: needs a condition for at least one of info, warning, major, critical")
        if self.transform is not None and self.transform.kind == "anomaly" and not self.transform.sustain:
            held = [s.name for s, c in levels if c.for_s > 0 or c.count > 1]
            if held:
                raise ValueError(f"raise: {held[0]} is held (for_s or count) on the anomaly score, which is high "
                                 "only at readings that beat the recent ones: add `sustain: true` to the transform")
        plain = [(s, c.threshold) for s, c in levels if isinstance(c.threshold, float)
                 and c.for_s == 0 and c.count == 1]
        rising = self.rising
        # With plain numbers a worse severity must need a worse value, or it could never be reached.
        values = [t for _, t in plain]
        if any((b < a) if rising else (b > a) for a, b in zip(values, values[1:])):
            order = "increase" if rising else "decrease"
            raise ValueError(f"raise: thresholds must {order} with severity (info → critical) for op {self.op!r}")
        if self.clear is not None and isinstance(self.clear.threshold, float):
            mildest = next((c.threshold for _, c in levels if isinstance(c.threshold, float)), None)
            if mildest is not None and ((self.clear.threshold > mildest) if rising else (self.clear.threshold < mildest)):
                side = "at or below" if rising else "at or above"
                raise ValueError(
                    f"clear: {self.clear.threshold} must lie {side} the mildest raise threshold {mildest}, "
                    "or the alert would clear while still raised"
                )
        return self

    @property
    def rising(self) -> bool:
        return self.op in (">", ">=")

    def params(self) -> set[str]:
        conditions = [c for _, c in self.raise_.levels()] + ([self.clear] if self.clear else [])
        return {c.threshold.param for c in conditions if isinstance(c.threshold, ParamRef)}


class Param(Strict):
    """A per-series value taken from the registry.

    * a numeric attribute as it is (``attribute: rated_power_w``, times ``scale``);
    * a table by attribute value (``attribute: zone_class, values: {"1": 55}``);
    * a day and a night table (``day:``/``night:`` with ``night_hours``), e.g. GB 3096 zone limits.
    """

    attribute: str
    values: dict[str, float] | None = None
    day: dict[str, float] | None = None
    night: dict[str, float] | None = None
    night_hours: str = "22:00-06:00"
    scale: float = 1.0
    default: float | None = None

    @model_validator(mode="after")
    def _shape(self) -> Param:
        if (self.day is None) != (self.night is None):
            raise ValueError("give both day and night tables, or neither")
        if self.values is not None and self.day is not None:
            raise ValueError("give either values or day/night tables, not both")
        parse_schedule([self.night_hours])
        return self


class Offline(Strict):
    """The staleness alert of a kind: no accepted reading for ``offline_after_s`` (gateway clock)."""

    severity: Literal["info", "warning", "major", "critical"] = "warning"
    escalate_tags: dict[str, int] = Field(default_factory=dict)
    message: Message | None = None


class KindProfile(Strict):
    """The rule profile of one device kind."""

    description: str = ""
    offline_after_s: float = Field(default=3600.0, gt=0, description="no reading for this long → offline")
    offline: Offline = Field(default_factory=Offline)
    lateness_s: float = Field(default=300.0, ge=0,
                              description="readings older than the newest one by more than this are rejected")
    window_samples: int = Field(default=32, ge=2, le=1024, description="readings kept per windowed field")
    params: dict[str, Param] = Field(default_factory=dict)
    rules: dict[str, Rule] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _params_defined(self) -> KindProfile:
        for rule_id, rule in self.rules.items():
            missing = rule.params() - set(self.params)
            if missing:
                raise ValueError(f"rule {rule_id} refers to undefined params: {', '.join(sorted(missing))}")
        if "offline" in self.rules:
            raise ValueError("the rule id 'offline' is reserved for the staleness alert (configure `offline:`)")
        return self
