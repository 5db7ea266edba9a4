"""``streetbrain simulate`` and ``streetbrain evaluate``: the simulators (which know nothing of the
gateway but its payloads) wired to a broker, a gateway, and the configuration."""

from __future__ import annotations

import argparse
import asyncio
import ssl
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from gateway import security
from gateway.config import Config, Device
from simulators import fleet as fleets
from simulators.evaluate import Collector, evaluate, render
from simulators.models import DeviceSpec
from simulators.runner import SHANGHAI, RunResult, Simulation
from simulators.scenario import Scenario, ScenarioError, load_scenario

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def scenario_from_args(args: argparse.Namespace) -> Scenario:
    """The scenario file, or a free run of the fleet (no events) when none is given; flags override."""
    if args.scenario:
        scenario = load_scenario(args.scenario)
    else:
        scenario = Scenario(name="free-run", start="now", duration=args.duration or 7 * 86400.0, speed=1.0)
    if args.duration:
        scenario = scenario.model_copy(update={"duration": args.duration})
        scenario.events = [e for e in scenario.events if e.at < args.duration]
        scenario.faults = [f for f in scenario.faults if f.at < args.duration]
    if args.speed is not None:
        scenario = scenario.model_copy(update={"speed": args.speed})
    if args.rate is not None:
        scenario = scenario.model_copy(update={"rate": args.rate})
    if args.seed is not None:
        scenario = scenario.model_copy(update={"seed": args.seed})
    return scenario


def fleet_for(config: Config, scenario: Scenario, devices: int | None) -> list[DeviceSpec]:
    size = devices or scenario.fleet.devices
    if size:
        chosen = fleets.synthetic(size, [s.id for s in config.sites], scenario.fleet.kinds)
    else:
        chosen = fleets.from_registry(config.devices)
    return fleets.select(chosen, scenario.fleet.kinds, scenario.fleet.per_kind)


def registry_devices(config: Config, fleet: list[DeviceSpec]) -> list[Device]:
    """The gateway's registry for a fleet: the configured entries where they exist, else new ones."""
    known = {d.id: d for d in config.devices}
    rows = fleets.registry_csv(d for d in fleet if d.id not in known).splitlines()[1:]
    made = []
    for line in rows:
        id_, kind, site, lat, lon, name, _, zone, ports, rated, tags = line.split(",")
        made.append(Device(id=id_, kind=kind, site=site, lat=float(lat), lon=float(lon), name=name,
                           zone_class=zone or None, ports=int(ports) if ports else None,
                           rated_power_w=float(rated) if rated else None, tags=[t for t in tags.split(";") if t]))
    return [known[d.id] for d in fleet if d.id in known] + made


class ProgressView:
    """Messages sent, their rate, and how far through device time the run is (rich)."""

    def __init__(self, console: Console, title: str):
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                 TextColumn("{task.percentage:>3.0f}% of device time"),
                                 TextColumn("{task.fields[sent]} messages · {task.fields[rate]} msg/s"),
                                 TimeElapsedColumn(), console=console, transient=False)
        self.task = self.progress.add_task(title, total=1.0, sent=0, rate="-")
        self.started = time.time()

    def __call__(self, result: RunResult, done: float) -> None:
        elapsed = max(1e-6, time.time() - self.started)
        self.progress.update(self.task, completed=min(1.0, done), sent=result.published,
                             rate=f"{result.published / elapsed:,.0f}")


def _tls_context(config: Config, embedded: Any) -> ssl.SSLContext | None:
    if embedded is not None and getattr(embedded, "tls", False):
        return ssl.create_default_context(cafile=str(config.state_dir / "tls" / "ca.crt"))
    return None


def _accounts(config: Config, embedded: bool = False) -> tuple[tuple[str | None, str | None],
                                                               tuple[str | None, str | None]]:
    """(simulator, operator) broker accounts: streetbrain's own on its embedded broker, else the configured one."""
    if config.broker.username and not embedded:
        secret = config.broker.password.get_secret_value() if config.broker.password else None
        return (config.broker.username, secret), (config.broker.username, secret)
    return (security.account(config.state_dir, security.SIMULATOR_USER),
            security.account(config.state_dir, security.OPERATOR_USER))


