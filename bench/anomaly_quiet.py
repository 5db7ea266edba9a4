"""The shipped anomaly-score rules (config.yaml) over the simulators' quiet-street device models, run
offline through the rule engine: how many alerts each raises in days where nothing is wrong, at its
shipped threshold and at others. This is how those thresholds were set; run it again after any change
to detectors/anomaly.py.

    .venv/bin/python -m bench.anomaly_quiet [--days 2] [--smoke-days 20] [--seed 11]

Every device of the default street's kind (737 smoke detectors, 15 charging points of 10 ports, 14
noise points: simulators/fleet.py) reports as simulators/models.py makes it, with no scripted event,
for ``--days`` (``--smoke-days`` for smoke detectors, which report every four hours). The readings go
through a rule engine that holds only the anomaly rule, in hourly batches, as the gateway would see
them. Nothing is published; the figures are the rule's own.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from gateway.config import load_config
from gateway.registry import KindSeries
from gateway.schemas import READING_MODELS
from rules.engine import ColumnBatch, KindEngine
from rules.model import KindProfile
from simulators.fleet import STREET_SHARES, synthetic
from simulators.models import MODELS

ROOT = Path(__file__).resolve().parent.parent
T0 = 1_800_000_000.0 - 1_800_000_000.0 % 86400 - 8 * 3600  # a local (UTC+8) midnight
HOUR_S = 3600.0


def quiet_readings(kind: str, field: str, days: float,
                   seed: int) -> tuple[KindSeries, np.ndarray, np.ndarray, np.ndarray]:
    """(the series, row of each reading, device time of each, value of ``field``), in device time order."""
    devices = synthetic(STREET_SHARES[kind], ["street"], kinds=[kind])
    series = KindSeries(kind)
    rows, ts, values = [], [], []
    end = T0 + days * 86400
    for number, spec in enumerate(devices):
        series.add(spec)  # a DeviceSpec has the registry's attributes: its rows as the gateway makes them
        model = MODELS[kind](spec, random.Random(seed * 100_003 + number), T0)
        t = model.next_at
        while t < end:
            for reading in model.readings(t):
                rows.append(series.rows[(spec.id, int(reading.get("port", 0)))])
                ts.append(reading["ts"])
                values.append(float(reading[field]))
            model.schedule_next(t)
            t = model.next_at
    order = np.argsort(np.array(ts), kind="stable")
    return series, np.array(rows, dtype=np.int64)[order], np.array(ts)[order], np.array(values)[order]


def alerts(kind: str, rule_id: str, threshold: float, series: KindSeries, rows: np.ndarray, ts: np.ndarray,
           values: np.ndarray, config: Any = None) -> int:
    """Alerts the rule raises at ``threshold``, fed hour by hour (``config``: config.yaml's, loaded)."""
    shipped = (config or load_config(ROOT / "config.yaml", env={})).kinds[kind]
    rule: dict[str, Any] = shipped.rules[rule_id].model_dump(by_alias=True, exclude_none=True)
    severity, _ = shipped.rules[rule_id].raise_.levels()[0]
    rule["raise"] = {severity.name.lower(): {"threshold": threshold}}
    profile = KindProfile.model_validate({**shipped.model_dump(by_alias=True, exclude_none=True),
                                          "rules": {rule_id: rule}})
    fields = READING_MODELS[kind].FIELDS
    engine = KindEngine(kind, profile, fields, series, started_at=T0)
    column = fields.index(rule["field"])
    raised = 0
    hours = ((ts - T0) // HOUR_S).astype(np.int64)
    bounds = np.flatnonzero(np.diff(hours)) + 1
    for part in np.split(np.arange(ts.shape[0]), bounds):
        block = np.full((part.shape[0], len(fields)), np.nan)
        block[:, column] = values[part]
        evaluation = engine.evaluate(ColumnBatch(rows[part], ts[part], block, fields), float(ts[part].max()))
        raised += sum(e.event == "raised" for e in evaluation.events)
    return raised


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--days", type=float, default=2.0, help="simulated days of charging ports and noise points")
    parser.add_argument("--smoke-days", type=float, default=20.0, help="simulated days of smoke detectors")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--thresholds", default="0.5,0.6,0.7,0.75,0.8", help="raise thresholds to try")
    args = parser.parse_args()
    config = load_config(ROOT / "config.yaml", env={})
    table = Table(title="Anomaly rules on the quiet street (no scripted event): alerts raised by threshold")
    thresholds = [float(x) for x in args.thresholds.split(",")]
    for column in ("rule", "series", "readings", "shipped", *(f"≥ {x:g}" for x in thresholds)):
        table.add_column(column, justify="left" if column == "rule" else "right")
    for kind, profile in config.kinds.items():
        for rule_id, rule in profile.rules.items():
            if rule.transform is None or rule.transform.kind != "anomaly":
                continue
            days = args.smoke_days if kind == "smoke" else args.days
            series, rows, ts, values = quiet_readings(kind, rule.field, days, args.seed)
            shipped = min(condition.threshold for _, condition in rule.raise_.levels())
            counts = [alerts(kind, rule_id, x, series, rows, ts, values, config) for x in thresholds]
            table.add_row(f"{kind}.{rule_id} ({days:g} days)", f"{len(series.device_ids):,}", f"{ts.shape[0]:,}",
                          f"{shipped:g}", *(str(c) for c in counts))
    Console(width=150).print(table)


if __name__ == "__main__":
    main()
