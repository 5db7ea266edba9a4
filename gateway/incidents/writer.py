"""The batches' alerts on their way into the incident store, off the ingest loop.

A batch's alerts are published at once; their incidents are committed by this writer, in the order the
batches came, while the ingest loop goes on to the next batch. Before, the loop waited for every commit
(a few queries and an fsync a batch with alerts, 3.6 ms at the median and up to 92 ms when the
store's thread was starved): the next batch's smoke alarm waited behind the last batch's paperwork.

What queued while a commit was under way is committed together, in one transaction. Nothing is lost on
the way: a batch's readings are acknowledged only by a snapshot taken after the batch, and the snapshot
waits for :meth:`IncidentWriter.settled` up to the alerts that were handed over before it
(``gateway/service.py``), so after a crash whatever was not committed is delivered again and replayed.

The queue is bounded: past ``room`` alerts waiting, the ingest loop waits for the store (the store
slows the gateway down rather than have it hold an unbounded backlog in memory). Its depth is the
``streetbrain_incident_store_depth`` gauge.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Awaitable, Callable

from rules.events import AlertEvent

log = logging.getLogger("streetbrain.incidents")

Batches = list[tuple[list[AlertEvent], float]]


class IncidentWriter:
    def __init__(self, write: Callable[[Batches], Awaitable[None]], after: Callable[[], Awaitable[None]],
                 on_failure: Callable[[Exception, float], None], room: int = 20_000, group: int = 2_000):
        """``write`` commits the batches given, in one transaction. Should it fail (the database down,
        full, locked…), ``on_failure(error, delay)`` is told, and after the delay (0.5 s doubling to
        10 s) the same batches are tried again, with any queued since (a repeat of what did commit,
        as in the store's alert-by-alert fallback, is recognised by its unique index): the alerts wait
        however long the store is away, and their readings stay unacknowledged. ``after`` runs after
        each commit (the incident changes published). Past ``room`` alerts waiting,
        :meth:`room_for_more` holds the ingest loop. At most ``group`` alerts a transaction, unless a
        single batch has more."""
        self._write = write
        self._after = after
        self._on_failure = on_failure
        self.room = room
        self.group = group
        self._waiting: deque[tuple[list[AlertEvent], float]] = deque()
        self.queued = 0  # alerts handed over since the start (a sequence: settled(n) waits for the first n)
        self.stored = 0  # of them committed
        self.busy = False  # a commit, or what follows it, under way
        self.failing = False  # the last commit failed: the writer waits to try again
        self.writing = False  # a commit is in the store's hands (a cancel would not stop it there)
        self._work = asyncio.Event()  # something was handed over
        self._progress = asyncio.Condition()  # something was committed, or the writer fell idle
        self._task: asyncio.Task[None] | None = None

    @property
    def depth(self) -> int:
        """Alerts handed over and not yet committed."""
        return self.queued - self.stored

    def start(self) -> IncidentWriter:
        self._task = asyncio.create_task(self._run(), name="incident-writer")
        return self

    def put(self, alerts: list[AlertEvent], now: float) -> int:
        """Hand a batch's alerts over (never waits); returns what :meth:`settled` is to wait for."""
        if alerts:
            self._waiting.append((alerts, now))
            self.queued += len(alerts)
            self._work.set()
        return self.queued

    async def room_for_more(self) -> None:
        """Wait while more than ``room`` alerts wait for the store."""
        await self._until(lambda: self.depth <= self.room, None)

    async def settled(self, upto: int, timeout: float | None) -> bool:
        """Whether the first ``upto`` alerts handed over are committed, waiting up to ``timeout`` s
        (``None``: however long it takes)."""
        return await self._until(lambda: self.stored >= upto, timeout)

    async def stop(self, timeout: float) -> bool:
        """Let what is handed over be committed and its changes published, up to ``timeout`` s (while
        the store is failing, only the attempt under way); then stop. Whether all of it was committed."""
        await self._until(lambda: not self.writing and (self.failing or not (self._waiting or self.busy)), timeout)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        return self.depth == 0

    async def _until(self, done: Callable[[], bool], timeout: float | None) -> bool:
        if done():
            return True
        try:
            async with self._progress:
                await asyncio.wait_for(self._progress.wait_for(done), timeout)
        except TimeoutError:
            return False
        return True

    async def _tell(self) -> None:
        async with self._progress:
            self._progress.notify_all()

    async def _run(self) -> None:
        delay = 0.5
        while True:
            await self._work.wait()
            self._work.clear()
            while self._waiting:
                self.busy = True
                taken: Batches = []
                count = 0
                for alerts, now in self._waiting:
                    if taken and count + len(alerts) > self.group:
                        break
                    taken.append((alerts, now))
                    count += len(alerts)
                self.writing = True
                try:
                    await self._write(taken)
                except Exception as exc:
                    self.writing, self.failing = False, True
                    self._on_failure(exc, delay)
                    await self._tell()
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 10.0)
                    continue
                delay, self.writing, self.failing = 0.5, False, False
                for _ in taken:
                    self._waiting.popleft()
                self.stored += count
                await self._tell()
                try:
                    await self._after()
                except Exception:  # committed all the same; what follows is tried again at the next commit
                    log.exception("after an incident commit")
            self.busy = False
            await self._tell()
