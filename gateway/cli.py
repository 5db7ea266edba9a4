"""``streetbrain``: one entry point, a verb per job (../shared/DESIGN.md, "CLI")."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from gateway import logs
from gateway.config import Config, ConfigError, load_config, parse_broker_url
from gateway.incidents.store import StoreError

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_CONFIG = 0, 1, 2, 3


def _broker_url(value: str) -> str:
    try:
        parse_broker_url(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def _positive(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not number > 0:
        raise argparse.ArgumentTypeError(f"{value} must be greater than 0")
    return number


def _common(parser: argparse.ArgumentParser, *, mqtt: bool) -> None:
    parser.add_argument("--config", metavar="FILE", default="config.yaml",
                        help="configuration file (default: ./config.yaml)")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-v info, -vv debug)")
    if mqtt:
        parser.add_argument("--broker", metavar="mqtt://HOST:PORT", type=_broker_url,
                            help="broker to use; overrides broker.url of the config")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streetbrain", description=(
        "The street brain: an MQTT gateway that turns smoke detectors, e-bike charging monitors and "
        "noise monitoring points into alerts for a street's command centre."))
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    run = verbs.add_parser("run", help="run the gateway (starts Mosquitto on loopback when none is configured)",
                           description="Run the gateway until SIGINT or SIGTERM. Without broker.url (or --broker) "
                                       "an embedded Mosquitto is started on a free loopback port.")
    _common(run, mqtt=True)

    demo = verbs.add_parser("demo", help="the gateway plus a simulated street, alerts shown as they happen",
                            description="Start the gateway (and an embedded broker), simulate every device of the "
                                        "registry, inject an event now and then, and print the alerts.")
    _common(demo, mqtt=True)
    demo.add_argument("--interval", type=_positive, default=5.0, metavar="S",
                      help="every device reports at least this often (default 5, for a lively dashboard; "
                           "devices otherwise keep their own pace: smoke heartbeats every 4 h, chargers 30 s, "
                           "noise 60 s, meter boxes 300 s)")
    demo.add_argument("--event-every", type=_positive, default=20.0, metavar="S",
                      help="mean seconds between injected events (default 20)")
    demo.add_argument("--duration", type=_positive, metavar="S", help="stop after this many seconds")
    demo.add_argument("--seed", type=int, default=1, help="random seed of the simulated street")
    demo.add_argument("--tls", action="store_true",
                      help="the embedded broker speaks TLS only, with a local CA made in state_dir/tls")

    from gateway.scenario_run import add_parsers as add_scenario_parsers

    add_scenario_parsers(verbs, _common, _positive)

    devices = verbs.add_parser("devices", help="list the device registry",
                               description="List the registry: id, kind, site and attributes.")
    _common(devices, mqtt=False)
    devices.add_argument("--kind", choices=["smoke", "ev_charger", "noise", "meter"])
    devices.add_argument("--site", help="only devices of this site")
    devices.add_argument("--json", action="store_true", help="print one JSON document")

    watch = verbs.add_parser("watch", help="the live alert stream and open incidents in the terminal",
                             description="Follow alerts and incidents on the broker, like a command-centre screen.")
    _common(watch, mqtt=True)
    watch.add_argument("--site")
    watch.add_argument("--kind", choices=["smoke", "ev_charger", "noise", "meter"])
    watch.add_argument("--severity", choices=["info", "warning", "major", "critical"], help="this and worse")

    history = verbs.add_parser("history", help="a device's recent points from the telemetry store",
                               description="Read a device's points back from the telemetry store (influx.url): "
                                           "InfluxDB through Flux, VictoriaMetrics through its export API.")
    _common(history, mqtt=False)
    history.add_argument("device", metavar="DEVICE")
    history.add_argument("--since", default="1h", metavar="TIME", help="a duration ago (1h, 2d) or a time (default 1h)")
    history.add_argument("--field", help="only this field (e.g. laeq_db)")
    history.add_argument("--json", action="store_true")

    from gateway.incidents.cli import add_parsers

    add_parsers(verbs, _common)

    check = verbs.add_parser("check-config", help="validate a configuration file",
                             description="Validate FILE (default: --config) and the registry it names; print "
                                         "every problem with its file:line and key path; exit 3 if any.")
    _common(check, mqtt=False)
    check.add_argument("file", nargs="?", metavar="FILE", help="file to check (default: --config)")
    return parser


def _load(args: argparse.Namespace, quiet: bool = False) -> Config:
    """Load the config and set up logging; ``quiet`` verbs show their own output and log errors only."""
    config = load_config(Path(args.config))
    default = "error" if quiet else config.logging.level
    level = "debug" if args.verbose >= 2 else ("info" if args.verbose == 1 else default)
    logs.setup(level, config.logging.format)
    return config


def _run_until_signal(main: Any) -> int:
    async def runner() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        return await main(stop)

    return asyncio.run(runner())


def cmd_run(args: argparse.Namespace) -> int:
    from gateway.service import Gateway

    config = _load(args)
    gateway = Gateway(config, broker_url=args.broker)

    async def main(stop: asyncio.Event) -> int:
        await gateway.run(stop)
        return EXIT_OK

    return _run_until_signal(main)


def cmd_demo(args: argparse.Namespace) -> int:
    from gateway.demo import demo

    config = _load(args, quiet=True)
    return _run_until_signal(lambda stop: demo(config, args, stop))


def cmd_simulate(args: argparse.Namespace) -> int:
    from gateway.scenario_run import cmd_simulate as simulate
    from gateway.service import resolve_broker

    config = _load(args, quiet=True)
    address, embedded = resolve_broker(config, args.broker)
    if embedded is not None:
        print(f"no broker at {args.broker or config.broker.url or '(none configured)'}: pass --broker "
              "mqtt://HOST:PORT of a running broker (streetbrain run starts one), or use streetbrain evaluate, "
              "which starts a gateway of its own", file=sys.stderr)
        return EXIT_FAILURE
    return simulate(config, args, address)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from gateway.scenario_run import evaluate_scenario

    if not args.scenario:
        print("evaluate needs --scenario FILE (the scenarios/ folder has one per kind, a quiet street and a bad day)",
              file=sys.stderr)
        return EXIT_USAGE
    config = _load(args, quiet=True)
    return _run_until_signal(lambda stop: evaluate_scenario(config, args, stop))


def _device_row(device: Any) -> dict[str, Any]:
    return device.model_dump(exclude_none=True, exclude_defaults=False)


def cmd_devices(args: argparse.Namespace) -> int:
    config = _load(args, quiet=True)
    devices = [d for d in config.devices if (args.kind is None or d.kind == args.kind)
               and (args.site is None or d.site == args.site)]
    if args.json:
        json.dump([_device_row(d) for d in devices], sys.stdout, ensure_ascii=False, indent=1)
        sys.stdout.write("\n")
        return EXIT_OK
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{len(devices)} devices", show_lines=False)
    for column in ("id", "kind", "site", "name", "attributes"):
        table.add_column(column)
    for d in devices:
        attributes = []
        if d.zone_class is not None:
            attributes.append(f"zone {d.zone_class}")
        if d.ports is not None:
            attributes.append(f"{d.ports} ports × {d.rated_power_w:g} W")
        attributes += d.tags
        attributes.append(f"{d.lat:.5f},{d.lon:.5f}")
        table.add_row(d.id, d.kind, d.site, d.name, " ".join(attributes))
    Console().print(table)
    return EXIT_OK


def cmd_check_config(args: argparse.Namespace) -> int:
    path = args.file or args.config
    try:
        config = load_config(Path(path))
    except ConfigError as exc:
        for issue in exc.issues:
            print(f"error: {issue}", file=sys.stderr)
        print(f"{path}: {len(exc.issues)} problem{'s' if len(exc.issues) != 1 else ''}", file=sys.stderr)
        return EXIT_CONFIG
    kinds: dict[str, int] = {}
    for device in config.devices:
        kinds[device.kind] = kinds.get(device.kind, 0) + 1
    rules = sum(len(p.rules) for p in config.kinds.values())
    print(f"{path}: ok — {len(config.sites)} sites, {len(config.teams)} teams, {rules} rules, "
          f"{len(config.devices)} devices ({', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))})")
    return EXIT_OK


def cmd_watch(args: argparse.Namespace) -> int:
    from gateway.watch import Watch, watch

    config = _load(args, quiet=True)
    url = args.broker or config.broker.url
    if url is None:
        print("streetbrain watch: which broker? pass --broker mqtt://HOST:PORT (streetbrain run logs its address)",
              file=sys.stderr)
        return EXIT_USAGE
    address = parse_broker_url(url)
    view = Watch(site=args.site, kind=args.kind, severity=args.severity)
    account = _account(config, "operator")
    return _run_until_signal(lambda stop: _watch(watch, address, view, stop, account))


def _account(config: Config, who: str) -> tuple[str | None, str | None]:
    """The broker account to use: the configured one, else streetbrain's own on its embedded broker."""
    from gateway import security

    if config.broker.username:
        return config.broker.username, config.broker.password.get_secret_value() if config.broker.password else None
    user = security.OPERATOR_USER if who == "operator" else security.SIMULATOR_USER
    return security.account(config.state_dir, user)


