"""The two MQTT connections of the gateway.

* :class:`Receiver` — the hot receive path: a lean MQTT 5 subscriber in its own I/O thread that reads
  many frames per ``recv`` (paho's per-packet machinery was half the gateway's CPU; paho itself is
  ~2× aiomqtt, ../shared/reference/mqtt-limits.md), persistent session, manual acknowledgements
  written in batches. Messages pile up in a buffer that the asyncio side drains in
  batches; each is acknowledged only after its batch was processed and its alerts were published,
  so a crash loses nothing: the broker redelivers what was not acknowledged. At most
  ``receive_maximum`` unacknowledged messages are taken, which bounds the buffer: the broker is asked
  to keep to that, and the receiver stops reading while the window is full, because Mosquitto 2.0.11
  does not keep to it once acknowledgements come in batches.
* The smoke hint lane (``Receiver.lane``, gateway/hints.py) — a second Receiver on a clean session,
  QoS 0, for smoke telemetry only; its copies join the urgent queue as hints.
* :class:`Publisher` — aiomqtt on a connection of its own, so alerts never queue behind inbound
  telemetry. Publishes are QoS 1 and awaited until the broker acknowledges them.
"""

from __future__ import annotations

import asyncio
import logging
import selectors
import socket
import ssl
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import aiomqtt

from gateway import topics
from gateway.config import BrokerAddress, BrokerConfig

log = logging.getLogger("streetbrain.mqtt")
URGENT = topics.SMOKE_MARK  # the topic level of the kind whose messages are processed first
# aiomqtt does not fail a publish whose connection dropped: it waits for a PUBACK that will not come
# until its timeout, and the timer starts when publish() is called, not when paho sends the message.
# A broker acknowledges a few alerts within milliseconds, so 2 s for a handful means the connection is
# gone: reconnect and publish again (a duplicate carries the same alert id). It was 10 s, the whole of
# a broker restart's recovery in bench.soak (docs/RELIABILITY.md). A burst gets 2 ms more a message
# (thousands of dead letters from a fleet not in the registry: 10,000 publishes of 1.5 KB took 5 s on
# loopback, the Python side being the limit; a remote broker at 20 ms round trip with PUBLISH_INFLIGHT
# messages in flight adds ~0.02 ms a message).
PUBLISH_TIMEOUT_S = 2.0
PUBLISH_TIMEOUT_PER_MESSAGE_S = 0.002
PUBLISH_INFLIGHT = 1000  # unacknowledged QoS 1 publishes on the wire (paho's default of 20 paced bursts)


def _tls_context(config: BrokerConfig) -> ssl.SSLContext | None:
    if config.tls is None:
        return None
    context = ssl.create_default_context(cafile=str(config.tls.ca_file) if config.tls.ca_file else None)
    if config.tls.cert_file:
        context.load_cert_chain(str(config.tls.cert_file), str(config.tls.key_file) if config.tls.key_file else None)
    if config.tls.insecure:
        context.check_hostname = False
    return context


@dataclass(slots=True)
class Inbound:
    topic: str
    payload: bytes
    mid: int
    qos: int
    generation: int  # which connection it arrived on: acks are only valid on that one
    claimed: bool = False  # taken by the main thread: decoding it ahead is no use any more
    ahead: Any = None  # its batch decoded by the decode-ahead worker (gateway/ahead.py), when it was
    inflight: bool = False  # with the decode-ahead worker right now (gateway/ahead.py)
    hint: bool = False  # a copy from the smoke hint lane (gateway/hints.py), not the record: never acknowledged


class BrokerRefused(ConnectionError):
    pass


def varint(n: int) -> bytes:
    """MQTT's variable byte integer (remaining lengths, property lengths)."""
    out = bytearray()
    while True:
        n, digit = n >> 7, n & 0x7F
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def read_varint(data: bytes, i: int) -> tuple[int, int]:
    """A variable byte integer at ``data[i:]``: (value, index after it); IndexError if it is cut short."""
    value, shift = 0, 0
    while True:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7


