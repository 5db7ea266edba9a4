"""Rule profiles per device kind, as configured under ``kinds:`` in config.yaml.

A rule watches one reading field and holds a create threshold per severity plus a separate clear
threshold, so one alert can escalate (warning → major) and de-escalate without being re-raised,
and hysteresis keeps it from chattering around a single limit (raise at 75 dB, clear below 72 dB).
"""

from __future__ import annotations

from enum import IntEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Severity(IntEnum):
    """Ordered so that ``max()`` picks the worst; 0 means no active alert."""

    none = 0
    info = 1
    warning = 2
    major = 3
    critical = 4


SEVERITY_NAMES = ("info", "warning", "major", "critical")

Comparison = Literal[">", ">=", "<", "<="]


class Message(BaseModel):
    """Bilingual alert text. ``{device}``, ``{name}``, ``{value}``, ``{threshold}`` and ``{unit}``
    are filled in; an unknown placeholder is a config error, not a crash at alert time."""

    model_config = ConfigDict(extra="forbid")

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


class Thresholds(BaseModel):
    """Create threshold per severity; a reading raises the worst severity whose threshold it crosses."""

    model_config = ConfigDict(extra="forbid")

    info: float | None = None
    warning: float | None = None
    major: float | None = None
    critical: float | None = None

    def levels(self) -> list[tuple[Severity, float]]:
        return [(Severity[name], v) for name in SEVERITY_NAMES if (v := getattr(self, name)) is not None]


class Rule(BaseModel):
    """One field, one comparison, thresholds per severity, and a clear level.

    ``op`` says which side is bad: ``">="`` raises when ``value >= threshold``; ``"<"`` raises when
    the value falls below (low battery). ``clear`` is the level the value must get back past to
    clear the alert: for ``>``/``>=`` rules it clears when ``value < clear``, for ``<``/``<=`` rules
    when ``value > clear``. Without ``clear`` it clears as soon as no create threshold holds.
    """

    model_config = ConfigDict(extra="forbid")

    field: str
    op: Comparison = ">="
    raise_: Thresholds = Field(alias="raise")
    clear: float | None = None
    unit: str = ""
    message: Message | None = None
    description: str = ""

    @model_validator(mode="after")
    def _consistent(self) -> Rule:
        levels = self.raise_.levels()
        if not levels:
            raise ValueError("raise: needs a threshold for at least one of info, warning, major, critical")
        values = [v for _, v in levels]
        rising = self.op in (">", ">=")
        # A worse severity must need a worse value, or escalation could never happen.
        if any((b < a) if rising else (b > a) for a, b in zip(values, values[1:])):
            order = "increase" if rising else "decrease"
            raise ValueError(f"raise: thresholds must {order} with severity (info → critical) for op {self.op!r}")
        if self.clear is not None:
            mildest = values[0]
            if (self.clear > mildest) if rising else (self.clear < mildest):
                side = "at or below" if rising else "at or above"
                raise ValueError(
                    f"clear: {self.clear} must lie {side} the mildest raise threshold {mildest}, "
                    "or the alert would clear while still raised"
                )
        return self

    @property
    def rising(self) -> bool:
        return self.op in (">", ">=")


class KindProfile(BaseModel):
    """The rule profile of one device kind."""

    model_config = ConfigDict(extra="forbid")

    description: str = ""
    offline_after_s: float = Field(default=3600.0, gt=0, description="no reading for this long → offline")
    rules: dict[str, Rule] = Field(default_factory=dict)
