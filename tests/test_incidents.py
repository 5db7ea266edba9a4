"""The incident queue, each behaviour on SQLite and on a real PostgreSQL."""

from __future__ import annotations

import random

import pytest

from gateway.incidents import sla

from gateway.config import GroupingConfig, InhibitRule
from gateway.incidents.lifecycle import TransitionError
from gateway.incidents.queue import IncidentQueue
from gateway.incidents.store import Conflict, Database, StoreError
from rules.events import AlertEvent

T0 = 1_795_300_000.0


def alert(device: str = "smk-wangma-001", rule: str = "smoke_alarm", event: str = "raised",
          severity: str = "critical", kind: str = "smoke", site: str = "wangma", ts: float = T0,
          value: float = 1.0, port: int | None = None) -> AlertEvent:
    return AlertEvent(alert_id=f"{device}/{rule}/{int(ts * 1000)}", event=event, rule=rule, kind=kind,  # type: ignore[arg-type]
                      severity=severity, previous_severity=None, site=site, device_id=device, port=port,
                      device_name=device, field="alarm", value=value, threshold=1.0, op=">=", unit="", ts=ts,
                      raised_ts=ts, gateway_time=ts + 0.01, message_zh=f"【紧急·告警】{device} 烟感报警",
                      message_en=f"[critical raised] Smoke alarm at {device}")


@pytest.fixture
def queue(street_config, store_url):
    config = street_config.model_copy(deep=True)
    config.incidents.url = store_url
    db = Database(store_url)
    yield IncidentQueue(config, db)
    db.close()


def test_an_alert_opens_an_incident_routed_to_the_sites_squad_and_fire_station(queue):
    [change] = queue.absorb([alert()], now=T0)
    incident = queue.get(change.incident["id"])
    assert (incident["state"], incident["team"], incident["fire_station"]) == ("new", "squad-1", "fire-west")
    assert incident["severity"] == "critical" and incident["occurrences"] == 1
    assert incident["title_zh"] == "smk-wangma-001 烟感报警"
    assert incident["dispatch_deadline"] == T0 + 60 and incident["arrive_deadline"] == T0 + 300
    assert [(a["actor"], a["action"]) for a in incident["audit"]] == [("gateway", "opened")]


def test_noise_incident_names_no_fire_station(queue):
    [change] = queue.absorb([alert("noise-02", "laeq_over_limit", kind="noise", site="dongxin", severity="warning")],
                            now=T0)
    assert (change.incident["team"], change.incident["fire_station"]) == ("squad-3", None)


def test_a_repeat_alert_adds_an_occurrence_not_a_second_incident(queue):
    queue.absorb([alert(ts=T0)], now=T0)
    queue.absorb([alert(event="cleared", ts=T0 + 30)], now=T0 + 30)
    queue.absorb([alert(ts=T0 + 60)], now=T0 + 60)
    [incident] = queue.list()
    assert incident["occurrences"] == 2 and incident["last_ts"] == T0 + 60 and incident["alert_active"]
    assert [o["event"] for o in queue.get(incident["id"])["occurrence_log"]] == ["raised", "cleared", "raised"]


def test_the_same_alert_event_redelivered_is_counted_once(queue):
    queue.absorb([alert()], now=T0)
    queue.absorb([alert()], now=T0 + 5)  # the reading came again after a restart: the same alert id
    [incident] = queue.list()
    assert incident["occurrences"] == 1


def test_after_close_a_new_alert_opens_a_new_incident(queue):
    [first] = queue.absorb([alert()], now=T0)
    incident_id = first.incident["id"]
    queue.act(incident_id, "resolve", "王丽", note="burnt toast, no fire", now=T0 + 100)
    queue.act(incident_id, "close", "王丽", note="revisit: resident fine", now=T0 + 200)
    [second] = queue.absorb([alert(ts=T0 + 300)], now=T0 + 300)
    assert second.incident["id"] != incident_id
    assert [i["state"] for i in queue.list()] == ["new", "closed"]


