"""The incident writer (gateway/incidents/writer.py): the alerts' way into the store off the ingest loop,
in order, grouped while a commit is under way, bounded, retried, and what a snapshot waits for."""

from __future__ import annotations

import asyncio
from typing import Any

from gateway.incidents.writer import IncidentWriter


class Store:
    """Records what each commit held; a commit takes as long as ``gate`` stays shut, and the next
    ``fail`` commits fail."""

    def __init__(self) -> None:
        self.commits: list[list[tuple[list[Any], float]]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail = 0
        self.failures: list[tuple[str, float]] = []
        self.after = 0

    async def write(self, batches: list[tuple[list[Any], float]]) -> None:
        await self.gate.wait()
        if self.fail:
            self.fail -= 1
            raise OSError("disk I/O error")
        self.commits.append(list(batches))

    async def changes(self) -> None:
        self.after += 1

    def failed(self, exc: Exception, delay: float) -> None:
        self.failures.append((str(exc), delay))

    def writer(self, **kwargs: Any) -> IncidentWriter:
        return IncidentWriter(self.write, self.changes, self.failed, **kwargs).start()


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_what_queues_during_a_commit_goes_in_the_next_one_in_order_and_settled_says_when():
    async def main() -> None:
        store = Store()
        writer = store.writer()
        store.gate.clear()  # the first commit is under way and slow
        first = writer.put(["a1", "a2"], 1.0)
        await asyncio.sleep(0.01)
        second = writer.put(["b1"], 2.0)
        third = writer.put(["c1", "c2"], 3.0)
        assert writer.put([], 4.0) == third == 5 and writer.depth == 5
        assert not await writer.settled(first, 0.05), "nothing is committed while the store is held"
        store.gate.set()
        assert await writer.settled(third, 2)
        assert store.commits == [[(["a1", "a2"], 1.0)], [(["b1"], 2.0), (["c1", "c2"], 3.0)]]
        assert writer.depth == 0 and await writer.settled(second, 0)
        assert await writer.stop(1) and store.after == 2

    run(main())


def test_a_commit_holds_at_most_a_group_but_never_splits_a_batch():
    async def main() -> None:
        store = Store()
        writer = store.writer(group=3)
        store.gate.clear()
        for n, size in enumerate((2, 2, 5, 1)):
            writer.put([f"{n}.{i}" for i in range(size)], float(n))
        store.gate.set()
        assert await writer.settled(writer.queued, 2)
        assert [sum(len(alerts) for alerts, _ in commit) for commit in store.commits] == [2, 2, 5, 1]
        await writer.stop(1)

    run(main())


def test_past_its_room_the_ingest_waits_for_the_store():
    async def main() -> None:
        store = Store()
        writer = store.writer(room=3)
        store.gate.clear()
        writer.put(["a", "b"], 1.0)
        await asyncio.wait_for(writer.room_for_more(), 0.1)  # 2 waiting: room for more
        writer.put(["c", "d"], 2.0)
        waiting = asyncio.ensure_future(writer.room_for_more())
        await asyncio.sleep(0.05)
        assert not waiting.done(), "4 alerts waiting past a room of 3: the ingest should wait"
        store.gate.set()
        await asyncio.wait_for(waiting, 2)
        await writer.stop(1)

    run(main())


def test_a_failed_commit_is_tried_again_with_what_queued_since_and_nothing_is_lost():
    async def main() -> None:
        store = Store()
        writer = store.writer()
        store.fail = 2
        writer.put(["a"], 1.0)
        await asyncio.sleep(0.1)
        assert writer.failing and writer.depth == 1 and not store.commits
        writer.put(["b"], 2.0)
        assert await writer.settled(writer.queued, 5)
        assert store.commits == [[(["a"], 1.0), (["b"], 2.0)]]
        assert [delay for _, delay in store.failures] == [0.5, 1.0] and not writer.failing
        await writer.stop(1)

    run(main())


def test_a_stop_lets_the_commit_under_way_finish_but_does_not_wait_on_a_failing_store():
    async def main() -> None:
        store = Store()
        writer = store.writer()
        store.gate.clear()
        writer.put(["a"], 1.0)
        await asyncio.sleep(0.01)
        asyncio.get_running_loop().call_later(0.1, store.gate.set)
        assert await writer.stop(2) and store.commits == [[(["a"], 1.0)]] and store.after == 1

        store = Store()
        writer = store.writer()
        store.fail = 100
        writer.put(["a"], 1.0)
        started = asyncio.get_running_loop().time()
        assert not await writer.stop(5), "the alert was never committed"
        assert asyncio.get_running_loop().time() - started < 1 and writer.depth == 1

    run(main())
