"""What decides where an alert goes: routing to a team, silences, inhibition, storm grouping.

Each takes rows of the store and an alert, and answers; none of them writes.
"""

from __future__ import annotations

import json
from typing import Any

from gateway.config import Config, InhibitRule
from rules.events import AlertEvent


def dedup_key(alert: AlertEvent) -> str:
    """At most one open incident per (device, port, rule)."""
    series = f"{alert.device_id}#{alert.port}" if alert.port else alert.device_id
    return f"{series}/{alert.rule}"


def group_key(site: str, rule: str) -> str:
    return f"group:{site}/{rule}"


def route(config: Config, site_id: str, kind: str) -> tuple[str | None, str | None]:
    """(team, fire station) responsible for a site: the squad owning its roads and, for the kinds
    that burn, the nearest micro fire station ("1+3+N")."""
    site = config.site(site_id)
    if site is None:
        return None, None
    station = site.fire_station if kind in config.incidents.fire_kinds else None
    return site.team, station


def silence_for(silences: list[dict[str, Any]], alert: AlertEvent, now: float) -> dict[str, Any] | None:
    """The first active silence matching the alert's device, rule and site (unset matchers match all)."""
    for s in silences:
        if s["cancelled_at"] is not None or not (s["starts_at"] <= now < s["ends_at"]):
            continue
        if s["device_id"] not in (None, alert.device_id):
            continue
        if s["rule"] not in (None, alert.rule):
            continue
        if s["site"] not in (None, alert.site):
            continue
        return s
    return None


def source_rules_for(rules: list[InhibitRule], target_rule: str) -> set[str]:
    """The rules whose open incidents could hold back an alert of ``target_rule``."""
    return {source for rule in rules if target_rule in rule.target_rules for source in rule.source_rules}


def inhibitor_for(rules: list[InhibitRule], open_incidents: list[dict[str, Any]],
                  alert: AlertEvent) -> tuple[dict[str, Any], InhibitRule] | None:
    """An open incident whose alert is active and whose rule holds this alert back."""
    for rule in rules:
        if alert.rule not in rule.target_rules:
            continue
        for incident in open_incidents:
            if incident["rule"] not in rule.source_rules or not incident["alert_active"]:
                continue
            members = json.loads(incident["members"])
            if rule.source_group_only and len(members) < 2:
                continue
            if incident["dedup_key"] in (dedup_key(alert), group_key(alert.site, alert.rule)):
                continue  # an alert is never held back by its own incident or its own storm
            if "site" in rule.equal and incident["site"] != alert.site:
                continue
            if "device_id" in rule.equal and alert.device_id not in members:
                continue
            return incident, rule
    return None
