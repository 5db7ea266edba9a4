"""Decode-ahead (gateway/ahead.py): a batch decoded by the worker process must change nothing a user
can see, and a worker that dies must cost nothing but its own work. Real worker processes throughout."""

from __future__ import annotations

import random
import time
import urllib.request

import numpy as np
import orjson
import pytest

from gateway import ahead as ahead_module
from gateway import topics
from gateway.ahead import DecodeAhead, pack, unpack
from gateway.decode import Decoder, TypedBatch, fast_reading
from gateway.mqtt import Inbound
from gateway.registry import Registry
from gateway.schemas import READING_MODELS

NOW = 1795322561.0


def _batch(kind: str, n: int, rng: random.Random, start: float) -> list[dict[str, object]]:
    readings: list[dict[str, object]] = []
    for i in range(n):
        item: dict[str, object] = {"ts": start + i, "seq": 1000 + i}
        if kind == "meter":
            item.update(temp_c=30.0 + rng.random(), current_a=8.0, voltage_v=221.5)
        elif kind == "ev_charger":
            item.update(port=1 + i % 3, power_w=400.0 + i, current_a=2.0)
        elif kind == "smoke":
            item.update(alarm=False, smoke_obscuration_pct_m=0.1, battery_pct=90.0)
        else:
            item.update(laeq_db=55.0 + rng.random(), interval_s=60)
        readings.append(item)
    return readings


def _messages(registry: Registry, rng: random.Random) -> list[tuple[str, bytes]]:
    """Plain batches of every kind, and batches each wrong in one way, in a random order."""
    devices = {}
    for device in registry.devices.values():
        devices.setdefault(device.kind, []).append(device)
    out = []
    for k in range(60):
        kind = rng.choice(sorted(READING_MODELS))
        device = rng.choice(devices[kind])
        topic = topics.telemetry(device.site, kind, device.id)
        readings = _batch(kind, rng.choice([8, 20, 100]), rng, NOW - 3000 + k * 200)
        flaw = rng.choice(["none"] * 6 + ["range", "type", "unknown", "device_id", "future", "ascii", "single",
                                          "port", "json"])
        body: dict[str, object] = {"readings": readings}
        if flaw == "range":
            readings[rng.randrange(len(readings))]["battery_pct" if kind == "smoke" else "seq"] = -5
        elif flaw == "type":
            readings[rng.randrange(len(readings))]["ts"] = "yesterday"
        elif flaw == "unknown":
            readings[0]["firmware"] = "1.2"
        elif flaw == "device_id":
            body["device_id"] = "someone-else"
        elif flaw == "future":
            readings[-1]["ts"] = NOW + 3600
        elif flaw == "port" and kind == "ev_charger":
            readings[0]["port"] = 99
        payload = orjson.dumps(readings[0] if flaw == "single" else body)
        if flaw == "ascii":  # another key of the batch, skipped by the decoder: good UTF-8 or not
            payload = b'{"note":"' + rng.choice([b"\xe7\x81\xab", b"\xff"]) + b'",' + payload[1:]
        elif flaw == "json":
            payload = payload[:-3]
        out.append((topic, payload))
    out.append((topics.status("wangma", "meter", "mtr-wangma-001"), b'{"online": true}'))
    return out


def _wait_decoded(messages: list[Inbound], timeout_s: float = 60.0) -> None:
    wanted = [m for m in messages if m.topic.endswith("/telemetry") and b'"readings"' in m.payload]
    deadline = time.monotonic() + timeout_s
    while any(m.ahead is None for m in wanted) and time.monotonic() < deadline:
        time.sleep(0.05)


def _same(a, b) -> None:
    assert [(d.topic, d.problems, d.rejected, d.accepted) for d in a.deadletters] == \
        [(d.topic, d.problems, d.rejected, d.accepted) for d in b.deadletters]
    assert a.readings == b.readings and a.statuses == b.statuses
    assert sorted(a.columns) == sorted(b.columns)
    for kind in a.columns:
        for x, y in zip(a.columns[kind], b.columns[kind], strict=True):
            assert (x.site, x.device_id) == (y.site, y.device_id)
            for name in ("rows", "ts", "seq", "ports"):
                assert np.array_equal(getattr(x, name), getattr(y, name))
            assert np.array_equal(x.values, y.values, equal_nan=True)


