"""Decode-ahead: a second process decodes batch messages while they wait in the receive buffer.

With 100 readings a message, decoding a batch (msgspec's typed parse and reading its columns,
:class:`gateway.decode.TypedBatch`) is half of the main thread's time (about 110 of 220 µs a message
under load, docs/PERFORMANCE.md), and the main thread, which also runs detection, is the gateway's
wall. Decoding a batch is a pure function of its bytes, so it can be done earlier and elsewhere: the
receiver's I/O thread offers each message that looks like a batch to this module's thread, which
hands what has piled up to a worker process (the second core) and attaches each result, the columns
as arrays, to its waiting message. When the main thread takes a message it uses the result if it is
there and decodes the message itself if it is not. It waits for the worker only for an exchange under
way that holds messages of its batch, and then WAIT_MAX_S at most (never for a batch with smoke in
it): decoding those itself would do the worker's work twice, which under load was half the batches.
So a worker that is slow, dead, hung or restarting costs its own work and at most WAIT_MAX_S a batch.
(A payload that crashed the parser would crash the worker, and the main thread would then decode it
itself: this isolates the worker's own failures, the OOM killer say, not the parser's.) Everything else (topic, device,
rate limit, the batch's device_id, dead letters) stays on the main thread in arrival order, and the
worker runs the same decoder as the main thread, so what is accepted and rejected does not depend on
where a batch was decoded (tests/test_ahead.py).

The worker is a ``multiprocessing`` "spawn" process (forking a threaded gateway is not safe): like every
spawn child it imports the parent's main module, so a program that embeds :class:`gateway.service.Gateway`
needs the usual ``if __name__ == "__main__":`` guard (``streetbrain`` and ``python -m gateway.cli`` have it).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import pickle
import queue
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from gateway.decode import Decoder
    from gateway.mqtt import Inbound

log = logging.getLogger("streetbrain.ahead")

REFUSED = "refused"  # the worker's decoder said "not a plain batch": the main thread goes to the JSON path
EXCHANGE_MAX = 512  # messages handed to the worker at once: results come back in time for the next drain
AHEAD_MAX = 4096  # decoded messages not yet taken by the main thread (about one drain, gateway batch_max)
GATHER_S = 0.001  # a few messages wait this long for company (one exchange costs ~0.1 ms of IPC)
GATHER_MIN = 16
OFFERED_MAX = 100_000  # messages offered and not yet looked at, beyond which offers are dropped (the
#                        thread is stuck: the main thread decodes them, and nothing piles up here)
EXCHANGE_TIMEOUT_S = 10.0  # a worker that has not answered 512 messages (~50 ms of work) by then is hung
START_MIN = 16  # batches waiting at once that start the worker: a street's trickle never needs one
RESTART_S = 5.0  # a dead worker is started again after this long; meanwhile the main thread decodes
WAIT_MAX_S = 0.02  # the main thread waits at most this long for an exchange holding its batch's messages


def _worker(conn: Any, max_readings: int) -> None:
    """The worker process: requests of (kind, payload) in, packed results out, until the pipe closes."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the gateway's to handle; it ends us
    from gateway.decode import READING_MODELS, TypedBatch, fast_reading

    typed = {kind: TypedBatch(kind, fast_reading(kind), max_readings) for kind in READING_MODELS}
    conn.send_bytes(b"ready")
    while True:
        try:
            jobs = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            return
        results: list[Any] = []
        for kind, payload in jobs:
            try:
                result = typed[kind](payload)
            except Exception:  # the main thread decodes it again and explains (or dead-letters) it
                result = None
            else:
                result = False if result is None else result
            results.append(result)
        conn.send_bytes(pack(results))


def pack(results: list[Any]) -> bytes:
    """The worker's results (None: failed, False: refused, else TypedBatch's) → one message: a short
    head per result and two flat buffers of numbers. (Pickling each result's four arrays costs the receiving side ~20 µs a message; this, ~4.)"""
    heads: list[Any] = []
    floats: list[np.ndarray] = []
    values: list[np.ndarray] = []
    ints: list[np.ndarray] = []
    for result in results:
        if result is None:
            heads.append(None)
        elif result is False:
            heads.append(REFUSED)
        else:
            device_id, (ts, numbers, seq, ports) = result
            heads.append((device_id, len(ts), numbers.shape[1]))
            floats.append(ts)
            values.append(numbers.ravel())
            ints += (seq, ports)
    flat = np.concatenate(floats + values) if floats else np.empty(0)
    whole = np.concatenate(ints) if ints else np.empty(0, np.int64)
    return pickle.dumps((heads, flat.tobytes(), whole.tobytes()), protocol=5)