async def _watch(watch: Any, address: Any, view: Any, stop: asyncio.Event, account: tuple[str | None, str | None]) -> int:
    import aiomqtt

    try:
        await watch(address.host, address.port, view, stop, username=account[0], password=account[1])
    except aiomqtt.MqttError as exc:
        print(f"streetbrain watch: cannot follow {address}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def cmd_history(args: argparse.Namespace) -> int:
    import time as clock

    from gateway.incidents.cli import local, moment
    from gateway.telemetry.history import HistoryUnavailable, read

    config = _load(args, quiet=True)
    if args.device not in {d.id for d in config.devices}:
        print(f"streetbrain history: no device {args.device!r} in the registry", file=sys.stderr)
        return EXIT_FAILURE
    try:
        since = moment(args.since)
    except argparse.ArgumentTypeError as exc:
        print(f"streetbrain history: --since: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        points = read(config.influx, args.device, since, clock.time(), args.field)
    except HistoryUnavailable as exc:
        print(f"streetbrain history: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    if args.json:
        json.dump(points, sys.stdout, ensure_ascii=False, indent=1)
        sys.stdout.write("\n")
        return EXIT_OK
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{args.device}: {len(points)} points since {local(since)}")
    for column in ("time", "measurement", "field", "value"):
        table.add_column(column)
    for p in points:
        table.add_row(local(p["time"]), p["measurement"], p["field"], f"{p['value']:g}" if isinstance(
            p["value"], (int, float)) else str(p["value"]))
    Console().print(table)
    return EXIT_OK


def cmd_incidents(args: argparse.Namespace) -> int:
    from gateway.incidents.cli import run_incidents

    return run_incidents(_load(args, quiet=True), args)


def cmd_report(args: argparse.Namespace) -> int:
    from gateway.incidents.cli import run_report

    return run_report(_load(args, quiet=True), args)


COMMANDS = {"run": cmd_run, "demo": cmd_demo, "simulate": cmd_simulate, "evaluate": cmd_evaluate, "devices": cmd_devices,
            "incidents": cmd_incidents, "report": cmd_report, "history": cmd_history, "watch": cmd_watch,
            "check-config": cmd_check_config}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.verb](args)
    except StoreError as exc:
        print(f"streetbrain {args.verb}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except ConfigError as exc:
        print(f"streetbrain {args.verb}: the configuration has problems (run streetbrain check-config):",
              file=sys.stderr)
        for issue in exc.issues:
            print(f"  {issue}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        with contextlib.suppress(Exception):
            sys.stdout.close()
        return EXIT_OK
    except Exception as exc:  # the last line of defence: a message a person can act on, not a trace
        logging.getLogger("streetbrain").debug("failed", exc_info=True)
        print(f"streetbrain {args.verb}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
