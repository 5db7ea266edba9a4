"""``streetbrain demo``: the gateway, a simulated street and the alerts as an operator sees them."""

from __future__ import annotations

import argparse
import asyncio
import secrets
import ssl
import threading
import time
from collections import Counter
from typing import Any

import aiomqtt
import orjson
from rich.console import Console

from gateway import security, topics
from gateway.broker import reachable
from gateway.config import Config, Operator
from gateway.service import Gateway
from simulators.fleet import from_registry
from simulators.runner import Simulation, TruthRow
from simulators.scenario import live_scenario

STYLE = {"critical": "bold white on red", "major": "bold red", "warning": "yellow", "info": "cyan"}


def _host_port(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


def format_alert(alert: dict) -> str:
    clock = time.strftime("%H:%M:%S", time.localtime(alert["gateway_time"]))
    style = "green" if alert["event"] == "cleared" else STYLE.get(alert["severity"], "")
    label = f"[{style}]{alert['severity'].upper():<8}[/]"
    return (f"{clock} {label} {alert['event']:<8} {alert['site']}/{alert['device_id']}  "
            f"{alert['message']['zh']}  [dim]{alert['message']['en']}[/]")


def format_incident(incident: dict) -> str:
    change = incident["change"]
    clock = time.strftime("%H:%M:%S", time.localtime(change["at"]))
    who = f"{incident['team'] or '-'}" + (f" + {incident['fire_station']}" if incident["fire_station"] else "")
    deadline = incident.get("dispatch_deadline")
    due = f", dispatch by {time.strftime('%H:%M:%S', time.localtime(deadline))}" if deadline else ""
    repeat = f" ×{incident['occurrences']}" if change["action"] == "occurrence" else ""
    return (f"{clock} [bold magenta]INCIDENT[/] {change['action']:<8} {incident['id']}{repeat}  "
            f"{incident['title_zh']}  → {who}{due}")


async def watch_alerts(host: str, port: int, console: Console, counts: Counter[str], stop: asyncio.Event,
                       username: str | None = None, password: str | None = None, tls_context: Any = None) -> None:
    """Follow alerts and incidents like any operator console would, on a connection of its own."""
    incidents = f"{topics.ROOT}/+/incidents/#"
    async with aiomqtt.Client(host, port, identifier=f"streetbrain-demo-watch-{time.time_ns() % 10**9}",
                              username=username, password=password, tls_context=tls_context) as client:
        await client.subscribe(topics.ALERTS_FILTER, qos=1)
        await client.subscribe(incidents, qos=1)
        async for message in client.messages:
            try:
                body = orjson.loads(message.payload)  # type: ignore[arg-type]
            except orjson.JSONDecodeError:
                continue
            if message.topic.matches(incidents):
                action = body.get("change", {}).get("action")
                if not message.retain and action in ("opened", "occurrence", "escalated", "sla_warning", "sla_breach"):
                    # a repeat on an incident still open (from this run or the last) is an occurrence
                    counts["incidents" if action == "opened" else "incident updates"] += 1
                    console.print(format_incident(body), highlight=False)
            else:
                counts[body.get("event", "?")] += 1
                console.print(format_alert(body), highlight=False)
            if stop.is_set():
                return


DRAIN_S = 5.0  # at the end, how long the gateway may take to receive what the simulator sent


async def demo(config: Config, args: argparse.Namespace, stop: asyncio.Event) -> int:
    console = Console()
    demo_token = None
    config.broker.embedded_tls = config.broker.embedded_tls or args.tls
    if not config.api.tokens:
        # nobody configured: a token for this session only, so the dashboard can be tried at once
        demo_token = secrets.token_urlsafe(12)
        config.api.tokens = {demo_token: Operator(operator="demo", role="admin")}
    if reachable(*_host_port(config.api.listen)):
        config.api.listen = config.api.listen.rsplit(":", 1)[0] + ":0"  # the usual port is taken: any free one
    gateway = Gateway(config, broker_url=args.broker)
    gateway_stop = asyncio.Event()  # set after the simulator's, once the gateway has taken what it sent
    gateway_task = asyncio.create_task(gateway.run(gateway_stop), name="gateway")
    started = asyncio.create_task(gateway.started.wait())
    await asyncio.wait({gateway_task, started}, return_when=asyncio.FIRST_COMPLETED)
    if gateway_task.done():
        started.cancel()
        await gateway_task  # raises what went wrong
        return 1
    assert gateway.address is not None
    host, port = gateway.address.host, gateway.address.port
    counts: Counter[str] = Counter()
    scenario = live_scenario(args.duration or 7 * 86400.0, args.event_every, args.seed)
    simulation = Simulation(scenario, from_registry(config.devices), interval_s=args.interval,
                            offline_after_s={k: p.offline_after_s for k, p in config.kinds.items()},
                            check_interval_s=config.detection.offline_check_interval_s)
    console.rule("[bold]streetbrain demo street")
    every = f"at least every {args.interval:g} s" if args.interval else "at its own pace (chargers 30 s, noise 60 s, …)"
    console.print(f"broker {gateway.address}  ·  {len(config.devices)} devices "
                  f"({sum(len(s) for s in gateway.registry.series.values())} series)  ·  each device reports "
                  f"{every}  ·  an injected event every ~{args.event_every:g} s  ·  Ctrl-C stops")
    console.print(f"follow the alerts elsewhere: mosquitto_sub -p {port} -t '{topics.ALERTS_FILTER}' -v", highlight=False)
    host_ip = config.api.listen.rsplit(":", 1)[0]
    console.print(f"dashboard: [bold]http://{host_ip}:{gateway.api_port}/[/]" +
                  (f"  token: [bold]{demo_token}[/] (this session only)" if demo_token else ""), highlight=False)

    def on_event(row: TruthRow) -> None:
        console.print(f"[magenta]simulator[/] injects {row.describe()}", highlight=False)

    operator = security.account(config.state_dir, security.OPERATOR_USER) if gateway.embedded else (None, None)
    rig = security.account(config.state_dir, security.SIMULATOR_USER) if gateway.embedded else (None, None)
    context = (ssl.create_default_context(cafile=str(config.state_dir / "tls" / "ca.crt"))
               if gateway.embedded is not None and gateway.embedded.tls else None)
    watcher = asyncio.create_task(watch_alerts(host, port, console, counts, stop, *operator, tls_context=context),
                                  name="watch")
    halt = threading.Event()
    simulator = asyncio.ensure_future(asyncio.to_thread(
        simulation.run, host, port, username=rig[0], password=rig[1], tls_context=context, stop=halt,
        on_event=on_event))
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({simulator, stopping}, timeout=args.duration, return_when=asyncio.FIRST_COMPLETED)
    # The devices stop first and the gateway takes what they sent before it stops: stopped together, what
    # the simulator sent meanwhile stayed in the gateway's broker session for the next start.
    halt.set()
    try:
        published = (await simulator).readings
        deadline = time.monotonic() + DRAIN_S
        while (sum(gateway.stats.valid.values()) + sum(gateway.stats.rejected.values()) < published
               and time.monotonic() < deadline and not gateway_task.done() and not stop.is_set()):
            await asyncio.sleep(0.05)  # (a Ctrl-C meanwhile cuts it short)
    finally:
        stop.set()  # the watcher, after the drain's alerts
        gateway_stop.set()  # however the simulator ended
    stopping.cancel()
    await asyncio.wait({watcher}, timeout=2)
    watcher.cancel()
    await gateway_task
    console.rule()
    console.print(f"published {published} readings; alerts raised {counts['raised']}, updated {counts['updated']}, "
                  f"cleared {counts['cleared']}; incidents opened {counts['incidents']}, updated "
                  f"{counts['incident updates']}; "
                  f"rejected {_rejects(gateway.stats.rejected)}")
    console.print("the queue: streetbrain incidents list --open; streetbrain report", highlight=False)
    return 0


def _rejects(rejected: Counter[tuple[str, str]]) -> str:
    """``12 (meter rate_limited 10, smoke bad_value 2)``: how many, and why (``streetbrain_rejects``)."""
    total = sum(rejected.values())
    if not total:
        return "0"
    return f"{total} (" + ", ".join(f"{kind} {reason} {n}" for (kind, reason), n in rejected.most_common()) + ")"