def unpack(data: bytes) -> list[Any]:
    """:func:`pack`'s message → per request: None (decode it here), REFUSED, or (device_id, columns)
    with the columns as views of two shared buffers."""
    heads, flat_bytes, whole_bytes = pickle.loads(data)
    flat = np.frombuffer(flat_bytes, np.float64).copy()  # writable, as the main thread's own columns are
    whole = np.frombuffer(whole_bytes, np.int64).copy()
    at_values = sum(head[1] for head in heads if isinstance(head, tuple))
    at_ts = at_ints = 0
    out: list[Any] = []
    for head in heads:
        if not isinstance(head, tuple):
            out.append(head)
            continue
        device_id, n, width = head
        out.append((device_id, (flat[at_ts:at_ts + n], flat[at_values:at_values + n * width].reshape(n, width),
                                whole[at_ints:at_ints + n], whole[at_ints + n:at_ints + 2 * n])))
        at_ts += n
        at_values += n * width
        at_ints += 2 * n
    return out


class DecodeAhead:
    """The thread that feeds the worker process, and the worker's life (started on the first batch,
    restarted after it dies)."""

    # Smaller messages are decoded on the main thread: a batch of ~20 readings or fewer decodes there in
    # ~15 µs, about what shipping it to the worker and back costs (a review's A/B at 10 readings a
    # message was inconclusive, with the latency worse with the worker). The receiver offers no less.
    MIN_BYTES = 2048

    def __init__(self, decoder: Decoder):
        """Feeding ``decoder``'s batches: its limits, and the kinds its typed decoder takes at all (the
        others go the JSON way anyway)."""
        self.max_readings = decoder.limits.max_readings_per_message
        self.max_payload_bytes = decoder.limits.max_payload_bytes
        self.kinds = {kind for kind, typed in decoder.typed.items() if typed.enabled}
        self._offers: queue.SimpleQueue[list[Inbound] | None] = queue.SimpleQueue()
        self._offered = 0  # messages in _offers (under _count_lock: two threads change it)
        self._count_lock = threading.Lock()
        self.dropped = 0  # offers dropped because the thread was not taking them
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._conn: Any = None
        self._process: Any = None
        self._retry_at = 0.0
        self._busy_since = 0.0  # when the exchange under way began (0: none)
        self._waiting: deque[Inbound] = deque()  # decoded, in arrival order, not yet all taken
        self.decoded = 0  # messages the worker decoded
        self.exchanges = 0
        self.starts = 0  # worker processes started (more than one: it died and was restarted)
        self.failures = 0  # workers that died or could not start
        self.waits = 0  # batches whose main thread waited for an exchange under way
        self.loop: asyncio.AbstractEventLoop | None = None  # the main thread's, to wake it when an exchange ends
        self._waiters: list[asyncio.Future[None]] = []  # (only touched on that loop)

    async def settled(self, messages: list[Inbound]) -> None:
        """From the main thread, before it decodes ``messages``: if some are with the worker right now,
        wait for that exchange (at most WAIT_MAX_S). Decoding them here instead would do the worker's
        work a second time: under load the main thread, freed of other work, did so for half the
        batches (docs/PERFORMANCE.md)."""
        if not any(m.inflight for m in messages):
            return
        self.loop = loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT_MAX_S
        self.waits += 1
        # Every exchange that ends wakes every waiter, so a wake-up may be another exchange's (one that
        # ended while this thread was busy, its call queued): look again after each.
        while any(m.inflight for m in messages) and (left := deadline - loop.time()) > 0:
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                if any(m.inflight for m in messages):  # (the exchange may have ended meanwhile)
                    await asyncio.wait_for(waiter, left)
            except TimeoutError:
                return
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)

    def _release(self) -> None:
        """On the main thread's loop: an exchange ended."""
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def start(self) -> DecodeAhead:
        self._thread = threading.Thread(target=self._run, name="decode-ahead", daemon=True)
        self._thread.start()
        threading.Thread(target=self._watch, name="decode-ahead-watchdog", daemon=True).start()
        return self

    def _watch(self) -> None:
        """Kill a worker that has not answered within EXCHANGE_TIMEOUT_S (stopped, swapping, stuck):
        the exchange then fails like any other, and the worker is started again."""
        while not self._stopping:
            time.sleep(min(1.0, EXCHANGE_TIMEOUT_S / 2))
            since, process = self._busy_since, self._process
            if since and process is not None and time.monotonic() - since > EXCHANGE_TIMEOUT_S:
                log.warning("decode worker gave no answer in %.0f s; killing it", EXCHANGE_TIMEOUT_S)
                process.kill()

    def offer(self, messages: list[Inbound]) -> None:
        """From the receiver's I/O thread: messages just queued for the main thread."""
        with self._count_lock:
            if self._offered > OFFERED_MAX:
                self.dropped += len(messages)
                return
            self._offered += len(messages)
        self._offers.put(messages)

    def _took(self, messages: list[Inbound]) -> None:
        with self._count_lock:
            self._offered -= len(messages)

    def stop(self) -> None:
        self._stopping = True
        self._offers.put(None)
        process = self._process
        if process is not None:
            process.kill()  # a thread waiting on the worker's answer gets EOF
        if self._thread is not None:
            self._thread.join(10)
        self._end_worker()

    # -- the thread ---------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopping:
            try:
                if not self._round():
                    return
            except Exception:  # a bug here must not stop decode-ahead for good (nor let offers pile up)
                self.failures += 1
                log.exception("decode-ahead failed; the main thread decodes while it starts again")
                self._end_worker()
                self._retry_at = time.monotonic() + RESTART_S

    def _round(self) -> bool:
        """Take what has been offered and have the worker decode it; False when told to stop."""
        offered = self._offers.get()
        if offered is None:
            return False
        self._took(offered)
        jobs = self._candidates(offered, [])
        if len(jobs) < GATHER_MIN:
            time.sleep(GATHER_S)
        if not self._gather(jobs):
            return False
        while jobs and not self._stopping:
            self._keep_pace()
            taken = [m for m in jobs[:EXCHANGE_MAX] if not m.claimed]  # the main thread took the rest
            del jobs[:EXCHANGE_MAX]
            if taken and (self._conn is not None or len(taken) >= START_MIN) and self._ensure_worker():
                self._exchange(taken)
        return True

    def _keep_pace(self) -> None:
        """Wait while AHEAD_MAX decoded messages are still waiting for the main thread: decoding a
        backlog of the whole receive window at once would hold its columns too (~6 KB a 100-reading
        message on top of its 10 KB), for messages the main thread reaches only much later."""
        waiting = self._waiting
        while waiting and waiting[0].claimed:
            waiting.popleft()
        while len(waiting) >= AHEAD_MAX and not self._stopping:
            time.sleep(0.002)
            while waiting and waiting[0].claimed:
                waiting.popleft()

    def _gather(self, jobs: list[Inbound]) -> bool:
        """Add whatever else has been offered meanwhile; False when told to stop."""
        while True:
            try:
                more = self._offers.get_nowait()
            except queue.Empty:
                return True
            if more is None:
                return False
            self._took(more)
            self._candidates(more, jobs)

    def _candidates(self, messages: list[Inbound], into: list[Inbound]) -> list[Inbound]:
        limit, kinds = self.max_payload_bytes, self.kinds
        for m in messages:
            if (len(m.payload) <= limit and m.topic.endswith("/telemetry") and b'"readings"' in m.payload
                    and m.topic.split("/", 3)[2] in kinds):
                into.append(m)
        return into

    def _exchange(self, messages: list[Inbound]) -> None:
        for m in messages:
            m.inflight = True
        try:
            self._trade(messages)
        finally:  # with results or without, a main thread waiting for these goes on
            for m in messages:
                m.inflight = False
            loop = self.loop
            if loop is not None:
                try:
                    loop.call_soon_threadsafe(self._release)
                except RuntimeError:  # the loop is closed: nobody waits any more
                    pass

    def _trade(self, messages: list[Inbound]) -> None:
        request = pickle.dumps([(m.topic.split("/", 3)[2], m.payload) for m in messages], protocol=5)
        self._busy_since = time.monotonic()  # a hung worker blocks even the send: the watchdog kills it
        try:
            self._conn.send_bytes(request)
            results = unpack(self._conn.recv_bytes())
        except (EOFError, OSError, pickle.UnpicklingError, ValueError) as exc:
            if not self._stopping:
                self.failures += 1
                log.warning("decode worker lost (%s); the main thread decodes until it is back in %.0f s",
                            exc or type(exc).__name__, RESTART_S)
            self._end_worker()
            self._retry_at = time.monotonic() + RESTART_S
            return
        finally:
            self._busy_since = 0.0
        self.exchanges += 1
        for message, result in zip(messages, results):
            if result is not None:
                message.ahead = result
                self.decoded += 1
        self._waiting.extend(messages)

    def _ensure_worker(self) -> bool:
        if self._conn is not None:
            return True
        if self._stopping or time.monotonic() < self._retry_at:
            return False
        ctx = mp.get_context("spawn")  # a fresh interpreter: forking a threaded gateway is not safe
        try:
            parent, child = ctx.Pipe()
        except OSError as exc:  # out of file descriptors
            self.failures += 1
            log.warning("decode worker not started (%s); the main thread decodes", exc)
            self._retry_at = time.monotonic() + RESTART_S
            return False
        process = ctx.Process(target=_worker, args=(child, self.max_readings), name="streetbrain-decode", daemon=True)
        try:
            process.start()
            child.close()
            if not parent.poll(60) or parent.recv_bytes() != b"ready":
                raise TimeoutError("no word from the worker within 60 s")
        except Exception as exc:
            self.failures += 1
            log.warning("decode worker did not start (%s); the main thread decodes, retrying in %.0f s",
                        exc or type(exc).__name__, RESTART_S)
            parent.close()
            if process.is_alive():
                process.kill()
            self._retry_at = time.monotonic() + RESTART_S
            return False
        self.starts += 1
        self._conn, self._process = parent, process
        log.info("decode worker started pid=%s", process.pid)
        return True

    def _end_worker(self) -> None:
        process, conn = self._process, self._conn
        self._process = self._conn = None
        if process is not None:
            process.kill()
            process.join(5)
        if conn is not None:
            conn.close()

    def state(self) -> dict[str, float]:
        return {"decoded": self.decoded, "exchanges": self.exchanges, "starts": self.starts,
                "failures": self.failures, "dropped": self.dropped, "waits": self.waits,
                "running": float(self._process is not None)}
