"""Running a scenario: every device's reports in device-time order, events and faults at their
times, published over real MQTT (QoS 1) at ``speed`` device seconds per wall second, and the ground
truth of what was done.

The publisher is a plain paho client in the caller's thread (about twice aiomqtt's rate on this
machine, ../shared/reference/mqtt-limits.md) with a bounded window of unacknowledged messages, so a
slow broker or gateway slows the simulation down instead of filling memory.
"""

from __future__ import annotations

import heapq
import json
import math
import random
import ssl
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable

import orjson
import paho.mqtt.client as mqtt

from simulators.models import MODELS, SHANGHAI_OFFSET_S, DeviceSpec, Model
from simulators.scenario import FAULTS, Planned, Scenario, plan

SHANGHAI = timezone(timedelta(seconds=SHANGHAI_OFFSET_S))
WINDOW = 2000  # unacknowledged QoS 1 messages in flight at most


def layout_start(scenario: Scenario, now: float) -> float:
    """The device time the scenario starts at: its local start time on the latest day that lets the
    whole scenario end no later than ``now``; or, for a live run (start "now", speed 1 or slower), now."""
    if scenario.start == "now":
        return now if 0 < scenario.speed <= 1 else now - scenario.duration
    hour, minute = (int(x) for x in scenario.start.split(":"))
    local_now = datetime.fromtimestamp(now, SHANGHAI)
    candidate = local_now.replace(hour=hour, minute=minute, second=0, microsecond=0)
    while candidate.timestamp() + scenario.duration > now:
        candidate -= timedelta(days=1)
    return candidate.timestamp()


@dataclass
class TruthRow:
    """One line of the ground truth: an event or an injected fault, and what should come of it."""

    id: int
    type: str                    # "event" or "fault"
    what: str
    device_id: str
    kind: str
    site: str
    port: int
    start: float                 # device time the anomaly begins
    end: float
    rules: list[str]             # must fire
    allowed: list[str]           # may fire
    severity: str | None
    incident_expected: bool
    expect: str = ""             # faults: deadletter:<reason> | rule:<rule> | counted:<counter> | accepted
    count: int = 0               # faults: messages injected
    wall_start: float | None = None
    wall_end: float | None = None

    def describe(self) -> str:
        where = self.device_id + (f" port {self.port}" if self.port else "")
        return f"{self.what.replace('_', ' ')} on {where} for {self.end - self.start:.0f} s"

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["start_iso"] = datetime.fromtimestamp(self.start, SHANGHAI).isoformat(timespec="seconds")
        out["end_iso"] = datetime.fromtimestamp(self.end, SHANGHAI).isoformat(timespec="seconds")
        return out


