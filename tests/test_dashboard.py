"""The dashboard in a real browser (Debian's Chromium driven by Playwright) on a running gateway."""

from __future__ import annotations

import os
import shutil
import time

import httpx
import pytest

from gateway import topics
from gateway.config import Operator
from tests.conftest import ROOT

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]

pytestmark = pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK),
                                reason="Debian's chromium is not installed (scripts/test installs it)")


@pytest.fixture
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield instance
        instance.close()


def test_a_smoke_alarm_shows_within_two_seconds_and_is_dispatched_with_one_click(config, run_gateway, mqtt, browser):
    config.api.tokens = {"dispatch-token": Operator(operator="王丽", role="dispatcher")}
    gateway = run_gateway(config).gateway
    base = f"http://127.0.0.1:{gateway.api_port}"
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(base + "/")
    page.fill("#token", "dispatch-token")
    page.click("#save-token")
    page.wait_for_selector("#who:has-text('王丽')", timeout=5000)
    page.wait_for_selector("#map-svg [data-device='noise-01']", timeout=5000)

    sent = time.time()
    mqtt().publish(topics.telemetry("hengyanzi", "smoke", "smk-hengyanzi-021"), {"ts": sent, "alarm": True})
    page.wait_for_selector("#alert-list li[data-device='smk-hengyanzi-021']", timeout=2000)
    assert time.time() - sent < 2.0
    # locators, not element handles: the board re-renders its cards as incident events arrive
    incident_id = page.locator(".column[data-state='new'] .card").first.get_attribute("data-id", timeout=5000)
    page.locator(f".column[data-state='new'] .card[data-id='{incident_id}'] button[data-action='dispatch']").click()
    page.wait_for_selector(f".column[data-state='dispatched'] .card[data-id='{incident_id}']", timeout=5000)

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
    trail = httpx.get(f"{base}/api/incidents/{incident_id}", headers={"Authorization": "Bearer dispatch-token"},
                      timeout=5).json()["audit"]
    assert [(a["actor"], a["action"]) for a in trail] == [("gateway", "opened"), ("王丽", "dispatch")]


def test_the_page_fits_a_phone_and_speaks_english_on_request(config, run_gateway, browser):
    config.api.tokens = {"view-token": Operator(operator="赵磊", role="viewer")}
    gateway = run_gateway(config).gateway
    page = browser.new_page(viewport={"width": 390, "height": 844})
    page.goto(f"http://127.0.0.1:{gateway.api_port}/")
    assert page.text_content("h1") == "街脑 · 指挥中心"
    page.click("#lang")
    assert page.text_content("h1") == "streetbrain · command centre"
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, f"the page is {width} px wide on a 390 px phone"
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "dashboard-phone.png"), full_page=True)
