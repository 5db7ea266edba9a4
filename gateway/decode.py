"""Decode and validate raw MQTT messages into readings, or dead letters that say why.

Nothing a device sends can raise out of here: every message ends either as accepted readings or as
a dead letter with a reason code (counted per kind and reason) and a detail a person can act on. A
batch with some bad readings keeps its good ones.
"""

from __future__ import annotations

import base64
import json
import typing
from dataclasses import dataclass, field
from functools import cache
from operator import attrgetter
from typing import Annotated, Any

import annotated_types
import msgspec
import numpy as np
import orjson
from pydantic import ValidationError
from pydantic.fields import FieldInfo

from gateway import topics
from gateway.config import Config, Device
from gateway.registry import Registry
from gateway.schemas import EPOCH_FLOOR, READING_MODELS, Reading

MAX_PROBLEMS_LISTED = 20
_UNPARSED = object()  # JSON `null` is a document too; failure needs its own marker
DEADLETTER_PAYLOAD_BYTES = 4096


@dataclass(slots=True)
class DeadLetter:
    """One rejected message, or the rejected readings of one batch message."""

    topic: str
    site: str
    kind: str
    device_id: str
    payload: bytes
    problems: list[tuple[int | None, str, str]] = field(default_factory=list)  # (index, reason, detail)
    rejected: int = 0
    accepted: int = 0

    @property
    def reason(self) -> str:
        return self.problems[0][1]

    @property
    def detail(self) -> str:
        return self.problems[0][2]

    def add(self, index: int | None, reason: str, detail: str) -> None:
        self.rejected += 1
        if len(self.problems) < MAX_PROBLEMS_LISTED:
            self.problems.append((index, reason, detail))

    def to_json(self, gateway_time: float) -> bytes:
        body: dict[str, Any] = {
            "reason": self.reason,
            "detail": self.detail,
            "problems": [{"index": i, "reason": r, "detail": d} for i, r, d in self.problems],
            "rejected": self.rejected,
            "accepted": self.accepted,
            "topic": self.topic,
            "site": self.site,
            "kind": self.kind,
            "device_id": self.device_id,
            "gateway_time": gateway_time,
            "payload_bytes": len(self.payload),
        }
        shown = self.payload[:DEADLETTER_PAYLOAD_BYTES]
        try:
            body["payload"] = shown.decode("utf-8")
        except UnicodeDecodeError:
            body["payload_b64"] = base64.b64encode(shown).decode("ascii")
        body["payload_truncated"] = len(self.payload) > DEADLETTER_PAYLOAD_BYTES
        return orjson.dumps(body)

    @property
    def deadletter_topic(self) -> str:
        return topics.deadletter(self.site, self.kind, self.device_id)


@dataclass(slots=True)
class StatusUpdate:
    kind: str
    device_id: str
    online: bool


@dataclass
class Decoded:
    """What one batch of raw messages turned into."""

    readings: dict[str, list[tuple[int, Reading]]] = field(default_factory=dict)  # kind → (row, reading)
    columns: dict[str, list[ReadingColumns]] = field(default_factory=dict)  # kind → plain batch messages
    statuses: list[StatusUpdate] = field(default_factory=list)
    deadletters: list[DeadLetter] = field(default_factory=list)
    registered: list[Device] = field(default_factory=list)
    throttled: dict[str, int] = field(default_factory=dict)  # kind → messages dropped over a device's rate
    floods_started: list[Device] = field(default_factory=list)
    batches_here: int = 0  # plain batches decoded by this thread…
    batches_ahead: int = 0  # …and by the decode-ahead worker (gateway/ahead.py)


