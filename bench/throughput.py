"""Throughput and latency of the whole gateway, next to this machine's own receive ceiling (issue 9).

    .venv/bin/python -m bench.throughput            # about 4 minutes
    .venv/bin/python -m bench.throughput --quick    # about 2 minutes, shorter steps
    .venv/bin/python -m bench.throughput --only ceiling,1,100,memory

One Mosquitto from ``gateway/mosquitto.conf`` (the configuration ``streetbrain run`` writes) on a free
loopback port, anonymous. Devices are meter boxes of a generated registry (``--devices``), published
by ``--publishers`` processes that write pre-encoded MQTT 3.1.1 QoS 1 frames to their own socket and
count the broker's PUBACKs, so that publishing costs a few µs a message and is not the bottleneck
(a 100-reading batch is its cached body with the timestamps written in: ~7 µs instead of ~90).
Every publisher sends exactly the messages it planned, at the offered pace or as fast as the broker
takes them.

* **ceiling** — a bare paho-mqtt subscriber that only counts (QoS 1, its own process), and
  ``mosquitto_sub -q 1`` (C), each offered more than it can take: receive rate = messages ÷ (last −
  first received).
* **gateway** — ``streetbrain run`` (``python -m gateway.cli run``: validation, rate limits, detection,
  the incident queue on SQLite, alerts published, snapshots and acknowledgements) at offered loads that
  step up until it saturates, with 1, 10 and 100 readings per message (``{"readings": [...]}``). A
  step is *sustained* when every reading was accepted (the gateway's ``streetbrain_readings_valid``
  counter), none was rejected, every hot reading's alert arrived, and the gateway finished within
  ``--slack`` seconds of the publishers. 1% of messages carry one reading over ``meter_overheat``'s
  threshold (its alert is ``raised``; the device's next reading clears it); the reading's ``ts`` is
  the moment it was written to the socket, so publish → alert latency is the alert's arrival − its
  ``ts`` (one clock, one machine). CPU is the user + system time of the gateway process and its
  children (the decode-ahead worker) over the step; RSS the gateway process's peak (VmHWM) so far.
  A stopped gateway's persistent session is ended, so that the broker does not go on queueing the
  rest of the run's messages for it. ``--no-decode-ahead`` runs the gateway without its worker.
* **memory** — a fresh process builds a registry of 300,000 devices (smoke, meter, charging points,
  noise in the street's proportions), the pipeline with the shipped rule profiles, and steps one
  reading per device through decode and detection: RSS before and after.

The machine has 2 cores shared by broker, publishers, gateway and whatever else runs: figures move
from run to run; ratios against the paho subscriber measured in the same run are what to compare.
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing as mp
import os
import random
import re
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as paho
import yaml
from paho.mqtt.enums import CallbackAPIVersion
from rich.console import Console
from rich.table import Table

from bench.soak import start_gateway, write_config
from gateway import mqtt, topics
from gateway.broker import EmbeddedBroker, find_mosquitto, free_port

ROOT = Path(__file__).resolve().parent.parent
SITES = ("wangma", "dongxin", "xiangfu", "shiqiao", "zhaohui", "mishi")  # replaced by config.yaml's at start
HOT_FRACTION = 0.01
HOT_TEMP_C, NORMAL_TEMP_C = 65.0, 30.0  # meter_overheat: warning over 60 °C, clear under 55 °C
TICK_S = 0.002
CLK_TCK = os.sysconf("SC_CLK_TCK")
console = Console(width=220)


# -- MQTT 3.1.1 frames, written by hand so the load generator costs next to nothing ----------------
def _connect_frame(client_id: str) -> bytes:
    # clean session, keepalive 60 s
    return mqtt.packet(0x10, mqtt.string("MQTT") + b"\x04\x02\x00\x3c" + mqtt.string(client_id))


def _publish_frame(topic: bytes, payload: bytes, packet_id: int) -> bytes:
    return mqtt.packet(0x32, len(topic).to_bytes(2, "big") + topic + packet_id.to_bytes(2, "big") + payload)


def _reading(stamp: bytes, seq: int, hot: bool) -> bytes:
    return (b'{"ts":%s,"seq":%d,"temp_c":%.1f,"current_a":%.1f,"voltage_v":221.5,"leakage_ma":1.2}'
            % (stamp, seq, HOT_TEMP_C if hot else NORMAL_TEMP_C + seq % 7, 8.0 + seq % 11))


class _Batches:
    """``{"readings": [...]}`` payloads at ~7 µs for 100 readings instead of ~90 µs formatted reading by
    reading, so that the load generator does not take the CPU the gateway is measured on (2 cores).

    A message's body depends only on its first seq and whether its last reading is hot, so it is kept
    with a 15-byte mark where each reading's timestamp goes; the message's time (to 0.1 ms, 0.2–0.3 ms
    before now) replaces the mark, and each reading appends two digits, its place in the batch, in
    microseconds: readings 1 µs apart, the last (the hot one) at most 0.3 ms older than the write, so
    latency is overstated by that much, never understated."""

    MARK = b"T" * 15

    def __init__(self, per: int):
        if not 1 < per <= 100:
            raise ValueError("batches of 2 to 100 readings")
        self.per = per
        self.bodies: dict[tuple[int, bool], bytes] = {}

    def payload(self, now: float, seq: int, hot: bool) -> bytes:
        body = self.bodies.get((seq, hot))
        if body is None:
            if len(self.bodies) > 4096:
                self.bodies.clear()
            readings = [_reading(b"%s%02d" % (self.MARK, i), seq + i, hot and i == self.per - 1)
                        for i in range(self.per)]
            body = self.bodies[(seq, hot)] = b'{"readings":[' + b",".join(readings) + b"]}"
        stamp = b"%d.%04d" % divmod(int((now - 2e-4) * 1e4), 10000)
        assert len(stamp) == len(self.MARK)
        return body.replace(self.MARK, stamp)


@dataclass
class Plan:
    host: str
    port: int
    devices: list[tuple[str, str]]  # (site, device id) this publisher owns
    rate: float  # messages/s offered by this publisher
    messages: int
    per_message: int  # readings per message
    start_at: float
    seed: int
    hot: Any  # shared across steps, one flag per device of the whole bench: its last reading was hot
    first: int  # this publisher owns devices first, first + stride, …
    stride: int


def _publisher(plan: Plan, results: Any) -> None:
    """One load-generating process: paced QoS 1 publishes, every PUBACK counted."""
    rng = random.Random(plan.seed)
    sock = socket.create_connection((plan.host, plan.port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(_connect_frame(f"bench-pub-{plan.seed}-{os.getpid()}"))
    if sock.recv(4)[:1] != b"\x20":
        raise RuntimeError("broker refused the publisher")
    acked = [0]

    def count_acks() -> None:
        pending = b""
        while acked[0] < plan.messages:
            chunk = sock.recv(65536)
            if not chunk:
                return
            pending += chunk
            whole = len(pending) // 4  # a PUBACK is 4 bytes
            acked[0] += whole
            pending = pending[whole * 4:]

    reader = threading.Thread(target=count_acks, daemon=True)
    reader.start()
    topics_ = [topics.telemetry(site, "meter", device).encode() for site, device in plan.devices]
    seqs = [0] * len(topics_)
    hot = plan.hot
    n_dev, per = len(topics_), plan.per_message
    sent = hot_sent = 0
    batches = _Batches(per) if per > 1 else None
    time.sleep(max(0.0, plan.start_at - time.time()))
    t0 = time.time()
    while sent < plan.messages:
        due = min(plan.messages, int((time.time() - t0) * plan.rate) + 1)
        frames = []
        now = time.time()
        while sent < due:
            d = sent % n_dev
            # a device that was hot reads normal next, so every hot reading raises exactly one alert
            flag = plan.first + d * plan.stride
            make_hot = not hot[flag] and rng.random() < HOT_FRACTION
            hot[flag] = make_hot
            hot_sent += make_hot
            seq = seqs[d]
            seqs[d] = seq + per
            payload = (_reading(b"%.6f" % now, seq, make_hot) if per == 1
                       else batches.payload(now, seq, make_hot))  # type: ignore[union-attr]
            sent += 1
            frames.append(_publish_frame(topics_[d], payload, sent % 65535 + 1))
        if frames:
            sock.sendall(b"".join(frames))
        time.sleep(TICK_S)
    t_end = time.time()
    reader.join(30)
    sock.close()
    results.put({"sent": sent, "acked": acked[0], "hot": hot_sent, "t0": t0, "t_end": t_end})


def publish(host: str, port: int, devices: list[tuple[str, str]], rate: float, seconds: float, per_message: int,
            publishers: int, seed: int, hot: Any = None) -> dict[str, Any]:
    """Start the publishers; returns once they have all sent and been acknowledged."""
    ctx = mp.get_context("fork")
    hot = hot if hot is not None else ctx.RawArray("b", len(devices))
    results = ctx.Queue()
    total = max(publishers, int(rate * seconds))
    start_at = time.time() + 0.3
    procs = []
    for p in range(publishers):
        plan = Plan(host, port, devices[p::publishers], rate / publishers, total // publishers, per_message,
                    start_at, seed * 100 + p, hot, p, publishers)
        procs.append(ctx.Process(target=_publisher, args=(plan, results), daemon=True))
    for proc in procs:
        proc.start()
    parts = [results.get(timeout=seconds * 20 + 60) for _ in procs]
    for proc in procs:
        proc.join(10)
    return {"messages": sum(p["sent"] for p in parts), "acked": sum(p["acked"] for p in parts),
            "hot": sum(p["hot"] for p in parts), "t0": min(p["t0"] for p in parts),
            "t_end": max(p["t_end"] for p in parts), "readings": sum(p["sent"] for p in parts) * per_message}


# -- ceilings ----------------------------------------------------------------------------------------
def _counter(host: str, port: int, expected: int, ready: Any, results: Any) -> None:
    """A bare paho subscriber that only counts QoS 1 messages."""
    state = {"n": 0, "first": 0.0, "last": 0.0}

    def on_message(client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        now = time.time()
        if not state["n"]:
            state["first"] = now
        state["n"] += 1
        state["last"] = now

    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-count-{os.getpid()}", protocol=paho.MQTTv5)
    client.on_message = on_message
    client.on_subscribe = lambda *a: ready.set()
    client.on_connect = lambda c, *a: c.subscribe(topics.TELEMETRY_FILTER, qos=1)
    client.connect(host, port)
    client.loop_start()
    idle_since = time.time()
    seen = 0
    while state["n"] < expected and time.time() - idle_since < 5.0:
        time.sleep(0.05)
        if state["n"] != seen:
            seen, idle_since = state["n"], time.time()
    client.disconnect()
    client.loop_stop()
    cpu = os.times()
    results.put({"n": state["n"], "first": state["first"], "last": state["last"], "cpu": cpu.user + cpu.system})


@dataclass
class Row:
    subject: str
    per_message: int
    offered: float  # messages/s
    messages: int
    received: int  # messages (or readings / per_message) the subject took
    rate: float  # messages/s, first → last received
    sustained: bool
    lag_s: float | None = None  # last processed − last published
    cpu_us: float | None = None  # µs of the subject's CPU per message
    latency_ms: tuple[float, float, float] | None = None  # p50, p99, max
    alerts: tuple[int, int] | None = None  # (raised received, hot readings published)
    rss_mb: float | None = None
    note: str = ""
    rejected: int = 0


def paho_ceiling(host: str, port: int, devices: list[tuple[str, str]], args: argparse.Namespace) -> Row:
    ctx = mp.get_context("fork")
    ready, results = ctx.Event(), ctx.Queue()
    expected = int(args.ceiling_rate * args.ceiling_seconds)
    proc = ctx.Process(target=_counter, args=(host, port, expected, ready, results), daemon=True)
    proc.start()
    ready.wait(10)
    sent = publish(host, port, devices, args.ceiling_rate, args.ceiling_seconds, 1, args.publishers, seed=1)
    got = results.get(timeout=120)
    proc.join(10)
    rate = (got["n"] - 1) / max(1e-9, got["last"] - got["first"])
    return Row("bare paho subscriber (counts only)", 1, args.ceiling_rate, sent["messages"], got["n"], rate,
               got["n"] == sent["acked"] == sent["messages"], lag_s=got["last"] - sent["t_end"],
               cpu_us=got["cpu"] / max(1, got["n"]) * 1e6)


def mosquitto_sub_ceiling(host: str, port: int, devices: list[tuple[str, str]], args: argparse.Namespace) -> Row | None:
    binary = find_mosquitto()
    sub = Path(binary).with_name("mosquitto_sub") if binary else None
    found = next((str(p) for p in (sub, Path("/usr/bin/mosquitto_sub")) if p and p.exists()), None)
    if found is None:
        return None
    expected = int(args.ceiling_rate * args.ceiling_seconds) // args.publishers * args.publishers
    proc = subprocess.Popen([found, "-h", host, "-p", str(port), "-q", "1", "-t", topics.TELEMETRY_FILTER,
                             "-C", str(expected), "-F", "%l", "-i", f"bench-csub-{os.getpid()}"],
                            stdout=subprocess.PIPE)
    seen = {"lines": 0, "first": 0.0, "last": 0.0}

    def read() -> None:
        assert proc.stdout is not None
        while chunk := proc.stdout.read1(65536):
            if not seen["lines"]:
                seen["first"] = time.time()
            seen["lines"] += chunk.count(b"\n")
            seen["last"] = time.time()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    time.sleep(1.0)  # subscribed by then
    sent = publish(host, port, devices, args.ceiling_rate, args.ceiling_seconds, 1, args.publishers, seed=2)
    deadline, usage = time.time() + 60, None
    while time.time() < deadline and time.time() - max(seen["last"], sent["t_end"]) < 5:
        pid, _, usage = os.wait4(proc.pid, os.WNOHANG)  # its rusage: CPU time of mosquitto_sub
        if pid:
            break
        usage = None
        time.sleep(0.05)
    if usage is None:
        proc.terminate()
        _, _, usage = os.wait4(proc.pid, 0)
    proc.returncode = 0
    reader.join(5)
    n = seen["lines"]
    rate = (n - 1) / max(1e-9, seen["last"] - seen["first"])
    cpu = usage.ru_utime + usage.ru_stime
    return Row("mosquitto_sub (C, -q 1)", 1, args.ceiling_rate, sent["messages"], n, rate,
               n == sent["messages"], lag_s=seen["last"] - sent["t_end"],
               cpu_us=cpu / max(1, n) * 1e6)


# -- the gateway ---------------------------------------------------------------------------------------
def bench_registry(work: Path, count: int) -> tuple[Path, list[tuple[str, str]]]:
    """``count`` meter boxes spread over the street's sites, as a registry CSV."""
    sites = [s["id"] for s in yaml.safe_load((ROOT / "config.yaml").read_text(encoding="utf-8"))["sites"]]
    devices = [(sites[i % len(sites)], f"mtr-bench-{i:06d}") for i in range(count)]
    path = work / "registry.csv"
    lines = ["id,kind,site,lat,lon,name,address,zone_class,ports,rated_power_w,tags"]
    lines += [f"{d},meter,{s},30.31,120.17,,,,,," for s, d in devices]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path, devices


