"""Evaluation: what the gateway said (alerts, incidents, dead letters, as any MQTT client sees them)
against the ground truth of a scenario run.

Per rule: recall over the (event, rule) pairs that should have fired, precision over the alerts
raised, detection latency in device time (from the anomaly's start to the device time of the reading
that raised the alert) and end-to-end latency in wall time (from publishing that reading to receiving
the alert). Then false alerts (a raised alert that no event explains) per device-day, expected versus
created incidents, and whether each injected fault got the treatment it should.
"""

from __future__ import annotations

import bisect
import json
import ssl
import statistics
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as mqtt

from simulators.runner import RunResult, TruthRow
from simulators.scenario import Expect

SEVERITY_RANK = {"info": 0, "warning": 1, "major": 2, "critical": 3}
GATEWAY_CLOCK_RULES = {"offline", "flooding"}  # raised on the gateway's clock, not on device time
WALL_GRACE_S = 30.0


@dataclass
class Heard:
    received: float
    topic: str
    body: dict[str, Any]


class Collector:
    """Subscribes to alerts, incidents and dead letters (as an operator would) and keeps what it hears."""

    def __init__(self, host: str, port: int, *, username: str | None = None, password: str | None = None,
                 tls_context: ssl.SSLContext | None = None):
        self.alerts: list[Heard] = []
        self.incidents: list[Heard] = []
        self.deadletters: list[Heard] = []
        self.last_heard = time.time()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"streetbrain-evaluate-{time.time_ns()}",
                                  protocol=mqtt.MQTTv311)
        if username:
            self.client.username_pw_set(username, password)
        if tls_context is not None:
            self.client.tls_set_context(tls_context)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *args: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(host, port, keepalive=30)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            self.close()
            raise ConnectionError(f"could not subscribe to the alerts at {host}:{port} (account and ACL?)")

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        client.subscribe([("streetbrain/+/alerts/#", 1), ("streetbrain/+/incidents/#", 1),
                          ("streetbrain/+/deadletter/#", 1)])

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        if message.retain:  # a retained incident is history from before this run
            return
        try:
            body = orjson.loads(message.payload)
        except orjson.JSONDecodeError:
            return
        if not isinstance(body, dict):
            return
        heard = Heard(time.time(), message.topic, body)
        self.last_heard = heard.received
        level = message.topic.split("/")[2]
        {"alerts": self.alerts, "incidents": self.incidents, "deadletter": self.deadletters}.get(level, []).append(heard)

    def settle(self, quiet_s: float = 3.0, timeout_s: float = 120.0) -> None:
        """Wait until nothing has been heard for ``quiet_s``."""
        deadline = time.time() + timeout_s
        while time.time() < deadline and time.time() - self.last_heard < quiet_s:
            time.sleep(0.1)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(q * (len(ordered) - 1)))))]


def _summary(values: list[float]) -> dict[str, float | None]:
    return {"median": statistics.median(values) if values else None, "p95": _percentile(values, 0.95),
            "max": max(values) if values else None}


