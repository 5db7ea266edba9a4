"""The device registry at run time: which device is which row of its kind's state arrays.

Detection state is columnar: every kind keeps arrays with one row per *series*. A smoke detector,
a noise point and a meter box are one series each; an e-bike charging point is one series per port,
because each port charges its own battery.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gateway.config import Config, Device
from gateway.schemas import KINDS


@dataclass
class KindSeries:
    """The series of one kind, row by row. Rows refer to their device's own values (no copies: a city
    is 300,000 devices)."""

    kind: str
    device_ids: list[str] = field(default_factory=list)
    ports: list[int] = field(default_factory=list)  # 0 where the kind has no ports
    sites: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    # registry attributes rules may use (zone_class, rated_power_w, …): the device's validated fields
    attributes: list[dict[str, Any]] = field(default_factory=list)
    tags: list[tuple[str, ...]] = field(default_factory=list)
    # (device_id, port) → row
    rows: dict[tuple[str, int], int] = field(default_factory=dict)

    def ports_of(self, device: Device) -> range | tuple[int]:
        return range(1, (device.ports or 1) + 1) if self.kind == "ev_charger" else (0,)

    def rows_of(self, device: Device) -> list[int]:
        """The rows of one device (one per port), by index rather than by a scan of the kind."""
        return [row for port in self.ports_of(device) if (row := self.rows.get((device.id, port))) is not None]

    def add(self, device: Device) -> None:
        for port in self.ports_of(device):
            self.rows[(device.id, port)] = len(self.device_ids)
            self.device_ids.append(device.id)
            self.ports.append(port)
            self.sites.append(device.site)
            self.names.append(device.name or device.id)
            self.attributes.append(device.__dict__)  # Device is frozen: a view, never written through
            self.tags.append(device.tags)

    def __len__(self) -> int:
        return len(self.device_ids)


class Registry:
    """Devices by id, and the series of each kind."""

    def __init__(self, devices: list[Device]):
        self.devices: dict[str, Device] = {}
        self.series: dict[str, KindSeries] = {kind: KindSeries(kind) for kind in KINDS}
        for device in devices:
            self.register(device)

    @classmethod
    def from_config(cls, config: Config) -> Registry:
        return cls(config.devices)

    def register(self, device: Device) -> None:
        self.devices[device.id] = device
        self.series[device.kind].add(device)

    def row(self, kind: str, device_id: str, port: int = 0) -> int | None:
        return self.series[kind].rows.get((device_id, port))
