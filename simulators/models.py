"""Device models: what a smoke detector, a charging point, a noise monitoring point and a meter box
report, in quiet times and while something happens to them.

Each model keeps its own physical state and produces readings in the payload contract of
../shared/DESIGN.md for a device time it is given; nothing here reads a clock. Events (a fire, a
modified charger, a night party…) change what a device reports for a while, and each model says what
the gateway *should* make of an event it can produce (``expect``): the rules that must fire, the
rules that may fire without being false, the severity, and whether an incident should open. That
expectation is written from the physics (a party is loud; whether it is over the limit depends on
the zone and the hour), never from the gateway's configuration.

Figures, from ../shared/MISSION.md and the standards it cites:
- smoke: clean air well under 0.2 %/m; EN 14604 domestic alarms trip at a few %/m (we draw each
  detector's own alarm point from 3.5–4.5 %/m) or, with a heat element, at ~58 °C (EN 54-5 A1);
  smouldering test fires (EN 54-9 TF2/TF3) darken the chamber over minutes with much CO, flaming
  ones (TF1/TF4/TF5) in tens of seconds with a steep temperature rise.
- e-bike charging: chargers draw 120–180 W, fast lithium ones ~400 W; a charge runs constant current,
  then tapers at constant voltage, then stops; > 450 W sustained is a modified charger; a failing
  battery's power turns upward again after the taper, its socket heating (seeds 000, 001).
- noise: GB 3096-2008 LAeq limits by zone class, day 06–22, night 22–06 (Asia/Shanghai).
- meter boxes of old compounds: 40 A breakers; 30 mA is the residual-current trip level.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any, ClassVar

DAY_S = 86400.0
SHANGHAI_OFFSET_S = 8 * 3600
# GB 3096-2008 Table 1, LAeq dB(A): (day 06-22, night 22-06) by zone class
ZONE_LIMITS_DB = {"0": (50, 40), "1": (55, 45), "2": (60, 50), "3": (65, 55), "4a": (70, 55), "4b": (70, 60)}
NIGHT_LMAX_OVER_DB = 15  # GB 3096: sudden noise at night may exceed the limit by at most 15 dB(A)


def local_hour(t: float) -> float:
    """Hour of the day in Asia/Shanghai (no daylight saving there), 0 <= h < 24."""
    return ((t + SHANGHAI_OFFSET_S) % DAY_S) / 3600.0


def is_night(t: float) -> bool:
    hour = local_hour(t)
    return hour >= 22 or hour < 6


@dataclass(frozen=True)
class DeviceSpec:
    """A device as the simulator knows it: the registry's fixed attributes (../shared/DESIGN.md)."""

    id: str
    kind: str
    site: str
    name: str = ""
    zone_class: str | None = None
    ports: int | None = None
    rated_power_w: float | None = None
    tags: tuple[str, ...] = ()

    @property
    def telemetry_topic(self) -> str:
        return f"streetbrain/{self.site}/{self.kind}/{self.id}/telemetry"

    @property
    def status_topic(self) -> str:
        return f"streetbrain/{self.site}/{self.kind}/{self.id}/status"


@dataclass
class Happening:
    """An event under way on one device (and port): its type, device-time span and drawn figures."""

    name: str
    start: float
    end: float
    port: int = 0
    figures: dict[str, float] = field(default_factory=dict)

    def covers(self, t: float) -> bool:
        return self.start <= t < self.end


@dataclass(frozen=True)
class Expectation:
    """What the gateway should make of one event: the ground truth's row, minus the bookkeeping."""

    rules: tuple[str, ...]       # each must fire (raised) on this device during the event
    allowed: tuple[str, ...]     # may fire without counting as false
    severity: str | None         # the highest severity the expected rules should reach
    incident: bool               # an incident should open
    start: float                 # device time the anomaly begins (may be later than the event's start)
    end: float


NOTHING = ()


