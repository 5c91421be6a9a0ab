"""fleet serve --broker --alerts --dashboard-port, run as a user runs it, against fleet broker:
a revoked device knocking is alerted by log, MQTT and webhook and shown on the dashboard while
the bystanders are served; every metric the Grafana dashboard queries is served."""

from __future__ import annotations

import datetime as dt
import json
import re
import subprocess
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from broker import launched_broker
from broker.policy import DEFAULT_POLICY_YAML
from fleet import ProvisionSpec, Workspace, provision_devices
from tests.broker_support import device_credentials, paho_device
from tests.conftest import fleet_command
from tests.observability_support import get_json, served_control_plane, wait_for_snapshot
from tests.test_alerts import _Webhook

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

REPO = Path(__file__).resolve().parent.parent


def _metric_names(url: str) -> set[str]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    names = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names |= {sample.name for sample in family.samples}
        if family.type == "counter":
            names.add(f"{family.name}_total")
        if family.type == "histogram":
            names |= {f"{family.name}_{suffix}" for suffix in ("bucket", "sum", "count")}
    return names


def _queried_metrics() -> set[str]:
    board = json.loads((REPO / "monitoring/grafana/mtls-fleet.json").read_text())
    exprs = [t["expr"] for panel in board["panels"] for t in panel["targets"]]
    assert len(exprs) >= 20
    return {name for expr in exprs for name in re.findall(r"\b((?:mtls|fleet)_[a-z_]+)\b", expr)}


def test_a_revoked_device_knocking_is_alerted_everywhere_and_shown_on_the_dashboard(
    workspace: Workspace, tmp_path: Path
) -> None:
    victim, bystander_id = provision_devices(
        workspace, ProvisionSpec(count=2, prefix="pump", valid_for=dt.timedelta(days=10))
    ).device_ids
    (ops,) = provision_devices(workspace, ProvisionSpec(count=1, prefix="ops")).device_ids
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        DEFAULT_POLICY_YAML
        + "  - name: operators\n    match: {id: 'ops-*'}\n    subscribe: ['$fleet/alerts/#']\n"
    )
    webhook = _Webhook()
    alerts = tmp_path / "alerts.yaml"
    alerts.write_text(
        f"deliver:\n  mqtt: $fleet/alerts\n  webhook: {webhook.url}\nrules:\n"
        "  - {name: knock, kind: rejected_attempt, reasons: [revoked], severity: critical}\n"
        "  - {name: soon, kind: certificate_expiring, within: 30d, min_devices: 2}\n"
    )
    root = workspace.paths.root
    ca = workspace.paths.root_cert
    log = (tmp_path / "serve.log").open("w+")
    with (
        launched_broker(root, "--policy", str(policy), metrics=True) as broker,
        served_control_plane(
            root, "--broker", broker.target, "--alerts", alerts, "--dashboard-port", "0",
            stderr=log,
        ) as plane,
    ):  # fmt: skip
        assert plane.dashboard is not None
        operator = paho_device(broker.port, ca, device_credentials(workspace, ops))
        assert operator.connected.wait(10)
        operator.client.subscribe("$fleet/alerts/#", qos=1)
        assert operator.subscribed.wait(10) and operator.granted == [1]
        bystander = paho_device(broker.port, ca, device_credentials(workspace, bystander_id))
        held = paho_device(broker.port, ca, device_credentials(workspace, victim))
        assert bystander.connected.wait(10) and held.connected.wait(10)
        bystander.client.subscribe(f"devices/{bystander_id}/#", qos=1)
        assert bystander.subscribed.wait(10)
        wait_for_snapshot(
            plane.dashboard, "fleet", lambda s: s["connections"]["total"] >= 3, timeout=20
        )

        revoked = subprocess.run(
            fleet_command("revoke", victim, "--dir", root),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert revoked.returncode == 0, revoked.stderr
        assert held.disconnected.wait(20), "the broker did not cut the revoked device off"
        held.stop()
        knocking = paho_device(broker.port, ca, device_credentials(workspace, victim))
        knock = webhook.wait_for("knock")  # its refusal, alerted
        knocking.stop()
        assert not knocking.connected.is_set()
        assert (knock["state"], knock["severity"], knock["kind"]) == (
            "firing", "critical", "rejected_attempt",
        )  # fmt: skip
        assert knock["labels"]["device"] == victim and knock["labels"]["reason"] == "revoked"
        soon = webhook.wait_for("soon")
        assert (
            soon["value"] == 2.0 and "2 device certificate(s) expire within 30d" in soon["summary"]
        )
        assert operator.message_arrived.wait(10)
        by_topic = {topic: json.loads(payload) for topic, payload in operator.messages}
        assert by_topic["$fleet/alerts/knock"]["labels"]["device"] == victim

        snapshot = wait_for_snapshot(
            plane.dashboard,
            "fleet",
            lambda s: (
                "revoked" in (s["outcomes"] or {}).get("series", {})
                and any(a["rule"] == "knock" for a in s["alerts"])
            ),
            timeout=20,
        )
        assert snapshot["inventory"]["by_state"] == {"active": 2, "revoked": 1}
        latest = snapshot["revocation"]["recent"][0]
        assert latest["id"] == victim
        assert latest["cut_after_seconds"] is not None and 0 <= latest["cut_after_seconds"] < 20
        assert snapshot["connections"]["by_tier"] == {"bronze": 2}  # ops and the bystander
        status, found = get_json(f"{plane.dashboard}/api/devices?state=revoked")
        assert status == 200 and [d["id"] for d in found["devices"]] == [victim]

        # hostile queries get a clear 400 and stop nothing
        for query, said in [
            ("limit=0", "limit: a whole number from 1 to 500"),
            ("bogus=1", "unknown parameter 'bogus'"),
            ("q=" + "x" * 65, "parameter 'q' is too long"),
        ]:
            status, answer = get_json(f"{plane.dashboard}/api/devices?{query}")
            assert (status, answer["error"]) == (400, said)
        assert get_json(f"{plane.dashboard}/api/fleet")[0] == 200

        # the bystander was served throughout
        bystander.client.publish(f"devices/{bystander_id}/t", b"still here", qos=1)
        assert bystander.message_arrived.wait(10)
        assert bystander.messages == [(f"devices/{bystander_id}/t", b"still here")]

        # every metric the Grafana dashboard queries is on the live /metrics endpoints
        assert broker.metrics_url is not None
        served = _metric_names(broker.metrics_url) | _metric_names(f"{plane.url}/metrics")
        assert _queried_metrics() - served == set()
        for client in (operator, bystander):
            client.stop()
    webhook.stop()
    log.seek(0)
    said = log.read()
    assert f"ALERT firing [critical] knock: {victim} tried to connect with a revoked" in said