@dataclass
class RunResult:
    scenario: str
    t0: float
    duration_s: float
    devices: int
    published: int = 0
    readings: int = 0
    wall_s: float = 0.0
    truth: list[TruthRow] = field(default_factory=list)
    published_at: dict[tuple[str, float], float] = field(default_factory=dict)  # (device, ts) → wall
    faults_sent: Counter[str] = field(default_factory=Counter)
    stopped: bool = False

    def write_truth(self, path: str | Path) -> None:
        document = {"scenario": self.scenario, "t0": self.t0, "duration_s": self.duration_s, "devices": self.devices,
                    "published": self.published, "readings": self.readings,
                    "rows": [row.to_dict() for row in self.truth]}
        Path(path).write_text(json.dumps(document, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


class Publisher:
    """paho on its own network thread; ``send`` blocks while WINDOW messages await their PUBACK."""

    def __init__(self, host: str, port: int, *, username: str | None, password: str | None,
                 tls_context: ssl.SSLContext | None, client_id: str):
        self.host, self.port = host, port
        self.username, self.password, self.tls_context = username, password, tls_context
        self.client = self._client(client_id)
        self.client.max_inflight_messages_set(WINDOW)
        self.client.max_queued_messages_set(0)
        self.acked = 0
        self.sent = 0
        self.cond = threading.Condition()
        self.client.on_publish = self._on_publish
        self.connected = threading.Event()
        self.refused: str | None = None
        self.client.on_connect = self._on_connect
        self.client.connect(host, port, keepalive=30)
        self.client.loop_start()
        if not self.connected.wait(10) or self.refused:
            self.client.loop_stop()
            raise ConnectionError(f"the broker at {host}:{port} did not take the simulator's connection: "
                                  f"{self.refused or 'no answer in 10 s'}")

    def _client(self, client_id: str, will: tuple[str, bytes] | None = None) -> mqtt.Client:
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
        if self.username:
            client.username_pw_set(self.username, self.password)
        if self.tls_context is not None:
            client.tls_set_context(self.tls_context)
        if will is not None:
            client.will_set(will[0], will[1], qos=1, retain=True)
        return client

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            self.refused = f"{reason} (user {self.username or '(anonymous)'})"
        self.connected.set()

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        with self.cond:
            self.acked += 1
            self.cond.notify_all()

    def send(self, topic: str, payload: bytes, retain: bool = False) -> None:
        with self.cond:
            while self.sent - self.acked >= WINDOW:
                if not self.cond.wait(30):
                    raise TimeoutError(f"the broker at {self.host}:{self.port} acknowledged nothing for 30 s")
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise ConnectionError(f"publish to {self.host}:{self.port} failed: {mqtt.error_string(info.rc)}")
        with self.cond:
            self.sent += 1

    def drain(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        with self.cond:
            while self.acked < self.sent and time.monotonic() < deadline:
                self.cond.wait(0.1)

    def drop_connection(self, device: DeviceSpec) -> mqtt.Client:
        """A device connection with a last will, cut without a DISCONNECT: the broker sends the will."""
        client = self._client(f"sim-{device.id}", (device.status_topic, b"offline"))
        client.connect(self.host, self.port, keepalive=30)
        client.loop_start()
        client.publish(device.status_topic, b"online", qos=1, retain=True).wait_for_publish(5)
        sock = client.socket()
        client.loop_stop()
        if sock is not None:
            sock.close()
        return client

    def close(self) -> None:
        self.drain()
        self.client.disconnect()
        self.client.loop_stop()


class Simulation:
    """A scenario over a fleet, ready to run once."""

    def __init__(self, scenario: Scenario, fleet: list[DeviceSpec], *, now: float | None = None,
                 speed: float | None = None, rate: float | None = None, seed: int | None = None,
                 offline_after_s: dict[str, float] | None = None, check_interval_s: float = 5.0,
                 interval_s: float | None = None, device_rate_per_s: float = 0.0):
        self.scenario = scenario
        self.speed = scenario.speed if speed is None else speed
        self.rate = scenario.rate if rate is None else rate
        # Unpaced (speed 0), a device whose event makes it report every few seconds during a quiet hour
        # of the rest of the fleet would send hundreds of messages in a fraction of a wall second, and
        # the gateway rightly takes that for a flood: its reports are spaced to half the gateway's
        # per-device rate (``ingest.device_rate_per_s``; 0 = no limit). Flood faults are not spaced.
        self.device_gap_s = 2.0 / device_rate_per_s if device_rate_per_s > 0 and self.speed <= 0 else 0.0
        self.rng = random.Random(scenario.seed if seed is None else seed)
        self.t0 = layout_start(scenario, time.time() if now is None else now)
        self.t_end = self.t0 + scenario.duration
        self.devices = {d.id: d for d in fleet}
        if not self.devices:
            raise ValueError("the fleet is empty: nothing to simulate")
        self.models: dict[str, Model] = {}
        for device in fleet:
            model_rng = random.Random(f"{self.rng.random()}")
            cls = MODELS[device.kind]
            if device.kind == "smoke":
                self.models[device.id] = cls(device, model_rng, self.t0, heartbeat_s=scenario.fleet.heartbeat_s)
            elif device.kind == "ev_charger":
                after = (offline_after_s or {}).get("ev_charger", 600.0)
                self.models[device.id] = cls(device, model_rng, self.t0, offline_after_s=after,
                                             check_interval_s=check_interval_s)
            else:
                self.models[device.id] = cls(device, model_rng, self.t0)
            if interval_s is not None:  # every device reports at least this often (a livelier demo)
                model = self.models[device.id]
                model.interval_s = min(model.interval_s, interval_s)
                model.next_at = min(model.next_at, self.t0 + model_rng.uniform(0, model.interval_s))
        self.planned = plan(scenario, self.devices, self.rng)
        self.result = RunResult(scenario.name, self.t0, scenario.duration, len(self.devices))
        self._truth_by_plan: dict[int, TruthRow] = {}
        for item in self.planned:
            self.result.truth.append(self._truth(item))
        marks = [(r.start, r, "wall_start") for r in self.result.truth] + [(r.end, r, "wall_end") for r in self.result.truth]
        self._pending = sorted(marks, key=lambda mark: mark[0], reverse=True)  # popped from the end
        self.on_event: Callable[[TruthRow], None] | None = None
        self.silent_until: dict[str, float] = {}
        self.skew: dict[str, tuple[float, float]] = {}  # device → (until, seconds ahead)

    def _truth(self, item: Planned) -> TruthRow:
        device = self.devices[item.device_id]
        start = self.t0 + item.at
        row_id = len(self.result.truth)
        if item.is_fault:
            expect = FAULTS[item.what]
            rules = [expect.split(":", 1)[1]] if expect.startswith("rule:") else []
            end = start + (item.duration_s or 0.0)
            row = TruthRow(row_id, "fault", item.what, device.id, device.kind, device.site, 0, start, end, rules,
                           [], "warning" if rules else None, bool(rules), expect=expect,
                           count=item.spec.count if item.what not in ("connection_drop", "clock_skew", "flood") else 1)
            if item.what == "connection_drop":  # the device's offline clears when it is back
                row.allowed = ["offline"]
        else:
            model = self.models[item.device_id]
            happening = model.begin(item.what, start, item.duration_s, item.port)
            expected = model.expect(happening, self.speed or math.inf)
            allowed = list(expected.allowed) + [r for r in model.ANOMALY_RULES
                                                if r not in expected.rules and r not in expected.allowed]
            row = TruthRow(row_id, "event", item.what, device.id, device.kind, device.site, item.port,
                           expected.start, expected.end, list(expected.rules), allowed,
                           expected.severity, expected.incident)
        self._truth_by_plan[item.index] = row
        return row

    # -- running ---------------------------------------------------------------------------------------
    def run(self, host: str, port: int, *, username: str | None = None, password: str | None = None,
            tls_context: ssl.SSLContext | None = None, stop: threading.Event | None = None,
            on_progress: Callable[[RunResult, float], None] | None = None,
            on_event: Callable[[TruthRow], None] | None = None) -> RunResult:
        stop = stop or threading.Event()
        self.on_event = on_event
        publisher = Publisher(host, port, username=username, password=password, tls_context=tls_context,
                              client_id=f"streetbrain-sim-{self.rng.randrange(1 << 30)}")
        result = self.result
        tracked = {row.device_id for row in result.truth}
        heap: list[tuple[float, int, str, Any]] = []
        order = 0
        for device_id, model in self.models.items():
            heap.append((model.next_at, order, "report", device_id))
            order += 1
        for item in self.planned:
            if item.is_fault:
                heap.append((self.t0 + item.at, order, "fault", item))
                order += 1
        heapq.heapify(heap)
        wall0 = time.time()
        budget_at, sent_in_budget = wall0, 0
        last_progress = 0.0
        dropped: dict[str, tuple[mqtt.Client, float]] = {}
        last_sent: dict[str, float] = {}  # device → wall time of its last report (see device_gap_s)
        try:
            while heap and not stop.is_set():
                t, _, what, item = heapq.heappop(heap)
                if t > self.t_end:
                    break
                if self.speed > 0:  # device time follows the wall clock, scaled
                    due = wall0 + (t - self.t0) / self.speed
                    while (wait := due - time.time()) > 0 and not stop.is_set():
                        time.sleep(min(wait, 0.1))
                if what == "report" and self.device_gap_s:
                    if (wait := last_sent.get(item, -math.inf) + self.device_gap_s - time.time()) > 0:
                        time.sleep(wait)
                    last_sent[item] = time.time()
                messages = self._messages(what, item, t, publisher, dropped, heap)
                for topic, payload, retain in messages:
                    if self.rate:
                        sent_in_budget += 1
                        if sent_in_budget > self.rate * 0.05:  # pace in 50 ms slices
                            budget_at += 0.05
                            sent_in_budget = 0
                            if (ahead := budget_at - time.time()) > 0:
                                time.sleep(ahead)
                            else:
                                budget_at = time.time()
                    publisher.send(topic, payload, retain)
                result.published += len(messages)
                if what == "report":
                    model = self.models[item]
                    if item in tracked:
                        result.published_at.setdefault((item, round(t, 3)), time.time())
                    model.schedule_next(t)
                    heapq.heappush(heap, (model.next_at, order, "report", item))
                    order += 1
                now = time.time()
                self._mark_walls(t, now)
                if on_progress is not None and now - last_progress >= 0.2:
                    last_progress = now
                    on_progress(result, (t - self.t0) / self.scenario.duration)
            result.stopped = stop.is_set()
            for device_id in list(dropped):  # back online at the end, and the retained status cleared
                self._reconnect(device_id, publisher, dropped)
            for device_id in {row.device_id for row in result.truth if row.what == "connection_drop"}:
                publisher.send(self.devices[device_id].status_topic, b"", True)
        finally:
            publisher.close()
        self._mark_walls(math.inf, time.time())
        result.wall_s = time.time() - wall0
        if on_progress is not None:
            on_progress(result, 1.0)
        return result

    def _mark_walls(self, t: float, now: float) -> None:
        """Note the wall time at which device time passed each row's start and end."""
        while self._pending and self._pending[-1][0] <= t:
            _, row, which = self._pending.pop()
            setattr(row, which, now)
            if which == "wall_start" and self.on_event is not None:
                self.on_event(row)

    def _messages(self, what: str, item: Any, t: float, publisher: Publisher,
                  dropped: dict[str, tuple[mqtt.Client, float]], heap: list[Any]) -> list[tuple[str, bytes, bool]]:
        if what == "reconnect":
            self._reconnect(item, publisher, dropped)
            return []
        if what == "fault":
            return self._fault(item, t, publisher, dropped, heap)
        device = self.devices[item]
        if self.silent_until.get(item, -math.inf) > t:
            self.models[item].readings(t)  # the device goes on living; nothing reaches the broker
            return []
        return [(device.telemetry_topic, self._payload(device, self.models[item].readings(t), t), False)]

    def _payload(self, device: DeviceSpec, readings: list[dict[str, Any]], t: float) -> bytes:
        until, ahead = self.skew.get(device.id, (0.0, 0.0))
        if t < until:
            for r in readings:
                r["ts"] = round(r["ts"] + ahead, 3)
        self.result.readings += len(readings)
        if len(readings) == 1 and device.kind != "ev_charger":
            return orjson.dumps(readings[0])
        return orjson.dumps({"readings": readings})

    def _reconnect(self, device_id: str, publisher: Publisher, dropped: dict[str, tuple[mqtt.Client, float]]) -> None:
        if device_id in dropped:
            dropped.pop(device_id)
            publisher.send(self.devices[device_id].status_topic, b"online", True)
            self.silent_until.pop(device_id, None)

    def _fault(self, item: Planned, t: float, publisher: Publisher, dropped: dict[str, tuple[mqtt.Client, float]],
               heap: list[Any]) -> list[tuple[str, bytes, bool]]:
        device = self.devices[item.device_id]
        model = self.models[item.device_id]
        spec, topic = item.spec, device.telemetry_topic
        self.result.faults_sent[item.what] += 1

        def body() -> dict[str, Any]:
            readings = model.readings(t)
            self.result.readings += 1
            return readings[0]

        out: list[tuple[str, bytes, bool]] = []
        if item.what == "connection_drop":
            dropped[device.id] = (publisher.drop_connection(device), t)
            self.silent_until[device.id] = t + (spec.duration or 600.0)
            heapq.heappush(heap, (t + (spec.duration or 600.0), -1, "reconnect", device.id))
            return out
        if item.what == "clock_skew":
            self.skew[device.id] = (t + (spec.duration or 600.0), spec.skew_s)
            return out
        for _ in range(spec.count):
            reading = body()
            if item.what == "malformed_json":
                out.append((topic, orjson.dumps(reading)[:-7], False))
            elif item.what == "wrong_type":
                field_name = next(k for k, v in reading.items() if isinstance(v, float) and k != "ts")
                out.append((topic, orjson.dumps({**reading, field_name: str(reading[field_name])}), False))
            elif item.what == "missing_field":
                out.append((topic, orjson.dumps({k: v for k, v in reading.items() if k != "ts"}), False))
            elif item.what == "non_finite":
                text = orjson.dumps(reading).decode()
                out.append((topic, text.replace('"seq":', '"nan_field":NaN,"seq":', 1).encode(), False))
            elif item.what == "oversized":
                out.append((topic, orjson.dumps({**reading, "note": "x" * 100_000}), False))
            elif item.what == "future_ts":
                # a day ahead of the receiver's clock as well as of device time: a scenario replays
                # the past, and a day after yesterday's device time can be now
                ahead = max(reading["ts"], time.time()) + 86400
                out.append((topic, orjson.dumps({**reading, "ts": round(ahead, 3)}), False))
            elif item.what == "late":  # a reading from three hours ago, sent after a current one
                out.append((topic, self._payload(device, [reading], t), False))
                out.append((topic, orjson.dumps({**body(), "ts": round(t - 3 * 3600, 3)}), False))
            elif item.what == "device_mismatch":
                other = next((d for d in self.devices if d != device.id), "someone-else")
                out.append((topic, orjson.dumps({**reading, "device_id": other}), False))
            elif item.what == "unknown_device":
                stranger = f"sim-unknown-{self.rng.randrange(10**6):06d}"
                out.append((f"streetbrain/{device.site}/{device.kind}/{stranger}/telemetry",
                            orjson.dumps(reading), False))
            elif item.what == "duplicate":  # a QoS 1 redelivery: the very same bytes twice
                payload = self._payload(device, [reading], t)
                out += [(topic, payload, False), (topic, payload, False)]
            elif item.what == "out_of_order":  # two readings, the newer one first
                later = body()
                later["ts"] = round(t + 1.0, 3)
                out.append((topic, self._payload(device, [later], t), False))
                out.append((topic, self._payload(device, [reading], t), False))
            elif item.what == "flood":
                out.append((topic, self._payload(device, [reading], t), False))
        return out