def _describe(console: Console, simulation: Simulation, fleet: list[DeviceSpec]) -> None:
    s = simulation.scenario
    start = datetime.fromtimestamp(simulation.t0, SHANGHAI)
    console.print(f"scenario [bold]{s.name}[/]: {len(fleet)} devices, {s.duration / 3600:g} h of device time from "
                  f"{start:%Y-%m-%d %H:%M} (Asia/Shanghai), speed {simulation.speed:g}×"
                  + (f", at most {simulation.rate:g} msg/s" if simulation.rate else "")
                  + f", {sum(1 for r in simulation.result.truth if r.type == 'event')} events, "
                    f"{sum(1 for r in simulation.result.truth if r.type == 'fault')} faults", highlight=False)


def cmd_simulate(config: Config, args: argparse.Namespace, address: Any) -> int:
    console = Console(stderr=True)
    try:
        scenario = scenario_from_args(args)
        fleet = fleet_for(config, scenario, args.devices)
        simulation = Simulation(scenario, fleet, offline_after_s={k: p.offline_after_s for k, p in config.kinds.items()},
                                device_rate_per_s=config.ingest.device_rate_per_s)
    except (ScenarioError, ValueError) as exc:
        console.print(f"[red]{exc}[/]", highlight=False)
        return EXIT_USAGE
    if args.registry_out:
        Path(args.registry_out).write_text(fleets.registry_csv(fleet), encoding="utf-8")
        console.print(f"registry of the fleet written to {args.registry_out} (point registry_file at it)")
    _describe(console, simulation, fleet)
    (user, password), _ = _accounts(config)
    stop = threading.Event()
    view = ProgressView(console, "simulate")
    try:
        with view.progress:
            result = simulation.run(address.host, address.port, username=user, password=password, stop=stop,
                                    on_progress=view)
    except KeyboardInterrupt:
        stop.set()
        return EXIT_FAILURE
    except (OSError, ConnectionError, TimeoutError) as exc:
        console.print(f"[red]simulation stopped: {exc}[/]", highlight=False)
        return EXIT_FAILURE
    truth = args.truth or (f"ground-truth-{scenario.name}.json" if args.scenario else None)
    if truth:
        result.write_truth(truth)
        console.print(f"ground truth: {truth}")
    console.print(f"done: {result.published} messages ({result.readings} readings) in {result.wall_s:.1f} s")
    return EXIT_OK


def _evaluation_config(config: Config, fleet: list[DeviceSpec], speed: float, state_dir: Path) -> Config:
    """A gateway of the evaluation's own: fresh state, its own broker and store, the fleet as registry, and
    per-device rate limits that admit a device reporting ``speed`` times faster than in real time."""
    mine = config.model_copy(deep=True)
    mine.state_dir = state_dir
    mine.broker.url = None
    mine.incidents.url = f"sqlite:///{state_dir / 'incidents.db'}"
    mine.influx.url = None
    mine.api.listen = "127.0.0.1:0"
    mine.devices = registry_devices(config, fleet)
    fastest_s = 10.0  # a smoke detector reporting a fire
    if mine.ingest.device_rate_per_s:
        needed = 2 * speed / fastest_s if speed > 0 else 500.0
        mine.ingest.device_rate_per_s = max(mine.ingest.device_rate_per_s, needed)
    return mine