@dataclass
class Evaluation:
    report: dict[str, Any]
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def write(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({**self.report, "failures": self.failures, "passed": self.passed},
                                         ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


def evaluate(run: RunResult, heard: Collector, expect: Expect, *, grace_s: float,
             counters: dict[str, float] | None = None) -> Evaluation:
    rows_by_device: dict[str, list[TruthRow]] = defaultdict(list)
    for row in run.truth:
        rows_by_device[row.device_id].append(row)

    # -- alerts: one raise per alert id (a QoS 1 redelivery is not a second alert) --------------------
    raised: dict[str, dict[str, Any]] = {}
    top_severity: dict[str, int] = {}
    for h in heard.alerts:
        body = h.body
        aid = body.get("alert_id")
        if not aid or body.get("event") not in ("raised", "updated"):
            continue
        top_severity[aid] = max(top_severity.get(aid, 0), SEVERITY_RANK.get(body.get("severity", "info"), 0))
        if body["event"] == "raised" and aid not in raised:
            raised[aid] = {**body, "_received": h.received}

    def matches(row: TruthRow, alert: dict[str, Any]) -> bool:
        if row.port and alert.get("port") and alert["port"] != row.port:
            return False
        if alert["rule"] in GATEWAY_CLOCK_RULES or row.type == "fault":
            if row.wall_start is None:
                return False
            return row.wall_start - 1 <= alert["gateway_time"] <= (row.wall_end or row.wall_start) + WALL_GRACE_S
        return row.start - 1 <= alert["ts"] <= row.end + grace_s

    detections: dict[tuple[int, str], dict[str, Any]] = {}
    per_rule: dict[str, Counter[str]] = defaultdict(Counter)
    false_alerts: list[dict[str, Any]] = []
    for alert in sorted(raised.values(), key=lambda a: a["ts"]):
        rule = alert["rule"]
        per_rule[rule]["raised"] += 1
        rows = [r for r in rows_by_device.get(alert["device_id"], []) if matches(r, alert)]
        expected = [r for r in rows if rule in r.rules]
        if expected:
            per_rule[rule]["true"] += 1
            for r in expected:
                detections.setdefault((r.id, rule), alert)
        elif any(rule in r.allowed for r in rows):
            per_rule[rule]["tolerated"] += 1
        else:
            per_rule[rule]["false"] += 1
            false_alerts.append({k: alert.get(k) for k in ("alert_id", "rule", "severity", "device_id", "port",
                                                            "ts", "value", "threshold")})

    latencies: dict[str, list[float]] = defaultdict(list)
    e2e: dict[str, list[float]] = defaultdict(list)
    events = []
    for row in run.truth:
        if row.type != "event" and not row.rules:
            continue
        found = {rule: detections.get((row.id, rule)) for rule in row.rules}
        for rule, alert in found.items():
            per_rule[rule]["expected"] += 1
            if alert is None:
                continue
            per_rule[rule]["detected"] += 1
            if rule in GATEWAY_CLOCK_RULES:
                latencies[rule].append(max(0.0, alert["gateway_time"] - (row.wall_start or alert["gateway_time"])))
                e2e[rule].append(max(0.0, alert["_received"] - (row.wall_start or alert["_received"])))
            else:
                latencies[rule].append(max(0.0, alert["ts"] - row.start))
                published = run.published_at.get((row.device_id, round(alert["ts"], 3)))
                if published is not None:
                    e2e[rule].append(max(0.0, alert["_received"] - published))
        caught = [a for a in found.values() if a is not None]
        reached = max((top_severity.get(a["alert_id"], 0) for a in caught), default=-1)
        events.append({**row.to_dict(), "detected": [r for r, a in found.items() if a is not None],
                       "missed": [r for r, a in found.items() if a is None],
                       "latency_s": min((a["ts"] - row.start for a in caught if a["rule"] not in GATEWAY_CLOCK_RULES),
                                        default=None),
                       "severity_reached": next((k for k, v in SEVERITY_RANK.items() if v == reached), None)})

    rules_report = {}
    for rule, counts in sorted(per_rule.items()):
        judged = counts["true"] + counts["false"]
        rules_report[rule] = {
            "expected": counts["expected"], "detected": counts["detected"],
            "recall": counts["detected"] / counts["expected"] if counts["expected"] else None,
            "raised": counts["raised"], "true": counts["true"], "false": counts["false"],
            "tolerated": counts["tolerated"], "precision": counts["true"] / judged if judged else None,
            "latency_s": _summary(latencies[rule]), "e2e_latency_s": _summary(e2e[rule]),
        }

    device_days = run.devices * run.duration_s / 86400
    critical_rows = [e for e in events if e["severity"] == "critical"]
    incidents = _incidents(run, heard)
    faults = _faults(run, heard, raised, counters)
    all_expected = sum(r["expected"] for r in rules_report.values())
    all_detected = sum(r["detected"] for r in rules_report.values())
    all_e2e = [v for values in e2e.values() for v in values]
    report = {
        "scenario": run.scenario, "devices": run.devices, "device_days": device_days,
        "published": run.published, "readings": run.readings, "wall_s": run.wall_s,
        "rules": rules_report,
        "recall": all_detected / all_expected if all_expected else None,
        "critical_events": len(critical_rows),
        "critical_detected": sum(1 for e in critical_rows if e["detected"]),
        "false_alerts": len(false_alerts),
        "false_critical": sum(1 for a in false_alerts if a["severity"] == "critical"),
        "false_alerts_per_device_day": len(false_alerts) / device_days if device_days else 0.0,
        "false_alert_list": false_alerts[:200],
        "e2e_latency_s": _summary(all_e2e),
        "incidents": incidents, "faults": faults, "events": events,
    }
    return Evaluation(report, _check(report, expect))


def _incidents(run: RunResult, heard: Collector) -> dict[str, Any]:
    latest: dict[str, dict[str, Any]] = {}  # id → the last news of it (a storm gathers members as it goes)
    for h in heard.incidents:
        if h.body.get("id"):
            latest[h.body["id"]] = h.body
    opened = list(latest.values())
    def devices_of(incident: dict[str, Any]) -> set[str]:
        members = incident.get("members") or []
        return {incident.get("device_id")} | {m if isinstance(m, str) else m.get("device_id") for m in members}

    expected = [r for r in run.truth if r.incident_expected]
    covered = sum(1 for r in expected if any(r.device_id in devices_of(i) for i in opened))
    explained = {r.device_id for r in run.truth if r.rules or r.allowed}
    unexpected = [{"id": i["id"], "rule": i.get("rule"), "device_id": i.get("device_id"), "severity": i.get("severity")}
                  for i in opened if not (devices_of(i) & explained)]
    missing = [{"device_id": r.device_id, "event": r.what, "rules": r.rules} for r in expected
               if not any(r.device_id in devices_of(i) for i in opened)]
    return {"expected": len(expected), "created": len(opened), "expected_created": covered,
            "recall": covered / len(expected) if expected else None, "unexpected": len(unexpected),
            "unexpected_list": unexpected[:100], "missing_list": missing[:100],
            "created_list": [{"id": i["id"], "rule": i.get("rule"), "device_id": i.get("device_id"),
                              "severity": i.get("severity"), "members": i.get("members")} for i in opened][:200]}


def _faults(run: RunResult, heard: Collector, raised: dict[str, dict[str, Any]],
            counters: dict[str, float] | None) -> dict[str, Any]:
    letters: Counter[tuple[str, str]] = Counter()
    letter_times: dict[str, list[float]] = defaultdict(list)
    for h in heard.deadletters:
        device = h.body.get("device_id", "")
        device = "(unknown)" if str(device).startswith("sim-unknown-") else device
        for problem in h.body.get("problems") or [{"reason": h.body.get("reason")}]:
            letters[(device, problem.get("reason"))] += 1
        letter_times[device].append(h.received)
    for times in letter_times.values():
        times.sort()
    by_fault: dict[str, Counter[str]] = defaultdict(Counter)
    duplicates_expected = 0
    for row in (r for r in run.truth if r.type == "fault"):
        tally = by_fault[row.what]
        tally["injected"] += row.count
        kind, _, target = row.expect.partition(":")
        if kind == "deadletter":
            device = "(unknown)" if row.what == "unknown_device" else row.device_id
            got = min(letters[(device, target)], row.count)
            letters[(device, target)] -= got
            tally["handled"] += got
        elif kind == "rule":
            start, end = row.wall_start or 0.0, (row.wall_end or row.wall_start or 0.0) + WALL_GRACE_S
            tally["handled"] += row.count if any(
                a["rule"] == target and a["device_id"] == row.device_id and start - 1 <= a["gateway_time"] <= end
                for a in raised.values()) else 0
        elif kind == "accepted":
            times = letter_times.get(row.device_id, [])
            start, end = (row.wall_start or 0.0) - 1, (row.wall_end or row.wall_start or 0.0) + 5
            tally["handled"] += 0 if bisect.bisect_left(times, end) > bisect.bisect_left(times, start) else row.count
        elif kind == "counted":
            duplicates_expected += row.count
    if duplicates_expected:
        tally = by_fault["duplicate"]
        if counters is None:
            tally["unverified"] = duplicates_expected
        else:
            tally["handled"] += int(min(counters.get("duplicate", 0), duplicates_expected))
    injected = sum(t["injected"] - t["unverified"] for t in by_fault.values())
    handled = sum(t["handled"] for t in by_fault.values())
    return {"by_fault": {k: dict(v) for k, v in sorted(by_fault.items())}, "injected": injected,
            "handled": handled, "share_handled": handled / injected if injected else None}


def _check(report: dict[str, Any], expect: Expect) -> list[str]:
    failures = []

    def at_least(name: str, value: float | None, limit: float | None) -> None:
        if limit is not None and value is not None and value < limit:
            failures.append(f"{name} {value:.3g} < {limit:g}")

    def at_most(name: str, value: float | None, limit: float | None) -> None:
        if limit is not None and value is not None and value > limit:
            failures.append(f"{name} {value:.3g} > {limit:g}")

    critical = report["critical_detected"] / report["critical_events"] if report["critical_events"] else None
    at_least("critical events detected", critical, expect.min_recall_critical)
    at_least("recall", report["recall"], expect.min_recall)
    at_most("false critical alerts", report["false_critical"], expect.max_false_critical)
    at_most("false alerts", report["false_alerts"], expect.max_false_alerts)
    at_most("false alerts per device-day", report["false_alerts_per_device_day"], expect.max_false_alerts_per_device_day)
    for rule, limit in expect.max_latency_p95_s.items():
        at_most(f"{rule} p95 latency (s)", (report["rules"].get(rule) or {}).get("latency_s", {}).get("p95"), limit)
    at_most("end-to-end p95 latency (s)", report["e2e_latency_s"]["p95"], expect.max_e2e_latency_p95_s)
    at_least("incidents created/expected", report["incidents"]["recall"], expect.min_incident_recall)
    at_most("unexpected incidents", report["incidents"]["unexpected"], expect.max_unexpected_incidents)
    at_least("faults handled", report["faults"]["share_handled"], expect.min_faults_handled)
    return failures


def render(evaluation: Evaluation, console: Any) -> None:
    """The result as tables (rich)."""
    from rich.table import Table

    r = evaluation.report

    def fmt(value: float | None, spec: str = ".2f") -> str:
        return "-" if value is None else format(value, spec)

    table = Table(title=f"{r['scenario']}: {r['devices']} devices, {r['device_days']:.2f} device-days, "
                        f"{r['published']} messages in {r['wall_s']:.1f} s")
    for column in ("rule", "expected", "detected", "recall", "raised", "false", "tolerated", "precision",
                   "latency p50 s", "p95 s", "e2e p50 ms", "e2e p95 ms"):
        table.add_column(column, justify="left" if column == "rule" else "right")
    for rule, s in r["rules"].items():
        e2e = s["e2e_latency_s"]
        table.add_row(rule, str(s["expected"]), str(s["detected"]), fmt(s["recall"]), str(s["raised"]),
                      str(s["false"]), str(s["tolerated"]), fmt(s["precision"]), fmt(s["latency_s"]["median"], ".0f"),
                      fmt(s["latency_s"]["p95"], ".0f"),
                      fmt(e2e["median"] * 1000 if e2e["median"] is not None else None, ".0f"),
                      fmt(e2e["p95"] * 1000 if e2e["p95"] is not None else None, ".0f"))
    console.print(table)
    inc, faults = r["incidents"], r["faults"]
    console.print(f"critical events detected {r['critical_detected']}/{r['critical_events']} · recall {fmt(r['recall'])} · "
                  f"false alerts {r['false_alerts']} ({r['false_critical']} critical, "
                  f"{r['false_alerts_per_device_day']:.3f} per device-day) · incidents expected {inc['expected']}, "
                  f"created for them {inc['expected_created']}, unexpected {inc['unexpected']} · faults handled "
                  f"{faults['handled']}/{faults['injected']}", highlight=False)
    if faults["by_fault"]:
        console.print("faults: " + ", ".join(f"{k} {v.get('handled', 0)}/{v.get('injected', 0)}"
                                             for k, v in faults["by_fault"].items()), highlight=False)
    for alert in r["false_alert_list"][:10]:
        console.print(f"  [yellow]false[/] {alert['severity']} {alert['rule']} on {alert['device_id']}"
                      f"{'#' + str(alert['port']) if alert.get('port') else ''} value {alert['value']}", highlight=False)
    missed = [e for e in r["events"] if e["missed"]]
    for event in missed[:10]:
        console.print(f"  [red]missed[/] {', '.join(event['missed'])} for {event['what']} on {event['device_id']}"
                      f" at {event['start_iso']}", highlight=False)
    if evaluation.passed:
        console.print("[bold green]PASS[/] every threshold of the scenario is met")
    else:
        for failure in evaluation.failures:
            console.print(f"[bold red]FAIL[/] {failure}", highlight=False)