@pytest.fixture
def street(street_config):
    """The street's config and registry, and a decode-ahead thread (its worker not started yet)."""
    config = street_config.model_copy(deep=True)
    config.ingest.device_rate_per_s = 0
    registry = Registry.from_config(config)
    worker = DecodeAhead(Decoder(config, registry)).start()
    yield config, registry, worker
    worker.stop()


def _inbound(raw: list[tuple[str, bytes]], claimed: bool = False) -> list[Inbound]:
    return [Inbound(topic, payload, 1, 1, 1, claimed=claimed) for topic, payload in raw]


def test_pack_and_unpack_give_back_what_the_decoder_made():
    rng = random.Random(1)
    results = []
    for kind in ("meter", "ev_charger", "noise", "smoke"):
        typed = TypedBatch(kind, fast_reading(kind), 1000)
        results.append(typed(orjson.dumps({"readings": _batch(kind, 12, rng, NOW)})))
    results[1] = ("evc-wangma-01", results[1][1])
    results[2:2] = [None, False]
    back = unpack(pack(results))
    assert back[2] is None and back[3] == ahead_module.REFUSED
    for made, got in zip([r for r in results if r], [r for r in back if isinstance(r, tuple)], strict=True):
        assert made[0] == got[0]
        for x, y in zip(made[1], got[1], strict=True):
            assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y, equal_nan=True)
            assert y.flags.writeable
    assert unpack(pack([])) == []


def test_batches_decoded_ahead_give_the_same_readings_and_dead_letters_as_decoded_here(street):
    config, registry, worker = street
    for seed in range(3):
        raw = _messages(registry, random.Random(seed))
        inbound = _inbound(raw)
        worker.offer(inbound)
        _wait_decoded(inbound)
        ahead = [m.ahead for m in inbound]
        assert sum(r is not None for r in ahead) > 40  # the worker did decode them
        here = Decoder(config, registry).decode(raw, NOW)
        there = Decoder(config, registry).decode(raw, NOW, ahead)
        assert there.batches_ahead > 40 and here.batches_ahead == 0
        assert here.columns and here.deadletters  # both paths and both outcomes were exercised
        _same(here, there)
    assert worker.state()["starts"] == 1 and worker.state()["failures"] == 0
    worker.stop()
    assert worker.state()["running"] == 0


def test_a_worker_that_dies_costs_only_its_work_and_is_started_again(street, monkeypatch):
    monkeypatch.setattr(ahead_module, "RESTART_S", 0.2)
    _, registry, worker = street

    def burst(seed: int) -> list[Inbound]:
        messages = _inbound([(t, p) for t, p in _messages(registry, random.Random(seed)) if t.endswith("/telemetry")])
        worker.offer(messages)
        return messages

    _wait_decoded(burst(1))
    worker._process.kill()  # as the OOM killer or a crash in the parser would
    worker._process.join(5)
    lost = burst(2)
    time.sleep(1.0)
    assert all(m.ahead is None for m in lost)  # nothing from a dead worker: the main thread decodes them
    assert worker.state()["failures"] == 1
    again = burst(3)
    _wait_decoded(again)
    assert all(m.ahead is not None for m in again if b'"readings"' in m.payload)
    assert worker.state()["starts"] == 2


def test_messages_the_main_thread_has_taken_are_not_decoded_ahead(street):
    _, registry, worker = street
    first = _inbound(_messages(registry, random.Random(4)))
    worker.offer(first)
    _wait_decoded(first)  # the worker is up
    exchanges = worker.state()["exchanges"]
    taken = _inbound(_messages(registry, random.Random(5)), claimed=True)
    worker.offer(taken)
    time.sleep(0.5)
    assert all(m.ahead is None for m in taken) and worker.state()["exchanges"] == exchanges