def string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return len(raw).to_bytes(2, "big") + raw


def packet(first: int, body: bytes) -> bytes:
    """A whole MQTT packet: its first byte, the remaining length, the body."""
    return bytes((first,)) + varint(len(body)) + body


def connect_packet(config: BrokerConfig, client_id: str | None = None, clean: bool = False) -> bytes:
    """MQTT 5 CONNECT: persistent session (clean start off, session expiry), our receive window; or,
    ``clean``, a session that starts empty and ends with the connection."""
    flags = 0x02 if clean else 0
    payload = string(client_id or config.client_id)
    if config.username:
        flags |= 0x80
        payload += string(config.username)
        if config.password is not None:
            flags |= 0x40
            payload += string(config.password.get_secret_value())
    properties = (b"\x11" + (0 if clean else config.session_expiry_s).to_bytes(4, "big")
                  + b"\x21" + config.receive_maximum.to_bytes(2, "big"))
    body = (string("MQTT") + b"\x05" + bytes((flags,)) + config.keepalive_s.to_bytes(2, "big")
            + varint(len(properties)) + properties + payload)
    return packet(0x10, body)


def subscribe_packet(filters: list[str], packet_id: int = 1, qos: int = 1) -> bytes:
    options = bytes((qos,))
    return packet(0x82, packet_id.to_bytes(2, "big") + b"\x00" + b"".join(string(f) + options for f in filters))


PINGREQ = b"\xc0\x00"
DISCONNECT = b"\xe0\x00"  # normal disconnection: the session (and what the broker queues for it) stays
CLOSE_WAIT_S = 2.0  # at a stop, how long the broker may take to close the connection after our DISCONNECT


class FrameReader:
    """MQTT frames out of a byte stream: as many whole frames as each ``recv`` brought.

    paho handles one packet per ``select()`` with several ``recv`` calls and objects per message
    (~60 µs of Python each, most of a paho gateway's CPU: ../shared/reference/mqtt-limits.md); this
    reads a socket's worth at a time and keeps only topic, packet id and payload.
    """

    def __init__(self) -> None:
        self.pending = b""

    def feed(self, chunk: bytes) -> list[tuple[int, bytes, int, int]]:
        """(first byte, buffer, start and end of the body) for every whole frame; the rest waits."""
        data = self.pending + chunk if self.pending else chunk
        n, pos = len(data), 0
        frames = []
        while n - pos >= 2:
            try:
                length, i = read_varint(data, pos + 1)
            except IndexError:
                break  # the length itself is not all here yet
            if i + length > n:
                break
            frames.append((data[pos], data, i, i + length))
            pos = i + length
        self.pending = data[pos:]
        return frames


def parse_publish(first: int, data: bytes, start: int, end: int) -> tuple[str, bytes, int, int]:
    """A PUBLISH body → (topic, payload, packet id, QoS). Properties are skipped: we ask for none."""
    length = (data[start] << 8) | data[start + 1]
    topic = data[start + 2:start + 2 + length].decode("utf-8")
    i = start + 2 + length
    qos = (first >> 1) & 3
    mid = 0
    if qos:
        mid = (data[i] << 8) | data[i + 1]
        i += 2
    properties, i = read_varint(data, i)
    return topic, data[i + properties:end], mid, qos


