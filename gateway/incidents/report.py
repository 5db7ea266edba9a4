"""SLA compliance and what the queue saw over a period: the figures the seeds report on (time to
dispatch and to arrive, repeat alarms), per stage, kind, site and rule."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import numpy as np

from gateway.incidents.store import Database

STAGES = (("dispatch", "dispatched_at", "dispatch_deadline"), ("arrive", "on_site_at", "arrive_deadline"),
          ("resolve", "resolved_at", "resolve_deadline"))


def build(db: Database, since: float, until: float) -> dict[str, Any]:
    rows = db.fetchall("SELECT * FROM incidents WHERE opened_at >= ? AND opened_at < ? AND "
                       "(result IS NULL OR result NOT LIKE 'merged into %')", (since, until))
    stages = {}
    for stage, done, deadline in STAGES:
        # an incident counts for a stage once its clock has stopped or its deadline has passed
        judged = [r for r in rows if r[deadline] is not None and (r[done] is not None or r[deadline] < until)]
        within = [r for r in judged if r[done] is not None and r[done] <= r[deadline]]
        durations = np.array([r[done] - r["opened_at"] for r in rows if r[done] is not None])
        stages[stage] = {
            "judged": len(judged),
            "within_target": len(within),
            "within_target_pct": round(100.0 * len(within) / len(judged), 1) if judged else None,
            "median_s": round(float(np.median(durations)), 1) if durations.size else None,
            "p90_s": round(float(np.percentile(durations, 90)), 1) if durations.size else None,
        }
    repeated = [r for r in rows if r["occurrences"] > 1]
    return {
        "since": since,
        "until": until,
        "incidents": len(rows),
        "open": sum(1 for r in rows if r["is_open"]),
        "stages": stages,
        "repeat_alert_rate_pct": round(100.0 * len(repeated) / len(rows), 1) if rows else None,
        "occurrences": sum(r["occurrences"] for r in rows),
        "storms": sum(1 for r in rows if len(json.loads(r["members"])) > 1),
        "by_kind": dict(Counter(r["kind"] for r in rows).most_common()),
        "by_site": dict(Counter(r["site"] for r in rows).most_common()),
        "by_rule": dict(Counter(r["rule"] for r in rows).most_common()),
        "by_severity": dict(Counter(r["severity"] for r in rows).most_common()),
    }


def write_png(report: dict[str, Any], path: str) -> None:
    """The same figures as charts: compliance per stage, and incidents by kind, site and rule."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    stages = report["stages"]
    names = list(stages)
    pct = [stages[s]["within_target_pct"] or 0 for s in names]
    axes[0][0].bar(names, pct, color=["#2e7d32" if p >= 90 else "#f9a825" if p >= 70 else "#c62828" for p in pct])
    axes[0][0].set_ylim(0, 100)
    axes[0][0].set_title("SLA: % within target per stage")
    for ax, key, title in ((axes[0][1], "by_kind", "incidents by kind"), (axes[1][0], "by_site", "incidents by site"),
                           (axes[1][1], "by_rule", "incidents by rule")):
        items = list(report[key].items())[:12]
        ax.barh([k for k, _ in items][::-1], [v for _, v in items][::-1], color="#1565c0")
        ax.set_title(title)
    fig.suptitle(f"streetbrain report: {report['incidents']} incidents, repeat-alert rate "
                 f"{report['repeat_alert_rate_pct']}%")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
