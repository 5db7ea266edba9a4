"""The incident queue: alert events in, incidents and their every change out.

An alert event is, in order: held by a silence, or held by an inhibiting incident (both recorded in
``suppressed``); or added to the open incident of its (device, rule) as an occurrence; or added to
its site's storm (group incident); or it opens an incident routed to the site's team. Clearing an
alert does not close its incident: people do, after handling and a revisit. Every change is a row
of the append-only audit trail, with actor, time and note, and is returned as an
:class:`IncidentChange` for publishing.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

from gateway.config import Config
from gateway.incidents import lifecycle, policy, sla
from gateway.incidents.store import Conflict, Database
from rules.events import AlertEvent

GATEWAY = "gateway"  # the actor of what the gateway does by itself
SHANGHAI = timezone(timedelta(hours=8))
SEVERITY_RANK = {s: i for i, s in enumerate(sla.SEVERITY_ORDER)}
SLA_BATCH = 200  # incidents timed in one transaction: a storm's warnings cost one commit, not hundreds


@dataclass(frozen=True)
class IncidentChange:
    incident: dict[str, Any]
    action: str
    actor: str
    at: float
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**public(self.incident), "change": {"action": self.action, "actor": self.actor, "at": self.at,
                                                    "note": self.note}}


def public(incident: dict[str, Any]) -> dict[str, Any]:
    out = dict(incident)
    out["members"] = json.loads(out["members"])
    out["sla_warned"] = sla.stages(out["sla_warned"])
    out["sla_breached"] = sla.stages(out["sla_breached"])
    out["is_open"] = bool(out["is_open"])
    out["alert_active"] = bool(out["alert_active"])
    out.pop("dedup_key", None)
    out.pop("sla_next_at", None)  # the SLA tick's schedule, not part of the incident
    return out


def new_id(now: float) -> str:
    return f"INC-{datetime.fromtimestamp(now, SHANGHAI):%Y%m%d}-{secrets.token_hex(4)}"


def _title(message: str) -> str:
    return message.split("】", 1)[-1].split("] ", 1)[-1]


class NotFound(KeyError):
    pass


class IncidentQueue:
    def __init__(self, config: Config, db: Database, clock: Callable[[], float] = time.time):
        self.config = config
        self.db = db
        self.clock = clock

    # -- alerts in --------------------------------------------------------------------------------
    def absorb(self, alerts: list[AlertEvent], now: float | None = None) -> list[IncidentChange]:
        now = self.clock() if now is None else now
        return self.absorb_batches([(alerts, now)])

    def absorb_batches(self, batches: list[tuple[list[AlertEvent], float]]) -> list[IncidentChange]:
        """The alerts of several batches, in order, each on its batch's clock, in one transaction (one
        fsync for a storm, or for what queued while the last commit was under way); should another
        gateway write the same incident meanwhile, it is rolled back and taken one alert at a time."""
        timed = [(alert, now) for alerts, now in batches for alert in alerts]
        if len(timed) > 1:
            try:
                with self.db.transaction():
                    return [change for alert, now in timed for change in self._absorb_one(alert, now)]
            except Conflict:
                pass
        changes: list[IncidentChange] = []
        for alert, now in timed:
            for attempt in range(3):
                try:
                    with self.db.transaction():
                        changes += self._absorb_one(alert, now)
                    break
                except Conflict:
                    # another gateway opened the same incident a moment ago: take it from the top
                    if attempt == 2:
                        raise
        return changes

    def _absorb_one(self, alert: AlertEvent, now: float) -> list[IncidentChange]:
        seen = (alert.alert_id, alert.event, alert.ts)
        if (self.db.fetchone("SELECT 1 AS x FROM occurrences WHERE alert_id = ? AND event = ? AND ts = ?", seen)
                or self.db.fetchone("SELECT 1 AS x FROM suppressed WHERE alert_id = ? AND event = ? AND ts = ?", seen)):
            return []  # this very alert event again (redelivered after a restart): on record already
        key = policy.dedup_key(alert)
        incident = self.db.fetchone("SELECT * FROM incidents WHERE dedup_key = ? AND is_open = 1", (key,))
        if alert.event == "cleared":
            return self._cleared(alert, key, incident, now)
        if incident is not None:
            return self._occurrence(incident, alert, now)
        silence = policy.silence_for(self.db.fetchall(
            "SELECT * FROM silences WHERE cancelled_at IS NULL AND starts_at <= ? AND ends_at > ? AND "
            "(device_id IS NULL OR device_id = ?) AND (rule IS NULL OR rule = ?) AND (site IS NULL OR site = ?)",
            (now, now, alert.device_id, alert.rule, alert.site)), alert, now)
        if silence is not None:
            self._suppress(alert, now, "silenced", silence["id"])
            return []
        sources = policy.source_rules_for(self.config.incidents.inhibit, alert.rule)
        if sources:
            marks = ", ".join("?" * len(sources))
            found = policy.inhibitor_for(self.config.incidents.inhibit, self.db.fetchall(
                f"SELECT * FROM incidents WHERE is_open = 1 AND site = ? AND rule IN ({marks})",
                (alert.site, *sorted(sources))), alert)
            if found is not None:
                source, _ = found
                self._suppress(alert, now, "inhibited", source["id"])
                return [self._audit(source, "inhibited", GATEWAY, now,
                                    f"{alert.rule} on {alert.device_id} held back by this incident")]
        grouping = self.config.incidents.grouping
        if alert.rule not in grouping.exclude_rules:
            return self._maybe_group(alert, now) or self._open(alert, key, now)
        return self._open(alert, key, now)

    def _open(self, alert: AlertEvent, key: str, now: float, members: list[str] | None = None,
              state: str = "new") -> list[IncidentChange]:
        team, station = policy.route(self.config, alert.site, alert.kind)
        group = members is not None
        row: dict[str, Any] = {
            "id": new_id(now), "dedup_key": key, "is_open": 1, "state": state, "kind": alert.kind,
            "rule": alert.rule, "site": alert.site, "device_id": None if group else alert.device_id,
            "port": None if group else alert.port, "members": json.dumps(members or [alert.device_id]),
            "severity": alert.severity, "opened_severity": alert.severity, "team": team, "fire_station": station,
            "assignee": None,
            "title_zh": (f"{alert.site} 多台设备同时告警：{alert.rule}" if group else _title(alert.message_zh)),
            "title_en": (f"Many devices at {alert.site} raised {alert.rule} together" if group
                         else _title(alert.message_en)),
            "alert_id": alert.alert_id, "alert_active": 1, "inhibited_by": None, "silenced_by": None,
            "occurrences": 1, "last_value": alert.value, "last_ts": alert.ts, "opened_at": now,
            "acknowledged_at": None, "dispatched_at": None, "on_site_at": None, "resolved_at": None,
            "closed_at": None, **sla.deadlines(self.config.sla, alert.kind, alert.severity, now),
            "sla_warned": "", "sla_breached": "", "result": None, "updated_at": now,
        }
        row["sla_next_at"] = sla.next_check(row)
        columns = ", ".join(row)
        self.db.execute(f"INSERT INTO incidents ({columns}) VALUES ({', '.join('?' * len(row))})", list(row.values()))
        self._add_occurrence(row, alert)
        note = f"routed to {team}" + (f", nearest fire station {station}" if station else "")
        return [self._audit(row, "opened", GATEWAY, now, note, to_state=state)]

    def _occurrence(self, incident: dict[str, Any], alert: AlertEvent, now: float) -> list[IncidentChange]:
        if not self._add_occurrence(incident, alert):
            return []  # the same alert event again (a redelivery after a restart): already counted
        members = json.loads(incident["members"])
        if alert.device_id not in members:
            members.append(alert.device_id)
        worse = SEVERITY_RANK[alert.severity] > SEVERITY_RANK[incident["severity"]]
        self.db.execute("UPDATE incidents SET occurrences = occurrences + 1, last_value = ?, last_ts = ?, "
                        "alert_active = 1, alert_id = ?, members = ?, severity = ?, updated_at = ? WHERE id = ?",
                        (alert.value, alert.ts, alert.alert_id, json.dumps(members),
                         alert.severity if worse else incident["severity"], now, incident["id"]))
        incident = self._get(incident["id"])
        action = "escalated" if worse else "occurrence"
        note = (f"{alert.device_id}: {alert.severity} ({alert.event}, {alert.field} {alert.value:g})"
                if worse else f"{alert.device_id} again ({alert.event}); {incident['occurrences']} in all")
        return [self._audit(incident, action, GATEWAY, now, note)]

    def _maybe_group(self, alert: AlertEvent, now: float) -> list[IncidentChange]:
        grouping = self.config.incidents.grouping
        gkey = policy.group_key(alert.site, alert.rule)
        group = self.db.fetchone("SELECT * FROM incidents WHERE dedup_key = ? AND is_open = 1", (gkey,))
        if group is not None:
            return self._occurrence(group, alert, now)
        recent = self.db.fetchall(
            "SELECT * FROM incidents WHERE is_open = 1 AND site = ? AND rule = ? AND state = 'new' "
            "AND opened_at >= ? AND dedup_key NOT LIKE 'group:%' ORDER BY opened_at",
            (alert.site, alert.rule, now - grouping.window_s))
        if len(recent) + 1 < grouping.min_devices:
            return []
        members = list(dict.fromkeys([r["device_id"] for r in recent] + [alert.device_id]))
        changes = self._open(alert, gkey, now, members=members)
        group = self._get(changes[0].incident["id"])
        first = min(r["opened_at"] for r in recent)
        self.db.execute("UPDATE incidents SET occurrences = occurrences + ?, opened_at = ?, "
                        "dispatch_deadline = ?, arrive_deadline = ?, resolve_deadline = ?, sla_next_at = ? WHERE id = ?",
                        (len(recent), first, *sla.deadlines(self.config.sla, alert.kind, alert.severity, first).values(),
                         first, group["id"]))  # the clocks run from the first member: let the next tick look
        for member in recent:
            self.db.execute("UPDATE incidents SET is_open = 0, state = 'closed', closed_at = ?, result = ?, "
                            "updated_at = ? WHERE id = ?",
                            (now, f"merged into {group['id']}", now, member["id"]))
            changes.append(self._audit(self._get(member["id"]), "merged", GATEWAY, now,
                                       f"merged into the storm {group['id']}", from_state=member["state"],
                                       to_state="closed"))
        changes[0] = IncidentChange(self._get(group["id"]), "opened", GATEWAY, now, changes[0].note)
        return changes

    def _cleared(self, alert: AlertEvent, key: str, incident: dict[str, Any] | None,
                 now: float) -> list[IncidentChange]:
        if incident is None:
            incident = self.db.fetchone("SELECT * FROM incidents WHERE dedup_key = ? AND is_open = 1",
                                        (policy.group_key(alert.site, alert.rule),))
        if incident is None:
            return []  # nothing open: the alert was held back (silenced, inhibited) or its incident closed
        if not self._add_occurrence(incident, alert):
            return []
        still_active = 0
        if incident["dedup_key"].startswith("group:"):
            active = self.db.fetchall(
                "SELECT device_id, event FROM occurrences WHERE incident_id = ? ORDER BY ts", (incident["id"],))
            latest = {r["device_id"]: r["event"] for r in active}
            still_active = int(any(e != "cleared" for e in latest.values()))
        self.db.execute("UPDATE incidents SET alert_active = ?, updated_at = ? WHERE id = ?",
                        (still_active, now, incident["id"]))
        return [self._audit(self._get(incident["id"]), "alert_cleared", GATEWAY, now,
                            f"{alert.device_id}: {alert.rule} back to normal ({alert.field} {alert.value:g}); "
                            "the incident stays open until resolved")]

    def _add_occurrence(self, incident: dict[str, Any], alert: AlertEvent) -> bool:
        try:
            self.db.execute("INSERT INTO occurrences (incident_id, alert_id, event, device_id, severity, value, ts, "
                            "gateway_time) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                            (incident["id"], alert.alert_id, alert.event, alert.device_id, alert.severity,
                             alert.value, alert.ts, alert.gateway_time))
        except Conflict:
            return False
        return True

    def _suppress(self, alert: AlertEvent, now: float, reason: str, by_id: str) -> None:
        try:
            self.db.execute("INSERT INTO suppressed (alert_id, event, rule, kind, site, device_id, severity, value, ts, "
                            "gateway_time, reason, by_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            (alert.alert_id, alert.event, alert.rule, alert.kind, alert.site, alert.device_id,
                             alert.severity, alert.value, alert.ts, alert.gateway_time, reason, by_id))
        except Conflict:
            pass  # recorded already

    # -- people act ---------------------------------------------------------------------------------
    def act(self, incident_id: str, action: str, actor: str, note: str | None = None, team: str | None = None,
            member: str | None = None, now: float | None = None) -> IncidentChange:
        """One lifecycle action by an operator; raises TransitionError, NotFound or ValueError."""
        now = self.clock() if now is None else now
        if not actor.strip():
            raise ValueError("an action needs the operator who takes it")
        with self.db.transaction():
            incident = self._get(incident_id)
            spec = lifecycle.check(action, incident["state"], note)
            sets: dict[str, Any] = {"updated_at": now}
            detail = note
            if action in ("dispatch", "reassign"):
                team = team or incident["team"]
                if team is None or all(t.id != team for t in self.config.teams):
                    raise ValueError(f"team {team!r} is not configured; teams: "
                                     f"{', '.join(t.id for t in self.config.teams)}")
                sets.update(team=team, assignee=member)
                detail = f"to {team}" + (f" ({member})" if member else "") + (f": {note}" if note else "")
            if action == "ack":
                sets["acknowledged_at"] = now
            elif action == "dispatch":
                sets["dispatched_at"] = now
            elif action == "arrive":
                sets["on_site_at"] = now
            elif action == "resolve":
                sets.update(resolved_at=now, result=note)
            elif action == "close":
                sets.update(closed_at=now, is_open=0)
            elif action == "reopen":
                sets.update(is_open=1, closed_at=None, resolved_at=None, result=None, opened_at=now,
                            acknowledged_at=None, dispatched_at=None, on_site_at=None, sla_warned="",
                            sla_breached="", sla_next_at=now,  # new clocks: the next tick schedules them
                            **sla.deadlines(self.config.sla, incident["kind"], incident["severity"], now))
            if spec.to is not None:
                sets["state"] = spec.to
            assignments = ", ".join(f"{column} = ?" for column in sets)
            try:
                self.db.execute(f"UPDATE incidents SET {assignments} WHERE id = ?", [*sets.values(), incident_id])
            except Conflict:
                raise lifecycle.TransitionError(
                    "cannot reopen: a newer incident for the same device and rule is open; comment on that one"
                ) from None
            return self._audit(self._get(incident_id), action, actor, now, detail, from_state=incident["state"],
                               to_state=spec.to or incident["state"])

    # -- clocks ---------------------------------------------------------------------------------------
    def sla_tick(self, now: float | None = None) -> list[IncidentChange]:
        """Warn at 80% of each running deadline; on breach escalate: severity up one, the escalation
        team told, and an incident that was only acknowledged goes back to new (re-triggered).

        Reads only the incidents whose ``sla_next_at`` is due (an index), not every open one: a
        city's open incidents are read when they have something to time, not every few seconds.
        ``sla_next_at`` may be early (a clock stopped by a dispatch, an incident closed) but never
        late; an incident read early is rescheduled and nothing else happens to it."""
        now = self.clock() if now is None else now
        changes: list[IncidentChange] = []
        due = [r["id"] for r in self.db.fetchall("SELECT id FROM incidents WHERE sla_next_at IS NOT NULL AND "
                                                 "sla_next_at <= ? ORDER BY sla_next_at", (now,))]
        for start in range(0, len(due), SLA_BATCH):  # one commit (one fsync) for a batch of incidents
            with self.db.transaction():
                for incident_id in due[start:start + SLA_BATCH]:
                    changes += self._sla_step(self._get(incident_id), now)
        return changes

    def _sla_step(self, incident: dict[str, Any], now: float) -> list[IncidentChange]:
        changes: list[IncidentChange] = []
        if incident["is_open"] and incident["state"] in sla.CLOCKED_STATES:
            for clock in sla.running(incident, now):
                warned, breached = set(sla.stages(incident["sla_warned"])), set(sla.stages(incident["sla_breached"]))
                if clock.breached and clock.stage not in breached:
                    severity = sla.raise_one(incident["severity"])
                    state = "new" if incident["state"] == "acknowledged" else incident["state"]
                    # conditional on what was read: another gateway that got there first wins
                    if not self.db.execute("UPDATE incidents SET sla_breached = ?, sla_warned = ?, severity = ?, "
                                           "state = ?, updated_at = ? WHERE id = ? AND sla_breached = ?",
                                           (",".join(sorted(breached | {clock.stage})),
                                            ",".join(sorted(warned | {clock.stage})), severity, state, now,
                                            incident["id"], incident["sla_breached"])):
                        return changes
                    escalation = self.config.incidents.escalation_team
                    note = (f"{clock.stage} deadline missed by {now - clock.deadline:.0f} s; severity "
                            f"{incident['severity']} → {severity}" + (f"; {escalation} notified" if escalation else "")
                            + ("; re-triggered: acknowledged but not acted on" if state != incident["state"] else ""))
                    before = incident["state"]
                    incident = self._get(incident["id"])
                    changes.append(self._audit(incident, "sla_breach", GATEWAY, now, note, from_state=before,
                                               to_state=state))
                elif not clock.breached and clock.fraction >= sla.WARN_AT and clock.stage not in warned:
                    if not self.db.execute("UPDATE incidents SET sla_warned = ?, updated_at = ? "
                                           "WHERE id = ? AND sla_warned = ?",
                                           (",".join(sorted(warned | {clock.stage})), now, incident["id"],
                                            incident["sla_warned"])):
                        return changes
                    incident = self._get(incident["id"])
                    changes.append(self._audit(incident, "sla_warning", GATEWAY, now,
                                               f"{clock.stage} deadline in {clock.deadline - now:.0f} s"))
        self.db.execute("UPDATE incidents SET sla_next_at = ? WHERE id = ?", (sla.next_check(incident), incident["id"]))
        return changes

    # -- silences ---------------------------------------------------------------------------------------
    def silence(self, actor: str, reason: str, ends_at: float, device_id: str | None = None,
                rule: str | None = None, site: str | None = None, now: float | None = None) -> dict[str, Any]:
        now = self.clock() if now is None else now
        if not reason.strip():
            raise ValueError("a silence needs a reason")
        if device_id is None and rule is None and site is None:
            raise ValueError("a silence needs a device, a rule or a site (silencing everything is not allowed)")
        if ends_at <= now:
            raise ValueError("a silence must end in the future")
        row = {"id": f"SIL-{secrets.token_hex(4)}", "device_id": device_id, "rule": rule, "site": site,
               "starts_at": now, "ends_at": ends_at, "reason": reason, "created_by": actor, "created_at": now,
               "cancelled_at": None}
        with self.db.transaction():
            self.db.execute(f"INSERT INTO silences ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                            list(row.values()))
        return row

    def silences(self, active_at: float | None = None) -> list[dict[str, Any]]:
        if active_at is None:
            return self.db.fetchall("SELECT * FROM silences ORDER BY created_at DESC")
        return self.db.fetchall("SELECT * FROM silences WHERE cancelled_at IS NULL AND starts_at <= ? AND ends_at > ? "
                                "ORDER BY created_at DESC", (active_at, active_at))

    # -- reading ----------------------------------------------------------------------------------------
    def _get(self, incident_id: str) -> dict[str, Any]:
        row = self.db.fetchone("SELECT * FROM incidents WHERE id = ?", (incident_id,))
        if row is None:
            raise NotFound(incident_id)
        return row

    def get(self, incident_id: str) -> dict[str, Any]:
        """One incident with its audit trail and occurrences."""
        incident = public(self._get(incident_id))
        incident["audit"] = self.db.fetchall("SELECT at, actor, action, from_state, to_state, note FROM audit "
                                             "WHERE incident_id = ? ORDER BY seq", (incident_id,))
        incident["occurrence_log"] = self.db.fetchall(
            "SELECT alert_id, event, device_id, severity, value, ts, gateway_time FROM occurrences "
            "WHERE incident_id = ? ORDER BY ts, gateway_time", (incident_id,))
        incident["suppressed"] = self.db.fetchall(
            "SELECT alert_id, event, rule, device_id, severity, ts, reason FROM suppressed WHERE by_id = ? "
            "ORDER BY ts", (incident_id,))
        return incident

    def list(self, state: str | None = None, kind: str | None = None, site: str | None = None,
             severity: str | None = None, open_only: bool = False, overdue_at: float | None = None,
             limit: int = 200) -> list[dict[str, Any]]:
        where, params = [], []
        for column, value in (("state", state), ("kind", kind), ("site", site), ("severity", severity)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        if open_only:
            where.append("is_open = 1")
        if overdue_at is not None:
            where.append("is_open = 1 AND ((dispatched_at IS NULL AND dispatch_deadline < ?) OR "
                         "(on_site_at IS NULL AND arrive_deadline < ?) OR (resolved_at IS NULL AND resolve_deadline < ?))")
            params += [overdue_at] * 3
        sql = "SELECT * FROM incidents" + (f" WHERE {' AND '.join(where)}" if where else "")
        rows = self.db.fetchall(sql + " ORDER BY opened_at DESC LIMIT ?", (*params, limit))
        return [public(r) for r in rows]

    def sla_figures(self, now: float) -> dict[str, Any]:
        """Counts for /metrics: incidents by state, and open ones with a clock past its deadline."""
        by_state = {r["state"]: r["n"] for r in self.db.fetchall("SELECT state, COUNT(*) AS n FROM incidents GROUP BY state")}
        overdue = len(self.list(overdue_at=now, limit=100000))
        return {"by_state": by_state, "overdue": overdue}

    def changes_after(self, seq: int) -> tuple[int, list[IncidentChange]]:
        """Audit lines after ``seq`` as changes (to publish what other processes did)."""
        rows = self.db.fetchall("SELECT * FROM audit WHERE seq > ? ORDER BY seq", (seq,))
        out = [IncidentChange(self._get(r["incident_id"]), r["action"], r["actor"], r["at"], r["note"]) for r in rows]
        return (rows[-1]["seq"] if rows else seq), out

    def last_audit_seq(self) -> int:
        row = self.db.fetchone("SELECT MAX(seq) AS seq FROM audit")
        return int(row["seq"]) if row and row["seq"] is not None else 0

    # -- the trail ----------------------------------------------------------------------------------------
    def _audit(self, incident: dict[str, Any], action: str, actor: str, at: float, note: str | None,
               from_state: str | None = None, to_state: str | None = None) -> IncidentChange:
        self.db.execute("INSERT INTO audit (incident_id, at, actor, action, from_state, to_state, note) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (incident["id"], at, actor, action, from_state, to_state, note))
        return IncidentChange(incident, action, actor, at, note)