class Receiver:
    """Subscribes to ``filters`` with QoS 1 on a persistent session and buffers what arrives.

    A thread of its own owns the socket: it reads many frames per ``recv``, queues the messages for
    the asyncio side, and writes the acknowledgements that side hands it (one ``send`` for a whole
    batch) and the keepalive pings. It reconnects with backoff, forever.
    """

    def __init__(self, config: BrokerConfig, address: BrokerAddress, filters: list[str],
                 loop: asyncio.AbstractEventLoop, wake: asyncio.Event, ahead: Any = None, hint_lane: bool = False,
                 *, hints_for: Receiver | None = None):
        self.config = config
        self.ahead = ahead  # gateway.ahead.DecodeAhead: offered every bulk message as it arrives
        # The smoke hint lane (gateway/hints.py) is a Receiver too: a clean session of its own, QoS 0,
        # whose messages join this one's urgent queue as hints.
        self.hint = hints_for is not None  # this is the lane: its messages are hints, QoS 0, clean session
        self.sink = self if hints_for is None else hints_for
        self.client_id = f"{config.client_id}-hint" if self.hint else config.client_id
        self.qos = 0 if self.hint else 1
        self.lane = Receiver(config, address, [topics.SMOKE_TELEMETRY_FILTER], loop, wake, hints_for=self) \
            if hint_lane else None
        self.address = address
        self.filters = filters
        self.loop = loop
        self.wake = wake
        self.buffer: deque[Inbound] = deque()
        # Smoke detectors' messages wait in a queue of their own and are taken first: under overload a
        # fire is never queued behind bulk telemetry.
        self.urgent: deque[Inbound] = deque()
        self.generation = 0
        # QoS 1 messages received on this connection, and acknowledged (connection, count): the window
        # the broker should keep to, kept by us (see _serve)
        self._received = 0
        self._acked = (0, 0)
        self.holds = 0  # times reading stopped because the window was full
        self.connected = threading.Event()
        self.subscribed = asyncio.Event()
        self._signalled = False
        self._paused = False
        self._stopping = threading.Event()
        self._outgoing: deque[bytes] = deque()  # frames for the I/O thread to write
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._thread: threading.Thread | None = None
        # called on the event loop with the seconds the connection was down, once it is back: what the
        # broker queued meanwhile, and what devices kept through a broker outage, comes at once now
        self.on_back: Callable[[float], None] | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"mqtt-receive-{self.client_id}", daemon=True)
        self._thread.start()
        if self.lane is not None:
            self.lane.start()

    def pause(self) -> None:
        """Take no more messages; those arriving now stay unacknowledged and come back later."""
        self._paused = True
        if self.lane is not None:
            self.lane.pause()

    def stop(self) -> None:
        if self.lane is not None:
            self.lane.stop()
        self._stopping.set()
        self._poke()
        if self._thread is not None:
            self._thread.join(10)
        self._wake_r.close()
        self._wake_w.close()

    # -- the I/O thread ------------------------------------------------------------------------
    def _run(self) -> None:
        delay = 1.0
        lost: float | None = None  # when the last connection was lost
        while not self._stopping.is_set():
            sock: socket.socket | None = None
            try:
                sock = self._connect()
                delay = 1.0
                if lost is not None and self.on_back is not None:
                    self.loop.call_soon_threadsafe(self.on_back, time.time() - lost)
                lost = None
                self._serve(sock)
            except BrokerRefused as exc:
                log.error("broker refused the connection url=%s reason=%s", self.address, exc)
            except (OSError, ValueError, IndexError) as exc:  # ValueError/IndexError: a malformed frame
                if not self._stopping.is_set():
                    log.warning("disconnected from broker url=%s reason=%s; reconnecting with backoff",
                                self.address, exc or type(exc).__name__)
            finally:
                if self.connected.is_set() and lost is None:
                    lost = time.time()
                self.connected.clear()
                self._outgoing.clear()  # acks of this connection mean nothing on the next one
                if sock is not None:
                    sock.close()
            if not self._stopping.is_set():
                self._stopping.wait(delay)
                delay = min(delay * 2, 30.0)

    def _connect(self) -> socket.socket:
        sock = socket.create_connection((self.address.host, self.address.port), timeout=10)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.config.tls or self.address.tls:
                context = _tls_context(self.config) or ssl.create_default_context()
                sock = context.wrap_socket(sock, server_hostname=self.address.host)
            sock.sendall(connect_packet(self.config, self.client_id, clean=self.hint))
            reader = FrameReader()
            frames: list[tuple[int, bytes, int, int]] = []
            while not frames:
                chunk = sock.recv(4096)
                if not chunk:
                    raise ConnectionError("the broker closed the connection before CONNACK")
                frames = reader.feed(chunk)
            first, data, start, _ = frames[0]
            if first >> 4 != 2:
                raise ConnectionError(f"expected CONNACK, got packet type {first >> 4}")
            session_present, reason = data[start] & 1, data[start + 1]
            if reason >= 0x80:
                raise BrokerRefused(f"CONNACK reason code 0x{reason:02x}")
        except BaseException:
            sock.close()
            raise
        self._received = 0
        self.generation += 1
        self.connected.set()
        log.info("connected url=%s client_id=%s session_present=%s", self.address, self.client_id,
                 bool(session_present))
        # Subscribing again on a present session is harmless and repairs a session the broker lost.
        if self.filters:
            sock.sendall(subscribe_packet(self.filters, qos=self.qos))
        self._pending_frames = frames[1:]
        self._reader = reader
        return sock

    def _serve(self, sock: socket.socket) -> None:
        keepalive = float(self.config.keepalive_s)
        sock.settimeout(None)
        selector = selectors.DefaultSelector()
        selector.register(sock, selectors.EVENT_READ)
        selector.register(self._wake_r, selectors.EVENT_READ)
        reader, frames = self._reader, self._pending_frames
        last_sent = last_heard = time.monotonic()
        generation = self.generation
        # The broker is to send at most receive_maximum unacknowledged QoS 1 messages. Mosquitto 2.0.11
        # (Debian's) keeps to that only until acknowledgements come: each PUBACK of a batch lets it send
        # up to a whole window more (a window of 10, acknowledged at once, brought 100 more; of 100,
        # 4,900: docs/PERFORMANCE.md). So the window is kept here: with as many unacknowledged as it
        # allows, the socket is not read until acknowledgements go out, and the broker's writes wait.
        window = self.config.receive_maximum if self.qos else 0
        reading = True
        try:
            while not self._stopping.is_set():
                if frames:
                    self._handle(frames, generation)
                    frames = []
                if self._outgoing:
                    sock.sendall(self._take_outgoing())
                    last_sent = time.monotonic()
                if window and (self.outstanding() < window) != reading:
                    reading = not reading
                    if reading:
                        selector.register(sock, selectors.EVENT_READ)
                    else:
                        selector.unregister(sock)
                        self.holds += 1
                if reading:
                    ready = True if isinstance(sock, ssl.SSLSocket) and sock.pending() else \
                        any(key.fileobj is sock for key, _ in selector.select(keepalive / 2))
                else:  # waiting for acknowledgements (the wake-up socket): the broker is not listened to
                    selector.select(keepalive / 2)
                    ready, last_heard = False, time.monotonic()
                try:
                    while True:
                        self._wake_r.recv(4096)
                except (BlockingIOError, InterruptedError):
                    pass
                now = time.monotonic()
                if ready:
                    # near a full window, no more bytes than the messages it still has room for could take
                    # (64 bytes is about the smallest device message): the window is kept to within 4 KB
                    room = (window - self.outstanding()) * 64 if window else 262144
                    chunk = sock.recv(max(4096, min(262144, room)))
                    if not chunk:
                        raise ConnectionError("the broker closed the connection")
                    frames = reader.feed(chunk)
                    last_heard = now
                elif now - last_heard > keepalive * 1.5:
                    raise TimeoutError(f"nothing from the broker for {keepalive * 1.5:.0f} s")
                if now - last_sent >= keepalive / 2:
                    sock.sendall(PINGREQ)
                    last_sent = now
            if self.connected.is_set():
                # The PUBACKs of the stop's last snapshot go before the DISCONNECT, and the broker is
                # heard out until it closes: closed at once with the broker's messages unread, the socket
                # went down with a reset, which threw away what the broker had not yet read of ours
                # (Mosquitto reads one packet a turn). Either way the broker delivered up to a second of
                # readings again to the next start, each a duplicate.
                sock.sendall(self._take_outgoing() + DISCONNECT)
                sock.settimeout(CLOSE_WAIT_S)
                try:
                    while sock.recv(65536):
                        pass
                except OSError:  # the wait is over, or the broker reset the connection itself
                    pass
        finally:
            selector.close()

    def _take_outgoing(self) -> bytes:
        """What the asyncio side handed over to write, as one buffer (popped one by one: it may be
        appending meanwhile)."""
        out = []
        while self._outgoing:
            out.append(self._outgoing.popleft())
        return b"".join(out)

    def _handle(self, frames: list[tuple[int, bytes, int, int]], generation: int) -> None:
        taken = False
        bulk: list[Inbound] = []
        least = self.ahead.MIN_BYTES if self.ahead is not None else 1 << 62  # offered to decode-ahead
        sink, hint = self.sink, self.hint
        for first, data, start, end in frames:
            kind = first >> 4
            if kind == 3:
                topic, payload, mid, qos = parse_publish(first, data, start, end)
                if qos:
                    self._received += 1
                if not self._paused:
                    inbound = Inbound(topic, payload, mid, qos, generation, hint=hint)
                    if URGENT in topic:
                        sink.urgent.append(inbound)
                    else:
                        sink.buffer.append(inbound)
                        if len(payload) >= least:
                            bulk.append(inbound)
                    taken = True
            elif kind == 9:  # SUBACK: one reason code per filter, after the packet id and properties
                self._on_suback(data[start + 3 + data[start + 2]:end])
            elif kind == 14:
                reason = data[start] if end > start else 0
                raise ConnectionError(f"the broker disconnected us (reason code 0x{reason:02x})")
            # PINGRESP needs nothing: hearing it is what counts
        if taken:
            sink._signal()
        if bulk and self.ahead is not None:
            self.ahead.offer(bulk)

    def _on_suback(self, reasons: bytes) -> None:
        if any(r >= 0x80 for r in reasons):
            log.error("subscription refused filters=%s reasons=%s", self.filters, [f"0x{r:02x}" for r in reasons])
            return
        self.loop.call_soon_threadsafe(self.subscribed.set)

    def _on_message(self, client: object, userdata: object, message: Any) -> None:
        """Queue one message (what the I/O thread does for each PUBLISH; tests drive it directly)."""
        if self._paused:
            return
        sink = self.sink
        inbound = Inbound(message.topic, message.payload, message.mid, message.qos, self.generation, hint=self.hint)
        (sink.urgent if URGENT in inbound.topic else sink.buffer).append(inbound)
        sink._signal()

    def _signal(self) -> None:
        if not self._signalled:
            self._signalled = True
            self.loop.call_soon_threadsafe(self.wake.set)

    def _poke(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # already poked, or closed

    # -- asyncio side ------------------------------------------------------------------------
    def drain(self, limit: int, max_bytes: int = 1 << 62) -> list[Inbound]:
        """At most ``limit`` messages, smoke detectors' first, and no more once ``max_bytes`` of payload
        are taken (a batch's work grows with its readings, and a fire arriving meanwhile waits for it)."""
        self._signalled = False
        out: list[Inbound] = []
        size = 0
        for queue in (self.urgent, self.buffer):
            for _ in range(min(limit - len(out), len(queue))):
                if size >= max_bytes:
                    break
                message = queue.popleft()
                message.claimed = True
                size += len(message.payload)
                out.append(message)
        if self.urgent or self.buffer:  # more left: come straight back
            self._signalled = True
            self.wake.set()
        return out

    def __len__(self) -> int:
        return len(self.urgent) + len(self.buffer)

    @staticmethod
    def pubacks(messages: list[Inbound]) -> list[tuple[int, bytes, int]]:
        """The PUBACKs of processed messages, to be sent later: (connection generation, frames,
        messages). Kept instead of the messages themselves while they wait for a snapshot: a second's
        worth of objects would otherwise climb through every generation of the garbage collector."""
        frames: dict[int, list[bytes]] = {}
        for message in messages:
            if message.qos == 1:
                frames.setdefault(message.generation, []).append(b"\x40\x02" + message.mid.to_bytes(2, "big"))
        return [(generation, b"".join(acks), len(acks)) for generation, acks in frames.items()]

    def send_pubacks(self, pending: list[tuple[int, bytes, int]]) -> None:
        """Send PUBACKs from :meth:`pubacks` in one write by the I/O thread; only those of the current
        connection (the broker redelivers the others on its own)."""
        generation = self.generation
        acks = b"".join(frames for g, frames, _ in pending if g == generation)
        if acks:
            self._outgoing.append(acks)
            done, count = self._acked
            self._acked = (generation, (count if done == generation else 0) + len(acks) // 4)  # 4 bytes a PUBACK
            self._poke()

    def outstanding(self) -> int:
        """QoS 1 messages received on the current connection and not acknowledged yet."""
        done, count = self._acked
        return self._received - (count if done == self.generation else 0)

    def ack(self, messages: list[Inbound]) -> None:
        """PUBACK what was processed, on the connection it came from."""
        self.send_pubacks(self.pubacks(messages))


class Publisher:
    """Alert, dead-letter and incident publishing on a connection of its own, reconnecting forever."""

    def __init__(self, config: BrokerConfig, address: BrokerAddress):
        self.config = config
        self.address = address
        self.client: aiomqtt.Client | None = None
        self.ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = asyncio.Event()
        self._broken = asyncio.Event()  # a publish failed: the connection is to be made again
        self.failures = 0  # publishes that failed and were retried

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="publisher")

    async def _run(self) -> None:
        delay = 1.0
        while not self._closing.is_set():
            client = aiomqtt.Client(
                self.address.host, self.address.port, identifier=f"{self.config.client_id}-pub",
                username=self.config.username,
                password=self.config.password.get_secret_value() if self.config.password else None,
                protocol=aiomqtt.ProtocolVersion.V5, keepalive=self.config.keepalive_s,
                max_inflight_messages=PUBLISH_INFLIGHT,
                tls_context=_tls_context(self.config) if (self.config.tls or self.address.tls) else None,
            )
            try:
                async with client:
                    self.client, delay = client, 1.0
                    self._broken.clear()
                    self.ready.set()
                    # aiomqtt notices a dead connection only when it is used: a failed publish says so
                    await asyncio.wait({asyncio.ensure_future(self._closing.wait()),
                                        asyncio.ensure_future(self._broken.wait())},
                                       return_when=asyncio.FIRST_COMPLETED)
                    self.ready.clear()
                    if self._broken.is_set() and not self._closing.is_set():
                        log.warning("publisher connection broken url=%s; reconnecting", self.address)
            except aiomqtt.MqttError as exc:
                log.warning("publisher connection lost url=%s error=%s; retry in %.0f s", self.address, exc, delay)
            finally:
                self.ready.clear()
                self.client = None
            if not self._closing.is_set():
                try:
                    await asyncio.wait_for(self._closing.wait(), delay)
                except TimeoutError:
                    pass
                delay = min(delay * 2, 30.0)

    async def publish_many(self, messages: list[tuple[str, bytes]], retain: bool = False) -> None:
        """Publish all at QoS 1 and wait for the broker's acknowledgements; retries until sent."""
        pending = list(messages)
        while pending:
            await self.ready.wait()
            client = self.client
            if client is None:
                continue
            timeout = PUBLISH_TIMEOUT_S + PUBLISH_TIMEOUT_PER_MESSAGE_S * len(pending)
            results = await asyncio.gather(
                *(client.publish(topic, payload, qos=1, retain=retain, timeout=timeout) for topic, payload in pending),
                return_exceptions=True,
            )
            failed = [m for m, r in zip(pending, results) if isinstance(r, BaseException)]
            self.failures += len(failed)
            if failed:
                log.warning("publish failed count=%d error=%s; reconnecting and retrying", len(failed),
                            next(r for r in results if isinstance(r, BaseException)))
                self.ready.clear()
                self._broken.set()
                await asyncio.sleep(0.2)
            pending = failed

    async def stop(self) -> None:
        self._closing.set()
        if self._task is not None:
            await self._task