class RateLimiter:
    """A token bucket per device: ``rate`` messages a second on average, ``burst`` at once. What a
    flooding device sends beyond that is dropped before it is parsed, so it cannot hold up the rest
    of the street; the flood itself becomes an alert (see the pipeline)."""

    def __init__(self, rate_per_s: float, burst: int):
        self.rate = rate_per_s
        self.burst = float(burst)
        # device → (tokens, last refill): a tuple of floats, which the garbage collector stops tracking
        # (a list per device of a city was walked by every full collection)
        self.buckets: dict[str, tuple[float, float]] = {}
        self.floods: dict[str, list[float]] = {}  # device → [started, last drop, dropped]
        self.extra, self.granted_at, self.extra_until = 0.0, 0.0, 0.0  # the grant for a backlog (see grant)

    def grant(self, away_s: float, now: float) -> None:
        """The gateway was away ``away_s`` seconds and the broker queued what the devices sent meanwhile:
        it comes now all at once, but it was sent at the devices' own pace. Each device may send the
        tokens it would have earned meanwhile (``rate`` × ``away_s``) beyond its burst, for as long as
        it was away: a backlog drains far faster than it built up, or the gateway never catches up.
        Before, a charging point's ten ports reporting every 5 s filled the burst of 100 in under a
        minute away, and the rest of their backlog was dropped and the device flagged as flooding.
        A device that flooded while the gateway was away is still cut off beyond what it earned, and
        over the time away and the grant's together none gets more than the rate allows on average.
        At start (the time away from the snapshot), and when the broker connection is back (the time
        it was down: the broker queued for us, or devices kept what they could not send through it)."""
        if self.rate > 0 and away_s > 0:
            self.extra, self.granted_at, self.extra_until = self.rate * away_s, now, now + away_s

    def allow(self, device_id: str, now: float) -> bool:
        if self.rate <= 0:
            return True
        if now < self.extra_until:  # a backlog's grant: tokens beyond the burst are spent, not topped up
            bucket = self.buckets.get(device_id)
            if bucket is None:
                tokens, last = self.burst + self.extra, now
            else:
                tokens, last = bucket
                if last < self.granted_at:  # its first message since the grant: the grant on top
                    tokens, last = min(self.burst, tokens + (now - last) * self.rate) + self.extra, now
            tokens = min(max(self.burst, tokens), tokens + (now - last) * self.rate)
        else:
            tokens, last = self.buckets.get(device_id, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
        allowed = tokens >= 1.0
        self.buckets[device_id] = (tokens - 1.0 if allowed else tokens, now)
        return allowed

    def dropped(self, device_id: str, now: float) -> bool:
        """Record a drop; True when it starts a flood episode."""
        flood = self.floods.get(device_id)
        if flood is None:
            self.floods[device_id] = [now, now, 1]
            return True
        flood[1], flood[2] = now, flood[2] + 1
        return False

    def calmed(self, now: float, quiet_s: float) -> list[tuple[str, float, int]]:
        """Floods with no drop for ``quiet_s``: (device, started, dropped), forgotten as they are returned."""
        over = [(d, f[0], int(f[2])) for d, f in self.floods.items() if now - f[1] >= quiet_s]
        for device_id, _, _ in over:
            del self.floods[device_id]
        return over


_TYPES = (float, int, bool, str)
MAX_EXACT_INT = 2**53  # an int that a float holds exactly: beyond, pydantic decides
_FLOAT_MAX = 1.7976931348623157e308  # an absent bound still refuses the infinities


class FastReading:
    """The plain case of one kind's :class:`Reading`, checked without pydantic.

    A reading whose keys are all known fields and whose values have exactly the strict types and lie
    within the ranges of the model is built straight into a model instance, the same object
    ``model_validate`` returns, in about a third of its time. Anything else — an unknown field, an
    RFC 3339 ``ts``, a wrong type, a value out of range, a huge integer — returns None and goes to
    pydantic, which accepts it or says exactly what is wrong. The checks are read from the model's own
    field annotations, so the two cannot drift apart; a model with a validator or a constraint this
    does not know gets no fast path at all.
    """

    def __init__(self, model: type[Reading]):
        self.model = model
        # name → (type, lowest, highest, lowest excluded, highest excluded, None allowed)
        self.fields: dict[str, tuple[type, float, float, bool, bool, bool]] = {}
        self.required = frozenset(n for n, f in model.model_fields.items() if f.is_required() and n != "ts")
        # every field in the model's order; the required ones (ts, a port) are always overwritten
        self.template = {n: None if f.is_required() else f.default for n, f in model.model_fields.items()}
        validated = {name for d in model.__pydantic_decorators__.field_validators.values() for name in d.info.fields}
        self.enabled = validated <= {"ts"} and not model.__pydantic_decorators__.model_validators
        for name, info in model.model_fields.items():
            if name == "ts":
                continue
            check = self._check(info)
            if check is None:
                self.enabled = False
            else:
                self.fields[name] = check

    @staticmethod
    def _check(info: FieldInfo) -> tuple[type, float, float, bool, bool, bool] | None:
        annotation, metadata, nullable = info.annotation, list(info.metadata), False
        args = typing.get_args(annotation)
        if type(None) in args and typing.get_origin(annotation) is not Annotated:
            nullable = True
            rest = [a for a in args if a is not type(None)]
            if len(rest) != 1:
                return None
            annotation = rest[0]
        if typing.get_origin(annotation) is Annotated:
            annotation, *extra = typing.get_args(annotation)
            for item in extra:
                metadata += item.metadata if isinstance(item, FieldInfo) else [item]
        if annotation not in _TYPES:
            return None
        lo, hi, lo_open, hi_open = -_FLOAT_MAX, _FLOAT_MAX, False, False
        for item in metadata:
            if isinstance(item, annotated_types.Ge):
                lo = item.ge
            elif isinstance(item, annotated_types.Gt):
                lo, lo_open = item.gt, True
            elif isinstance(item, annotated_types.Le):
                hi = item.le
            elif isinstance(item, annotated_types.Lt):
                hi, hi_open = item.lt, True
            else:
                return None  # a constraint this does not know: leave the field to pydantic
        return annotation, lo, hi, lo_open, hi_open, nullable  # type: ignore[return-value]

    def __call__(self, item: dict[str, Any]) -> Reading | None:
        if not self.enabled:
            return None
        ts = item.get("ts")
        if type(ts) is int and -MAX_EXACT_INT < ts < MAX_EXACT_INT:  # type: ignore[operator]
            ts = float(ts)  # type: ignore[arg-type]
        elif type(ts) is not float:
            return None
        if not EPOCH_FLOOR <= ts <= 1e11:  # type: ignore[operator]
            return None  # before 2000 or in milliseconds: pydantic says which
        values = self.template.copy()
        fields = self.fields
        for name, value in item.items():
            check = fields.get(name)
            if check is None:
                if name == "ts":
                    continue
                return None  # an unknown field: kept as an extra by pydantic
            wanted, lo, hi, lo_open, hi_open, nullable = check
            kind = type(value)
            if kind is not wanted:
                if value is None and nullable:
                    values[name] = None
                    continue
                if wanted is float and kind is int and -MAX_EXACT_INT < value < MAX_EXACT_INT:
                    value = float(value)
                else:
                    return None
            if wanted is not bool and wanted is not str and (
                    not lo <= value <= hi or (lo_open and value == lo) or (hi_open and value == hi)):
                return None
            values[name] = value
        if self.required and not self.required <= item.keys():
            return None
        values["ts"] = ts
        return self.build(values, set(item))

    def build(self, values: dict[str, Any], given: set[str]) -> Reading:
        """The model instance of values already checked (every field of the model, in its order)."""
        reading = object.__new__(self.model)
        object.__setattr__(reading, "__dict__", values)
        object.__setattr__(reading, "__pydantic_fields_set__", given)
        object.__setattr__(reading, "__pydantic_extra__", {})
        object.__setattr__(reading, "__pydantic_private__", None)
        return reading


COLUMNS_FROM = 8  # a batch message of at least this many readings is decoded as columns


@cache
def fast_reading(kind: str) -> FastReading:
    return FastReading(READING_MODELS[kind])


@cache
def booleans(kind: str) -> frozenset[str]:
    """The kind's fields that are booleans (0.0/1.0 in the columns)."""
    return frozenset(n for n, check in fast_reading(kind).fields.items() if check[0] is bool)


@dataclass(slots=True)
class ReadingColumns:
    """The readings of one batch message as columns, without a Python object per reading: what
    :class:`FastReading` accepts reading by reading, checked field by field over the whole batch."""

    kind: str
    site: str
    device_id: str
    rows: np.ndarray  # int64: the series row of each reading
    ts: np.ndarray  # float64
    values: np.ndarray  # float64 (n, len(FIELDS)): NaN where a reading lacks the field, booleans 0.0/1.0
    seq: np.ndarray  # int64, -1 where a reading has none
    ports: np.ndarray  # int64, 0 for kinds without ports

    def __len__(self) -> int:
        return int(self.ts.shape[0])

    def reading(self, i: int) -> Reading:
        """Reading ``i`` as the model instance the per-reading path would have made (for storage, the
        dashboard, a dead letter): only built where one is asked for."""
        model = READING_MODELS[self.kind]
        values: dict[str, Any] = {name: None for name in model.model_fields}
        values["ts"] = float(self.ts[i])
        seq = int(self.seq[i])
        values["seq"] = seq if seq >= 0 else None
        if "port" in values:
            values["port"] = int(self.ports[i])
        flags = booleans(self.kind)
        for name, value in zip(model.FIELDS, self.values[i].tolist()):
            if value == value:  # not NaN
                values[name] = bool(value) if name in flags else value
        return fast_reading(self.kind).build(values, {n for n, v in values.items() if v is not None})


class TypedBatch:
    """The plain batch message of one kind, decoded from its bytes straight into checked columns.

    msgspec decodes the JSON into one small typed object per reading, checking as it parses what
    :class:`FastReading` checks reading by reading: known fields only, exact types (a boolean is not
    a number, ``3.0`` is not an integer), the model's ranges, ``ts`` as epoch seconds, the port
    present. The columns are then read attribute by attribute, with no Python object per reading
    left behind: more than twice as fast as the orjson dicts checked column by column that it replaced
    (docs/PERFORMANCE.md). Anything it refuses, for whatever reason, goes the way of every other
    message, reading by reading, which accepts it or says exactly what is wrong with each reading.
    The types are made from :class:`FastReading`'s field checks, so the two cannot drift apart.
    """

    def __init__(self, kind: str, fast: FastReading, max_readings: int):
        self.fields = fast.model.FIELDS
        self.has_port = "port" in fast.fields
        columns = {*self.fields, "seq", *(["port"] if self.has_port else [])}
        # a field that is neither a column nor the device's name would be accepted unread: no shortcut
        self.enabled = (fast.enabled and set(fast.fields) - {"device_id"} == columns
                        and all(fast.template[n] is None for n in columns - fast.required))
        spec: list[tuple[Any, ...]] = [("ts", Annotated[float, msgspec.Meta(ge=EPOCH_FLOOR, le=1e11)])]
        for name in sorted(columns) if self.enabled else ():
            wanted, lo, hi, lo_open, hi_open, nullable = fast.fields[name]
            bounds = {"gt" if lo_open else "ge": lo, "lt" if hi_open else "le": hi}
            if wanted is int:
                bounds = {k: int(v) for k, v in bounds.items() if abs(v) != _FLOAT_MAX}
            annotation = wanted if wanted is bool else Annotated[wanted, msgspec.Meta(**bounds)]
            # absent and null are the same (enabled only so); a reading naming its device goes one by one
            spec.append((name, annotation | None, None) if nullable else (name, annotation))
        spec.sort(key=lambda f: len(f) == 3)  # the required ones (ts, a port) first
        reading = msgspec.defstruct(f"{kind}_reading", spec, forbid_unknown_fields=True, gc=False)
        batch = msgspec.defstruct(f"{kind}_batch", [
            ("readings", Annotated[list[reading], msgspec.Meta(min_length=COLUMNS_FROM, max_length=max_readings)]),
            ("device_id", str | None, None)], gc=False)  # other keys of the batch are ignored, as by the dict path
        self.decoder = msgspec.json.Decoder(batch)
        self.getters = [attrgetter(name) for name in self.fields]

    def __call__(self, payload: bytes) -> tuple[str | None, tuple[np.ndarray, ...]] | None:
        """(the batch's device_id, (ts, values, seq, ports)), or None where this is no plain batch."""
        if not self.enabled:
            return None
        if not payload.isascii():
            try:  # msgspec does not check the encoding of what it skips (other keys of the batch)
                payload.decode("utf-8")
            except UnicodeDecodeError:
                return None
        try:
            batch = self.decoder.decode(payload)
        except (msgspec.DecodeError, RecursionError):  # deep nesting in a skipped key: the JSON path decides
            return None
        items = batch.readings
        n = len(items)
        ts = np.fromiter(map(attrgetter("ts"), items), np.float64, n)
        values = np.empty((n, len(self.fields)))
        for j, getter in enumerate(self.getters):  # None → NaN, booleans → 0.0/1.0
            values[:, j] = np.fromiter(map(getter, items), np.float64, n)
        try:
            seq = np.fromiter(map(attrgetter("seq"), items), np.int64, n)
        except TypeError:
            seq = np.array([-1 if v is None else v for v in map(attrgetter("seq"), items)], dtype=np.int64)
        ports = (np.fromiter(map(attrgetter("port"), items), np.int64, n) if self.has_port
                 else np.zeros(n, dtype=np.int64))
        return batch.device_id, (ts, values, seq, ports)


class _NonFinite(ValueError):
    pass


def _reject_constant(name: str) -> float:
    raise _NonFinite(name)


def _pydantic_reason(error: dict[str, Any]) -> str:
    kind = error["type"]
    if kind == "missing":
        return "missing_field"
    if kind == "finite_number":
        return "non_finite"
    if kind.endswith("_type") or kind.endswith("_parsing"):
        return "wrong_type"
    if kind.startswith(("greater_than", "less_than")):
        return "out_of_range"
    if error["loc"][:1] == ("ts",):
        return "bad_timestamp"
    return "invalid"


def _pydantic_detail(exc: ValidationError) -> str:
    parts = []
    for e in exc.errors()[:5]:
        where = ".".join(str(p) for p in e["loc"]) or "reading"
        shown = ""
        if "input" in e and not isinstance(e["input"], dict):
            shown = f" (got {e['input']!r:.40})"
        parts.append(f"{where}: {e['msg']}{shown}")
    return "; ".join(parts)


class Decoder:
    """Turns raw (topic, payload) pairs into validated readings routed to their series rows."""

    def __init__(self, config: Config, registry: Registry):
        self.config = config
        self.registry = registry
        self.limits = config.ingest
        self.site_ids = {s.id for s in config.sites}
        self.limiter = RateLimiter(config.ingest.device_rate_per_s, config.ingest.device_burst)
        self.fast = {kind: fast_reading(kind) for kind in READING_MODELS}
        self.typed = {kind: TypedBatch(kind, fast, config.ingest.max_readings_per_message)
                      for kind, fast in self.fast.items()}
        self.with_port = {kind for kind, model in READING_MODELS.items() if "port" in model.model_fields}

    def decode(self, messages: list[tuple[str, bytes]], now: float, ahead: list[Any] | None = None) -> Decoded:
        """``ahead``: per message, what the decode-ahead worker made of it as a batch (None: nothing)."""
        out = Decoded()
        for at, (topic, payload) in enumerate(messages):
            try:
                self._decode_one(topic, payload, now, out, ahead[at] if ahead is not None else None)
            except Exception as exc:  # a decoder bug must cost one message, never the gateway
                letter = DeadLetter(topic, topics.UNKNOWN, topics.UNKNOWN, topics.UNKNOWN, payload)
                letter.add(None, "internal_error", f"{type(exc).__name__}: {exc}")
                out.deadletters.append(letter)
        return out

    def _decode_one(self, topic: str, payload: bytes, now: float, out: Decoded, ahead: Any = None) -> None:
        parsed = topics.parse_device_topic(topic)
        if parsed is None:
            letter = DeadLetter(topic, topics.UNKNOWN, topics.UNKNOWN, topics.UNKNOWN, payload)
            letter.add(None, "bad_topic", "expected streetbrain/{site}/{kind}/{device_id}/telemetry or …/status")
            out.deadletters.append(letter)
            return
        site, kind, device_id, channel = parsed
        letter = DeadLetter(topic, site, kind, device_id, payload)

        model = READING_MODELS.get(kind)
        if model is None:
            letter.add(None, "unknown_kind", f"kind {kind!r} is not one of {', '.join(READING_MODELS)}")
            out.deadletters.append(letter)
            return
        device = self._device(site, kind, device_id, letter, out)
        if device is None:
            out.deadletters.append(letter)
            return
        if not self.limiter.allow(device_id, now):
            out.throttled[kind] = out.throttled.get(kind, 0) + 1
            if self.limiter.dropped(device_id, now):  # one dead letter per flood, not one per message
                letter.add(None, "rate_limited",
                           f"device {device_id} sends more than {self.limits.device_rate_per_s:g} messages/s "
                           f"(burst {self.limits.device_burst}); what it sends beyond is dropped and counted")
                out.deadletters.append(letter)
                out.floods_started.append(device)
            return

        if channel == "status":
            self._status(kind, device_id, payload, letter, out)
            return

        if len(payload) > self.limits.max_payload_bytes:
            letter.add(None, "oversized", f"{len(payload)} bytes is over the {self.limits.max_payload_bytes}-byte limit")
            out.deadletters.append(letter)
            return
        if b'"readings"' in payload:  # tried as a plain batch before it is parsed to dicts
            if ahead is None:
                typed = self.typed[kind](payload)
                out.batches_here += 1
            else:  # the same decoder's answer, from the worker: columns, or "refused"
                typed = ahead if isinstance(ahead, tuple) else None
                out.batches_ahead += 1
            if typed is not None and typed[0] in (None, device_id) and self._chunk(
                    site, kind, device_id, typed[1], now, out):
                return
        document = self._parse_json(payload, letter)
        if document is _UNPARSED:
            out.deadletters.append(letter)
            return

        if not isinstance(document, dict):
            letter.add(None, "not_object", f"payload is a JSON {type(document).__name__}, expected an object")
            out.deadletters.append(letter)
            return
        if "readings" in document:
            items = document["readings"]
            if not isinstance(items, list) or not items:
                letter.add(None, "bad_batch", '"readings" must be a non-empty list of reading objects')
                out.deadletters.append(letter)
                return
            if len(items) > self.limits.max_readings_per_message:
                letter.add(None, "too_many_readings",
                           f"{len(items)} readings is over the limit of {self.limits.max_readings_per_message}")
                out.deadletters.append(letter)
                return
            batch_device = document.get("device_id")
            if batch_device is not None and batch_device != device_id:
                letter.add(None, "device_mismatch", f"batch device_id {batch_device!r:.40} ≠ topic device {device_id!r}")
                out.deadletters.append(letter)
                return
            indexed: list[tuple[int | None, Any]] = list(enumerate(items))
        else:
            indexed = [(None, document)]

        accepted = out.readings.setdefault(kind, [])
        max_ts = now + self.limits.max_future_s
        fast = self.fast[kind]
        has_port = kind in self.with_port
        for index, item in indexed:
            if not isinstance(item, dict):
                letter.add(index, "not_object", f"reading is a JSON {type(item).__name__}, expected an object")
                continue
            reading = fast(item)
            if reading is None:
                try:
                    reading = model.model_validate(item)
                except ValidationError as exc:
                    letter.add(index, _pydantic_reason(exc.errors()[0]), _pydantic_detail(exc))
                    continue
            if reading.device_id is not None and reading.device_id != device_id:
                letter.add(index, "device_mismatch",
                           f"payload device_id {reading.device_id!r:.40} ≠ topic device {device_id!r}")
                continue
            if reading.ts > max_ts:
                letter.add(index, "future_ts",
                           f"ts is {reading.ts - now:.0f} s ahead of the gateway clock "
                           f"(allowed {self.limits.max_future_s:.0f} s): check the device clock")
                continue
            port = reading.port if has_port else 0  # type: ignore[attr-defined]
            row = self.registry.row(kind, device_id, port)
            if row is None:
                letter.add(index, "bad_port", f"charging point {device_id} has no port {port} "
                                              f"(it has {device.ports or 0})")
                continue
            accepted.append((row, reading))
            letter.accepted += 1
        if letter.rejected:
            out.deadletters.append(letter)

    def _chunk(self, site: str, kind: str, device_id: str, columns: tuple[np.ndarray, ...], now: float,
               out: Decoded) -> bool:
        """Checked columns that are current and of known ports, as one column chunk; False (and
        nothing done) otherwise."""
        ts, values, seq, ports = columns
        if float(ts.max()) > now + self.limits.max_future_s:
            return False
        if kind in self.with_port:
            distinct = np.unique(ports)
            found = [self.registry.row(kind, device_id, port) for port in distinct.tolist()]
            if None in found:
                return False
            rows = np.array(found, dtype=np.int64)[np.searchsorted(distinct, ports)]
        else:
            row = self.registry.row(kind, device_id, 0)
            if row is None:
                return False
            rows = np.full(ts.shape[0], row, dtype=np.int64)
        out.columns.setdefault(kind, []).append(ReadingColumns(kind, site, device_id, rows, ts, values, seq, ports))
        return True

    def _device(self, site: str, kind: str, device_id: str, letter: DeadLetter, out: Decoded) -> Device | None:
        device = self.registry.devices.get(device_id)
        if device is None:
            if not self.limits.auto_register:
                letter.add(None, "unknown_device", f"device {device_id!r:.70} is not in the registry "
                                                    "(register it, or set ingest.auto_register)")
                return None
            if site not in self.site_ids:
                letter.add(None, "unknown_site", f"site {site!r:.40} is not configured; cannot auto-register")
                return None
            device = self._auto_register(site, kind, device_id, letter)
            if device is None:
                return None
            out.registered.append(device)
            return device
        if device.kind != kind:
            letter.add(None, "kind_mismatch", f"device {device_id} is registered as {device.kind}, not {kind}")
            return None
        if device.site != site:
            letter.add(None, "site_mismatch", f"device {device_id} is registered at site {device.site}, not {site}")
            return None
        return device

    def _auto_register(self, site: str, kind: str, device_id: str, letter: DeadLetter) -> Device | None:
        home = self.config.site(site)
        assert home is not None
        extra: dict[str, Any] = {}
        if kind == "ev_charger":
            extra = {"ports": 16, "rated_power_w": 1000.0}
        if kind == "noise":
            extra = {"zone_class": "2"}  # mixed area: the middle of GB 3096's classes until surveyed
        try:
            device = Device(id=device_id, kind=kind, site=site, lat=home.lat, lon=home.lon,
                            tags=["auto_registered"], **extra)
        except ValidationError as exc:
            letter.add(None, "bad_device_id", _pydantic_detail(exc))
            return None
        self.registry.register(device)
        return device

    def _parse_json(self, payload: bytes, letter: DeadLetter) -> Any:
        try:
            return orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            first_error = str(exc)
        # Cold path: tell NaN/Infinity (valid to some device firmwares, not to JSON) from garbage.
        try:
            # stdlib reads what orjson refuses but is still well-formed JSON (integers beyond 64
            # bits, numbers beyond float range); validation then says what is wrong with them.
            return json.loads(payload, parse_constant=_reject_constant)
        except _NonFinite as exc:
            letter.add(None, "non_finite", f"payload holds {exc} (NaN and infinities are not numbers)")
            return _UNPARSED
        except (ValueError, RecursionError):
            pass
        try:
            payload.decode("utf-8")
        except UnicodeDecodeError as exc:
            letter.add(None, "bad_encoding", f"payload is not UTF-8 ({exc.reason} at byte {exc.start})")
            return _UNPARSED
        letter.add(None, "bad_json", f"payload is not JSON: {first_error}")
        return _UNPARSED

    def _status(self, kind: str, device_id: str, payload: bytes, letter: DeadLetter, out: Decoded) -> None:
        text = payload[:64].strip().lower()
        if text.startswith(b"{"):
            try:
                text = str(orjson.loads(payload).get("state", "")).encode().lower()
            except (orjson.JSONDecodeError, AttributeError):
                text = b""
        if text in (b"online", b"offline"):
            out.statuses.append(StatusUpdate(kind, device_id, text == b"online"))
        elif text == b"":
            pass  # an empty retained message clears the retained status; nothing to record
        else:
            letter.add(None, "bad_status", 'status payload must be "online" or "offline"')
            out.deadletters.append(letter)