class GatewayProcess:
    """``streetbrain run`` in a process of its own, on the bench broker, read through /metrics and /proc."""

    def __init__(self, work: Path, broker_url: str, registry: Path, name: str, decode_ahead: bool = True,
                 ingest: dict[str, Any] | None = None):
        self.work = work / name
        self.work.mkdir(parents=True)
        path = write_config(self.work, broker_url)
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        self.api_port = free_port()
        self.broker_url = broker_url
        data["registry_file"] = str(registry)
        data["devices"] = []
        self.client_id = data["broker"]["client_id"] = f"gw-bench-{name}"
        data["api"]["listen"] = f"127.0.0.1:{self.api_port}"
        data["ingest"]["device_rate_per_s"] = 10  # the shipped limits stay on: part of the work measured
        data["ingest"]["decode_ahead"] = decode_ahead
        data["ingest"].update(ingest or {})
        path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
        self.log = self.work / "gateway.log"
        self.log.write_bytes(b"")
        self.process = start_gateway(path, self.log)
        if b"gateway ready" not in self.log.read_bytes():
            raise RuntimeError(f"the gateway did not start: see {self.log}")

    def counters(self) -> dict[str, float]:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.api_port}/metrics", timeout=10).read().decode()
        out: dict[str, float] = {"valid": 0.0, "rejected": 0.0, "received": 0.0}
        for line in text.splitlines():
            match = re.match(r"streetbrain_(readings_valid|rejects|messages_received)_total\{([^}]*)\} (\S+)", line)
            if match:
                key = {"readings_valid": "valid", "rejects": "rejected", "messages_received": "received"}[match[1]]
                out[key] += float(match[3])
        return out

    def cpu_s(self) -> float:
        """User + system CPU of the gateway and of its child processes (the decode-ahead worker)."""
        total, pids = 0, [self.process.pid]
        while pids:
            pid = pids.pop()
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                for task in Path(f"/proc/{pid}/task").iterdir():
                    pids += [int(c) for c in (task / "children").read_text().split()]
            except OSError:  # it ended meanwhile
                continue
            total += int(fields[11]) + int(fields[12])
        return total / CLK_TCK

    def rss_mb(self) -> float:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+)", status)[1]) / 1024

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        # End its persistent session: the broker would otherwise queue every later message of the
        # bench for it (up to max_queued_messages), a load on the broker that the next series would pay.
        host, port = self.broker_url.removeprefix("mqtt://").rsplit(":", 1)
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=paho.MQTTv5)
        connected = threading.Event()
        client.on_connect = lambda *_: connected.set()
        client.connect(host, int(port), clean_start=True)  # session expiry 0: gone at the disconnect
        client.loop_start()
        connected.wait(10)
        client.disconnect()
        client.loop_stop()


