"""Alert events: what the rules say happened to one (series, rule) alert."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal

from rules.model import Severity

SEVERITY_ZH = {"info": "提示", "warning": "警告", "major": "严重", "critical": "紧急"}
EVENT_ZH = {"raised": "告警", "updated": "告警等级变化", "cleared": "已恢复", "flapping": "频繁波动，暂停推送"}


@dataclass(slots=True)
class AlertEvent:
    """One change of one alert: raised, escalated or de-escalated (updated), or cleared; or the news
    that it is flapping (its changes are held until it settles, then one event says where it ended).

    ``alert_id`` is the same for every event of one episode (raise … clear) and is derived from the
    device time of the raise, so a reading redelivered after a restart yields the same id.
    """

    alert_id: str
    event: Literal["raised", "updated", "cleared", "flapping"]
    rule: str
    kind: str
    severity: str  # the severity now; on "cleared", the severity it had
    previous_severity: str | None
    site: str
    device_id: str
    port: int | None
    device_name: str
    field: str
    value: float
    threshold: float
    op: str
    unit: str
    ts: float  # device time of the reading that caused the event
    raised_ts: float  # device time the episode was raised
    gateway_time: float
    message_zh: str
    message_en: str
    flapping: bool = False
    retracted: bool = False  # a "cleared" that withdraws an alert a late reading showed never happened

    def to_dict(self) -> dict[str, Any]:
        return {
            "alert_id": self.alert_id,
            "event": self.event,
            "rule": self.rule,
            "kind": self.kind,
            "severity": self.severity,
            "previous_severity": self.previous_severity,
            "site": self.site,
            "device_id": self.device_id,
            "port": self.port,
            "device_name": self.device_name,
            "field": self.field,
            "value": self.value,
            "threshold": self.threshold,
            "op": self.op,
            "unit": self.unit,
            "ts": self.ts,
            "device_time": datetime.fromtimestamp(self.ts, timezone.utc).isoformat(timespec="milliseconds"),
            "raised_ts": self.raised_ts,
            "gateway_time": self.gateway_time,
            "message": {"zh": self.message_zh, "en": self.message_en},
            "flapping": self.flapping,
            "retracted": self.retracted,
        }


def alert_id(device_id: str, port: int, rule: str, raised_ts: float) -> str:
    series = f"{device_id}#{port}" if port else device_id
    return f"{series}/{rule}/{int(round(raised_ts * 1000))}"


_NAMES = tuple(Severity(level).name for level in range(len(Severity)))


def severity_name(level: int) -> str:
    return _NAMES[level]
