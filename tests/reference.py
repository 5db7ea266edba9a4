"""A plain, one-reading-at-a-time reference of the rule engine, for checking the vectorised core.

Written for clarity, not speed: dictionaries and loops, one reading after another in device-time
order per series, with the same contract as ``rules.engine.KindEngine`` (duplicates by seq or by
repeated newest device time, lateness, debounce by duration and count, hysteresis, schedules, tag
escalation, window aggregates, flapping).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from scipy.special import log_ndtr

from rules.model import Condition, ParamRef, Rule, parse_schedule

UTC_OFFSET_S = 8 * 3600


def in_schedule(ts: float, windows: list[tuple[int, int]] | None) -> bool:
    if not windows:
        return True
    local = (ts + UTC_OFFSET_S) % 86400
    return any((a <= local < b) if a < b else (local >= a or local < b) for a, b in windows)


def median(values: list[float]) -> float:
    ordered, n = sorted(values), len(values)
    return (ordered[(n - 1) // 2] + ordered[n // 2]) / 2


class PlainEwm:
    """A bias-corrected exponentially weighted mean, one reading at a time."""

    def __init__(self, alpha: float):
        self.alpha, self.raw = alpha, 0.0

    def corrected(self, raw: float, n: int) -> float:
        return raw / max(1.0 - (1.0 - self.alpha) ** n, 1e-300)

    def step(self, u: float, n: int) -> tuple[float, float]:
        """(mean after this reading, mean before it); ``n`` readings seen after it."""
        before = self.corrected(self.raw, n - 1)
        self.raw = self.alpha * u + (1.0 - self.alpha) * self.raw
        return self.corrected(self.raw, n), before


class PlainAnomaly:
    """The anomaly score of detectors/anomaly.py (without its seasonal view), reading by reading."""

    def __init__(self, warmup: int, medium: float = 0.05, short: float = 0.1, long: float = 0.01,
                 calibration: float = 0.0005, decay: float = 0.01, echo: float = 0.1, local: float | None = 0.9,
                 levels: int = 4, context: int = 4, context_weight: float = 2.5, drift: float = 0.0015,
                 drift_weight: float = 0.5, forget: float | None = 3.0, ordinary: float = 20.0,
                 memory: float = 20000.0):
        self.warmup, self.decay, self.echo, self.local = warmup, decay, echo, local
        self.forget, self.memory, self.ordinary = forget, memory, ordinary
        self.worst = 0.0
        self.levels, self.context, self.context_weight = levels, context, context_weight
        self.symbols: list[int] = []  # every symbol so far (the last ``context`` make a context)
        self.contexts: set[tuple[int, ...]] = set()
        self.lo = self.hi = 0.0
        self.novel = 0
        self.mean, self.spread = PlainEwm(medium), PlainEwm(medium)
        self.short_var, self.long_var = PlainEwm(short), PlainEwm(long)
        self.level, self.level_var = PlainEwm(long), PlainEwm(long)
        self.short_mean = PlainEwm(short)
        self.baseline, self.baseline_var = PlainEwm(drift), PlainEwm(drift)
        self.drift_weight = drift_weight
        self.short_share = short / (2.0 - short)
        self.calibration = {name: (PlainEwm(calibration), PlainEwm(calibration))
                            for name in ("spike", "vol", "shift", "drift")}
        self.count, self.origin, self.peak, self.record = 0, 0.0, 0.0, 0.0

    def step(self, v: float) -> float:
        if self.count == 0:
            self.origin = v
        x, n = v - self.origin, self.count + 1
        self.count = n
        _, mean_before = self.mean.step(x, n)
        error = x - mean_before if n > 1 else 0.0
        _, spread_before = self.spread.step(error * error, n)
        short_var, _ = self.short_var.step(error * error, n)
        _, long_var_before = self.long_var.step(error * error, n)
        level, level_before = self.level.step(x, n)
        _, level_var_before = self.level_var.step((x - level_before) ** 2, n)
        floor = (1e-9 + 1e-6 * abs(mean_before)) ** 2 + 0.1 ** 2 * level_var_before
        short_mean, _ = self.short_mean.step(x, n)
        baseline, baseline_before = self.baseline.step(x, n)
        _, baseline_var_before = self.baseline_var.step((x - baseline_before) ** 2, n)
        baseline_floor = (1e-9 + 1e-6 * abs(baseline_before)) ** 2
        # the gap between the two means for white noise: Σ (w_level − w_baseline)² over the n readings
        a, b = self.level.alpha, self.baseline.alpha
        weights = [(a * (1 - a) ** (n - i) / (1 - (1 - a) ** n), b * (1 - b) ** (n - i) / (1 - (1 - b) ** n))
                   for i in range(1, n + 1)] if n > 3 and b > 0 else []
        gap_share = max(sum((wa - wb) ** 2 for wa, wb in weights), 1e-12)
        judged = n > 3
        features = {"spike": abs(error) / math.sqrt(max(spread_before, floor)) if judged else 0.0,
                    "vol": abs(math.log((short_var + floor) / (long_var_before + floor))) if judged else 0.0,
                    "shift": abs(short_mean - level_before) / math.sqrt(max(level_var_before, floor) * self.short_share)
                    if judged else 0.0,
                    "drift": abs(level - baseline) / math.sqrt(max(baseline_var_before, baseline_floor) * gap_share)
                    if judged and b > 0 else 0.0}
        surprise = 0.0
        for name, feature in features.items():
            g = math.log1p(feature)
            g_mean, g_var = self.calibration[name]
            _, mean = g_mean.step(g, n)
            _, var = g_var.step((g - mean) ** 2, n)
            evidence = max(-float(log_ndtr(-(g - mean) / math.sqrt(max(var, 0.04)))) - math.log(2.0), 0.0)
            surprise += self.drift_weight * evidence if name == "drift" else evidence
        surprise += self.context_weight * self.novel_context(x, n)
        surprise = surprise if n > self.warmup else 0.0
        peak_before = max(self.peak - self.decay, 0.0)
        self.peak = max(peak_before, surprise)
        if self.forget is not None:  # the ordinary worst: capped, fading ``forget`` over an e-fold of age
            age = min(max(n - self.warmup, 1), self.memory)
            worst_before = max(self.worst - min(self.decay, self.forget / age), 0.0)
            self.worst = max(worst_before, min(surprise, self.ordinary))
            peak_before = max(peak_before, worst_before)
        # the echo counts only at a local record of surprise (beaten by more than rounding), or always
        local_record = self.local is None or surprise > self.record * (1 + 1e-9)
        self.record = max((self.local or 0.0) * self.record, surprise)
        novelty = max(surprise - peak_before, 0.0) + (self.echo * surprise if local_record else 0.0)
        return novelty / (novelty + 10.0)


    def novel_context(self, x: float, n: int) -> float:
        if n == 1:
            self.lo = self.hi = x
        span = self.hi - self.lo
        share = (x - self.lo) / span if span > 0 else 0.0
        self.symbols.append(min(max(math.floor(self.levels * share), 0), self.levels - 1))
        self.lo, self.hi = min(self.lo, x), max(self.hi, x)
        if n <= self.context:  # the first reading has no range: contexts of the readings after it
            return 0.0
        context = tuple(self.symbols[-self.context:])
        judged_before = n - 1 - self.context
        rate = (self.novel + 0.5) / (judged_before + 1.0)
        if context in self.contexts:
            return 0.0
        self.contexts.add(context)
        self.novel += 1
        return max(-math.log(rate) - math.log(2.0), 0.0)


class Transform:
    """Plain versions of the stateful transforms (rebound, EWMA z-score, CUSUM, anomaly) for one series."""

    def __init__(self, kind: str, alpha: float, k: float, warmup: int, sustain: bool = False):
        self.kind, self.alpha, self.k, self.warmup = kind, alpha, k, warmup
        self.peak = self.trough = None
        self.fall = 0.0
        self.mean = self.var = 0.0
        self.count = 0
        self.high = self.low = 0.0
        self.anomaly = PlainAnomaly(warmup, **({"local": None} if sustain else {})) if kind == "anomaly" else None

    def step(self, v: float) -> float:
        if self.anomaly is not None:
            return self.anomaly.step(v)
        if self.kind == "rebound":
            if v <= 0:
                self.peak = self.trough = None
                self.fall = 0.0
                return 0.0
            if self.peak is None:
                self.peak = self.trough = v
                self.fall = 0.0
                return 0.0
            if v < self.trough:
                self.trough, self.fall = v, self.peak - v
            self.peak = max(self.peak, v)
            return max(0.0, min(self.fall, v - self.trough))
        z = (v - self.mean) / math.sqrt(max(self.var, 1e-6)) if self.count >= self.warmup else math.nan
        weight = max(self.alpha, 1 / (self.count + 1))
        diff = v - self.mean
        self.mean += weight * diff
        self.var = (1 - weight) * (self.var + diff * weight * diff)
        self.count += 1
        if self.kind == "ewma_z" or math.isnan(z):
            return z if self.kind == "ewma_z" else math.nan
        self.high = max(0.0, self.high + z - self.k)
        self.low = max(0.0, self.low - z - self.k)
        return max(self.high, self.low)


def aggregate(name: str, points: list[tuple[float, float]], latest: float = math.nan) -> float:
    if not points:
        return math.nan
    values = [v for _, v in sorted(points)]
    n = len(values)
    if name == "leq":
        return 10 * math.log10(sum(10 ** (v / 10) for v in values) / n)
    if name == "mean":
        return sum(values) / n
    if name == "max":
        return max(values)
    if name == "min":
        return min(values)
    if name == "range":
        return max(values) - min(values)
    if name == "rise_per_min":
        if n < 2:
            return math.nan
        t0 = min(t for t, _ in points)
        xs = [(t - t0) / 60 for t, _ in sorted(points)]
        xm, ym = sum(xs) / n, sum(values) / n
        sxx = sum((x - xm) ** 2 for x in xs)
        return math.nan if sxx == 0 else sum((x - xm) * (y - ym) for x, y in zip(xs, values)) / sxx
    if name in ("p10", "p50", "p90"):
        q = {"p10": 0.10, "p50": 0.50, "p90": 0.90}[name] * (n - 1)
        ordered = sorted(values)
        low = math.floor(q)
        return ordered[low] + (ordered[min(low + 1, n - 1)] - ordered[low]) * (q - low)
    if name == "robust_z":
        m = median(values)
        mad = 1.4826 * median([abs(v - m) for v in values])
        return (latest - m) / max(mad, 1e-6)
    raise ValueError(name)


@dataclass
class SeriesState:
    level: int = 0
    announced: int = 0
    runs: list[list[float]] = field(default_factory=list)  # [start, count] per create condition, then clear
    bits: deque[int] = field(default_factory=deque)
    flapping: bool = False
    ring: deque[tuple[float, float]] = field(default_factory=deque)
    transform: Transform | None = None
    last_ts: float = -math.inf
    max_seq: int = -1
    seen_seqs: set[int] = field(default_factory=set)  # accepted seqs, within 64 of max_seq


class ReferenceRule:
    """One rule over several series, stepped one reading at a time."""

    def __init__(self, rule: Rule, n_series: int, params: Callable[[str, int, float], float],
                 bumps: list[int], lateness_s: float, window_samples: int):
        self.rule = rule
        self.params = params
        self.bumps = bumps
        self.lateness_s = lateness_s
        self.windows = parse_schedule(rule.schedule) if rule.schedule else None
        t = rule.transform
        self.series = [SeriesState(runs=[[math.nan, 0] for _ in range(len(rule.raise_.levels()) + 1)],
                                   ring=deque(maxlen=window_samples),
                                   transform=Transform(t.kind, t.alpha, t.k, t.warmup, t.sustain) if t else None)
                       for _ in range(n_series)]

    def threshold(self, condition: Condition, row: int, ts: float) -> float:
        t = condition.threshold
        if isinstance(t, ParamRef):
            return self.params(t.param, row, ts) * t.scale + t.offset
        return t

    def compare(self, value: float, threshold: float, op: str) -> bool:
        if math.isnan(value) or math.isnan(threshold):
            return False
        return {">": value > threshold, ">=": value >= threshold, "<": value < threshold,
                "<=": value <= threshold}[op]

    @staticmethod
    def run(state: list[float], holds: bool, ts: float, for_s: float, count: int) -> bool:
        if holds:
            state[0] = ts if math.isnan(state[0]) else min(state[0], ts)
            state[1] += 1
            return ts - state[0] >= for_s and state[1] >= count
        state[0], state[1] = math.nan, 0
        return False

    def feed(self, batch: list[tuple[int, float, float, int]]) -> list[tuple[int, str, int, float]]:
        """Readings (series, ts, value, seq) of one batch → events (series, event, level, ts)."""
        out: list[tuple[int, str, int, float]] = []
        indexed = sorted(enumerate(batch), key=lambda item: (item[1][0], item[1][1], item[0]))
        for _, (row, ts, value, seq) in indexed:
            s = self.series[row]
            replay = seq >= 0 and (seq in s.seen_seqs or s.max_seq - seq >= 64)
            if ts == s.last_ts or (ts <= s.last_ts and replay):
                continue  # duplicate
            if ts < s.last_ts - self.lateness_s:
                continue  # too late
            if seq >= 0:
                if ts > s.last_ts and seq <= s.max_seq:  # counter reset: start the window again
                    s.max_seq, s.seen_seqs = seq, {seq}
                else:
                    s.max_seq = max(s.max_seq, seq)
                    s.seen_seqs = {q for q in s.seen_seqs | {seq} if s.max_seq - q < 64}
            s.last_ts = max(s.last_ts, ts)
            out += self.step(row, ts, value)
        return out

    def step(self, row: int, ts: float, raw: float) -> list[tuple[int, str, int, float]]:
        rule, s = self.rule, self.series[row]
        if math.isnan(raw):
            return []
        if rule.window is not None:
            s.ring.append((ts, raw))
            inside = [(t, v) for t, v in s.ring if ts - rule.window.seconds < t <= ts]
            spanned = (max(t for t, _ in inside) - min(t for t, _ in inside)) if inside else 0.0
            enough = len(inside) >= rule.window.min_samples and spanned >= rule.window.min_span_s
            value = aggregate(rule.window.aggregate, inside, raw) if enough else math.nan
        elif s.transform is not None:
            value = s.transform.step(raw)
        else:
            value = raw
        active = in_schedule(ts, self.windows)
        if math.isnan(value) and active:
            return []
        worst = 0
        levels = rule.raise_.levels()
        for j, (severity, condition) in enumerate(levels):
            holds = active and self.compare(value, self.threshold(condition, row, ts), rule.op)
            if self.run(s.runs[j], holds, ts, condition.for_s, condition.count):
                worst = max(worst, int(severity))
        if rule.clear is not None:
            back = self.compare(value, self.threshold(rule.clear, row, ts), {">": "<", ">=": "<", "<": ">", "<=": ">"}[rule.op])
            cleared = self.run(s.runs[-1], back or not active, ts, rule.clear.for_s, rule.clear.count) or not active
        else:
            mildest = self.threshold(levels[0][1], row, ts)
            back = not math.isnan(value) and not self.compare(value, mildest, rule.op)
            cleared = self.run(s.runs[-1], back or not active, ts, 0.0, 1) or not active
        if worst:
            worst = min(4, worst + self.bumps[row])
        before = s.level
        s.level = worst if worst else (0 if cleared else s.level)
        events = []
        started = False
        if rule.flapping is not None:
            s.bits.append(int(s.level != before))
            while len(s.bits) > rule.flapping.history:
                s.bits.popleft()
            share = sum(s.bits) / rule.flapping.history
            if not s.flapping and share >= rule.flapping.high:
                s.flapping = started = True
                events.append((row, "flapping", max(s.announced, s.level) or 1, ts))
            elif s.flapping and share <= rule.flapping.low:
                s.flapping = False
        if not s.flapping and not started and s.level != s.announced:
            event = "raised" if s.announced == 0 else ("cleared" if s.level == 0 else "updated")
            events.append((row, event, s.level or s.announced, ts))
            s.announced = s.level
        return events
