"""Alert rules (fleet alerts check, fleet serve --alerts) and their Prometheus twin (promtool)."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleet import ProvisionSpec, Workspace, provision_devices
from fleet.controlplane.alert_rules import (
    AlertKind,
    AlertRulesError,
    load_alert_rules,
    parse_alert_rules,
)
from fleet.controlplane.alerts import AlertEngine
from fleet.controlplane.event_feed import EventFeed
from fleet.controlplane.fleet_view import FleetView
from tests.conftest import fleet_command, require_tool

REPO = Path(__file__).resolve().parent.parent
MONITORING = REPO / "monitoring"


def _rules(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "alerts.yaml"
    path.write_text(text)
    return path


def test_the_shipped_rules_pass_fleet_alerts_check_through_the_cli() -> None:
    checked = subprocess.run(
        fleet_command("alerts", "check", MONITORING / "alerts.yaml"),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stderr
    assert "5 rule(s), delivered to log, mqtt $fleet/alerts/<rule>" in checked.stdout
    rules = load_alert_rules(MONITORING / "alerts.yaml")
    assert {r.kind for r in rules.rules} == set(AlertKind)


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("rules:\n  - name: a\n    kind: certificate_expirin\n    within: 1d\n",
         ":3: rules[0] (a).kind: 'certificate_expirin' is not one of certificate_expiring, "
         "rejected_attempt, rejection_rate, crl_stale (did you mean 'certificate_expiring'?)"),
        ("rules:\n  - name: a\n    kind: rejected_attempt\n    reasons: [revokd]\n",
         ":4: rules[0] (a).reasons[0]: 'revokd' is not a refusal reason (did you mean 'revoked'?)"),
        ("rules:\n  - name: a\n    kind: crl_stale\n    within: 1d\n",
         ":4: rules[0] (a).within: not a field of a crl_stale rule"),
        ("rules:\n  - name: a\n    kind: certificate_expiring\n",
         ":2: rules[0] (a).within: give a duration such as 7d or 12h"),
        ("rules:\n  - name: a\n    kind: rejection_rate\n    above: 1.5\n",
         ":4: rules[0] (a).above: a share of refused attempts, from 0 to below 1"),
        ("deliver:\n  webhook: file:///etc/passwd\nrules:\n  - {name: a, kind: crl_stale}\n",
         ":2: deliver.webhook: expected an http(s):// URL"),
        ("deliver:\n  mqtt: devices/x\nrules:\n  - {name: a, kind: crl_stale}\n",
         ":2: deliver.mqtt: expected $fleet/alerts or a topic under it"),
        ("rules:\n  - {name: a, kind: crl_stale}\n  - {name: a, kind: crl_stale}\n",
         ":3: rules: two rules are named 'a'"),
        ("rules:\n  - {name: a/b, kind: crl_stale}\n", ":2: rules[0] (a/b).name: use letters"),
        ("rules: []\n", ":1: rules: expected a list of 1 to 100 rules"),
    ],
)  # fmt: skip
def test_a_bad_rules_file_names_file_line_and_field(tmp_path: Path, text: str, said: str) -> None:
    path = _rules(tmp_path, text)
    checked = subprocess.run(
        fleet_command("alerts", "check", path), capture_output=True, text=True, timeout=60
    )
    assert checked.returncode != 0
    assert f"{path}{said}" in " ".join(checked.stderr.split())


@given(st.text(max_size=300))
def test_any_text_is_alert_rules_or_an_alert_rules_error(text: str) -> None:
    try:
        rules = parse_alert_rules(text, Path("a.yaml"))
    except AlertRulesError as error:
        assert str(error).startswith("a.yaml:")
    else:
        assert rules.rules


def test_periodic_rules_fire_once_then_resolve_and_event_rules_repeat_per_device(
    workspace: Workspace, tmp_path: Path
) -> None:
    provision_devices(workspace, ProvisionSpec(count=2, valid_for=dt.timedelta(days=3)))
    provision_devices(workspace, ProvisionSpec(count=3, prefix="long"))
    rules = parse_alert_rules(
        "deliver: {log: false}\nrules:\n"
        "  - {name: soon, kind: certificate_expiring, within: 7d, min_devices: 2}\n"
        "  - {name: knock, kind: rejected_attempt, reasons: [revoked], repeat: 1h}\n"
        "  - {name: spike, kind: rejection_rate, window: 1m, above: 0.5, min_attempts: 4}\n"
        "  - {name: stale, kind: crl_stale, older_than: 1h}\n",
        Path("a.yaml"),
    )
    feed = EventFeed()
    engine = AlertEngine(rules, FleetView(workspace), feed)
    now = dt.datetime.now(dt.UTC)
    engine.check(now=now)
    engine.check(now=now)  # still true: not raised twice
    assert [(a["rule"], a["state"], a["value"]) for a in engine.recent()] == [
        ("soon", "firing", 2.0)
    ]
    assert "2 device certificate(s) expire within 7d" in engine.recent()[0]["summary"]
    engine.check(now=now + dt.timedelta(hours=2))  # the CRL is now over an hour old
    assert [a["rule"] for a in engine.recent()] == ["soon", "stale"]
    engine.check(now=now + dt.timedelta(days=4))  # the short ones have expired: resolved
    states = [(a["rule"], a["state"]) for a in engine.recent()]
    assert ("soon", "resolved") in states

    def rejected(device: str) -> bytes:
        return json.dumps(
            {"event": "rejected", "ts": now.isoformat(), "device": device, "serial": "AB",
             "peer": "127.0.0.1:1", "reason": "revoked", "stage": "tls"}
        ).encode()  # fmt: skip

    for device in ["d-1", "d-1", "d-2", "d-1"]:
        feed.receive(f"$fleet/events/rejected/{device}", rejected(device))
    knocks = [a for a in engine.recent() if a["rule"] == "knock"]
    assert [a["labels"]["device"] for a in knocks] == ["d-1", "d-2"]  # d-1 once within 1h
    assert "d-1 tried to connect with a revoked certificate (serial AB" in knocks[0]["summary"]
    engine.check(now=now + dt.timedelta(days=4))
    assert [a["rule"] for a in engine.recent()].count("spike") == 1  # 4 of 4 refused
    feed.receive("$fleet/events/rejected/x", b"not json")  # counted, never raised
    assert feed.malformed == 1


class _Webhook:
    """A local HTTP server recording the JSON bodies POSTed to it."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.arrived = threading.Condition()
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers["Content-Length"])
                with hook.arrived:
                    hook.bodies.append(json.loads(self.rfile.read(length)))
                    hook.arrived.notify_all()
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"

    def wait_for(self, rule: str, timeout: float = 20) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            return next((b for b in self.bodies if b["rule"] == rule), None)

        with self.arrived:
            assert self.arrived.wait_for(lambda: found() is not None, timeout), self.bodies
            body = found()
            assert body is not None
            return body

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def webhook() -> Iterator[_Webhook]:
    hook = _Webhook()
    yield hook
    hook.stop()


def test_promtool_checks_the_prometheus_rules_and_their_unit_tests_pass(tmp_path: Path) -> None:
    promtool = require_tool("promtool")
    rules = MONITORING / "prometheus"
    checked = subprocess.run(
        [promtool, "check", "rules", str(rules / "alerts.yml")], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 7 rules found" in checked.stdout
    tested = subprocess.run(
        [promtool, "test", "rules", "alerts_test.yml"], cwd=rules, capture_output=True, text=True
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr
    # the unit tests can fail: a rule that never fires for revoked attempts is caught
    shutil.copy(rules / "alerts_test.yml", tmp_path)
    broken = (rules / "alerts.yml").read_text().replace('"revoked|issuer_revoked"', '"nothing"')
    (tmp_path / "alerts.yml").write_text(broken)
    failed = subprocess.run(
        [promtool, "test", "rules", "alerts_test.yml"], cwd=tmp_path, capture_output=True, text=True
    )
    assert failed.returncode != 0
    assert "RevokedCertificateAttempt" in failed.stdout + failed.stderr
