"""The smoke hint lane: a fire is not queued in the broker behind a window full of bulk telemetry.

The gateway's persistent session receives everything at QoS 1, and the broker sends it at most
``broker.receive_maximum`` unacknowledged messages; what comes after waits in the broker's queue for
that session, in arrival order, until acknowledgements (one group per detector snapshot) open the
window again. Under overload a smoke detector's alarm would wait there behind bulk telemetry, however
quickly the gateway takes smoke messages once it has them.

The lane is a second connection (client id ``<broker.client_id>-hint``, ``gateway/mqtt.py``
``Receiver.lane``): a clean session subscribed at QoS 0 to smoke detectors' telemetry only. The broker
sends it each smoke message as it comes, whatever waits for the bulk session, and its copies join the
urgent queue (taken before anything else) as *hints*. :class:`Twins` pairs them with the bulk copies:

* **The bulk session stays the record.** Its copy of every message is received as before and
  acknowledged with its batch, once a snapshot holds what that batch did; nothing is acknowledged
  because of the lane.
* **Whichever copy comes first is processed; the other is its twin**: skipped, before decoding (not
  counted by the flood limiter, nor as a duplicate). A twin has the same topic and the same payload
  bytes (a 128-bit digest of both). A bulk copy is skipped only for a hint this process took in an
  earlier batch or earlier in the same one, so its acknowledgement waits for a snapshot that holds
  what the hint did; after a crash before that snapshot the broker delivers it again and it is
  processed as new.
* **A status yields to a reading the lane brought ahead of it.** The bulk session delivers a device's
  messages in the order they were published; a status (a will: "offline") that it delivers while a
  hint of that device still waits for its bulk twin was published before that reading, and is
  skipped (counted): else a detector that dropped and came straight back would be marked offline
  after its first reading, its twin being skipped.
* **The lane carries no backlog and costs nothing when down.** A clean session has nothing queued when
  it (re)connects: a fire published while the gateway was away comes by the bulk session only, as
  without the lane. A dead or half-open lane loses only the hint.
* **Bounded.** A copy waits ``TTL_S`` at most for its twin, and at most ``MAX`` wait; one forgotten
  (a bulk copy the lane never saw, a hint whose bulk copy the broker dropped) leaves its twin to be
  processed as a duplicate, as without the lane.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from hashlib import blake2b
from typing import Any

from gateway import topics

EVENTS = ("hint_first", "bulk_first", "hint_twin", "bulk_twin", "status_yielded", "forgotten")


class Twins:
    """Pairs the hint lane's copies of smoke telemetry with the bulk session's (main thread only)."""

    TTL_S = 300.0  # a bulk copy may be this far behind its hint (the broker's queue for the session)
    MAX = 100_000  # copies waiting for their twin (~150 bytes each)

    def __init__(self) -> None:
        # digest → [balance, forget at, device]: balance > 0, hints processed whose bulk copy has not come;
        # balance < 0, bulk copies processed whose hint may still come
        self.waiting: OrderedDict[bytes, list[Any]] = OrderedDict()  # oldest first, taken off in O(1)
        self.hints_ahead: Counter[str] = Counter()  # device topic prefix → hints waiting for their bulk copy
        self.counts: Counter[str] = Counter({event: 0 for event in EVENTS})

    def sift(self, batch: list[Any], now: float, lane_live: bool) -> list[Any]:
        """The messages of ``batch`` to process, in order: all but twins and statuses that yield.

        ``batch`` is as :meth:`Receiver.drain` hands it out, smoke detectors' messages first (the
        urgent queue), so only its head is looked at. ``lane_live``: the lane is connected, so a hint
        may still come for a bulk copy processed now.
        """
        if not batch or topics.SMOKE_MARK not in batch[0].topic:  # no smoke detector's message in it
            self._forget(now)
            return batch
        out: list[Any] = []
        for at, message in enumerate(batch):
            if topics.SMOKE_MARK not in message.topic:  # past the urgent head
                out += batch[at:]
                break
            parts = message.topic.split("/")
            if len(parts) != 5 or parts[2] != topics.SMOKE_KIND:
                out.append(message)  # a site or device called "smoke"
                continue
            device = message.topic[:-len(parts[4]) - 1]
            if parts[4] == "status":
                if self.hints_ahead.get(device, 0) > 0:
                    self.counts["status_yielded"] += 1
                else:
                    out.append(message)
                continue
            if self._take(message, device, now, lane_live):
                out.append(message)
        self._forget(now)
        return out

    def _take(self, message: Any, device: str, now: float, lane_live: bool) -> bool:
        key = blake2b(message.topic.encode() + b"\0" + message.payload, digest_size=16).digest()
        entry = self.waiting.get(key)
        balance = entry[0] if entry is not None else 0
        if message.hint:
            twin = balance < 0
            self.counts["hint_twin" if twin else "hint_first"] += 1
            if not twin:
                self.hints_ahead[device] += 1
            step = 1
        else:
            twin = balance > 0
            self.counts["bulk_twin" if twin else "bulk_first"] += 1
            if twin:
                self._behind(device, 1)
            elif not lane_live:
                return True  # no hint will come for it
            step = -1
        if entry is None:
            self.waiting[key] = [step, now + self.TTL_S, device]
        elif balance + step == 0:
            del self.waiting[key]
        else:
            entry[0] += step
        return not twin

    def _behind(self, device: str, n: int) -> None:
        left = self.hints_ahead[device] - n
        if left > 0:
            self.hints_ahead[device] = left
        else:
            del self.hints_ahead[device]

    def _forget(self, now: float) -> None:
        waiting = self.waiting
        while waiting:
            balance, until, device = waiting[next(iter(waiting))]
            if until > now and len(waiting) <= self.MAX:
                return
            waiting.popitem(last=False)
            self.counts["forgotten"] += 1
            if balance > 0:
                self._behind(device, balance)

    def state(self) -> dict[str, int]:
        return {"waiting": len(self.waiting), "hints_ahead": sum(self.hints_ahead.values())}
