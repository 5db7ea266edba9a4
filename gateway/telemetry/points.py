"""Readings, alert events and incident changes as InfluxDB points (line protocol, v2 write API).

Readings: measurement per kind; tags site, kind, device (and port); fields as the device sent them
(unknown fields included: kept for storage, never trusted); time = device time. Alerts go to
``alerts``, incident changes to ``incidents``. Numbers are written as floats (InfluxDB refuses a
field that changes between integer and float), ``seq`` as an integer.
"""

from __future__ import annotations

from typing import Any

from influxdb_client import Point, WritePrecision

from gateway.schemas import Reading
from rules.events import AlertEvent


class PointRejected(ValueError):
    pass


def _ns(ts: float) -> int:
    return int(round(ts * 1000)) * 1_000_000  # millisecond precision: one point per (series, ms)


def _field_value(value: Any) -> Any:
    if isinstance(value, bool) or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    return None  # lists, objects, null: not a field


def reading_point(kind: str, site: str, device_id: str, reading: Reading) -> Point:
    point = Point(kind).tag("site", site).tag("kind", kind).tag("device", device_id)
    port = getattr(reading, "port", None)
    if port is not None:
        point.tag("port", str(port))
    values = reading.model_dump(exclude={"ts", "seq", "device_id", "port"}, exclude_none=True)
    for name, value in values.items():
        value = _field_value(value)
        if value is not None:
            point.field(name, value)
    if reading.seq is not None:
        point.field("seq", int(reading.seq))
    return point.time(_ns(reading.ts), WritePrecision.NS)


def alert_point(alert: AlertEvent) -> Point:
    point = (Point("alerts").tag("site", alert.site).tag("kind", alert.kind).tag("device", alert.device_id)
             .tag("rule", alert.rule).tag("event", alert.event).tag("severity", alert.severity)
             .field("value", float(alert.value)).field("threshold", float(alert.threshold))
             .field("alert_id", alert.alert_id).field("gateway_time", float(alert.gateway_time)))
    if alert.port:
        point.tag("port", str(alert.port))
    return point.time(_ns(alert.ts), WritePrecision.NS)


def incident_point(incident: dict[str, Any], action: str, actor: str, at: float, note: str | None) -> Point:
    return (Point("incidents").tag("site", incident["site"]).tag("kind", incident["kind"]).tag("rule", incident["rule"])
            .tag("action", action).tag("state", incident["state"]).field("incident_id", incident["id"])
            .field("actor", actor).field("severity", incident["severity"]).field("note", note or "")
            .field("occurrences", float(incident["occurrences"]))
            .time(_ns(at), WritePrecision.NS))


class FieldGuard:
    """Refuses a point whose field changed type since first seen, or that carries an oversized
    string: the store would refuse it anyway, and one bad point must not cost its batch."""

    def __init__(self, max_string_bytes: int):
        self.max_string_bytes = max_string_bytes
        self.types: dict[tuple[str, str], type] = {}

    def check(self, point: Point) -> None:
        measurement = point._name  # influxdb-client keeps these private; they are its documented shape
        for name, value in point._fields.items():
            kind = type(value)
            if isinstance(value, str) and len(value.encode()) > self.max_string_bytes:
                raise PointRejected(f"{measurement}.{name}: a string of {len(value.encode())} bytes "
                                    f"(limit {self.max_string_bytes})")
            first = self.types.setdefault((measurement, name), kind)
            if first is not kind:
                raise PointRejected(f"{measurement}.{name}: was {first.__name__}, now {kind.__name__}")
