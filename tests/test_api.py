"""The operators' HTTP API on a running gateway: every endpoint, roles, and bad input."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from gateway import topics
from gateway.config import Operator

TOKENS = {"view-token": Operator(operator="赵磊", role="viewer"),
          "dispatch-token": Operator(operator="王丽", role="dispatcher"),
          "admin-token": Operator(operator="admin", role="admin")}


@pytest.fixture
def api(config, run_gateway, mqtt):
    config.api.tokens = dict(TOKENS)
    gateway = run_gateway(config)
    base = f"http://127.0.0.1:{gateway.gateway.api_port}"

    def call(method: str, path: str, token: str | None = "view-token", **kwargs) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.request(method, base + path, headers=headers, timeout=10, **kwargs)

    call.base = base  # type: ignore[attr-defined]
    call.gateway = gateway.gateway  # type: ignore[attr-defined]
    return call


def smoke_alarm(mqtt, device: str = "smk-wangma-011") -> None:
    mqtt().publish(topics.telemetry("wangma", "smoke", device), {"ts": time.time(), "alarm": True, "temp_c": 24.0})


def wait_for_incident(api, device: str) -> dict:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        found = [i for i in api("GET", "/api/incidents").json() if i["device_id"] == device]
        if found:
            return found[0]
        time.sleep(0.1)
    raise AssertionError("no incident")


def test_health_readiness_metrics_and_the_page_need_no_token(api):
    assert api("GET", "/healthz", token=None).json() == {"status": "ok"}
    assert api("GET", "/readyz", token=None).json()["ready"] is True
    deadline = time.monotonic() + 10  # the smoke hint lane connects beside the bulk session
    while not api("GET", "/readyz", token=None).json()["smoke_hint_lane"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert api("GET", "/readyz", token=None).json()["smoke_hint_lane"] is True
    metrics = api("GET", "/metrics", token=None).text
    assert "streetbrain_messages_received_total" in metrics and "streetbrain_incidents_overdue" in metrics
    assert "streetbrain_ingest_lag_seconds" in metrics and "streetbrain_ingest_queue_depth" in metrics
    assert 'streetbrain_smoke_hints_total{event="hint_first"}' in metrics
    assert "streetbrain_smoke_hint_lane_connected 1.0" in metrics
    assert "streetbrain_replay_pending{kind=\"smoke\"}" in metrics and "streetbrain_replay_settled_early_total" in metrics
    assert "streetbrain_replay_caught_up_total{kind=\"meter\"}" in metrics
    page = api("GET", "/", token=None)
    assert page.status_code == 200 and "街脑" in page.text and "http" not in page.text.split("<script>")[0].lower()
    docs = api("GET", "/docs", token=None)
    assert docs.status_code == 200 and "cdn" not in docs.text.lower()  # usable without the internet
    assert api("GET", "/docs-assets/swagger-ui-bundle.js", token=None).status_code == 200
    assert "/api/incidents/{incident_id}/{action}" in api("GET", "/openapi.json", token=None).json()["paths"]


@pytest.mark.parametrize("path", ["/api/incidents", "/api/devices", "/api/alerts", "/api/silences", "/api/street",
                                  "/api/devices/noise-01/readings", "/api/incidents/INC-x"])
def test_every_api_route_refuses_a_missing_or_unknown_token(api, path):
    for token in (None, "not-a-token"):
        response = api("GET", path, token=token)
        assert response.status_code == 401
        assert response.json() == {"error": "missing or unknown bearer token"}


def test_roles_viewer_reads_dispatcher_acts_admin_silences(api, mqtt):
    smoke_alarm(mqtt)
    incident = wait_for_incident(api, "smk-wangma-011")
    refused = api("POST", f"/api/incidents/{incident['id']}/ack")
    assert refused.status_code == 403 and refused.json()["error"] == "赵磊 is a viewer; this needs dispatcher"
    assert api("POST", "/api/silences", token="dispatch-token",
               json={"site": "wangma", "for_s": 600, "reason": "drill"}).status_code == 403
    assert api("GET", "/api/config", token="dispatch-token").status_code == 403
    config = api("GET", "/api/config", token="admin-token").json()
    assert "password" not in json.dumps(config) and "admin-token" not in json.dumps(config)


def test_the_actor_is_the_tokens_operator_never_a_field_the_client_sends(api, mqtt):
    smoke_alarm(mqtt)
    incident = wait_for_incident(api, "smk-wangma-011")
    forged = api("POST", f"/api/incidents/{incident['id']}/dispatch", token="dispatch-token",
                 json={"team": "squad-1", "actor": "someone else"})
    assert forged.status_code == 422 and "actor" in forged.json()["error"]
    done = api("POST", f"/api/incidents/{incident['id']}/dispatch", token="dispatch-token",
               json={"team": "squad-1", "member": "熊永信", "note": "nearest patrol"})
    assert done.status_code == 200 and done.json()["change"]["actor"] == "王丽"
    shown = api("GET", f"/api/incidents/{incident['id']}").json()
    assert [(a["actor"], a["action"]) for a in shown["audit"]] == [("gateway", "opened"), ("王丽", "dispatch")]
    assert shown["occurrence_log"][0]["device_id"] == "smk-wangma-011"


def test_illegal_actions_and_bad_input_get_clear_json_errors(api, mqtt):
    smoke_alarm(mqtt)
    incident = wait_for_incident(api, "smk-wangma-011")
    wrong = api("POST", f"/api/incidents/{incident['id']}/close", token="dispatch-token")
    assert wrong.status_code == 409
    assert wrong.json()["error"].startswith("cannot close an incident that is new; from new you can:")
    assert api("POST", f"/api/incidents/{incident['id']}/resolve", token="dispatch-token").status_code == 409
    assert api("POST", f"/api/incidents/{incident['id']}/explode", token="dispatch-token").status_code == 422
    assert api("POST", "/api/incidents/INC-none/ack", token="dispatch-token").status_code == 404
    assert api("GET", "/api/incidents?state=burning").status_code == 422
    assert api("GET", "/api/incidents?limit=0").json()["error"].startswith("invalid request: query.limit")
    assert api("POST", f"/api/incidents/{incident['id']}/dispatch", token="dispatch-token",
               json={"team": "squad-9"}).status_code == 422
    assert api("POST", "/api/silences", token="admin-token", json={"site": "wangma", "reason": "x"}).status_code == 422
    assert api("GET", "/api/devices/nope/readings").status_code == 404


def test_filters_devices_readings_alerts_and_silences(api, mqtt):
    smoke_alarm(mqtt)
    mqtt().publish(topics.telemetry("dongxin", "noise", "noise-05"), {"ts": time.time(), "laeq_db": 52.5,
                                                                       "lmax_db": 60.0})
    incident = wait_for_incident(api, "smk-wangma-011")
    assert [i["id"] for i in api("GET", "/api/incidents?kind=smoke&site=wangma&state=new").json()] == [incident["id"]]
    assert api("GET", "/api/incidents?kind=noise").json() == []
    noise = {d["id"]: d for d in api("GET", "/api/devices?kind=noise").json()}
    assert len(noise) == 14 and noise["noise-05"]["last_reading"]["laeq_db"] == 52.5
    assert noise["noise-05"]["params"]["limit_db"] in (50.0, 60.0) and noise["noise-05"]["online"]
    smoke = {d["id"]: d for d in api("GET", "/api/devices?kind=smoke&site=wangma").json()}
    assert smoke["smk-wangma-011"]["active_alerts"] == [{"rule": "smoke_alarm", "severity": "critical", "port": None}]
    readings = api("GET", "/api/devices/noise-05/readings").json()["readings"]
    assert readings[-1]["laeq_db"] == 52.5
    assert api("GET", "/api/alerts").json()[0]["device_id"] == "smk-wangma-011"
    made = api("POST", "/api/silences", token="admin-token", json={"device_id": "smk-wangma-012", "for_s": 3600,
                                                                 "reason": "detector replaced"})
    assert made.status_code == 201 and made.json()["created_by"] == "admin"
    assert [s["id"] for s in api("GET", "/api/silences").json()] == [made.json()["id"]]


def test_alert_stream_sends_each_alert_as_it_happens(api, mqtt):
    with httpx.stream("GET", api.base + "/api/alerts/stream?token=view-token", timeout=10) as stream:
        lines = stream.iter_lines()
        assert next(lines).startswith(": streetbrain")
        sent = time.time()
        smoke_alarm(mqtt, "smk-wangma-015")
        event = data = None
        for line in lines:
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event == "alert":
                data = json.loads(line[6:])
                break
        assert data is not None and data["device_id"] == "smk-wangma-015"
        assert time.time() - sent < 1.0


def test_a_batch_fills_a_devices_chart_and_single_readings_carry_on_from_it(api, mqtt):
    """A batch that fills the chart by itself is kept as columns (gateway/service.py, _remember): the
    readings endpoint and the device list read it like any other, and later readings follow it."""
    from gateway.service import RECENT_READINGS
    start = time.time() - 600
    batch = [{"ts": start + i, "seq": i, "laeq_db": 40.0 + i % 10, **({"lmax_db": 70.0} if i % 2 else {})}
             for i in range(RECENT_READINGS + 10)]
    client = mqtt()
    client.publish(topics.telemetry("dongxin", "noise", "noise-06"), {"readings": batch})

    def chart(expected_last_ts: float) -> list[dict]:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            readings = api("GET", "/api/devices/noise-06/readings?limit=1000").json()["readings"]
            if readings and readings[-1]["ts"] == expected_last_ts:
                return readings
            time.sleep(0.1)
        raise AssertionError(f"the chart never reached ts {expected_last_ts}: it ends {readings[-2:]}")

    readings = chart(batch[-1]["ts"])
    assert readings == [{"ts": r["ts"], **{k: v for k, v in r.items() if k in ("laeq_db", "lmax_db")}}
                        for r in batch[-RECENT_READINGS:]]
    assert [r["ts"] for r in api("GET", "/api/devices/noise-06/readings?limit=3").json()["readings"]] == [
        r["ts"] for r in batch[-3:]]
    client.publish(topics.telemetry("dongxin", "noise", "noise-06"), {"ts": start + 500, "laeq_db": 55.5})
    readings = chart(start + 500)
    assert len(readings) == RECENT_READINGS and readings[-1] == {"ts": start + 500, "laeq_db": 55.5}
    assert readings[-2]["ts"] == batch[-1]["ts"] and readings[0]["ts"] == batch[-RECENT_READINGS + 1]["ts"]
    noise = {d["id"]: d for d in api("GET", "/api/devices?kind=noise").json()}
    assert noise["noise-06"]["last_reading"] == {"ts": start + 500, "laeq_db": 55.5}