class Model:
    """One device. ``interval_s`` is its reporting period in quiet times, ``active_interval_s`` while
    an event is under way (detectors report on change)."""

    kind: ClassVar[str]
    EVENTS: ClassVar[dict[str, tuple[float, float]]] = {}  # event: (default duration s, minimum s)
    # the kind's anomaly-score rules (config.yaml): any scripted event makes the device unlike its own
    # history, so they may fire during one without counting as false; never required
    ANOMALY_RULES: ClassVar[tuple[str, ...]] = ()
    interval_s: float = 60.0
    active_interval_s: float = 60.0

    def __init__(self, spec: DeviceSpec, rng: random.Random, t0: float):
        self.spec, self.rng = spec, rng
        self.happenings: list[Happening] = []
        self.seq = 0
        self.next_at = t0 + rng.uniform(0, self.interval_s)  # reports spread over the period

    # -- events --------------------------------------------------------------------------------------
    def begin(self, name: str, start: float, duration_s: float, port: int = 0) -> Happening:
        if name not in self.EVENTS:
            raise ValueError(f"{self.kind} devices have no event {name!r} (they have: {', '.join(self.EVENTS)})")
        happening = Happening(name, start, start + duration_s, port, self.figures(name))
        self.happenings.append(happening)
        self.next_at = min(self.next_at, start)  # a detector reports what happens at once
        return happening

    def figures(self, name: str) -> dict[str, float]:
        return {}

    def active(self, t: float, port: int = 0) -> Happening | None:
        for h in self.happenings:
            if h.covers(t) and h.port == port:
                return h
        return None

    def busy(self, t: float) -> bool:
        return any(h.start <= t < h.end + 60 for h in self.happenings)

    def due(self, t: float) -> bool:
        return t >= self.next_at

    def schedule_next(self, t: float) -> None:
        period = self.active_interval_s if self.busy(t) else self.interval_s
        self.next_at = t + period
        upcoming = [h.start for h in self.happenings if h.start > t]
        if upcoming:  # an event starting before the next heartbeat is reported from its start
            self.next_at = min(self.next_at, min(upcoming))

    def expect(self, happening: Happening, speed: float) -> Expectation:
        raise NotImplementedError

    # -- readings ------------------------------------------------------------------------------------
    def readings(self, t: float) -> list[dict[str, Any]]:
        """The readings of one report at device time ``t`` (one per port for a charging point)."""
        self.happenings = [h for h in self.happenings if h.end + 3600 > t]
        self.seq += 1
        return [{"ts": round(t, 3), "seq": self.seq, **self.values(t)}]

    def values(self, t: float) -> dict[str, Any]:
        raise NotImplementedError

    def _ambient_c(self, t: float, base: float) -> float:
        """Indoor temperature: a degree and a half of daily swing peaking mid-afternoon."""
        return base + 1.5 * math.sin(2 * math.pi * (local_hour(t) - 9) / 24)


