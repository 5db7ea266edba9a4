"""config.yaml: validated, overridable from the environment, and errors that say where."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=60)


def test_default_street_has_the_seed_devices():
    config = load_config(ROOT / "config.yaml", env={})
    kinds = {k: sum(d.kind == k for d in config.devices) for k in ("smoke", "ev_charger", "noise", "meter")}
    assert kinds == {"smoke": 737, "ev_charger": 15, "noise": 14, "meter": 734}
    noise = [d for d in config.devices if d.kind == "noise"]
    assert all(d.name and d.zone_class in ("0", "1", "2", "3", "4a", "4b") for d in noise)
    assert all(d.ports and d.rated_power_w for d in config.devices if d.kind == "ev_charger")
    assert all("elderly_alone" in d.tags for d in config.devices if d.kind == "smoke")


def test_environment_overrides_any_key_and_carries_secrets():
    env = {"STREETBRAIN_INCIDENTS__URL": "postgresql://gw@db.example/street",
           "STREETBRAIN_API__LISTEN": "0.0.0.0:9000",
           "STREETBRAIN_BROKER__PASSWORD": "s3cret",
           "STREETBRAIN_API__TOKENS": '{"tok-1": {"operator": "王丽", "role": "dispatcher"}}',
           "STREETBRAIN_KINDS__SMOKE__OFFLINE_AFTER_S": "7200"}
    config = load_config(ROOT / "config.yaml", env=env)
    assert config.incidents.url == "postgresql://gw@db.example/street"
    assert config.api.listen == "0.0.0.0:9000"
    assert config.broker.password.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(config.broker)
    assert config.api.tokens["tok-1"].operator == "王丽"
    assert config.kinds["smoke"].offline_after_s == 7200
    shipped = load_config(ROOT / "config.yaml", env={})
    assert config.kinds["smoke"].rules == shipped.kinds["smoke"].rules  # the rest of the section stays


def test_bad_environment_value_names_the_variable():
    with pytest.raises(ConfigError) as error:
        load_config(ROOT / "config.yaml", env={"STREETBRAIN_API__LISTEN": "nowhere"})
    assert str(error.value.issues[0]).startswith("env STREETBRAIN_API__LISTEN: api.listen:")


BROKEN = """\
broker:
  url: http://example.org
teams:
  - {id: squad-1, name: 一中队}
sites:
  - {id: s1, name: 一号院, lat: 30.3, lon: 120.1, team: squad-9}
kinds:
  smoke:
    rules:
      smoke_alarm:
        field: alarm
        raise: {critical: 1}
      heat:
        field: temperature
        raise: {major: 57}
  toaster:
    rules: {}
devices:
  - {id: n1, kind: noise, site: s1, lat: 30.3, lon: 120.1}
  - {id: s1, kind: smoke, site: nowhere, lat: 30.3, lon: 120.1}
"""


def test_cross_references_are_checked_with_file_line_and_key_path(tmp_path):
    path = tmp_path / "street.yaml"
    path.write_text(BROKEN.replace("http://example.org", "mqtt://127.0.0.1:1883"))
    with pytest.raises(ConfigError) as error:
        load_config(path, env={})
    found = {str(issue) for issue in error.value.issues}
    assert f"{path}:6: sites[0].team: team 'squad-9' is not defined under teams" in found
    assert any(s.startswith(f"{path}:14: kinds.smoke.rules.heat.field: smoke readings have no field 'temperature'")
               for s in found)
    assert any(s.startswith(f"{path}:16: kinds.toaster: unknown device kind") for s in found)
    assert any(s.startswith(f"{path}:19: devices[0].zone_class: noise point n1 needs") for s in found)
    assert any(s.startswith(f"{path}:20: devices[1].site:") for s in found)


def test_check_config_reports_every_error_with_its_key_path_and_exits_non_zero(tmp_path):
    path = tmp_path / "street.yaml"
    path.write_text(BROKEN + "typo_section: 1\n")
    result = run_cli("check-config", str(path))
    assert result.returncode == 3
    assert f"{path}:2: broker.url: Value error, broker URL 'http://example.org' is not mqtt://HOST:PORT" in result.stderr
    assert f"{path}:21: typo_section: unknown key" in result.stderr


def test_check_config_accepts_the_shipped_config():
    result = run_cli("check-config")
    assert result.returncode == 0, result.stderr
    assert "1500 devices" in result.stdout


def test_rule_thresholds_must_escalate_and_clear_on_the_right_side(tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_text("""\
kinds:
  noise:
    rules:
      loud:
        field: laeq_db
        raise: {warning: 80, major: 75}
      band:
        field: laeq_db
        raise: {warning: 75}
        clear: 78
      battery:
        field: laeq_db
        op: "<"
        raise: {warning: 20, major: 10}
        clear: 15
""")
    with pytest.raises(ConfigError) as error:
        load_config(path, env={})
    messages = [str(i) for i in error.value.issues]
    assert any("kinds.noise.rules.loud.raise" not in m and "rules.loud" in m and "must increase" in m
               for m in messages)
    assert any("rules.band" in m and "clear: 78.0 must lie at or below" in m for m in messages)
    assert any("rules.battery" in m and "clear: 15.0 must lie at or above" in m for m in messages)


def test_registry_file_errors_name_the_csv_line(tmp_path):
    (tmp_path / "devices.csv").write_text(
        "# the registry\n"
        "id,kind,site,lat,lon,zone_class\n"
        "n1,noise,s1,30.3,120.1,2\n"
        "n2,noise,s1,north,120.1,2\n"
        "n3,noise,s1,30.3,120.1,9\n")
    (tmp_path / "street.yaml").write_text(
        "teams: [{id: t, name: T}]\nsites: [{id: s1, name: S, lat: 30.3, lon: 120.1, team: t}]\n"
        "registry_file: devices.csv\n")
    with pytest.raises(ConfigError) as error:
        load_config(tmp_path / "street.yaml", env={})
    found = [str(i) for i in error.value.issues]
    assert any(f.startswith(f"{tmp_path / 'devices.csv'}:4: lat:") for f in found), found
    assert any(f.startswith(f"{tmp_path / 'devices.csv'}:5: zone_class:") for f in found), found


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("broker:\n  url: [unclosed\nsites: []\n")
    with pytest.raises(ConfigError) as error:
        load_config(path, env={})
    assert str(error.value).startswith(f"{path}:3: YAML syntax error")


def test_secrets_never_appear_in_error_messages(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("api:\n  tokens:\n    hunter2-token: {operator: x, role: superuser}\n")
    with pytest.raises(ConfigError) as error:
        load_config(path, env={"PATH": os.environ.get("PATH", "")})
    assert "superuser" in str(error.value) or "role" in str(error.value)
    assert "hunter2" not in "".join(i.message for i in error.value.issues)