def alerts_client(host: str, port: int, client_id: str, rule: str, record: Any) -> paho.Client:
    """A paho client subscribed (QoS 1) to every alert: for each ``raised`` of ``rule``,
    ``record(device_id, publish → alert latency in s)`` in its network thread (the reading's ``ts`` is its
    publish time)."""

    def on_message(client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        now = time.time()
        body = orjson.loads(message.payload)
        if body.get("event") == "raised" and body.get("rule") == rule:
            record(body["device_id"], now - body["ts"])

    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
    client.on_message = on_message
    subscribed = threading.Event()
    client.on_subscribe = lambda *a: subscribed.set()
    client.connect(host, port)
    client.loop_start()
    client.subscribe(topics.ALERTS_FILTER, qos=1)
    if not subscribed.wait(5):
        raise RuntimeError("could not subscribe to the alerts")
    return client


class AlertWatch:
    """Subscribed to the alerts topic: publish → alert latency of every raised meter_overheat."""

    def __init__(self, host: str, port: int, devices: int):
        self.hot = mp.get_context("fork").RawArray("b", devices)  # which devices' alerts are raised now
        self.latencies: list[float] = []
        self.lock = threading.Lock()
        self.client = alerts_client(host, port, f"bench-alerts-{os.getpid()}", "meter_overheat", self._record)

    def _record(self, device_id: str, latency: float) -> None:
        with self.lock:
            self.latencies.append(latency)

    def take(self) -> list[float]:
        with self.lock:
            out, self.latencies = self.latencies, []
        return out

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _percentiles(values: list[float]) -> tuple[float, float, float] | None:
    if not values:
        return None
    ordered = sorted(values)
    p50, p99 = (ordered[min(len(ordered) - 1, int(q * len(ordered)))] for q in (0.50, 0.99))
    return p50 * 1000, p99 * 1000, ordered[-1] * 1000


def gateway_step(gateway: GatewayProcess, watch: AlertWatch, host: str, port: int, devices: list[tuple[str, str]],
                 rate: float, seconds: float, per_message: int, args: argparse.Namespace, seed: int) -> Row:
    before = gateway.counters()
    cpu_before = gateway.cpu_s()
    watch.take()
    sent = publish(host, port, devices, rate, seconds, per_message, args.publishers, seed, watch.hot)
    # wait until the gateway has taken every reading, or has stopped making progress
    done_at, last, last_change = time.time(), before["valid"], time.time()
    while True:
        now = gateway.counters()
        if now["valid"] != last:
            last, last_change = now["valid"], time.time()
        taken = now["valid"] + now["rejected"] - before["valid"] - before["rejected"]
        if taken >= sent["readings"] or time.time() - last_change > 5.0:
            done_at = last_change if taken < sent["readings"] else time.time()
            break
        time.sleep(0.1)
    deadline = time.time() + 3.0  # the last alerts are on their way
    while len(watch.latencies) < sent["hot"] and time.time() < deadline:
        time.sleep(0.05)
    after = gateway.counters()
    cpu = gateway.cpu_s() - cpu_before
    valid = int(after["valid"] - before["valid"])
    rejected = int(after["rejected"] - before["rejected"])
    latencies = watch.take()
    lag = done_at - sent["t_end"]
    messages = valid // per_message
    complete = valid == sent["readings"] and rejected == 0 and len(latencies) == sent["hot"]
    return Row("gateway", per_message, rate, sent["messages"], messages,
               messages / max(1e-9, done_at - sent["t0"]), complete and lag <= args.slack, lag_s=lag,
               cpu_us=cpu / max(1, sent["messages"]) * 1e6, latency_ms=_percentiles(latencies),
               alerts=(len(latencies), sent["hot"]), rss_mb=gateway.rss_mb(), rejected=rejected)


def gateway_series(work: Path, broker: EmbeddedBroker, registry: Path, devices: list[tuple[str, str]],
                   per_message: int, steps: list[float], args: argparse.Namespace) -> list[Row]:
    gateway = GatewayProcess(work, broker.url, registry, f"per{per_message}", not args.no_decode_ahead)
    watch = AlertWatch(broker.host, broker.port, len(devices))
    rows: list[Row] = []
    try:
        # warm up: every device heard from once, so the steps measure steady state
        gateway_step(gateway, watch, broker.host, broker.port, devices, min(steps[0], 5000), 2, per_message, args, 9)
        best: Row | None = None
        for i, rate in enumerate(steps):
            row = gateway_step(gateway, watch, broker.host, broker.port, devices, rate, args.seconds, per_message,
                               args, seed=10 + i)
            rows.append(row)
            console.print(f"  {_describe(row)}")
            if row.sustained:
                best = row
            else:
                break
        if best is not None and per_message == 1:
            # the first step at half the rate comes straight after the overload (the gateway still
            # digesting it: a heap at its peak, full collections); the second is the steady state
            for seed, note in ((50, "half the sustained rate, just after the overload"),
                               (51, "half the sustained rate, steady")):
                half = gateway_step(gateway, watch, broker.host, broker.port, devices, best.rate / 2, args.seconds,
                                    per_message, args, seed=seed)
                half.note = note
                rows.append(half)
                console.print(f"  {_describe(half)}")
    finally:
        watch.close()
        gateway.stop()
    return rows


def _describe(row: Row) -> str:
    lat = f"p50/p99/max {row.latency_ms[0]:.1f}/{row.latency_ms[1]:.1f}/{row.latency_ms[2]:.1f} ms" \
        if row.latency_ms else "no alerts"
    return (f"{row.subject} ×{row.per_message}: offered {row.offered:,.0f} msg/s → {row.rate:,.0f} msg/s, "
            f"{row.received:,}/{row.messages:,} msgs, lag {row.lag_s or 0:.2f} s, {lat}, "
            f"{'sustained' if row.sustained else 'NOT sustained'}")


# -- memory of a city's registry -------------------------------------------------------------------------
def _rss_mb() -> float:
    return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text())[1]) / 1024