class SmokeDetector(Model):
    kind = "smoke"
    ANOMALY_RULES = ("chamber_anomaly",)
    EVENTS = {
        "smouldering_fire": (900, 420), "flaming_fire": (300, 180), "cooking": (180, 60),
        "hushed_alarm": (120, 60), "tamper": (600, 60), "fault": (600, 60), "self_test": (20, 10),
        "low_battery": (3600, 60),
    }
    active_interval_s = 10.0

    def __init__(self, spec: DeviceSpec, rng: random.Random, t0: float, heartbeat_s: float = 14400.0):
        self.interval_s = heartbeat_s
        super().__init__(spec, rng, t0)
        self.baseline_pct_m = rng.uniform(0.03, 0.12)
        self.room_c = rng.uniform(18, 25)
        self.co_ppm = rng.uniform(0, 2)
        self.battery_pct = rng.uniform(30, 100)
        self.drain_pct_s = rng.uniform(0.01, 0.04) / DAY_S
        self.alarm_at_pct_m = rng.uniform(3.5, 4.5)  # this detector's own alarm point
        self.alarm = False
        self.last_t = t0

    def figures(self, name: str) -> dict[str, float]:
        u = self.rng.uniform
        return {
            "smouldering_fire": {"obscuration_per_min": u(0.8, 2.0), "heat_per_min": u(0.2, 0.5), "co_per_min": u(20, 60)},
            "flaming_fire": {"obscuration_per_min": u(5, 10), "heat_per_min": u(15, 30), "co_per_min": u(5, 15)},
            "cooking": {"peak_pct_m": u(1.0, 2.4), "rise_s": 20.0, "decay_s": 30.0},
            "hushed_alarm": {"peak_pct_m": u(4.8, 6.0), "hush_after_s": u(10, 20)},
            "low_battery": {"battery_pct": u(3, 12)},
        }.get(name, {})

    def expect(self, h: Happening, speed: float) -> Expectation:
        return {
            # obscuration first (the pre-alarm), the detector's own alarm as the chamber fills
            "smouldering_fire": Expectation(("smoke_obscuration", "smoke_alarm"),
                                            ("carbon_monoxide", "heat_static", "heat_rate_of_rise", "chamber_drift"),
                                            "critical", True, h.start, h.end),
            "flaming_fire": Expectation(("smoke_alarm", "heat_static", "heat_rate_of_rise"),
                                        ("smoke_obscuration", "carbon_monoxide", "chamber_drift"), "critical", True,
                                        h.start, h.end),
            # a stir-fry darkens the chamber for seconds: nothing should reach the command centre
            "cooking": Expectation(NOTHING, NOTHING, None, False, h.start, h.end),
            # the detector did sound, and the centre must call the resident even though it was hushed
            "hushed_alarm": Expectation(("smoke_alarm",), ("smoke_obscuration", "chamber_drift"), "critical", True,
                                        h.start, h.end),
            "tamper": Expectation(("tamper",), NOTHING, "warning", True, h.start, h.end),
            "fault": Expectation(("fault",), NOTHING, "major", True, h.start, h.end),
            "self_test": Expectation(NOTHING, NOTHING, None, False, h.start, h.end),
            "low_battery": Expectation(("low_battery",), NOTHING, "warning", True, h.start, h.end),
        }[h.name]

    def values(self, t: float) -> dict[str, Any]:
        rng = self.rng
        self.battery_pct = max(0.0, self.battery_pct - self.drain_pct_s * max(0.0, t - self.last_t))
        self.last_t = t
        obscuration = max(0.0, self.baseline_pct_m + rng.gauss(0, 0.015))
        temp_c = self._ambient_c(t, self.room_c) + rng.gauss(0, 0.1)
        co_ppm = abs(rng.gauss(self.co_ppm, 0.5))
        battery, tamper, fault, test, hushed = self.battery_pct, False, False, False, False
        h = self.active(t)
        if h is not None:
            minutes, f = (t - h.start) / 60, h.figures
            if h.name in ("smouldering_fire", "flaming_fire"):
                obscuration += f["obscuration_per_min"] * minutes
                temp_c = min(120.0, temp_c + f["heat_per_min"] * minutes)
                co_ppm = min(2000.0, co_ppm + f["co_per_min"] * minutes)
            elif h.name in ("cooking", "hushed_alarm"):
                rise_s = f.get("rise_s", 10.0)
                elapsed = t - h.start
                shape = elapsed / rise_s if elapsed < rise_s else math.exp(-(elapsed - rise_s) / f.get("decay_s", 40.0))
                obscuration += f["peak_pct_m"] * shape
                temp_c += 1.5
                hushed = h.name == "hushed_alarm" and elapsed >= f["hush_after_s"]
            elif h.name == "tamper":
                tamper = True
            elif h.name == "fault":
                fault = True
            elif h.name == "self_test":
                test = True  # the device reports its test; it is not a fire
            elif h.name == "low_battery":
                battery = min(battery, f["battery_pct"])
        obscuration = min(obscuration, 100.0)
        # the detector's own alarm latches until the chamber clears below 70 % of its alarm point
        if obscuration >= self.alarm_at_pct_m or temp_c >= 58:
            self.alarm = True
        elif obscuration < 0.7 * self.alarm_at_pct_m and temp_c < 50:
            self.alarm = False
        return {"alarm": self.alarm and not hushed and not fault, "smoke_obscuration_pct_m": round(obscuration, 3),
                "temp_c": round(temp_c, 1), "co_ppm": round(co_ppm, 1), "battery_pct": round(battery, 1),
                "tamper": tamper, "fault": fault, "test": test}


