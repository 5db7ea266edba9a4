"""``streetbrain watch``: the live alert stream and the open incidents in a terminal (rich).

Follows ``streetbrain/+/alerts/#`` and the retained ``streetbrain/+/incidents/#`` on a connection
of its own, like any screen in the command centre.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any

import aiomqtt
import orjson
from rich.console import Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from gateway import topics

SEVERITY_RANK = {"info": 0, "warning": 1, "major": 2, "critical": 3}
STYLE = {"critical": "bold white on red", "major": "bold red", "warning": "yellow", "info": "cyan"}


def styled(text: str, style: str) -> str:
    return f"[{style}]{escape(text)}[/]" if style else escape(text)


class Watch:
    def __init__(self, site: str | None = None, kind: str | None = None, severity: str | None = None):
        self.site, self.kind, self.severity = site, kind, severity
        self.alerts: deque[dict[str, Any]] = deque(maxlen=20)
        self.incidents: dict[str, dict[str, Any]] = {}

    def wanted(self, item: dict[str, Any]) -> bool:
        if self.site and item.get("site") != self.site:
            return False
        if self.kind and item.get("kind") != self.kind:
            return False
        return not (self.severity and SEVERITY_RANK.get(item.get("severity", "info"), 0) < SEVERITY_RANK[self.severity])

    def take(self, topic: str, body: dict[str, Any]) -> None:
        if "/incidents/" in topic:
            if body.get("is_open") and self.wanted(body):
                self.incidents[body["id"]] = body
            else:
                self.incidents.pop(body.get("id"), None)
        elif self.wanted(body):
            self.alerts.appendleft(body)

    def render(self) -> Group:
        alerts = Table(title="alerts · 实时告警", expand=True)
        for column in ("time", "severity", "event", "device", "message"):
            alerts.add_column(column)
        for a in self.alerts:
            style = "green" if a["event"] == "cleared" else STYLE.get(a["severity"], "")
            alerts.add_row(time.strftime("%H:%M:%S", time.localtime(a["gateway_time"])), styled(a["severity"], style),
                           a["event"], escape(f"{a['site']}/{a['device_id']}"), escape(a["message"]["zh"]))
        board = Table(title=f"open incidents · 未结事件 ({len(self.incidents)})", expand=True)
        for column in ("id", "state", "severity", "title", "team", "next deadline"):
            board.add_column(column)
        now = time.time()
        for inc in sorted(self.incidents.values(), key=lambda i: i["opened_at"], reverse=True)[:20]:
            stage = "dispatch" if inc["dispatched_at"] is None else "arrive" if inc["on_site_at"] is None else "resolve"
            deadline = inc.get(f"{stage}_deadline")
            due = "-"
            if deadline is not None and inc["state"] != "resolved":
                left = deadline - now
                colour = "red" if left < 0 else "yellow" if left < 0.2 * (deadline - inc["opened_at"]) else ""
                due = styled(f"{stage} {'-' if left < 0 else ''}{int(abs(left)) // 60}:{int(abs(left)) % 60:02d}", colour)
            board.add_row(escape(inc["id"]), inc["state"], styled(inc["severity"], STYLE.get(inc["severity"], "")),
                          escape(inc["title_zh"]), escape(inc["team"] or "-"), due)
        return Group(alerts, board)


async def watch(host: str, port: int, view: Watch, stop: asyncio.Event, refresh_s: float = 1.0,
                username: str | None = None, password: str | None = None) -> None:
    incidents = f"{topics.ROOT}/+/incidents/#"
    async with aiomqtt.Client(host, port, identifier=f"streetbrain-watch-{time.time_ns() % 10**9}",
                              username=username, password=password) as client:
        await client.subscribe(topics.ALERTS_FILTER, qos=1)
        await client.subscribe(incidents, qos=1)
        with Live(view.render(), refresh_per_second=2, screen=False) as live:
            messages = client.messages
            pending: asyncio.Task[Any] | None = None
            while not stop.is_set():
                if pending is None:
                    pending = asyncio.ensure_future(anext(messages))
                done, _ = await asyncio.wait({pending}, timeout=refresh_s)
                if done:
                    message = pending.result()
                    pending = None
                    try:
                        view.take(str(message.topic), orjson.loads(message.payload))  # type: ignore[arg-type]
                    except (orjson.JSONDecodeError, KeyError, TypeError):
                        pass
                live.update(view.render())
            if pending is not None:
                pending.cancel()
