"""Soak: a steady QoS 1 stream while the gateway is killed (SIGKILL) and the broker restarted, then an
account of what was published, processed, lost and duplicated.

    .venv/bin/python -m bench.soak [--rate 200] [--duration 60] [--kills 3] [--broker-restarts 2] [--kind smoke]

Every reading flips a meter box between 30 °C and 80 °C (``--kind smoke``: a smoke detector's alarm on
and off, its messages coming by the smoke hint lane too), so every reading is an alert event (raised or
cleared; flapping hold switched off for the soak) and lands in the incident store exactly once if
nothing is lost or doubled. Counted from the store after the run: readings published / processed
(recorded alert events) / lost / duplicated, and the longest time from a kill or restart to the next
recorded event (recovery). Broker: an embedded Mosquitto with persistence, restarted cleanly.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml


import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from gateway import topics
from gateway.broker import EmbeddedBroker, free_port
from gateway.incidents.store import Database

ROOT = Path(__file__).resolve().parent.parent

DEVICES = {"meter": [f"mtr-wangma-{n:03d}" for n in range(1, 51)], "smoke": [f"smk-wangma-{n:03d}" for n in range(1, 51)]}
BODY = {"meter": b'{"ts": %.3f, "seq": %d, "temp_c": %d}', "smoke": b'{"ts": %.3f, "seq": %d, "alarm": %s}'}


def write_config(work: Path, broker_url: str) -> Path:
    data = yaml.safe_load((ROOT / "config.yaml").read_text(encoding="utf-8"))
    data.update(state_dir=str(work / "state"), registry_file=str(ROOT / "registry" / "default-street.csv"))
    data["broker"].update(url=broker_url, client_id="gw-soak")
    data["incidents"]["url"] = f"sqlite:///{work / 'incidents.db'}"
    data["incidents"]["grouping"]["exclude_rules"] = ["smoke_alarm", "meter_overheat"]
    data["api"]["listen"] = "127.0.0.1:0"
    data["detection"]["snapshot_interval_s"] = 1
    data["ingest"]["device_rate_per_s"] = 0  # the soak's meters are not to be throttled
    data["kinds"]["meter"]["rules"]["meter_overheat"]["flapping"] = None
    data["kinds"]["meter"]["offline_after_s"] = data["kinds"]["smoke"]["offline_after_s"] = 3600
    path = work / "soak.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return path


def start_gateway(config: Path, log: Path) -> subprocess.Popen[bytes]:
    handle = open(log, "ab")
    process = subprocess.Popen([sys.executable, "-m", "gateway.cli", "run", "--config", str(config)], cwd=ROOT,
                               stdout=handle, stderr=handle)
    deadline = time.monotonic() + 30
    while b"gateway ready" not in log.read_bytes()[-20000:] and time.monotonic() < deadline:
        time.sleep(0.1)
    return process


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=200.0, help="readings per second")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of steady load")
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--broker-restarts", type=int, default=2)
    parser.add_argument("--kind", choices=sorted(DEVICES), default="meter", help="whose readings")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sb-soak-"))
    broker = EmbeddedBroker(work / "broker", port=free_port(), persistence=True).start()
    config = write_config(work, broker.url)
    log = work / "gateway.log"
    gateway = start_gateway(config, log)

    published: list[tuple[str, int]] = []
    stop = threading.Event()

    def publish() -> None:
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id="soak-devices", protocol=paho.MQTTv5)
        client.reconnect_delay_set(0.2, 2)
        client.connect(broker.host, broker.port)
        client.loop_start()
        t0, n = time.time(), 0
        while not stop.is_set():
            devices = DEVICES[args.kind]
            meter = devices[n % len(devices)]
            seq = n // len(devices)
            ts = t0 + n / args.rate
            hot = seq % 2 == 0
            body = BODY[args.kind] % (ts, seq, (b"true" if hot else b"false") if args.kind == "smoke" else (80 if hot else 30))
            while True:  # a device keeps what the broker has not taken and tries again
                info = client.publish(topics.telemetry("wangma", args.kind, meter), body, qos=1)
                if info.rc == 0:
                    break
                time.sleep(0.05)
            published.append((meter, round(ts * 1000)))
            n += 1
            time.sleep(max(0.0, t0 + n / args.rate - time.time()))
        client.loop_stop()

    publisher = threading.Thread(target=publish, daemon=True)
    publisher.start()
    faults = ["kill"] * args.kills + ["broker"] * args.broker_restarts
    gap = args.duration / (len(faults) + 1)
    fault_times: list[float] = []
    for fault in faults:
        time.sleep(gap)
        fault_times.append(time.time())
        if fault == "kill":
            gateway.send_signal(signal.SIGKILL)
            gateway.wait()
            gateway = start_gateway(config, log)
        else:
            broker.stop()
            broker.start()
    time.sleep(gap)
    stop.set()
    publisher.join(30)
    time.sleep(5)  # let the last of it through
    gateway.send_signal(signal.SIGTERM)
    gateway.wait(30)
    broker.stop()

    db = Database(f"sqlite:///{work / 'incidents.db'}")
    events = db.fetchall("SELECT device_id, ts, gateway_time FROM occurrences")
    db.close()
    recorded = {(e["device_id"], round(e["ts"] * 1000)) for e in events}
    sent = set(published)
    lost = sent - recorded
    duplicated = len(events) - len(recorded)
    recovery = max((min((e["gateway_time"] for e in events if e["gateway_time"] > f), default=f) - f
                    for f in fault_times), default=0.0)
    print(f"soak: {args.rate:g} {args.kind} readings/s for {args.duration:g} s, {args.kills} gateway kills "
          f"(SIGKILL), {args.broker_restarts} broker restarts")
    print(f"{'readings published':<32} {len(sent):>8}")
    print(f"{'processed (alert events recorded)':<32} {len(recorded & sent):>8}")
    print(f"{'lost':<32} {len(lost):>8}")
    print(f"{'duplicated':<32} {duplicated:>8}")
    print(f"{'alerts expected / recorded':<32} {len(sent):>8} / {len(recorded & sent)}")
    print(f"{'longest recovery after a fault':<32} {recovery:>7.1f} s")
    print(f"(work directory {work})")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
