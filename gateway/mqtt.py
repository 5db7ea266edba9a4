"""The two MQTT connections of the gateway.

* :class:`Receiver` — the hot receive path: paho-mqtt in its own network thread (measured ~2× the
  receive rate of aiomqtt on this machine, ../shared/reference/mqtt-limits.md), MQTT 5 persistent
  session, manual acknowledgements. Messages pile up in a buffer that the asyncio side drains in
  batches; each is acknowledged only after its batch was processed and its alerts were published,
  so a crash loses nothing: the broker redelivers what was not acknowledged. The broker sends at
  most ``receive_maximum`` unacknowledged messages, which bounds the buffer.
* :class:`Publisher` — aiomqtt on a connection of its own, so alerts never queue behind inbound
  telemetry. Publishes are QoS 1 and awaited until the broker acknowledges them.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import threading
from collections import deque
from dataclasses import dataclass

import aiomqtt
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.config import BrokerAddress, BrokerConfig

log = logging.getLogger("streetbrain.mqtt")
URGENT = "/smoke/"  # the topic level of the kind whose messages are processed first


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


class Receiver:
    """Subscribes to ``filters`` with QoS 1 on a persistent session and buffers what arrives."""

    def __init__(self, config: BrokerConfig, address: BrokerAddress, filters: list[str],
                 loop: asyncio.AbstractEventLoop, wake: asyncio.Event):
        self.config = config
        self.address = address
        self.filters = filters
        self.loop = loop
        self.wake = wake
        self.buffer: deque[Inbound] = deque()
        # Smoke detectors' messages wait in a queue of their own and are taken first: under overload a
        # fire is never queued behind bulk telemetry.
        self.urgent: deque[Inbound] = deque()
        self.generation = 0
        self.connected = threading.Event()
        self.subscribed = asyncio.Event()
        self._signalled = False
        self._paused = False
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=config.client_id,
                                  protocol=paho.MQTTv5, manual_ack=True)
        if config.username:
            self.client.username_pw_set(config.username,
                                        config.password.get_secret_value() if config.password else None)
        context = _tls_context(config) if (config.tls or address.tls) else None
        if context is not None or address.tls:
            self.client.tls_set_context(context or ssl.create_default_context())
        self.client.reconnect_delay_set(min_delay=1, max_delay=30)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe

    def start(self) -> None:
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = self.config.session_expiry_s
        properties.ReceiveMaximum = self.config.receive_maximum
        self.client.connect_async(self.address.host, self.address.port, keepalive=self.config.keepalive_s,
                                  clean_start=False, properties=properties)
        self.client.loop_start()

    def pause(self) -> None:
        """Take no more messages; those arriving now stay unacknowledged and come back later."""
        self._paused = True

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    # -- paho network thread -----------------------------------------------------------------
    def _on_connect(self, client: paho.Client, userdata: object, flags: paho.ConnectFlags,
                    reason: paho.ReasonCode, properties: Properties | None) -> None:
        if reason.is_failure:
            log.error("broker refused the connection url=%s reason=%s", self.address, reason)
            return
        self.generation += 1
        self.connected.set()
        log.info("connected url=%s session_present=%s", self.address, flags.session_present)
        # Subscribing again on a present session is harmless and repairs a session the broker lost.
        client.subscribe([(f, paho.SubscribeOptions(qos=1)) for f in self.filters])

    def _on_subscribe(self, client: paho.Client, userdata: object, mid: int,
                      reasons: list[paho.ReasonCode], properties: Properties | None) -> None:
        if any(r.is_failure for r in reasons):
            log.error("subscription refused filters=%s reasons=%s", self.filters, [str(r) for r in reasons])
            return
        self.loop.call_soon_threadsafe(self.subscribed.set)

    def _on_disconnect(self, client: paho.Client, userdata: object, flags: paho.DisconnectFlags,
                       reason: paho.ReasonCode, properties: Properties | None) -> None:
        self.connected.clear()
        if reason.value != 0:
            log.warning("disconnected from broker url=%s reason=%s; reconnecting with backoff", self.address, reason)

    def _on_message(self, client: paho.Client, userdata: object, message: paho.MQTTMessage) -> None:
        if self._paused:
            return
        inbound = Inbound(message.topic, message.payload, message.mid, message.qos, self.generation)
        (self.urgent if URGENT in inbound.topic else self.buffer).append(inbound)
        if not self._signalled:
            self._signalled = True
            self.loop.call_soon_threadsafe(self.wake.set)

    # -- asyncio side ------------------------------------------------------------------------
    def drain(self, limit: int) -> list[Inbound]:
        self._signalled = False
        out: list[Inbound] = []
        for queue in (self.urgent, self.buffer):
            for _ in range(min(limit - len(out), len(queue))):
                out.append(queue.popleft())
        if self.urgent or self.buffer:  # more left: come straight back
            self._signalled = True
            self.wake.set()
        return out

    def __len__(self) -> int:
        return len(self.urgent) + len(self.buffer)

    def ack(self, messages: list[Inbound]) -> None:
        generation = self.generation
        for message in messages:
            if message.qos and message.generation == generation:
                self.client.ack(message.mid, message.qos)


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
            results = await asyncio.gather(
                *(client.publish(topic, payload, qos=1, retain=retain, timeout=10) for topic, payload in pending),
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