@dataclass
class Charge:
    """One charging session on one port: constant current, then a constant-voltage taper, then the
    charger cuts off (below ``stop_w``)."""

    started: float
    cc_w: float
    cc_s: float
    taper_s: float
    stop_w: float = 8.0

    def power_w(self, t: float) -> float:
        elapsed = t - self.started
        if elapsed < self.cc_s:  # power creeps up ~5 % as the pack voltage rises under constant current
            return self.cc_w * (1 + 0.05 * elapsed / self.cc_s)
        return self.cc_w * 1.05 * math.exp(-(elapsed - self.cc_s) / self.taper_s)


class ChargingPoint(Model):
    """An e-bike charging point; one report carries every port (a ``{"readings": [...]}`` batch)."""

    kind = "ev_charger"
    ANOMALY_RULES = ("supply_voltage_anomaly",)
    EVENTS = {
        "modified_charger": (900, 420), "thermal_runaway": (1800, 1500), "leakage": (300, 60),
        "overload": (180, 60), "endless_session": (32400, 600), "port_offline": (1800, 300),
    }
    interval_s = 30.0
    active_interval_s = 30.0
    RUNAWAY_ONSET_S = 960.0  # thermal runaway: charge (8 min), taper (8 min), then power turns upward
    NEW_CHARGE = ("modified_charger", "overload", "endless_session", "thermal_runaway")  # a new plug-in

    def __init__(self, spec: DeviceSpec, rng: random.Random, t0: float, offline_after_s: float = 600.0,
                 check_interval_s: float = 5.0):
        super().__init__(spec, rng, t0)
        self.ports = spec.ports or 1
        self.offline_after_s, self.check_interval_s = offline_after_s, check_interval_s
        self.charges: dict[int, Charge | None] = {}
        self.energy_wh = {p: rng.uniform(0, 5e5) for p in range(1, self.ports + 1)}
        self.last_t = t0
        for port in range(1, self.ports + 1):  # about half the ports are charging when the run starts
            self.charges[port] = self._new_charge(t0 - rng.uniform(0, 4 * 3600)) if rng.random() < 0.45 else None
        self.port_seq = {p: 0 for p in range(1, self.ports + 1)}

    def _new_charge(self, started: float) -> Charge:
        rng = self.rng
        cc_w = rng.uniform(380, 420) if rng.random() < 0.15 else rng.uniform(120, 180)
        return Charge(started, cc_w, rng.uniform(1.5, 4) * 3600, rng.uniform(20, 40) * 60)

    def figures(self, name: str) -> dict[str, float]:
        u = self.rng.uniform
        return {
            "modified_charger": {"power_w": u(520, 700)},
            "thermal_runaway": {"cc_w": u(140, 180), "rise_w_per_min": u(8, 15), "heat_per_min": u(1.0, 2.0)},
            "leakage": {"leakage_ma": u(35, 70)},
            "overload": {"power_w": u(1100, 1300)},
            "endless_session": {"power_w": u(20, 40)},
        }.get(name, {})

    def expect(self, h: Happening, speed: float) -> Expectation:
        if h.name == "thermal_runaway":
            return Expectation(("thermal_runaway",), ("socket_overheat",), "major", True,
                               h.start + self.RUNAWAY_ONSET_S, h.end)
        if h.name == "endless_session":  # 8 hours of current, plus the last reports' slack
            long_enough = h.end - h.start >= 8 * 3600 + 2 * self.interval_s
            return Expectation(("session_too_long",) if long_enough else NOTHING, ("session_too_long",),
                               "warning" if long_enough else None, long_enough, h.start, h.end)
        if h.name == "port_offline":  # staleness runs on the gateway's clock: at speed X, a gap is X times shorter
            wall_s = (h.end - h.start) / speed
            seen = wall_s >= self.offline_after_s + self.check_interval_s + 2 * self.interval_s / speed
            return Expectation(("offline",) if seen else NOTHING, ("offline",), "warning" if seen else None, seen,
                               h.start, h.end)
        plugged = h.start + self.interval_s  # the first report of a new charge shows the old one unplugged
        return {
            "modified_charger": Expectation(("modified_charger",), NOTHING, "warning", True, plugged, h.end),
            "leakage": Expectation(("leakage_current",), NOTHING, "major", True, h.start, h.end),
            # power on the bare rating after the cut trips the port: the overload is critical at once
            "overload": Expectation(("port_overload",), ("socket_overheat", "modified_charger"), "critical", True,
                                    plugged, h.end),
        }[h.name]

    def readings(self, t: float) -> list[dict[str, Any]]:
        self.happenings = [h for h in self.happenings if h.end + 3600 > t]
        out = []
        elapsed = max(0.0, t - self.last_t)
        self.last_t = t
        for port in range(1, self.ports + 1):
            h = self.active(t, port)
            if h is not None and h.name == "port_offline":
                continue
            self.port_seq[port] += 1
            out.append({"ts": round(t, 3), "seq": self.port_seq[port], "port": port,
                        **self._port_values(t, port, h, elapsed)})
        return out

    def _port_values(self, t: float, port: int, h: Happening | None, elapsed_s: float) -> dict[str, Any]:
        rng = self.rng
        charge = self.charges[port]
        if charge is None:  # idle: plug-ins come more often in the evening
            hour = local_hour(t)
            mean_idle_s = 2 * 3600 if 18 <= hour < 23 else 8 * 3600
            if rng.random() < elapsed_s / mean_idle_s:
                charge = self.charges[port] = self._new_charge(t)
        power = charge.power_w(t) if charge is not None else 0.0
        if charge is not None and power < charge.stop_w:
            power, self.charges[port] = 0.0, None
        heat = 0.0
        leakage = rng.uniform(0.5, 4)
        if h is not None and h.name in self.NEW_CHARGE and t - h.start < self.interval_s:
            power, self.charges[port] = 0.0, None  # whatever was charging is unplugged for the newcomer
        elif h is not None:
            f = h.figures
            if h.name in ("modified_charger", "overload", "endless_session"):
                power = f["power_w"]
            elif h.name == "leakage":
                leakage = f["leakage_ma"]
            elif h.name == "thermal_runaway":
                runaway = Charge(h.start, f["cc_w"], 480.0, 300.0)
                power = runaway.power_w(t)
                past_onset_min = (t - h.start - self.RUNAWAY_ONSET_S) / 60
                if past_onset_min > 0:
                    power = runaway.power_w(h.start + self.RUNAWAY_ONSET_S) + f["rise_w_per_min"] * past_onset_min
                    heat = f["heat_per_min"] * past_onset_min
            if h.end - t <= self.interval_s and h.name in ("modified_charger", "endless_session", "thermal_runaway"):
                self.charges[port] = None  # unplugged when the event ends
        if power > 0:
            power = max(0.0, power * (1 + rng.gauss(0, 0.01)))
        voltage = rng.gauss(220, 2)
        self.energy_wh[port] += power * elapsed_s / 3600
        socket_c = self._ambient_c(t, 24) + power * 0.03 + heat + rng.gauss(0, 0.5)
        return {"power_w": round(power, 1), "voltage_v": round(voltage, 1), "current_a": round(power / voltage, 3),
                "energy_wh": round(self.energy_wh[port], 1), "leakage_ma": round(leakage, 1),
                "socket_temp_c": round(socket_c, 1)}