def _city_memory(count: int, results: Any) -> None:
    from gateway.config import Device, load_config
    from gateway.pipeline import Pipeline
    from gateway.registry import Registry
    from gateway.recent import RecentReadings
    from gateway.service import recent_readings_depth

    config = load_config(ROOT / "config.yaml")
    config.ingest.device_rate_per_s = 0
    sites = [s.id for s in config.sites]
    base = _rss_mb()
    # the street's proportions: half smoke detectors, half meter boxes, 2% charging points (10 ports), noise
    chargers, noise = count // 100, count // 1000
    smoke = (count - chargers - noise) // 2
    kinds = ["ev_charger"] * chargers + ["noise"] * noise + ["smoke"] * smoke
    kinds += ["meter"] * (count - len(kinds))
    prefix = {"smoke": "smk", "meter": "mtr", "ev_charger": "chg", "noise": "nse"}
    extra = {"ev_charger": {"ports": 10, "rated_power_w": 800.0}, "noise": {"zone_class": "2"}}
    devices = [Device(id=f"{prefix[k]}-city-{i:06d}", kind=k, site=sites[i % len(sites)], lat=30.3, lon=120.2,
                      tags=["elderly_alone"] if k == "smoke" and i % 3 == 0 else [], **extra.get(k, {}))
               for i, k in enumerate(kinds)]
    registry = Registry(devices)
    registered = _rss_mb()
    pipeline = Pipeline(config, registry)
    now = time.time()
    body = {"smoke": b'{"ts":%.3f,"alarm":false,"smoke_obscuration_pct_m":0.05,"temp_c":22.5,"battery_pct":90}',
            "meter": b'{"ts":%.3f,"temp_c":31.0,"current_a":9.5,"voltage_v":221.0,"leakage_ma":1.0}',
            "noise": b'{"ts":%.3f,"laeq_db":52.0,"lmax_db":60.0,"lmin_db":45.0,"interval_s":60}',
            "ev_charger": b'{"ts":%.3f,"port":%d,"current_a":2.0,"voltage_v":220.0,"power_w":440.0}'}

    def chunks(ts: float) -> Any:  # one reading per series, 5,000 messages at a time
        chunk: list[tuple[str, bytes]] = []
        for device in devices:
            topic = topics.telemetry(device.site, device.kind, device.id)
            if device.kind == "ev_charger":
                chunk += [(topic, body["ev_charger"] % (ts, port)) for port in range(1, 11)]
            else:
                chunk.append((topic, body[device.kind] % ts))
            if len(chunk) >= 5000:
                yield chunk
                chunk = []
        yield chunk

    t0 = time.process_time()
    for chunk in chunks(now - 5):
        pipeline.process(chunk, now)
    stepped_s = time.process_time() - t0
    gc.collect()
    series = sum(len(s) for s in registry.series.values())
    state = sum(a.nbytes for a in pipeline.snapshot().values())
    stepped = _rss_mb()
    # A second reading each, kept as the gateway keeps recent readings for the dashboard, filled to the
    # depth it allows.
    recent = RecentReadings(recent_readings_depth(series))
    pipeline.keep_readings = True
    for chunk in chunks(now - 4):
        for kind, _, device_id, reading in pipeline.process(chunk, now).accepted:
            for k in range(recent.depth):
                recent.add(kind, device_id, {**reading.__dict__, "ts": reading.ts + k})
    gc.collect()
    results.put({"devices": count, "series": series, "base_mb": base, "registered_mb": registered,
                 "stepped_mb": stepped, "state_mb": state / 2**20, "valid": sum(pipeline.stats.valid.values()),
                 "stepped_s": stepped_s, "depth": recent.depth, "recent_mb": _rss_mb()})


