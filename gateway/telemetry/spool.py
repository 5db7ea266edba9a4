"""A bounded on-disk spool of line-protocol batches, for when the telemetry store is away.

Each batch is a segment file named by a global sequence number and its class (``telemetry`` or
``events``: alerts and incident changes), written to a temporary name and renamed, so a crash
leaves whole segments only. Replay takes the oldest segment first, whatever its class. When the
spool would pass its size limit, the oldest telemetry goes first and events last, every dropped
line counted. It survives a gateway restart: the directory is the state.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

CLASSES = ("telemetry", "events")  # dropped in this order when full
_NAME = re.compile(r"^(\d{12})\.(telemetry|events)\.lp$")


@dataclass(frozen=True)
class Segment:
    seq: int
    cls: str
    path: Path
    size: int


class Spool:
    def __init__(self, directory: Path, max_bytes: int):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.lock = threading.Lock()
        self.dropped_lines = {cls: 0 for cls in CLASSES}
        self.segments: list[Segment] = []
        for tmp in self.directory.glob("*.tmp"):
            tmp.unlink()  # a write the crash interrupted: never acknowledged as spooled
        for path in sorted(self.directory.iterdir()):
            match = _NAME.match(path.name)
            if match:
                self.segments.append(Segment(int(match[1]), match[2], path, path.stat().st_size))
        self.next_seq = self.segments[-1].seq + 1 if self.segments else 1
        self.bytes = sum(s.size for s in self.segments)  # kept up to date: checked on every append

    def __len__(self) -> int:
        return len(self.segments)

    def append(self, cls: str, lines: list[bytes]) -> None:
        if not lines:
            return
        body = b"\n".join(lines) + b"\n"
        with self.lock:
            self._make_room(len(body))
            seq, self.next_seq = self.next_seq, self.next_seq + 1
            path = self.directory / f"{seq:012d}.{cls}.lp"
            tmp = path.with_name(path.name + ".tmp")
            with open(tmp, "wb") as handle:
                handle.write(body)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
            self.segments.append(Segment(seq, cls, path, len(body)))
            self.bytes += len(body)

    def _make_room(self, incoming: int) -> None:
        for cls in CLASSES:
            while self.segments and self.bytes + incoming > self.max_bytes:
                victim = next((s for s in self.segments if s.cls == cls), None)
                if victim is None:
                    break
                self.dropped_lines[cls] += victim.path.read_bytes().count(b"\n")
                victim.path.unlink(missing_ok=True)
                self.segments.remove(victim)
                self.bytes -= victim.size

    def oldest(self) -> tuple[Segment, list[bytes]] | None:
        with self.lock:
            if not self.segments:
                return None
            segment = self.segments[0]
        return segment, [line for line in segment.path.read_bytes().split(b"\n") if line]

    def remove(self, segment: Segment) -> None:
        with self.lock:
            segment.path.unlink(missing_ok=True)
            if segment in self.segments:
                self.segments.remove(segment)
                self.bytes -= segment.size
