"""Real parts for the tests: a Mosquitto on a free loopback port, the gateway in a thread."""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import orjson
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from gateway.broker import EmbeddedBroker, find_mosquitto
from gateway.config import Config, load_config
from gateway.service import Gateway

ROOT = Path(__file__).resolve().parent.parent
_ids = itertools.count()


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    """Mosquitto from the repo's gateway/mosquitto.conf, on a free loopback port, for the session."""
    if find_mosquitto() is None:
        pytest.fail("mosquitto is not installed: run the tests with scripts/test, which installs it")
    with EmbeddedBroker(tmp_path_factory.mktemp("mosquitto"), persistence=False) as running:
        yield running


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One PostgreSQL server for the session; each test that wants one gets a database of its own."""
    from tests.postgres import PostgresServer

    server = PostgresServer(tmp_path_factory.mktemp("postgres")).start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each incident-store test runs on SQLite and on a real PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'incidents.db'}"
    server = request.getfixturevalue("postgres")
    return server.create_database(f"t{next(_ids)}_{time.time_ns() % 10**6}")


@pytest.fixture(scope="session")
def street_config() -> Config:
    return load_config(ROOT / "config.yaml")


@pytest.fixture
def config(street_config: Config, broker: EmbeddedBroker, tmp_path: Path) -> Config:
    """The default street, on the test broker, with a client id of its own (sessions never mix)."""
    config = street_config.model_copy(deep=True)
    config.broker.url = broker.url
    config.broker.client_id = f"gw-test-{next(_ids)}-{time.time_ns() % 10**6}"
    config.state_dir = tmp_path / "state"
    config.incidents.url = f"sqlite:///{tmp_path / 'incidents.db'}"
    config.api.listen = "127.0.0.1:0"  # a free port of its own
    config.broker.session_expiry_s = 120  # long enough for a restart test, short enough to leave no backlog
    config.logging.stats_interval_s = 3600
    return config


class GatewayThread:
    """A gateway running in its own thread and event loop, as `streetbrain run` would."""

    def __init__(self, config: Config):
        self.config = config
        self.gateway: Gateway | None = None
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()

    def start(self, timeout_s: float = 10.0) -> GatewayThread:
        self.thread = threading.Thread(target=self._main, name="gateway", daemon=True)
        self.thread.start()
        if not self._started.wait(timeout_s):
            raise TimeoutError(f"gateway did not become ready in {timeout_s} s (error: {self.error!r})")
        if self.error:
            raise self.error
        return self

    def _main(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            self.gateway = Gateway(self.config)
            waiter = asyncio.create_task(self._signal_started())
            try:
                await self.gateway.run(self._stop)
            finally:
                waiter.cancel()

        try:
            asyncio.run(main())
        except BaseException as exc:  # surfaced to the test through start()/stop()
            self.error = exc
            self._started.set()

    async def _signal_started(self) -> None:
        assert self.gateway is not None
        await self.gateway.started.wait()
        self._started.set()

    def stop(self, timeout_s: float = 15.0) -> None:
        if self._loop is not None and self._stop is not None and self.thread and self.thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        if self.thread is not None:
            self.thread.join(timeout_s)
            assert not self.thread.is_alive(), "gateway did not stop"
        if self.error:
            raise self.error


@pytest.fixture
def run_gateway() -> Iterator[Any]:
    running: list[GatewayThread] = []

    def start(config: Config) -> GatewayThread:
        gateway = GatewayThread(config).start()
        running.append(gateway)
        return gateway

    yield start
    for gateway in running:
        gateway.stop()


class MqttClient:
    """A plain paho client for tests: publishes like a device, collects like an operator screen."""

    def __init__(self, broker: EmbeddedBroker, subscribe: list[str] = (), username: str | None = None,
                 password: str | None = None):
        self.messages: queue.Queue[tuple[str, dict[str, Any], float]] = queue.Queue()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"test-{next(_ids)}-{time.time_ns()}",
                                  protocol=paho.MQTTv5)
        if username is not None:
            self.client.username_pw_set(username, password)
        self.client.on_message = lambda c, u, m: self.messages.put((m.topic, orjson.loads(m.payload), time.time()))
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        if subscribe:
            self.client.subscribe([(t, 1) for t in subscribe])
            assert subscribed.wait(5), "test client could not subscribe"

    def publish(self, topic: str, payload: bytes | dict[str, Any], qos: int = 1, retain: bool = False) -> None:
        body = orjson.dumps(payload) if isinstance(payload, dict) else payload
        self.client.publish(topic, body, qos=qos, retain=retain).wait_for_publish(5)

    def wait_for(self, predicate: Any, timeout_s: float = 5.0) -> tuple[str, dict[str, Any], float]:
        deadline = time.monotonic() + timeout_s
        seen = []
        while (left := deadline - time.monotonic()) > 0:
            try:
                item = self.messages.get(timeout=left)
            except queue.Empty:
                break
            if predicate(*item[:2]):
                return item
            seen.append(item[:2])
        raise AssertionError(f"no matching message within {timeout_s} s; received instead: {seen!r:.2000}")

    def collect(self, seconds: float) -> list[tuple[str, dict[str, Any], float]]:
        out, deadline = [], time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                out.append(self.messages.get(timeout=left))
            except queue.Empty:
                break
        return out

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def mqtt(broker: EmbeddedBroker) -> Iterator[Any]:
    clients: list[MqttClient] = []

    def make(subscribe: list[str] = ()) -> MqttClient:
        client = MqttClient(broker, list(subscribe))
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()