def city_memory(count: int) -> dict[str, Any]:
    ctx = mp.get_context("spawn")  # a clean interpreter: nothing of the bench's own in its RSS
    results = ctx.Queue()
    proc = ctx.Process(target=_city_memory, args=(count, results))
    proc.start()
    out = results.get(timeout=600)
    proc.join(30)
    return out


# -- the run -------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--quick", action="store_true", help="shorter steps (3 s) and ceilings")
    parser.add_argument("--seconds", type=float, default=6.0, help="length of one offered-load step")
    parser.add_argument("--devices", type=int, default=20000, help="meter boxes in the bench registry")
    parser.add_argument("--publishers", type=int, default=2, help="load-generating processes")
    parser.add_argument("--ceiling-rate", type=float, default=45000.0, help="messages/s offered to the ceilings")
    parser.add_argument("--ceiling-seconds", type=float, default=5.0)
    parser.add_argument("--slack", type=float, default=0.5,
                        help="a step is sustained if the gateway finishes within this long after the publishers")
    parser.add_argument("--city", type=int, default=300000, help="devices for the memory measurement")
    parser.add_argument("--only", default="ceiling,1,10,100,memory",
                        help="comma-separated parts: ceiling, 1, 10, 100 (readings per message), memory")
    parser.add_argument("--steps-1", default="4000,8000,12000,16000,20000,24000,28000,32000",
                        help="offered messages/s with 1 reading per message")
    parser.add_argument("--steps-10", default="1000,2000,4000,6000,8000,10000,14000",
                        help="offered messages/s with 10 readings per message")
    parser.add_argument("--steps-100", default="1000,2000,3000,4000,5000,6000,7000",
                        help="offered messages/s with 100 readings per message")
    parser.add_argument("--no-decode-ahead", action="store_true",
                        help="the gateway decodes every batch on its main thread (ingest.decode_ahead: false)")
    args = parser.parse_args()
    if args.quick:
        args.seconds = min(args.seconds, 3.0)
        args.ceiling_seconds = min(args.ceiling_seconds, 3.0)
    parts = set(args.only.split(","))
    started = time.time()
    work = Path(tempfile.mkdtemp(prefix="sb-throughput-"))
    registry, devices = bench_registry(work, args.devices)
    ceilings: list[Row] = []
    series: list[Row] = []
    memory: dict[str, Any] | None = None
    with EmbeddedBroker(work / "broker", persistence=False) as broker:
        if "ceiling" in parts:
            console.print("ceiling: bare paho subscriber …")
            ceilings.append(paho_ceiling(broker.host, broker.port, devices, args))
            console.print(f"  {_describe(ceilings[-1])}")
            console.print("ceiling: mosquitto_sub …")
            row = mosquitto_sub_ceiling(broker.host, broker.port, devices, args)
            if row is not None:
                ceilings.append(row)
                console.print(f"  {_describe(row)}")
        for per in (1, 10, 100):
            if str(per) in parts:
                console.print(f"gateway, {per} reading(s) per message …")
                steps = [float(s) for s in getattr(args, f"steps_{per}").split(",")]
                series += gateway_series(work, broker, registry, devices, per, steps, args)
    if "memory" in parts:
        console.print(f"memory of {args.city:,} registered devices …")
        memory = city_memory(args.city)
    report(ceilings, series, memory, args, time.time() - started)
    console.print(f"(work directory {work})")


