"""Telemetry payloads per device kind: the wire contract of ../shared/DESIGN.md.

Every reading carries ``ts`` (device time, epoch seconds or RFC 3339) and may carry ``seq``. Fields
are strict: ``"12.5"`` is not a number and ``1`` is not a boolean, because a device that sends the
wrong type is broken and its values must not be trusted. Unknown fields are kept (``extra``) for
storage but never feed detection. Ranges are physical plausibility, not alert limits: a reading
outside them is a faulty sensor or a hostile device.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

EPOCH_FLOOR = 946684800.0  # 2000-01-01: a device whose clock says earlier has not been set

Pct = Annotated[float, Field(ge=0, le=100)]


class Reading(BaseModel):
    """Fields every kind shares."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="allow", frozen=True)

    ts: float
    seq: Annotated[int, Field(ge=0, le=2**63 - 1)] | None = None
    device_id: str | None = None

    #: numeric fields fed to detection, in column order; booleans become 0.0/1.0
    FIELDS: ClassVar[tuple[str, ...]] = ()

    @field_validator("ts", mode="before")
    @classmethod
    def _parse_ts(cls, value: object) -> float:
        if isinstance(value, bool):
            raise ValueError("ts must be epoch seconds or an RFC 3339 string, not a boolean")
        if isinstance(value, str):
            try:
                parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                raise ValueError(f"ts {value[:40]!r} is not RFC 3339") from None
            if parsed.tzinfo is None:
                raise ValueError("ts in RFC 3339 needs a UTC offset (Z or +08:00); local time is ambiguous")
            return parsed.timestamp()
        if isinstance(value, int):
            value = float(value)
        if isinstance(value, float):
            if value != value or value in (float("inf"), float("-inf")):
                raise ValueError("ts must be finite")
            if value > 1e11:  # milliseconds are a common device mistake; say so instead of "future"
                raise ValueError(f"ts {value:.0f} looks like milliseconds; send epoch seconds")
            if value < EPOCH_FLOOR:
                raise ValueError(f"ts {value:.0f} is before 2000-01-01: the device clock is not set")
            return value
        raise ValueError("ts must be epoch seconds or an RFC 3339 string")


class SmokeReading(Reading):
    """Home smoke detector (EN 14604 / EN 54-7 optical chamber, often with heat and CO)."""

    FIELDS: ClassVar[tuple[str, ...]] = (
        "alarm", "smoke_obscuration_pct_m", "temp_c", "co_ppm", "battery_pct", "tamper", "fault", "test",
    )

    alarm: bool | None = None
    smoke_obscuration_pct_m: Annotated[float, Field(ge=0, le=100)] | None = None
    temp_c: Annotated[float, Field(ge=-60, le=300)] | None = None
    co_ppm: Annotated[float, Field(ge=0, le=10000)] | None = None
    battery_pct: Pct | None = None
    tamper: bool | None = None
    fault: bool | None = None
    test: bool | None = None


class EvChargerReading(Reading):
    """One port of an e-bike charging point's current monitor; one message per port."""

    FIELDS: ClassVar[tuple[str, ...]] = (
        "current_a", "voltage_v", "power_w", "energy_wh", "leakage_ma", "socket_temp_c",
    )

    port: Annotated[int, Field(ge=1, le=256)]
    current_a: Annotated[float, Field(ge=0, le=200)] | None = None
    voltage_v: Annotated[float, Field(ge=0, le=500)] | None = None
    power_w: Annotated[float, Field(ge=0, le=50000)] | None = None
    energy_wh: Annotated[float, Field(ge=0)] | None = None
    leakage_ma: Annotated[float, Field(ge=0, le=10000)] | None = None
    socket_temp_c: Annotated[float, Field(ge=-60, le=300)] | None = None


class NoiseReading(Reading):
    """Automatic noise monitoring point: A-weighted levels over ``interval_s`` (GB 3096-2008)."""

    FIELDS: ClassVar[tuple[str, ...]] = ("laeq_db", "lmax_db", "lmin_db", "interval_s")

    laeq_db: Annotated[float, Field(ge=0, le=160)] | None = None
    lmax_db: Annotated[float, Field(ge=0, le=180)] | None = None
    lmin_db: Annotated[float, Field(ge=0, le=160)] | None = None
    interval_s: Annotated[float, Field(gt=0, le=86400)] | None = None


class MeterReading(Reading):
    """Smart electricity box of an old compound."""

    FIELDS: ClassVar[tuple[str, ...]] = ("current_a", "voltage_v", "leakage_ma", "temp_c")

    current_a: Annotated[float, Field(ge=0, le=1000)] | None = None
    voltage_v: Annotated[float, Field(ge=0, le=500)] | None = None
    leakage_ma: Annotated[float, Field(ge=0, le=10000)] | None = None
    temp_c: Annotated[float, Field(ge=-60, le=300)] | None = None


READING_MODELS: dict[str, type[Reading]] = {
    "smoke": SmokeReading,
    "ev_charger": EvChargerReading,
    "noise": NoiseReading,
    "meter": MeterReading,
}

KINDS: tuple[str, ...] = tuple(READING_MODELS)


def fields_of(kind: str) -> tuple[str, ...]:
    return READING_MODELS[kind].FIELDS
