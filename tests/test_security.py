"""The embedded broker lets in only who belongs, each within its own rights."""

from __future__ import annotations

import stat
import time

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from gateway import security, topics
from tests.conftest import MqttClient


@pytest.fixture
def secured(config, run_gateway):
    config.broker.url = None  # the gateway starts its own broker, with credentials and an ACL
    gateway = run_gateway(config).gateway
    return gateway, security.load(config.state_dir)


def connect(broker, username=None, password=None) -> int:
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"probe-{time.time_ns()}", protocol=paho.MQTTv5)
    if username is not None:
        client.username_pw_set(username, password)
    try:
        client.connect(broker.host, broker.port)
        code = []
        client.on_connect = lambda c, u, f, reason, p: code.append(reason.value)
        deadline = time.monotonic() + 3
        while not code and time.monotonic() < deadline:
            client.loop(0.1)
        return code[0] if code else -1  # no answer at all (a TLS listener says nothing to plain MQTT)
    finally:
        client.disconnect()


def test_anonymous_and_wrong_passwords_are_refused(secured):
    gateway, credentials = secured
    broker = gateway.embedded
    assert connect(broker) != 0
    assert connect(broker, "smk-wangma-001", "guess") != 0
    assert connect(broker, "smk-wangma-001", credentials.devices["smk-wangma-001"]) == 0


def test_a_device_may_publish_only_under_its_own_topics(secured):
    gateway, credentials = secured
    broker = gateway.embedded
    screen = MqttClient(broker, [topics.ALERTS_FILTER], security.OPERATOR_USER, credentials.operator)
    mine = MqttClient(broker, username="smk-wangma-001", password=credentials.devices["smk-wangma-001"])
    mine.publish(topics.telemetry("wangma", "smoke", "smk-wangma-002"), {"ts": time.time(), "alarm": True})  # not its own
    mine.publish(topics.telemetry("wangma", "smoke", "smk-wangma-001"), {"ts": time.time(), "alarm": True})
    operator = MqttClient(broker, username=security.OPERATOR_USER, password=credentials.operator)
    operator.publish(topics.telemetry("wangma", "smoke", "smk-wangma-003"), {"ts": time.time(), "alarm": True})
    received = [a["device_id"] for _, a, _ in screen.collect(2.0)]
    assert received == ["smk-wangma-001"]  # the forged and the operator's readings never reached the gateway
    for client in (screen, mine, operator):
        client.close()


def test_secrets_are_kept_in_files_only_their_owner_can_read_and_never_in_clear_for_the_broker(secured, config):
    gateway, credentials = secured
    for path in (config.state_dir / "credentials.json", config.state_dir / "mosquitto" / "passwords",
                 config.state_dir / "mosquitto" / "acl", config.state_dir / "mosquitto" / "mosquitto.conf"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    hashed = (config.state_dir / "mosquitto" / "passwords").read_text()
    assert credentials.gateway not in hashed and "$7$" in hashed


def test_the_gateway_never_logs_a_password(config, run_gateway, caplog):
    config.broker.url = None
    with caplog.at_level("DEBUG"):
        run_gateway(config)
        time.sleep(0.5)
    credentials = security.load(config.state_dir)
    everything = "\n".join(r.getMessage() + str(r.__dict__) for r in caplog.records)
    assert credentials.gateway not in everything
    assert all(password not in everything for password in list(credentials.devices.values())[:50])


def test_with_embedded_tls_the_broker_speaks_only_tls_and_the_gateway_trusts_its_local_ca(config, run_gateway):
    import ssl

    config.broker.url = None
    config.broker.embedded_tls = True
    gateway = run_gateway(config).gateway
    broker = gateway.embedded
    assert broker.url.startswith("mqtts://") and str(gateway.address).startswith("mqtts://")
    credentials = security.load(config.state_dir)
    assert connect(broker, "smk-wangma-001", credentials.devices["smk-wangma-001"]) != 0  # no plain MQTT

    context = ssl.create_default_context(cafile=str(config.state_dir / "tls" / "ca.crt"))

    def tls_client(user: str, password: str, subscribe: list[str] = ()) -> MqttClient:
        client = MqttClient.__new__(MqttClient)
        import queue as q

        import orjson
        client.messages = q.Queue()
        client.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"tls-{time.time_ns()}", protocol=paho.MQTTv5)
        client.client.username_pw_set(user, password)
        client.client.tls_set_context(context)
        client.client.on_message = lambda c, u, m: client.messages.put((m.topic, orjson.loads(m.payload), time.time()))
        client.client.connect(broker.host, broker.port)
        client.client.loop_start()
        for topic in subscribe:
            client.client.subscribe(topic, 1)
        time.sleep(0.3)
        return client

    screen = tls_client(security.OPERATOR_USER, credentials.operator, [topics.ALERTS_FILTER])
    device = tls_client("smk-wangma-001", credentials.devices["smk-wangma-001"])
    device.publish(topics.telemetry("wangma", "smoke", "smk-wangma-001"), {"ts": time.time(), "alarm": True})
    _, alert, _ = screen.wait_for(lambda t, a: a["device_id"] == "smk-wangma-001", timeout_s=5)
    assert alert["severity"] == "critical"
    screen.close()
    device.close()
    assert stat.S_IMODE((config.state_dir / "tls" / "broker.key").stat().st_mode) == 0o600