def test_a_few_batches_do_not_start_a_worker(street):
    _, registry, worker = street
    few = _inbound(_messages(registry, random.Random(6))[:10])
    worker.offer(few)
    time.sleep(0.3)
    assert worker.state()["starts"] == 0 and all(m.ahead is None for m in few)


@pytest.mark.parametrize("decode_ahead", [True, False])
def test_bursts_of_batches_through_the_gateway_lose_nothing(config, run_gateway, mqtt, decode_ahead):
    config.ingest.decode_ahead = decode_ahead
    config.ingest.device_rate_per_s = 0
    gateway = run_gateway(config)
    alerts = mqtt([topics.ALERTS_FILTER])
    device = mqtt()
    meters = [f"mtr-wangma-{n:03d}" for n in range(1, 41)]
    now = time.time()
    sent = 0
    for burst in range(3):
        handles = []
        for n, meter in enumerate(meters):
            readings = [{"ts": now - 300 + burst * 60 + i * 0.5, "seq": burst * 100 + i,
                         "temp_c": 75.0 if (burst, n, i) == (2, 7, 19) else 30.0} for i in range(20)]
            handles.append(device.client.publish(topics.telemetry("wangma", "meter", meter),
                                                 orjson.dumps({"readings": readings}), qos=1))
            sent += 20
        for handle in handles:
            handle.wait_for_publish(5)
        time.sleep(0.3)
    alerts.wait_for(lambda topic, body: body.get("device_id") == "mtr-wangma-008" and body.get("event") == "raised",
                    timeout_s=20)
    port = gateway.gateway.api_port
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        valid = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                    if line.startswith('streetbrain_readings_valid_total{kind="meter"}'))
        if valid >= sent:
            break
        time.sleep(0.2)
    assert valid == sent
    decodes = {where: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               for where in ("here", "ahead") if line.startswith(f'streetbrain_batch_decodes_total{{where="{where}"}}')}
    assert sum(decodes.values()) == 3 * len(meters)
    assert ("streetbrain_decode_worker_starts_total" in text) == decode_ahead


def test_a_hung_worker_is_replaced_and_offers_never_pile_up(street, monkeypatch):
    import os
    import signal

    monkeypatch.setattr(ahead_module, "EXCHANGE_TIMEOUT_S", 0.5)
    monkeypatch.setattr(ahead_module, "RESTART_S", 0.2)
    _, registry, worker = street
    first = _inbound(_messages(registry, random.Random(7)))
    worker.offer(first)
    _wait_decoded(first)
    os.kill(worker._process.pid, signal.SIGSTOP)  # hung: alive, answering nothing
    stuck = _inbound(_messages(registry, random.Random(8)))
    worker.offer(stuck)
    deadline = time.monotonic() + 10
    while worker.state()["starts"] < 2 and time.monotonic() < deadline:
        worker.offer(_inbound(_messages(registry, random.Random(9))))
        time.sleep(0.2)
    assert worker.state()["failures"] == 1 and worker.state()["starts"] == 2
    again = _inbound(_messages(registry, random.Random(10)))
    worker.offer(again)
    _wait_decoded(again)
    assert all(m.ahead is not None for m in again if b'"readings"' in m.payload)
    monkeypatch.setattr(ahead_module, "OFFERED_MAX", 10)  # a thread that takes nothing: offers are dropped
    worker._offered = 11
    worker.offer(_inbound(_messages(registry, random.Random(11))))
    assert worker.state()["dropped"] > 0
    worker._offered = 0


def test_the_worker_keeps_at_most_ahead_max_decoded_messages_waiting(street, monkeypatch):
    """A backlog of the whole receive window is decoded a drain ahead of the main thread, not all at
    once (its columns would double the backlog's memory)."""
    monkeypatch.setattr(ahead_module, "AHEAD_MAX", 40)
    monkeypatch.setattr(ahead_module, "EXCHANGE_MAX", 16)
    _, registry, worker = street
    backlog = _inbound([m for seed in range(20, 25) for m in _messages(registry, random.Random(seed))])
    batches = [m for m in backlog if b'"readings"' in m.payload and m.topic.endswith("/telemetry")]
    worker.offer(backlog)
    deadline = time.monotonic() + 30
    while sum(m.ahead is not None for m in batches) < 40 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    decoded = sum(m.ahead is not None for m in batches)
    assert 40 <= decoded < 40 + ahead_module.EXCHANGE_MAX and decoded < len(batches)
    for m in backlog:  # the main thread takes them all
        m.claimed = True
    time.sleep(0.3)
    fresh = _inbound(_messages(registry, random.Random(30)))
    worker.offer(fresh)  # and the worker goes on, as far as AHEAD_MAX again
    deadline = time.monotonic() + 30
    while sum(m.ahead is not None for m in fresh) < 40 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sum(m.ahead is not None for m in fresh) >= 40


