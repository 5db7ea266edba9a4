"""Fleets: the configured street's devices, or a synthetic one of any size in the street's proportions."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from typing import Any

from simulators.models import DeviceSpec

# The default street (seeds 000-004): 737 smoke detectors, 734 meter boxes, 15 charging points of
# 10 ports, 14 noise points.
STREET_SHARES = {"smoke": 737, "meter": 734, "ev_charger": 15, "noise": 14}
ZONES = ("1", "2", "4a", "2", "1", "4a", "2")
REGISTRY_COLUMNS = ("id", "kind", "site", "lat", "lon", "name", "address", "zone_class", "ports", "rated_power_w", "tags")
PREFIX = {"smoke": "smk", "meter": "mtr", "ev_charger": "chg", "noise": "nse"}


def from_registry(devices: Iterable[Any]) -> list[DeviceSpec]:
    """DeviceSpecs from registry entries (anything with the registry's attribute names)."""
    return [DeviceSpec(id=d.id, kind=d.kind, site=d.site, name=getattr(d, "name", "") or "",
                       zone_class=getattr(d, "zone_class", None), ports=getattr(d, "ports", None),
                       rated_power_w=getattr(d, "rated_power_w", None), tags=tuple(getattr(d, "tags", ()) or ()))
            for d in devices]


def synthetic(total: int, sites: list[str], kinds: Iterable[str] | None = None) -> list[DeviceSpec]:
    """``total`` devices split like the default street (at least one of each kind asked for)."""
    shares = {k: v for k, v in STREET_SHARES.items() if kinds is None or k in set(kinds)}
    whole = sum(shares.values())
    counts = {k: max(1, round(total * v / whole)) for k, v in shares.items()}
    biggest = max(counts, key=lambda k: counts[k])
    counts[biggest] = max(1, counts[biggest] + total - sum(counts.values()))
    devices = []
    for kind, count in counts.items():
        for i in range(1, count + 1):
            site = sites[i % len(sites)]
            devices.append(DeviceSpec(
                id=f"sim-{PREFIX[kind]}-{i:06d}", kind=kind, site=site, name=f"sim {kind} {i}",
                zone_class=ZONES[i % len(ZONES)] if kind == "noise" else None,
                ports=10 if kind == "ev_charger" else None, rated_power_w=1000.0 if kind == "ev_charger" else None,
                tags=("elderly_alone",) if kind == "smoke" else ()))
    return devices


def select(devices: list[DeviceSpec], kinds: Iterable[str] | None = None,
           per_kind: dict[str, int] | None = None) -> list[DeviceSpec]:
    """The devices of the kinds asked for, and only the first N of each kind in ``per_kind``."""
    wanted = set(kinds) if kinds is not None else set(per_kind) if per_kind else None
    taken: dict[str, int] = {}
    out = []
    for device in devices:
        if wanted is not None and device.kind not in wanted:
            continue
        limit = (per_kind or {}).get(device.kind)
        if limit is not None and taken.get(device.kind, 0) >= limit:
            continue
        taken[device.kind] = taken.get(device.kind, 0) + 1
        out.append(device)
    return out


def registry_csv(devices: Iterable[DeviceSpec], centre: tuple[float, float] = (30.3125, 120.1749)) -> str:
    """The devices as a registry file (``registry_file`` in config.yaml), laid out on a grid."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(REGISTRY_COLUMNS)
    for i, d in enumerate(devices):
        lat = centre[0] + ((i % 200) - 100) * 0.0001
        lon = centre[1] + ((i // 200) % 200 - 100) * 0.0001
        writer.writerow([d.id, d.kind, d.site, f"{lat:.6f}", f"{lon:.6f}", d.name, "", d.zone_class or "",
                         d.ports or "", d.rated_power_w or "", ";".join(d.tags)])
    return out.getvalue()
