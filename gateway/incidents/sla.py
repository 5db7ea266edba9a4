"""SLA clocks: a deadline per stage (dispatch, arrival on site, resolution) set when an incident
opens, a warning at 80% of each, an escalation on breach. Targets per kind and severity come from
``sla:`` in config.yaml (seeds: noise 1/5/60 min; fire 1-minute response, 5 minutes on site)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

STAGES = ("dispatch", "arrive", "resolve")
DONE_FIELD = {"dispatch": "dispatched_at", "arrive": "on_site_at", "resolve": "resolved_at"}
WARN_AT = 0.8
SEVERITY_ORDER = ("info", "warning", "major", "critical")


def targets(sla: dict[str, dict[str, Any]], kind: str, severity: str) -> dict[str, float] | None:
    """Seconds per stage for (kind, severity); a severity without its own targets takes those of the
    next more severe one that has them (never laxer ones)."""
    per_kind = sla.get(kind) or {}
    for candidate in SEVERITY_ORDER[SEVERITY_ORDER.index(severity):]:
        if candidate in per_kind:
            t = per_kind[candidate]
            return {"dispatch": t.dispatch_s, "arrive": t.arrive_s, "resolve": t.resolve_s}
    return None


def deadlines(sla: dict[str, dict[str, Any]], kind: str, severity: str, opened_at: float) -> dict[str, float | None]:
    t = targets(sla, kind, severity)
    return {f"{stage}_deadline": (opened_at + t[stage]) if t else None for stage in STAGES}


@dataclass(frozen=True)
class Clock:
    stage: str
    deadline: float
    fraction: float  # of the time allowed, used so far

    @property
    def breached(self) -> bool:
        return self.fraction >= 1.0


def running(incident: dict[str, Any], now: float) -> list[Clock]:
    """The stages of an open incident whose clock still runs (not yet done)."""
    out = []
    for stage in STAGES:
        deadline = incident.get(f"{stage}_deadline")
        if deadline is None or incident.get(DONE_FIELD[stage]) is not None:
            continue
        allowed = max(deadline - incident["opened_at"], 1e-9)
        out.append(Clock(stage, deadline, (now - incident["opened_at"]) / allowed))
    return out


def stages(marked: str) -> list[str]:
    """The stages named in an incident's ``sla_warned`` or ``sla_breached`` column ("dispatch,arrive")."""
    return [stage for stage in marked.split(",") if stage]


#: the states in which SLA clocks run (resolved and closed incidents have nothing left to time)
CLOCKED_STATES = ("new", "acknowledged", "dispatched", "on_site")


def next_check(incident: dict[str, Any]) -> float | None:
    """When the SLA tick next has something to do for this incident: the earliest warning not yet
    given or deadline not yet recorded as missed, among its running clocks; None when none is left.
    Stored as ``sla_next_at`` (indexed), so a tick reads only the incidents that are due."""
    if not incident["is_open"] or incident["state"] not in CLOCKED_STATES:
        return None
    warned, breached = stages(incident["sla_warned"]), stages(incident["sla_breached"])
    times = []
    for clock in running(incident, incident["opened_at"]):
        if clock.stage not in warned:
            times.append(incident["opened_at"] + WARN_AT * (clock.deadline - incident["opened_at"]))
        elif clock.stage not in breached:
            times.append(clock.deadline)
    return min(times, default=None)


def raise_one(severity: str) -> str:
    return SEVERITY_ORDER[min(SEVERITY_ORDER.index(severity) + 1, len(SEVERITY_ORDER) - 1)]