def test_the_main_thread_waits_for_an_exchange_holding_its_messages_and_not_longer_than_wait_max(street, monkeypatch):
    """Decoding a message the worker has in hand would do its work twice (under load the main thread
    did so for half the batches): the main thread waits for that exchange, but never long."""
    import asyncio
    import os
    import signal

    _, registry, worker = street
    first = _inbound(_messages(registry, random.Random(12)))
    worker.offer(first)
    _wait_decoded(first)  # the worker is up

    def in_hand(seed: int) -> list[Inbound]:
        messages = _inbound(_messages(registry, random.Random(seed)))
        worker.offer(messages)
        deadline = time.monotonic() + 10
        while not any(m.inflight for m in messages) and time.monotonic() < deadline:
            time.sleep(0.005)
        assert any(m.inflight for m in messages)
        return messages

    async def settle(messages: list[Inbound], resume_after: float | None) -> float:
        if resume_after is not None:
            asyncio.get_running_loop().call_later(resume_after, os.kill, worker._process.pid, signal.SIGCONT)
        start = time.monotonic()
        await worker.settled(messages)
        return time.monotonic() - start

    monkeypatch.setattr(ahead_module, "WAIT_MAX_S", 5.0)
    os.kill(worker._process.pid, signal.SIGSTOP)  # the exchange stays in hand until it resumes
    messages = in_hand(13)
    waited = asyncio.run(settle(messages, resume_after=0.3))
    assert 0.25 < waited < 4.0 and not any(m.inflight for m in messages)
    assert all(m.ahead is not None for m in messages if b'"readings"' in m.payload)  # its results, not ours

    monkeypatch.setattr(ahead_module, "WAIT_MAX_S", 0.2)
    os.kill(worker._process.pid, signal.SIGSTOP)  # a worker that does not answer costs WAIT_MAX_S at most
    messages = in_hand(14)
    waited = asyncio.run(settle(messages, resume_after=None))
    os.kill(worker._process.pid, signal.SIGCONT)
    assert 0.15 < waited < 1.0 and worker.state()["waits"] == 2


def test_a_wake_up_from_an_exchange_that_ended_earlier_does_not_end_the_wait(monkeypatch):
    """Every exchange that ends wakes the waiting main thread; one that ended while the main thread was
    busy (its wake-up still queued) must not end a wait for the exchange under way (found by a review:
    under load most waits ended at once and the messages were decoded twice)."""
    import asyncio
    import threading

    monkeypatch.setattr(ahead_module, "WAIT_MAX_S", 2.0)
    ahead = DecodeAhead.__new__(DecodeAhead)  # only the waiting is exercised: no worker
    ahead.loop, ahead._waiters, ahead.waits = None, [], 0
    release = threading.Event()
    ahead._trade = lambda messages: release.wait(0.3) if messages[0].topic == "b" else None

    async def main() -> float:
        ahead.loop = asyncio.get_running_loop()
        b = _inbound([("b", b"")])
        thread = threading.Thread(target=ahead._exchange, args=(b,))
        thread.start()
        while not b[0].inflight:
            time.sleep(0.001)
        ahead.loop.call_soon(ahead._release)  # the queued wake-up of an exchange that ended earlier
        start = time.monotonic()
        await ahead.settled(b)
        waited, still = time.monotonic() - start, b[0].inflight
        thread.join()
        assert not still, "the wait ended before the exchange under way"
        return waited

    assert 0.2 < asyncio.run(main()) < 1.5 and ahead.waits == 1
