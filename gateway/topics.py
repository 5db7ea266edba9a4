"""The MQTT topic scheme of ../shared/DESIGN.md (fixed: extend it, never rename it)."""

from __future__ import annotations

from typing import NamedTuple

ROOT = "streetbrain"
TELEMETRY_FILTER = f"{ROOT}/+/+/+/telemetry"
STATUS_FILTER = f"{ROOT}/+/+/+/status"
ALERTS_FILTER = f"{ROOT}/+/alerts/#"
DEADLETTER_FILTER = f"{ROOT}/+/deadletter/#"
# the smoke hint lane's subscription (gateway/hints.py): smoke detectors' telemetry, again
SMOKE_KIND = "smoke"
SMOKE_MARK = f"/{SMOKE_KIND}/"  # in every smoke detector's topic (and in those of a site called "smoke")
SMOKE_TELEMETRY_FILTER = f"{ROOT}/+/{SMOKE_KIND}/+/telemetry"

#: what stands in for a topic level the gateway could not read
UNKNOWN = "_"


class DeviceTopic(NamedTuple):
    site: str
    kind: str
    device_id: str
    channel: str  # "telemetry" or "status"


def parse_device_topic(topic: str) -> DeviceTopic | None:
    """``streetbrain/{site}/{kind}/{device_id}/{telemetry|status}``, or None if it is not one."""
    parts = topic.split("/")
    if len(parts) != 5 or parts[0] != ROOT or parts[4] not in ("telemetry", "status"):
        return None
    if not all(parts[1:4]):
        return None
    return DeviceTopic(parts[1], parts[2], parts[3], parts[4])


def telemetry(site: str, kind: str, device_id: str) -> str:
    return f"{ROOT}/{site}/{kind}/{device_id}/telemetry"


def status(site: str, kind: str, device_id: str) -> str:
    return f"{ROOT}/{site}/{kind}/{device_id}/status"


def alert(site: str, kind: str, device_id: str) -> str:
    return f"{ROOT}/{site}/alerts/{kind}/{device_id}"


def deadletter(site: str, kind: str, device_id: str) -> str:
    return f"{ROOT}/{site}/deadletter/{kind}/{device_id}"


def incident(site: str, incident_id: str) -> str:
    return f"{ROOT}/{site}/incidents/{incident_id}"
