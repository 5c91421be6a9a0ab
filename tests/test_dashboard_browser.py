"""The dashboard in a real browser: headless Chromium (Debian's chromium and chromedriver, driven
by selenium; nothing downloaded) watches a swarm run; after ``fleet revoke`` the device shows as
revoked and the outcomes chart shows ``revoked``. Screenshots go to build/test-artifacts/ (or
$FLEET_TEST_ARTIFACTS)."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker import launched_broker
from fleet import ProvisionSpec, Workspace, provision_devices
from tests.broker_support import free_port
from tests.conftest import fleet_command, require_tool
from tests.observability_support import served_control_plane

pytestmark = pytest.mark.slow

ARTIFACTS = Path(
    os.environ.get(
        "FLEET_TEST_ARTIFACTS", Path(__file__).resolve().parent.parent / "build/test-artifacts"
    )
)
WAIT = 30.0
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    chromium = require_tool("chromium")
    chromedriver = require_tool("chromedriver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--no-first-run", "--disable-quic", "--window-size=1400,1800",
        f"--user-data-dir={tmp_path / 'chromium'}",
    ):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=chromedriver))
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver: Any, what: str, condition: Any) -> Any:
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, WAIT, poll_frequency=0.25).until(condition)
    except TimeoutException:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / "failed.png"))
        raise AssertionError(
            f"the page never showed {what} (see {ARTIFACTS / 'failed.png'})"
        ) from None


def _script(driver: Any, code: str) -> Any:
    return driver.execute_script(code)


def test_watch_a_swarm_and_a_revocation_in_the_browser(
    workspace: Workspace, tmp_path: Path, browser: Any
) -> None:
    devices = provision_devices(workspace, ProvisionSpec(count=12, prefix="meter")).device_ids
    victim = devices[3]
    root = workspace.paths.root
    web_port = free_port()
    with (
        launched_broker(root) as broker,
        served_control_plane(
            root,
            "--broker",
            broker.target,
            "--dashboard-port",
            "0",
            "--alerts",
            REPO / "monitoring/alerts.yaml",
        ) as plane,  # fmt: skip
    ):
        swarm = subprocess.Popen(
            fleet_command(
                "swarm", "--dir", root, "--target", broker.target, "--devices", "12",
                "--ramp", "50/s", "--publish-every", "1s", "--duration", "90s",
                "--processes", "1", "--quiet", "--web", str(web_port),
            ),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        try:
            assert plane.dashboard is not None
            browser.get(f"{plane.dashboard}/fleet")
            _wait(
                browser,
                "12 sessions connected",
                lambda d: d.find_element("id", "connected-total").text == "12 sessions",
            )
            assert browser.find_element("id", "inventory-total").text == "12 devices"

            revoked = subprocess.run(
                fleet_command("revoke", victim, "--dir", root),
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert revoked.returncode == 0, revoked.stderr
            _wait(
                browser,
                f"{victim} as revoked in the device table",
                lambda d: (
                    _script(
                        d,
                        f"return document.querySelector('#inventory-table td[data-id=\"{victim}\"]')"
                        "?.parentElement.querySelector('td[data-state]').dataset.state",
                    )
                    == "revoked"
                ),
            )
            _wait(
                browser,
                "revoked in the outcomes chart",
                lambda d: (
                    "revoked"
                    in _script(
                        d,
                        "return [...document.querySelectorAll('#outcomes .legendtext')]"
                        ".map(e => e.textContent)",
                    )
                ),
            )
            assert _script(
                browser, "return document.querySelector('#outcomes-table td[data-reason=revoked]')"
            )
            _wait(
                browser,
                "the revocation with its cut-off time",
                lambda d: victim in d.find_element("id", "recent-revocations").text,
            )
            _wait(
                browser,
                "the alert for the revoked device's reconnect",
                lambda d: (
                    _script(
                        d,
                        "return document.querySelector('#alerts-table td[data-rule=\"revoked-certificate-attempt\"]')"
                        "?.parentElement.textContent",
                    )
                    and victim in d.find_element("id", "alerts-table").text
                ),
            )
            assert browser.find_element("css selector", "#by-state tbody").text.split() == [
                "active", "11", "revoked", "1",
            ]  # fmt: skip
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            browser.save_screenshot(str(ARTIFACTS / "dashboard-fleet.png"))

            # the search: revoked devices of the (only) issuing CA, chosen as a user does
            from selenium.webdriver.support.ui import Select

            Select(browser.find_element("id", "search-state")).select_by_visible_text("revoked")
            issuers = Select(browser.find_element("id", "search-issuer"))
            assert [o.text for o in issuers.options][1:] == [
                "CN=fleet.local issuing CA 1,O=fleet.local"
            ]
            issuers.select_by_index(1)
            _wait(
                browser,
                "only the revoked device in the search",
                lambda d: (
                    _script(
                        d,
                        "return [...document.querySelectorAll('#inventory-table td[data-id]')]"
                        ".map(e => e.dataset.id)",
                    )
                    == [victim]
                ),
            )
            assert browser.find_element("id", "search-count").text == "1 matching, 1 shown"

            browser.get(f"http://127.0.0.1:{web_port}/swarm")
            _wait(
                browser,
                "the swarm's connected devices",
                lambda d: (
                    int(
                        _script(
                            d,
                            "return document.querySelector('td[data-connected]')?.dataset.connected ?? 0",
                        )
                    )
                    >= 11
                ),
            )
            _wait(
                browser,
                "the swarm's refused reconnects of the revoked device, with the TLS alert",
                lambda d: (
                    "rejected_by_broker: certificate_revoked"
                    in _script(
                        d,
                        "return [...document.querySelectorAll('#swarm-details td[data-detail]')]"
                        ".map(e => e.dataset.detail)",
                    )
                ),
            )
            browser.save_screenshot(str(ARTIFACTS / "dashboard-swarm.png"))
        finally:
            swarm.send_signal(signal.SIGINT)  # Ctrl-C: the run stops and still reports
            output, _ = swarm.communicate(timeout=60)
    assert swarm.returncode == 130, output
    assert f"web view on http://127.0.0.1:{web_port}/swarm" in output
    assert "interrupted: the summary covers what happened until Ctrl-C" in output
