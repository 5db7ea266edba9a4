"""A first simulated street: every registered device reporting plausible readings, with an injected
event (a fire, a modified charger, leakage, a night party, an overheating meter box) now and then.

Values follow the figures in ../shared/MISSION.md: chargers draw 120-180 W (fast ones ~400 W),
clean air reads well under 1 %/m obscuration, noise sits a few dB under its GB 3096 limit.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Sequence

import aiomqtt
import orjson

from gateway import topics
from gateway.config import Device

SHANGHAI = timezone(timedelta(hours=8))
# GB 3096-2008 LAeq limits, dB(A): (day 06-22, night 22-06) by zone class
ZONE_LIMITS_DB = {"0": (50, 40), "1": (55, 45), "2": (60, 50), "3": (65, 55), "4a": (70, 55), "4b": (70, 60)}


@dataclass
class Event:
    name: str
    device: Device
    port: int
    started: float
    ends: float

    def describe(self) -> str:
        where = f"{self.device.id}" + (f" port {self.port}" if self.port else "")
        return f"{self.name} on {where} ({self.device.name or self.device.kind}) for {self.ends - self.started:.0f} s"


EVENTS: dict[str, tuple[str, float]] = {
    # name: (kind, seconds it lasts); long enough for the default rules' debounce to see it
    "kitchen fire": ("smoke", 45.0),
    "overloaded port": ("ev_charger", 40.0),  # an electric tricycle on a bicycle port
    "modified charger": ("ev_charger", 420.0),  # > 450 W for over 5 minutes
    "charger leakage": ("ev_charger", 40.0),
    "party at the square": ("noise", 900.0),  # the rolling LAeq needs minutes over the limit
    "meter box overheating": ("meter", 60.0),
}


class Street:
    """Readings for every device of a registry, one round at a time."""

    def __init__(self, devices: Sequence[Device], seed: int = 1, event_every_s: float = 20.0):
        self.devices = list(devices)
        self.rng = random.Random(seed)
        self.event_every_s = event_every_s
        self.events: list[Event] = []
        self.next_event_at: float | None = None
        self.battery = {d.id: self.rng.uniform(40, 100) for d in self.devices if d.kind == "smoke"}
        # room temperature drifts slowly; the sensor adds a tenth of a degree of noise
        self.room_c = {d.id: self.rng.uniform(18, 26) for d in self.devices if d.kind in ("smoke", "meter")}
        self.sessions = {(d.id, p): self._new_session() for d in self.devices if d.kind == "ev_charger"
                         for p in range(1, (d.ports or 1) + 1)}
        self.seq: dict[tuple[str, int], int] = {}  # per series, as a device counts its messages

    def _new_session(self) -> float:
        r = self.rng.random()
        return 0.0 if r < 0.55 else (self.rng.uniform(380, 420) if r > 0.92 else self.rng.uniform(120, 180))

    def maybe_inject(self, now: float) -> Event | None:
        if self.event_every_s <= 0:
            return None
        if self.next_event_at is None:
            self.next_event_at = now + self.event_every_s * 0.3
        if now < self.next_event_at:
            return None
        self.next_event_at = now + self.rng.expovariate(1 / self.event_every_s)
        name = self.rng.choice(list(EVENTS))
        kind, lasts = EVENTS[name]
        candidates = [d for d in self.devices if d.kind == kind]
        if not candidates:
            return None
        device = self.rng.choice(candidates)
        port = self.rng.randint(1, device.ports or 1) if kind == "ev_charger" else 0
        event = Event(name, device, port, now, now + lasts)
        self.events.append(event)
        return event

    def active(self, device: Device, port: int, now: float) -> str | None:
        self.events = [e for e in self.events if e.ends > now]
        return next((e.name for e in self.events if e.device.id == device.id and e.port == port), None)

    def readings(self, now: float) -> list[tuple[str, bytes]]:
        out = []
        for device in self.devices:
            ports = range(1, (device.ports or 1) + 1) if device.kind == "ev_charger" else (0,)
            for port in ports:
                body = self.reading(device, port, now)
                out.append((topics.telemetry(device.site, device.kind, device.id), orjson.dumps(body)))
        return out

    def _room(self, device_id: str) -> float:
        self.room_c[device_id] = min(30.0, max(14.0, self.room_c[device_id] + self.rng.gauss(0, 0.02)))
        return self.room_c[device_id] + self.rng.gauss(0, 0.1)

    def reading(self, device: Device, port: int, now: float) -> dict[str, Any]:
        rng, event = self.rng, self.active(device, port, now)
        seq = self.seq[(device.id, port)] = self.seq.get((device.id, port), 0) + 1
        body: dict[str, Any] = {"ts": round(now, 3), "seq": seq}
        if device.kind == "smoke":
            self.battery[device.id] = max(0.0, self.battery[device.id] - 0.0001)
            fire = event == "kitchen fire"
            body.update(alarm=fire, smoke_obscuration_pct_m=round(rng.uniform(4, 8) if fire else abs(rng.gauss(0.08, 0.04)), 3),
                        temp_c=round(rng.uniform(45, 52) if fire else self._room(device.id), 1),
                        co_ppm=round(rng.uniform(20, 40) if fire else abs(rng.gauss(1, 1)), 1),
                        battery_pct=round(self.battery[device.id], 1), tamper=False, fault=False)
        elif device.kind == "ev_charger":
            power = self.sessions[(device.id, port)]
            if event == "modified charger":
                power = rng.uniform(560, 640)
            elif event == "overloaded port":
                power = rng.uniform(1100, 1250)
            else:
                power = max(0.0, power + rng.gauss(0, 3)) if power else 0.0
            voltage = rng.gauss(220, 2)
            body.update(port=port, power_w=round(power, 1), voltage_v=round(voltage, 1),
                        current_a=round(power / voltage, 3),
                        leakage_ma=round(rng.uniform(40, 60) if event == "charger leakage" else rng.uniform(0.5, 4), 1),
                        socket_temp_c=round(rng.gauss(38 if power > 300 else 30, 1.5), 1))
        elif device.kind == "noise":
            local = datetime.fromtimestamp(now, SHANGHAI)
            day, night = ZONE_LIMITS_DB[device.zone_class or "2"]
            limit = day if 6 <= local.hour < 22 else night
            laeq = limit - 6 + rng.gauss(0, 2.0)
            if event == "party at the square":
                laeq = max(laeq, 78 + rng.gauss(0, 1.5))
            body.update(laeq_db=round(laeq, 1), lmax_db=round(laeq + rng.uniform(6, 14), 1),
                        lmin_db=round(laeq - rng.uniform(5, 9), 1), interval_s=60)
        elif device.kind == "meter":
            hot = event == "meter box overheating"
            body.update(current_a=round(abs(rng.gauss(12, 4)), 2), voltage_v=round(rng.gauss(220, 2), 1),
                        leakage_ma=round(rng.uniform(1, 8), 1),
                        temp_c=round(rng.uniform(72, 78) if hot else self._room(device.id) + 8, 1))
        if any(isinstance(v, float) and not math.isfinite(v) for v in body.values()):
            raise AssertionError(f"simulator produced a non-finite value: {body}")
        return body


async def run_street(street: Street, host: str, port: int, *, interval_s: float, stop: asyncio.Event,
                     duration_s: float | None = None, clock: Callable[[], float] | None = None,
                     on_event: Callable[[Event], None] | None = None,
                     on_round: Callable[[int], None] | None = None,
                     username: str | None = None, password: str | None = None,
                     tls_context: Any = None) -> int:
    """Publish one round of readings every ``interval_s`` until ``stop`` (or ``duration_s``).

    Returns the number of messages published.
    """
    loop = asyncio.get_running_loop()
    clock = clock or time.time
    deadline = loop.time() + duration_s if duration_s else math.inf
    sent = 0
    async with aiomqtt.Client(host, port, identifier=f"streetbrain-sim-{street.rng.randint(0, 1 << 30)}",
                              username=username, password=password, tls_context=tls_context,
                              max_queued_outgoing_messages=0) as client:
        while not stop.is_set() and loop.time() < deadline:
            started = loop.time()
            now = clock()
            event = street.maybe_inject(now)
            if event is not None and on_event is not None:
                on_event(event)
            messages = street.readings(now)
            for i in range(0, len(messages), 500):
                await asyncio.gather(*(client.publish(t, p, qos=1) for t, p in messages[i:i + 500]))
            sent += len(messages)
            if on_round is not None:
                on_round(sent)
            try:
                await asyncio.wait_for(stop.wait(), max(0.0, interval_s - (loop.time() - started)))
            except TimeoutError:
                pass
    return sent