async def evaluate_scenario(config: Config, args: argparse.Namespace, stop: asyncio.Event) -> int:
    from gateway.service import Gateway, resolve_broker

    console = Console()
    try:
        scenario = scenario_from_args(args)
        fleet = fleet_for(config, scenario, args.devices)
    except (ScenarioError, ValueError) as exc:
        console.print(f"[red]{exc}[/]", highlight=False)
        return EXIT_USAGE
    own = not args.broker
    gateway_task = None
    with tempfile.TemporaryDirectory(prefix="streetbrain-evaluate-") as scratch:
        if own:
            gateway_config = _evaluation_config(config, fleet, scenario.speed, Path(scratch))
            gateway = Gateway(gateway_config)
            gateway_task = asyncio.create_task(gateway.run(stop), name="gateway")
            started = asyncio.create_task(gateway.started.wait())
            await asyncio.wait({gateway_task, started}, return_when=asyncio.FIRST_COMPLETED)
            if gateway_task.done():
                started.cancel()
                await gateway_task
                return EXIT_FAILURE
            assert gateway.address is not None
            address, account_config = gateway.address, gateway_config
            context = _tls_context(gateway_config, gateway.embedded)
        else:
            gateway = None
            address, _ = resolve_broker(config, args.broker)
            account_config, context = config, None
            if scenario.speed > 50:
                console.print(f"[yellow]note[/]: at speed {scenario.speed:g} devices report {scenario.speed:g}× more "
                              "often than in real time; the gateway's ingest.device_rate_per_s may take them for floods")
        try:
            simulation = Simulation(scenario, fleet, offline_after_s={k: p.offline_after_s for k, p in config.kinds.items()},
                                    check_interval_s=config.detection.offline_check_interval_s,
                                    device_rate_per_s=account_config.ingest.device_rate_per_s)
        except (ScenarioError, ValueError) as exc:
            console.print(f"[red]{exc}[/]", highlight=False)
            stop.set()
            return EXIT_USAGE
        _describe(console, simulation, fleet)
        (sim_user, sim_password), (op_user, op_password) = _accounts(account_config, embedded=own)
        collector = Collector(address.host, address.port, username=op_user, password=op_password, tls_context=context)
        halt = threading.Event()
        view = ProgressView(console, "evaluate")
        try:
            with view.progress:
                run = asyncio.to_thread(simulation.run, address.host, address.port, username=sim_user,
                                        password=sim_password, tls_context=context, stop=halt, on_progress=view)
                sim_task = asyncio.ensure_future(run)
                stopper = asyncio.create_task(stop.wait())
                await asyncio.wait({sim_task, stopper}, return_when=asyncio.FIRST_COMPLETED)
                halt.set()
                result = await sim_task
                stopper.cancel()
            await asyncio.to_thread(collector.settle, args.settle)
        finally:
            collector.close()
        counters = None
        if gateway is not None:
            counters = {"duplicate": float(sum(n for (_, reason), n in gateway.stats.rejected.items()
                                               if reason == "duplicate"))}
            stop.set()
            await gateway_task  # type: ignore[misc]
    evaluation = evaluate(result, collector, scenario.expect, grace_s=scenario.grace, counters=counters)
    render(evaluation, console)
    out = args.out or f"evaluation-{scenario.name}.json"
    evaluation.write(out)
    if args.truth:
        result.write_truth(args.truth)
    console.print(f"report: {out}", highlight=False)
    if result.stopped:
        console.print("[yellow]stopped before the scenario's end: the figures cover what was sent[/]")
    return EXIT_OK if evaluation.passed else EXIT_FAILURE


def add_parsers(verbs: Any, common: Any, positive: Any) -> None:
    def scenario_flags(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--scenario", metavar="FILE", help="scenario file (YAML); see scenarios/")
        which = parser.add_mutually_exclusive_group()
        which.add_argument("--fleet", action="store_true", help="the configured street's devices (the default)")
        which.add_argument("--devices", type=int, metavar="N", help="a synthetic fleet of N devices in the street's "
                                                                     "proportions")
        parser.add_argument("--speed", type=float, metavar="X", help="device seconds per wall second (0: as fast as "
                                                                      "possible; default: the scenario's, else 1)")
        parser.add_argument("--rate", type=positive, metavar="MSGS_PER_S", help="at most this many messages/s")
        parser.add_argument("--duration", type=positive, metavar="S", help="device seconds to run (cuts the scenario)")
        parser.add_argument("--seed", type=int, help="random seed (default: the scenario's)")
        parser.add_argument("--truth", metavar="FILE", help="write the ground truth here (JSON)")

    simulate = verbs.add_parser(
        "simulate", help="publish a simulated street (or a scenario) to a broker",
        description="Publish readings of every device of the fleet, with the scenario's events and faults, to the "
                    "broker, showing progress; with --scenario also writes the ground truth.")
    common(simulate, mqtt=True)
    scenario_flags(simulate)
    simulate.add_argument("--registry-out", metavar="FILE", help="write the fleet as a registry CSV (for --devices)")

    evaluate_parser = verbs.add_parser(
        "evaluate", help="run a scenario against a gateway and score its alerts against the ground truth",
        description="Start a gateway of its own (or use the one at --broker), run the scenario, and compare alerts "
                    "and incidents with the ground truth: recall, precision, latency, false alerts per device-day. "
                    "Exits 1 when a threshold of the scenario is not met.")
    common(evaluate_parser, mqtt=True)
    scenario_flags(evaluate_parser)
    evaluate_parser.add_argument("--out", metavar="FILE", help="the report (JSON; default evaluation-<scenario>.json)")
    evaluate_parser.add_argument("--settle", type=positive, default=3.0, metavar="S",
                                 help="after the last message, wait until the gateway has been quiet this long")