class NoisePoint(Model):
    """An automatic noise monitoring point reporting each minute's LAeq, Lmax and Lmin."""

    kind = "noise"
    ANOMALY_RULES = ("laeq_anomaly",)
    EVENTS = {
        "night_party": (3600, 900), "square_dancing": (3600, 900), "night_construction": (3600, 900),
        "motorbike": (60, 60), "sensor_stuck": (3600, 2400),
    }
    interval_s = 60.0
    active_interval_s = 60.0
    #: LAeq at the monitoring point while the event goes on, dB(A), and how far Lmax rises above it
    LEVELS = {"night_party": ((68, 76), (8, 14)), "square_dancing": ((66, 72), (5, 9)),
              "night_construction": ((70, 80), (10, 18))}

    def __init__(self, spec: DeviceSpec, rng: random.Random, t0: float):
        super().__init__(spec, rng, t0)
        self.day_limit, self.night_limit = ZONE_LIMITS_DB[spec.zone_class or "2"]
        # typical levels sit a few dB under the zone's limits (the street is mostly compliant)
        self.day_db = self.day_limit - rng.uniform(5, 8)
        self.night_db = self.night_limit - rng.uniform(5, 8)

    def limit_db(self, t: float) -> float:
        return self.night_limit if is_night(t) else self.day_limit

    def typical_db(self, t: float) -> float:
        """Traffic rises from 06:00 to 07:30 and falls from 20:00 to 21:30."""
        hour = local_hour(t)
        share = (min(1.0, max(0.0, (hour - 6) / 1.5)) if hour < 12 else min(1.0, max(0.0, (21.5 - hour) / 1.5)))
        return self.night_db + (self.day_db - self.night_db) * share

    def figures(self, name: str) -> dict[str, float]:
        if name in self.LEVELS:
            (low, high), (lmax_low, lmax_high) = self.LEVELS[name]
            return {"laeq_db": self.rng.uniform(low, high), "lmax_over_db": self.rng.uniform(lmax_low, lmax_high)}
        if name == "motorbike":
            return {"lmax_db": self.rng.uniform(85, 95)}
        return {}

    def expect(self, h: Happening, speed: float) -> Expectation:
        span = [h.start + i * 60.0 for i in range(int((h.end - h.start) // 60) + 1)]
        limits = [self.limit_db(t) for t in span]
        night_all = all(is_night(t) for t in span)
        night_any = any(is_night(t) for t in span)
        rules: list[str] = []
        allowed: list[str] = []
        if h.name in self.LEVELS:
            (low, high), (lmax_low, _) = self.LEVELS[h.name]
            level = h.figures["laeq_db"]
            # the 15-minute LAeq needs ~10 minutes over the limit and 5 more of debounce
            if level - 1.5 >= max(limits) + 2 and h.end - h.start >= 900:
                rules.append("laeq_over_limit")
            elif level + 1.5 > min(limits) - 3:
                allowed.append("laeq_over_limit")
            if night_all and level - 1.5 + lmax_low > self.night_limit + NIGHT_LMAX_OVER_DB + 2:
                rules.append("night_lmax")
            elif night_any:
                allowed.append("night_lmax")
        elif h.name == "motorbike":
            if night_all and h.figures["lmax_db"] > self.night_limit + NIGHT_LMAX_OVER_DB + 2:
                rules.append("night_lmax")
            elif night_any:
                allowed.append("night_lmax")
        elif h.name == "sensor_stuck":  # a 30-minute window of identical levels, then the debounce
            rules.append("sensor_stuck") if h.end - h.start >= 1800 + 600 else allowed.append("sensor_stuck")
        severity = "warning" if rules else None
        return Expectation(tuple(rules), tuple(allowed), severity, bool(rules), h.start, h.end)

    def values(self, t: float) -> dict[str, Any]:
        rng = self.rng
        laeq = self.typical_db(t) + rng.gauss(0, 1.2)
        if rng.random() < 0.1:
            laeq += rng.uniform(1, 3)  # a bus or a lorry in this minute
        lmax = laeq + rng.uniform(5, 11)
        lmin = laeq - rng.uniform(4, 9)
        h = self.active(t)
        if h is not None:
            f = h.figures
            if h.name in self.LEVELS:
                laeq = max(laeq, f["laeq_db"] + rng.gauss(0, 1.0))
                lmax = laeq + f["lmax_over_db"] + rng.uniform(-1, 1)
                lmin = laeq - rng.uniform(3, 6)
            elif h.name == "motorbike":
                lmax = f["lmax_db"]
                laeq += rng.uniform(1, 3)
            elif h.name == "sensor_stuck":
                if "laeq_db" not in f:
                    f["laeq_db"] = round(laeq, 1)
                laeq = lmax = lmin = f["laeq_db"]
        return {"laeq_db": round(laeq, 1), "lmax_db": round(lmax, 1), "lmin_db": round(min(lmin, laeq), 1),
                "interval_s": 60}


class MeterBox(Model):
    kind = "meter"
    EVENTS = {"leakage": (900, 120), "overheating": (1200, 600), "overload": (1200, 600)}
    interval_s = 300.0
    active_interval_s = 60.0

    def __init__(self, spec: DeviceSpec, rng: random.Random, t0: float):
        super().__init__(spec, rng, t0)
        self.base_a = rng.uniform(6, 11)
        self.box_c = rng.uniform(22, 28)

    def load_share(self, t: float) -> float:
        """Old compound households: low at night, a morning bump, the evening peak 18–22."""
        hour = local_hour(t)
        if 18 <= hour < 22:
            return 1.6
        if 6 <= hour < 9:
            return 1.2
        return 1.0 if 9 <= hour < 18 else 0.5

    def figures(self, name: str) -> dict[str, float]:
        u = self.rng.uniform
        return {"leakage": {"leakage_ma": u(35, 80)}, "overheating": {"temp_c": u(68, 80)},
                "overload": {"current_a": u(42, 50)}}[name]

    def expect(self, h: Happening, speed: float) -> Expectation:
        rule, severity = {"leakage": ("meter_leakage", "major"), "overheating": ("meter_overheat", "warning"),
                          "overload": ("meter_overload", "major")}[h.name]
        return Expectation((rule,), ("meter_overheat",) if h.name == "overload" else NOTHING, severity, True,
                           h.start, h.end)

    def values(self, t: float) -> dict[str, Any]:
        rng = self.rng
        current = max(0.0, self.base_a * self.load_share(t) + rng.gauss(0, 1.0))
        leakage = rng.uniform(1, 8)
        temp = self._ambient_c(t, self.box_c) + 0.25 * current + rng.gauss(0, 0.3)
        h = self.active(t)
        if h is not None:
            f = h.figures
            if h.name == "leakage":
                leakage = f["leakage_ma"]
            elif h.name == "overheating":  # heats up over five minutes and stays hot
                temp = max(temp, temp + (f["temp_c"] - temp) * min(1.0, (t - h.start) / 300))
            elif h.name == "overload":
                current = f["current_a"] + rng.gauss(0, 0.5)
                temp += 0.3 * (current - self.base_a)
        return {"current_a": round(current, 2), "voltage_v": round(rng.gauss(220, 2), 1),
                "leakage_ma": round(leakage, 1), "temp_c": round(temp, 1)}


MODELS: dict[str, type[Model]] = {m.kind: m for m in (SmokeDetector, ChargingPoint, NoisePoint, MeterBox)}
EVENT_KINDS: dict[str, list[str]] = {}
for _model in MODELS.values():
    for _event in _model.EVENTS:
        EVENT_KINDS.setdefault(_event, []).append(_model.kind)