def report(ceilings: list[Row], series: list[Row], memory: dict[str, Any] | None, args: argparse.Namespace,
           elapsed: float) -> None:
    paho_rate = next((r.rate for r in ceilings if r.subject.startswith("bare paho")), None)
    table = Table(title=f"bench.throughput — QoS 1, {args.publishers} publisher processes, {args.devices:,} devices, "
                        f"{args.seconds:g} s steps ({elapsed:.0f} s in all)")
    for name in ("subject", "rdg/msg", "offered msg/s", "msg/s", "readings/s", "× paho", "loss", "lag s",
                 "CPU µs/msg", "alert p50/p99/max ms", "alerts", "peak RSS MB", "sustained"):
        table.add_column(name, justify="left" if name == "subject" else "right")
    for row in ceilings + series:
        loss = row.messages - row.received
        table.add_row(
            row.subject + (f" ({row.note})" if row.note else ""), str(row.per_message), f"{row.offered:,.0f}",
            f"{row.rate:,.0f}", f"{row.rate * row.per_message:,.0f}",
            f"{row.rate / paho_rate:.2f}" if paho_rate and row.per_message == 1 else "",
            str(loss) + (f" (+{row.rejected} rej.)" if row.rejected else ""),
            f"{row.lag_s:.2f}" if row.lag_s is not None else "",
            f"{row.cpu_us:.0f}" if row.cpu_us is not None else "",
            "/".join(f"{v:.1f}" for v in row.latency_ms) if row.latency_ms else "",
            f"{row.alerts[0]}/{row.alerts[1]}" if row.alerts else "",
            f"{row.rss_mb:.0f}" if row.rss_mb else "", "yes" if row.sustained else "no")
    console.print(table)
    for per in (1, 10, 100):
        sustained = [r for r in series if r.per_message == per and r.sustained and not r.note]
        if sustained:
            best = max(sustained, key=lambda r: r.rate)
            ratio = f" = {best.rate / paho_rate:.2f}× the bare paho subscriber" if paho_rate and per == 1 else ""
            console.print(f"sustained with {per} reading(s)/message: {best.rate:,.0f} msg/s, "
                          f"{best.rate * per:,.0f} readings/s{ratio}")
    if memory:
        console.print(f"memory: {memory['devices']:,} devices ({memory['series']:,} series) — RSS {memory['base_mb']:.0f} MB "
                      f"after imports, {memory['registered_mb']:.0f} MB registered, {memory['stepped_mb']:.0f} MB with "
                      f"detector state after one reading each ({memory['state_mb']:.0f} MB of it state arrays; "
                      f"{memory['valid']:,} readings in {memory['stepped_s']:.1f} s of CPU); "
                      f"{memory['recent_mb']:.0f} MB with the dashboard's recent readings full "
                      f"({memory['depth']} a device)")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
