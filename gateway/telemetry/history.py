"""``streetbrain history``: a device's recent points, read back from the telemetry store.

InfluxDB 2 answers Flux; VictoriaMetrics (and other Prometheus-style stores of the same write API)
answer their export API. The one the store speaks is used; a store that speaks neither says so.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from gateway.config import InfluxConfig


class HistoryUnavailable(RuntimeError):
    pass


def read(config: InfluxConfig, device_id: str, since: float, until: float,
         field: str | None = None) -> list[dict[str, Any]]:
    """Points of ``device_id`` in [since, until): [{"time", "measurement", "field", "value", "tags"}]."""
    if config.url is None:
        raise HistoryUnavailable("no telemetry store is configured (influx.url)")
    try:
        return _flux(config, device_id, since, until, field)
    except HistoryUnavailable:
        raise
    except Exception as flux_error:
        try:
            return _export(config, device_id, since, until, field)
        except urllib.error.URLError as exc:
            raise HistoryUnavailable(f"the store at {config.url} answers neither Flux ({flux_error}) nor the "
                                     f"export API ({exc})") from None


def _flux(config: InfluxConfig, device_id: str, since: float, until: float, field: str | None) -> list[dict]:
    from influxdb_client import InfluxDBClient

    token = config.token.get_secret_value() if config.token else ""
    field_filter = f' and r._field == "{field}"' if field else ""
    query = (f'from(bucket: "{config.bucket}") |> range(start: {int(since)}, stop: {int(until) + 1}) '
             f'|> filter(fn: (r) => r.device == "{device_id}"{field_filter})')
    with InfluxDBClient(url=config.url, token=token, org=config.org, timeout=int(config.timeout_s * 1000)) as client:
        tables = client.query_api().query(query)
    out = []
    for table in tables:
        for record in table.records:
            tags = {k: v for k, v in record.values.items() if not k.startswith("_") and k not in ("result", "table")}
            out.append({"time": record.get_time().timestamp(), "measurement": record.get_measurement(),
                        "field": record.get_field(), "value": record.get_value(), "tags": tags})
    return sorted(out, key=lambda p: (p["time"], p["measurement"], p["field"]))


def _export(config: InfluxConfig, device_id: str, since: float, until: float, field: str | None) -> list[dict]:
    match = f'{{device="{device_id}"' + (f', __name__=~".*_{field}"' if field else "") + "}"
    query = urllib.parse.urlencode({"match[]": match, "start": f"{since:.3f}", "end": f"{until:.3f}"})
    with urllib.request.urlopen(f"{config.url.rstrip('/')}/api/v1/export?{query}", timeout=config.timeout_s) as reply:
        lines = reply.read().splitlines()
    out = []
    for line in filter(None, lines):
        series = json.loads(line)
        labels = dict(series["metric"])
        name = labels.pop("__name__")
        # the store names a series measurement_field; the measurement is the kind, alerts or incidents
        prefix = next((m for m in (labels.get("kind"), "alerts", "incidents") if m and name.startswith(m + "_")), None)
        measurement, field_name = (prefix, name[len(prefix) + 1:]) if prefix else (name, "value")
        for ts, value in zip(series["timestamps"], series["values"]):
            out.append({"time": ts / 1000, "measurement": measurement, "field": field_name, "value": value,
                        "tags": labels})
    return sorted(out, key=lambda p: (p["time"], p["measurement"], p["field"]))