def test_the_database_itself_refuses_a_second_open_incident_for_one_device_and_rule(queue):
    [change] = queue.absorb([alert()], now=T0)
    row = dict(queue.db.fetchone("SELECT * FROM incidents WHERE id = ?", (change.incident["id"],)))
    row["id"] = "INC-duplicate"
    with pytest.raises(Conflict):
        queue.db.execute(f"INSERT INTO incidents ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                         list(row.values()))


def test_a_power_cut_taking_30_chargers_offline_is_one_group_incident(queue):
    queue.config.incidents.grouping = GroupingConfig(window_s=60, min_devices=5)
    ports = [alert(f"evc-wangma-0{1 + n // 10}", "offline", kind="ev_charger", severity="warning", port=1 + n % 10,
                   ts=T0 + n) for n in range(30)]
    for n, a in enumerate(ports):
        queue.absorb([a], now=T0 + n * 0.5)
    open_incidents = queue.list(open_only=True)
    assert len(open_incidents) == 1
    group = open_incidents[0]
    assert group["device_id"] is None and sorted(group["members"]) == ["evc-wangma-01", "evc-wangma-02", "evc-wangma-03"]
    assert group["occurrences"] == 30
    merged = [i for i in queue.list() if i["state"] == "closed"]
    assert len(merged) == 4 and all(i["result"] == f"merged into {group['id']}" for i in merged)


def test_smoke_alarms_are_never_grouped(queue):
    queue.config.incidents.grouping = GroupingConfig(window_s=60, min_devices=2)
    queue.absorb([alert(f"smk-wangma-00{n}") for n in range(1, 6)], now=T0)
    assert len(queue.list(open_only=True)) == 5


def test_a_smoke_alarm_inhibits_that_devices_heat_and_offline_alerts_which_stay_on_record(queue):
    queue.config.incidents.inhibit = [InhibitRule(source_rules=["smoke_alarm"], target_rules=["heat_static", "offline"],
                                                  equal=["device_id"])]
    [fire] = queue.absorb([alert()], now=T0)
    queue.absorb([alert(rule="heat_static", severity="major", ts=T0 + 10),
                  alert(rule="offline", severity="major", ts=T0 + 20),
                  alert("smk-wangma-002", rule="heat_static", severity="major", ts=T0 + 30)], now=T0 + 30)
    assert sorted((i["device_id"], i["rule"]) for i in queue.list(open_only=True)) == [
        ("smk-wangma-001", "smoke_alarm"), ("smk-wangma-002", "heat_static")]
    held = queue.get(fire.incident["id"])["suppressed"]
    assert [(s["rule"], s["reason"]) for s in held] == [("heat_static", "inhibited"), ("offline", "inhibited")]


def test_a_silenced_device_opens_no_incident_until_the_silence_expires(queue):
    silence = queue.silence("admin", "detector replaced, testing", ends_at=T0 + 600, device_id="smk-wangma-001",
                            now=T0)
    assert queue.absorb([alert(ts=T0 + 10)], now=T0 + 10) == []
    assert queue.list() == []
    [held] = queue.db.fetchall("SELECT reason, by_id FROM suppressed")
    assert (held["reason"], held["by_id"]) == ("silenced", silence["id"])
    assert [c.action for c in queue.absorb([alert(ts=T0 + 700)], now=T0 + 700)] == ["opened"]  # expired by itself


def test_silences_need_a_reason_a_matcher_and_an_end_in_the_future(queue):
    with pytest.raises(ValueError, match="reason"):
        queue.silence("admin", " ", ends_at=T0 + 60, site="wangma", now=T0)
    with pytest.raises(ValueError, match="device, a rule or a site"):
        queue.silence("admin", "maintenance", ends_at=T0 + 60, now=T0)
    with pytest.raises(ValueError, match="future"):
        queue.silence("admin", "maintenance", ends_at=T0 - 1, site="wangma", now=T0)


def test_the_closed_loop_dispatch_arrive_resolve_close_is_on_record_with_who_when_and_what(queue):
    [change] = queue.absorb([alert()], now=T0)
    incident_id = change.incident["id"]
    queue.act(incident_id, "ack", "王丽", now=T0 + 10)
    queue.act(incident_id, "dispatch", "王丽", team="squad-1", member="熊永信", note="nearest patrol", now=T0 + 40)
    queue.act(incident_id, "arrive", "熊永信", now=T0 + 180)
    queue.act(incident_id, "comment", "熊永信", note="smoke from the kitchen, pan on fire, put out", now=T0 + 200)
    queue.act(incident_id, "resolve", "熊永信", note="pan fire put out; resident unhurt", now=T0 + 400)
    queue.act(incident_id, "close", "张伟", note="revisit next day: stove checked, resident fine", now=T0 + 86400)
    incident = queue.get(incident_id)
    assert incident["state"] == "closed" and not incident["is_open"]
    assert (incident["dispatched_at"], incident["on_site_at"], incident["resolved_at"]) == (T0 + 40, T0 + 180, T0 + 400)
    assert incident["assignee"] == "熊永信" and incident["result"] == "pan fire put out; resident unhurt"
    assert [(a["actor"], a["action"], a["from_state"], a["to_state"]) for a in incident["audit"]] == [
        ("gateway", "opened", None, "new"), ("王丽", "ack", "new", "acknowledged"),
        ("王丽", "dispatch", "acknowledged", "dispatched"), ("熊永信", "arrive", "dispatched", "on_site"),
        ("熊永信", "comment", "on_site", "on_site"), ("熊永信", "resolve", "on_site", "resolved"),
        ("张伟", "close", "resolved", "closed")]
    assert incident["audit"][2]["note"] == "to squad-1 (熊永信): nearest patrol"


def test_illegal_transitions_are_refused_saying_what_is_allowed(queue):
    [change] = queue.absorb([alert()], now=T0)
    with pytest.raises(TransitionError, match="cannot arrive an incident that is new; from new you can: ack, dispatch, "
                                              "resolve, comment"):
        queue.act(change.incident["id"], "arrive", "王丽", now=T0 + 1)
    with pytest.raises(TransitionError, match="resolve needs a note"):
        queue.act(change.incident["id"], "resolve", "王丽", now=T0 + 1)
    with pytest.raises(ValueError, match="team 'squad-9' is not configured"):
        queue.act(change.incident["id"], "dispatch", "王丽", team="squad-9", now=T0 + 1)
    assert queue.get(change.incident["id"])["state"] == "new"


def test_the_audit_trail_cannot_be_changed_or_deleted(queue):
    queue.absorb([alert()], now=T0)
    with pytest.raises(Exception, match="append-only"):
        with queue.db.transaction():
            queue.db.execute("UPDATE audit SET actor = 'someone else'")
    with pytest.raises(Exception, match="append-only"):
        with queue.db.transaction():
            queue.db.execute("DELETE FROM audit")
    assert queue.db.fetchone("SELECT actor FROM audit")["actor"] == "gateway"


def test_sla_warns_at_80_percent_and_a_breach_escalates(queue):
    [change] = queue.absorb([alert("noise-02", "laeq_over_limit", kind="noise", site="dongxin", severity="warning")],
                            now=T0)
    incident_id = change.incident["id"]
    assert queue.sla_tick(now=T0 + 47) == []
    [warning] = queue.sla_tick(now=T0 + 48)  # 80% of the 1-minute dispatch target (seed 003)
    assert (warning.action, warning.note) == ("sla_warning", "dispatch deadline in 12 s")
    assert queue.sla_tick(now=T0 + 50) == []  # warned once
    [breach] = queue.sla_tick(now=T0 + 61)
    assert breach.action == "sla_breach" and breach.incident["severity"] == "major"
    assert breach.note == "dispatch deadline missed by 1 s; severity warning → major; command notified"
    queue.act(incident_id, "dispatch", "王丽", team="squad-3", now=T0 + 70)
    [arrive_warning] = queue.sla_tick(now=T0 + 240)  # the arrival clock (5 min) still runs
    assert arrive_warning.note == "arrive deadline in 60 s"
    assert queue.list(overdue_at=T0 + 240) == []  # dispatched (late): no clock is past its deadline now
    assert [i["id"] for i in queue.list(overdue_at=T0 + 301)] == [incident_id]  # not on site in 5 minutes


def test_an_acknowledged_incident_not_acted_on_in_time_re_triggers(queue):
    [change] = queue.absorb([alert()], now=T0)
    queue.act(change.incident["id"], "ack", "王丽", now=T0 + 5)
    changes = queue.sla_tick(now=T0 + 61)
    breach = next(c for c in changes if c.action == "sla_breach")
    assert breach.incident["state"] == "new" and "re-triggered" in breach.note


def test_reopen_needs_a_reason_and_restarts_the_clocks(queue):
    [change] = queue.absorb([alert()], now=T0)
    incident_id = change.incident["id"]
    queue.act(incident_id, "resolve", "王丽", note="false alarm", now=T0 + 10)
    queue.act(incident_id, "reopen", "王丽", note="alarm again, resident not answering", now=T0 + 500)
    incident = queue.get(incident_id)
    assert (incident["state"], incident["is_open"], incident["dispatch_deadline"]) == ("new", True, T0 + 560)


def test_migrations_are_versioned_and_applied_once(store_url):
    first = Database(store_url)
    first.close()
    again = Database(store_url)
    assert [r["version"] for r in again.fetchall("SELECT version FROM schema_version ORDER BY version")] == [1, 2]
    again.close()


def _due_by_scanning(queue: IncidentQueue, now: float) -> set[tuple[str, str, str]]:
    """What the SLA tick must do at ``now``, found the old way: every open incident, every clock."""
    due = set()
    for incident in queue.db.fetchall("SELECT * FROM incidents WHERE is_open = 1"):
        if incident["state"] not in sla.CLOCKED_STATES:
            continue
        for clock in sla.running(incident, now):
            if clock.breached and clock.stage not in incident["sla_breached"].split(","):
                due.add((incident["id"], "sla_breach", clock.stage))
            elif (not clock.breached and clock.fraction >= sla.WARN_AT
                  and clock.stage not in incident["sla_warned"].split(",")):
                due.add((incident["id"], "sla_warning", clock.stage))
    return due


def test_the_sla_tick_reads_only_due_incidents_and_misses_none_a_full_scan_would_find(queue):
    queue.config.incidents.grouping = GroupingConfig(window_s=30, min_devices=3)
    rng = random.Random(20261202)
    kinds = [("smoke", "smoke_alarm", "critical"), ("noise", "laeq_over_limit", "warning"),
             ("meter", "meter_overheat", "major"), ("ev_charger", "port_overtemp", "warning")]
    now, found, read = T0, 0, []
    for step in range(160):
        now += rng.choice([1, 3, 7, 20, 45, 120])
        roll = rng.random()
        open_ids = [r["id"] for r in queue.db.fetchall("SELECT id FROM incidents WHERE is_open = 1")]
        if roll < 0.35 or not open_ids:
            kind, rule, severity = rng.choice(kinds[1:] if roll < 0.1 else kinds)
            site = rng.choice(["wangma", "dongxin"])
            for n, unit in enumerate(rng.sample(range(6), 3 if roll < 0.1 else 1)):  # now and then a storm
                device = f"{kind}-{site}-{unit}"
                queue.absorb([alert(device, rule, kind=kind, severity=severity, ts=now + n, site=site)], now=now + n)
            now += n
        elif roll < 0.65:
            incident = queue.get(rng.choice(open_ids))
            action = {"new": "ack", "acknowledged": "dispatch", "dispatched": "arrive", "on_site": "resolve",
                      "resolved": rng.choice(["close", "reopen"])}.get(incident["state"])
            if action is not None:
                queue.act(incident["id"], action, "王丽", note="checked", team="squad-1", now=now)
        else:
            expected = _due_by_scanning(queue, now)
            before = queue.db.fetchone("SELECT COUNT(*) AS n FROM incidents WHERE sla_next_at <= ?", (now,))["n"]
            changes = queue.sla_tick(now=now)
            got = {(c.incident["id"], c.action, c.note.split(" ", 1)[0]) for c in changes}
            assert got == expected, f"step {step}"
            found += len(got)
            read.append((before, queue.db.fetchone("SELECT COUNT(*) AS n FROM incidents WHERE is_open = 1")["n"]))
            assert _due_by_scanning(queue, now) == set()  # and nothing is left for a second tick
    assert found >= 20  # the walk did reach warnings and breaches, and storms
    assert queue.db.fetchone("SELECT COUNT(*) AS n FROM incidents WHERE dedup_key LIKE 'group:%'")["n"] >= 3
    # the tick read a fraction of what a full scan reads
    assert sum(r for r, _ in read) < 0.3 * sum(n for _, n in read)


def test_two_gateways_ticking_the_same_store_warn_and_escalate_once(street_config, store_url):
    first, second = Database(store_url), Database(store_url)
    one, other = IncidentQueue(street_config, first), IncidentQueue(street_config, second)
    [change] = one.absorb([alert()], now=T0)
    stale = other._get(change.incident["id"])  # the other gateway read it due, then lost the race
    assert [c.action for c in one.sla_tick(now=T0 + 50)] == ["sla_warning"]
    assert other._sla_step(stale, T0 + 50) == []  # its conditional update found the row changed
    assert [c.action for c in other.sla_tick(now=T0 + 61)] == ["sla_breach"]
    assert one._sla_step(one._get(change.incident["id"]) | {"sla_breached": ""}, T0 + 61) == []
    incident = one.get(change.incident["id"])
    assert [a["action"] for a in incident["audit"]] == ["opened", "sla_warning", "sla_breach"]
    assert incident["severity"] == "critical"  # raised once (critical is the top: it stays)
    first.close()
    second.close()


def test_an_incident_open_when_the_store_is_upgraded_is_timed_from_the_first_tick(street_config, store_url):
    db = Database(store_url)
    queue = IncidentQueue(street_config, db)
    [change] = queue.absorb([alert()], now=T0)
    with db.transaction():  # as a version-1 store left it: no schedule
        db.execute("UPDATE incidents SET sla_next_at = NULL")
        db.execute("DROP INDEX incidents_sla_next")
        db.execute("ALTER TABLE incidents DROP COLUMN sla_next_at")
        db.execute("DELETE FROM schema_version WHERE version = 2")
    db.close()
    db = Database(store_url)  # migrates to version 2
    queue = IncidentQueue(queue.config, db)
    [warning] = queue.sla_tick(now=T0 + 50)
    assert (warning.incident["id"], warning.action) == (change.incident["id"], "sla_warning")
    assert queue.sla_tick(now=T0 + 55) == []
    assert db.fetchone("SELECT sla_next_at FROM incidents")["sla_next_at"] == T0 + 60  # the breach, next
    db.close()


def test_a_bad_store_url_says_so():
    with pytest.raises(StoreError, match="cannot connect to the incident store"):
        Database("postgresql://nobody@127.0.0.1:1/none?connect_timeout=2")


def test_an_alert_event_redelivered_after_its_incident_joined_a_storm_is_not_counted_again(queue):
    queue.config.incidents.grouping = GroupingConfig(window_s=60, min_devices=3)
    first = alert("mtr-wangma-001", "meter_overheat", kind="meter", severity="major", ts=T0)
    queue.absorb([first], now=T0)
    queue.absorb([alert(f"mtr-wangma-00{n}", "meter_overheat", kind="meter", severity="major", ts=T0 + n)
                  for n in (2, 3)], now=T0 + 3)  # a storm: the first incident is merged into it
    queue.absorb([first], now=T0 + 10)  # the gateway was killed before acknowledging: it comes again
    assert queue.db.fetchone("SELECT COUNT(*) AS n FROM occurrences WHERE alert_id = ?", (first.alert_id,))["n"] == 1
