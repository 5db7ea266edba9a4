"""``streetbrain incidents …`` and ``streetbrain report``: the queue from a shell, against the store."""

from __future__ import annotations

import argparse
import getpass
import json
import re
import sys
import time
from datetime import datetime, timedelta, timezone
from typing import Any

from gateway.config import Config
from gateway.incidents import lifecycle, report
from gateway.incidents.queue import IncidentQueue, NotFound
from gateway.incidents.store import Database

SHANGHAI = timezone(timedelta(hours=8))
ACTIONS = ("ack", "dispatch", "reassign", "arrive", "resolve", "close", "reopen", "comment")


def duration_s(text: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhd])", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 90s, 30m, 2h or 1d")
    return float(match[1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match[2]]


def moment(text: str) -> float:
    """An RFC 3339 time (local Asia/Shanghai if no offset is given), or a duration ago (``2h``)."""
    try:
        return time.time() - duration_s(text)
    except argparse.ArgumentTypeError:
        pass
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a time (2026-11-22T08:00) nor a duration ago (2h)") from None
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=SHANGHAI)).timestamp()


def local(ts: float | None) -> str:
    return "" if ts is None else datetime.fromtimestamp(ts, SHANGHAI).strftime("%m-%d %H:%M:%S")


def add_parsers(verbs: Any, common: Any) -> None:
    incidents = verbs.add_parser("incidents", help="list, show and act on incidents",
                                 description="The incident queue from a shell: list, show, and every lifecycle action. "
                                             "Actions are recorded with --actor (default: your login).")
    common(incidents, mqtt=False)
    # --config after the action too; SUPPRESS keeps an absent one from overwriting the verb's
    config_too = argparse.ArgumentParser(add_help=False)
    config_too.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS, help="configuration file")
    actions = incidents.add_subparsers(dest="action", metavar="ACTION", required=True)

    def add_parser(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        return actions.add_parser(name, parents=[config_too], **kwargs)

    listing = add_parser("list", help="incidents, newest first")
    listing.add_argument("--state", choices=lifecycle.STATES)
    listing.add_argument("--kind", choices=["smoke", "ev_charger", "noise", "meter"])
    listing.add_argument("--site")
    listing.add_argument("--severity", choices=["info", "warning", "major", "critical"])
    listing.add_argument("--open", action="store_true", help="only open incidents")
    listing.add_argument("--overdue", action="store_true", help="only incidents with a clock past its deadline")
    listing.add_argument("--limit", type=int, default=50)
    listing.add_argument("--json", action="store_true", help="print one JSON document")
    show = add_parser("show", help="one incident with its audit trail and occurrences")
    show.add_argument("id")
    show.add_argument("--json", action="store_true")
    for name in ACTIONS:
        spec = lifecycle.ACTIONS[name]
        action = add_parser(name, help=spec.help)
        action.add_argument("id")
        action.add_argument("--note", required=spec.needs_note, help="result, revisit, reason or comment")
        action.add_argument("--actor", default=getpass.getuser(), help="the operator recorded (default: your login)")
        if name in ("dispatch", "reassign"):
            action.add_argument("--team", help="team id (default: the site's squad)")
            action.add_argument("--member", help="one member of the team")
    silence = add_parser("silence", help="silence a device, a rule or a site until a time")
    silence.add_argument("--device")
    silence.add_argument("--rule")
    silence.add_argument("--site")
    until = silence.add_mutually_exclusive_group(required=True)
    until.add_argument("--for", dest="for_s", type=duration_s, metavar="DURATION", help="e.g. 2h")
    until.add_argument("--until", type=moment, metavar="TIME", help="e.g. 2026-11-22T18:00")
    silence.add_argument("--reason", required=True)
    silence.add_argument("--actor", default=getpass.getuser())
    silences = add_parser("silences", help="the silences, active first")
    silences.add_argument("--json", action="store_true")

    rep = verbs.add_parser("report", help="SLA compliance, repeat alerts, counts by kind, site and rule",
                           description="SLA compliance per stage (% within target, median and p90 times), the "
                                       "repeat-alert rate and counts, over incidents opened in [--since, --until).")
    common(rep, mqtt=False)
    rep.add_argument("--since", type=moment, default=None, metavar="TIME", help="default: 7d ago")
    rep.add_argument("--until", type=moment, default=None, metavar="TIME", help="default: now")
    rep.add_argument("--json", action="store_true")
    rep.add_argument("--png", metavar="FILE", help="also write the figures as charts")


def run_incidents(config: Config, args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    db = Database(config.incidents.url)
    queue = IncidentQueue(config, db)
    console = Console()
    try:
        if args.action == "list":
            rows = queue.list(state=args.state, kind=args.kind, site=args.site, severity=args.severity,
                              open_only=args.open, overdue_at=time.time() if args.overdue else None, limit=args.limit)
            if args.json:
                print(json.dumps(rows, ensure_ascii=False, indent=1))
                return 0
            table = Table(title=f"{len(rows)} incidents")
            for column in ("id", "state", "severity", "kind", "site", "device", "title", "opened", "team"):
                table.add_column(column)
            for r in rows:
                device = r["device_id"] or f"{len(r['members'])} devices"
                table.add_row(r["id"], r["state"], r["severity"], r["kind"], r["site"], device, r["title_zh"],
                              local(r["opened_at"]), r["team"] or "")
            console.print(table)
        elif args.action == "show":
            incident = queue.get(args.id)
            if args.json:
                print(json.dumps(incident, ensure_ascii=False, indent=1))
                return 0
            console.print(f"[bold]{incident['id']}[/]  {incident['state']}  {incident['severity']}  "
                          f"{incident['title_zh']} / {incident['title_en']}", highlight=False)
            console.print(f"site {incident['site']}  team {incident['team']}  fire station "
                          f"{incident['fire_station'] or '-'}  members {', '.join(incident['members'])}  "
                          f"occurrences {incident['occurrences']}", highlight=False)
            trail = Table(title="audit trail")
            for column in ("time", "actor", "action", "state", "note"):
                trail.add_column(column)
            for a in incident["audit"]:
                state = f"{a['from_state'] or ''} → {a['to_state']}" if a["to_state"] else ""
                trail.add_row(local(a["at"]), a["actor"], a["action"], state, a["note"] or "")
            console.print(trail)
        elif args.action in ACTIONS:
            change = queue.act(args.id, args.action, args.actor, note=args.note, team=getattr(args, "team", None),
                               member=getattr(args, "member", None))
            print(f"{change.incident['id']}: {args.action} by {change.actor} → {change.incident['state']}")
        elif args.action == "silence":
            ends_at = args.until if args.until is not None else time.time() + args.for_s
            row = queue.silence(args.actor, args.reason, ends_at, device_id=args.device, rule=args.rule, site=args.site)
            print(f"{row['id']}: silenced {args.device or args.rule or args.site} until {local(ends_at)} ({args.reason})")
        elif args.action == "silences":
            rows = queue.silences()
            if args.json:
                print(json.dumps(rows, ensure_ascii=False, indent=1))
                return 0
            table = Table(title=f"{len(rows)} silences")
            for column in ("id", "device", "rule", "site", "until", "reason", "by"):
                table.add_column(column)
            for r in rows:
                table.add_row(r["id"], r["device_id"] or "*", r["rule"] or "*", r["site"] or "*", local(r["ends_at"]),
                              r["reason"], r["created_by"])
            console.print(table)
    except NotFound as exc:
        print(f"streetbrain incidents {args.action}: no incident {exc.args[0]!r}", file=sys.stderr)
        return 1
    except (lifecycle.TransitionError, ValueError) as exc:
        print(f"streetbrain incidents {args.action}: refused: {exc}", file=sys.stderr)
        return 1
    finally:
        db.close()
    return 0


def run_report(config: Config, args: argparse.Namespace) -> int:
    until = args.until if args.until is not None else time.time()
    since = args.since if args.since is not None else until - 7 * 86400
    db = Database(config.incidents.url)
    try:
        figures = report.build(db, since, until)
    finally:
        db.close()
    if args.png:
        report.write_png(figures, args.png)
    if args.json:
        print(json.dumps(figures, ensure_ascii=False, indent=1))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"[bold]{figures['incidents']}[/] incidents opened {local(since)} – {local(until)}; "
                  f"{figures['open']} open; repeat-alert rate {figures['repeat_alert_rate_pct']}%; "
                  f"{figures['storms']} storms", highlight=False)
    table = Table(title="SLA per stage")
    for column in ("stage", "judged", "within target", "%", "median", "p90"):
        table.add_column(column)
    for stage, s in figures["stages"].items():
        table.add_row(stage, str(s["judged"]), str(s["within_target"]), str(s["within_target_pct"]),
                      f"{s['median_s']} s" if s["median_s"] is not None else "-",
                      f"{s['p90_s']} s" if s["p90_s"] is not None else "-")
    console.print(table)
    for key in ("by_kind", "by_site", "by_rule"):
        console.print(f"{key.replace('_', ' ')}: " + ", ".join(f"{k} {v}" for k, v in figures[key].items()),
                      highlight=False)
    if args.png:
        console.print(f"charts written to {args.png}")
    return 0
