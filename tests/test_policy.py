"""The access policy as data: the default is the tier model, a custom file grants what it says
through a real broker (and nothing else, to anyone else), errors name file, line and field."""

from __future__ import annotations

import datetime as dt
import functools
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import tests.mqtt_raw as mq
from broker import DEFAULT_POLICY, PolicyError, rights_for
from broker.policy import DAYS, DEFAULT_POLICY_YAML, filter_problem, parse_policy
from fleet import ProvisionSpec, Workspace, provision_devices
from fleet.kernel.identity import DeviceIdentity
from tests.broker_support import (
    BrokerThread,
    device_credentials,
    running_mosquitto,
    settings_for_tests,
)
from tests.conftest import fleet_command

SUBACK = 9
PLANT = """\
rules:
  - name: own-topics
    publish: ["devices/{id}/#"]
    subscribe: ["devices/{id}/#"]
  - name: plant-operators
    match: {tier: [silver, gold], env: prod, id: "op-*"}
    publish: ["plant/{id}/status"]
    subscribe: ["plant/+/alarms"]
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def _identity(device_id: str, tier: str = "bronze", env: str = "prod") -> DeviceIdentity:
    return DeviceIdentity(device_id, tier, env, "fleet.local")


def test_the_default_policy_is_the_tier_model() -> None:
    assert [r.name for r in DEFAULT_POLICY.rules] == [
        "own-topics",
        "read-telemetry",
        "broadcast-and-command",
    ]
    gold = rights_for("g-1", "gold")
    assert gold.publish == (
        "devices/g-1/#",
        "$fleet/renew/g-1/request",
        "fleet/broadcast/#",
        "devices/+/commands",
    )
    assert gold.subscribe == (
        "devices/g-1/#",
        "fleet/broadcast/#",
        "$fleet/renew/g-1/reply",
        "devices/+/telemetry",
    )


def test_rules_match_by_attributes_and_explain_why(tmp_path: Path) -> None:
    policy = parse_policy(PLANT, tmp_path / "plant.yaml")
    operator = _identity("op-7", tier="silver")
    assert policy.rights(operator).may_subscribe("plant/+/alarms")
    assert policy.rights(operator).may_publish("plant/op-7/status")
    assert not policy.rights(operator).may_publish("plant/op-8/status")
    allowed = policy.explain(operator, "subscribe", "plant/+/alarms")
    assert (allowed.allowed, allowed.rule, allowed.granted_by) == (
        True,
        "plant-operators",
        "plant/+/alarms",
    )
    for bystander, why in [
        (_identity("op-8", tier="bronze"), "tier is 'bronze', the rule wants silver or gold"),
        (_identity("op-9", tier="gold", env="dev"), "env is 'dev', the rule wants prod"),
        (_identity("pump-1", tier="gold"), "id is 'pump-1', the rule wants op-*"),
    ]:
        refused = policy.explain(bystander, "subscribe", "plant/+/alarms")
        assert not refused.allowed and not policy.rights(bystander).may_subscribe("plant/+/alarms")
        assert f"rule 'plant-operators' (line 5): {why}" in refused.reasons
        assert any(r.startswith("rule 'own-topics' (line 2) matches") for r in refused.reasons)


@pytest.mark.parametrize(
    ("text", "line", "where", "problem"),
    [
        ("rules:\n  - name: a\n    subscibe: [x]\n", 3, "rules[0]", "'subscibe' (did you mean 'subscribe'?)"),
        ("rules:\n  - name: a\n    match: {tier: golden}\n    publish: [x]\n", 3, "rules[0] (a).match.tier", "(did you mean 'gold'?)"),
        ("rules:\n  - name: a\n    publish:\n      - x\n      - a/#/b\n", 5, "rules[0] (a).publish[1]", "'#' must be a whole level, and the last"),
        ("rules:\n  - name: a\n    publish: ['x/{device}']\n", 3, "rules[0] (a).publish[0]", "the only placeholder is {id}"),
        ("rules:\n  - name: a\n    publish: [x]\n  - name: a\n    publish: [y]\n", 4, "name", "defined twice (line 2)"),
        ("rules:\n  - name: a\n", 2, "rules[0] (a)", "grants nothing"),
        ("rule: []\n", 1, "policy", "(did you mean 'rules'?)"),
        ("require:\n  max_lifetime: forever\nrules: []\n", 2, "require.max_lifetime", "forever"),
        ("require:\n  signature_algorithms: [ed2519]\nrules: []\n", 2, "require.signature_algorithms", "(did you mean 'ed25519'?)"),
    ],
)  # fmt: skip
def test_errors_name_file_line_and_field(
    tmp_path: Path, text: str, line: int, where: str, problem: str
) -> None:
    path = _write(tmp_path, text)
    checked = subprocess.run(
        fleet_command("policy", "check", path), capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 2, checked.stdout + checked.stderr
    message = " ".join(checked.stderr.split())
    assert f"{path}:{line}: {where}: " in message and problem in message, message


@given(st.text(max_size=400))
def test_any_text_is_a_policy_or_a_policy_error(text: str) -> None:
    try:
        policy = parse_policy(text, Path("p.yaml"))
    except PolicyError as error:
        assert str(error).startswith("p.yaml:")
    else:
        assert policy.rules


_LEVEL = st.sampled_from(["a", "b", "{id}", "+", "devices", "x-1"])


@given(
    granted=st.lists(
        st.lists(_LEVEL, min_size=1, max_size=4).map("/".join), min_size=1, max_size=4
    ),
    topic=st.lists(st.sampled_from(["a", "b", "d-1", "devices", "x-1"]), min_size=1, max_size=4),
)
def test_explain_and_rights_agree(granted: list[str], topic: list[str]) -> None:
    lines = "".join(f"      - {g!r}\n" for g in granted)
    policy = parse_policy(f"rules:\n  - name: r\n    publish:\n{lines}", Path("p.yaml"))
    device = _identity("d-1")
    name = "/".join(topic)
    decision = policy.explain(device, "publish", name)
    assert decision.allowed == policy.rights(device).may_publish(name)
    assert all(filter_problem(f) is None for f in policy.rights(device).publish)


# -- through a real broker and the CLI ---------------------------------------------------------


@pytest.fixture
def plant(workspace: Workspace, tmp_path: Path) -> Iterator[tuple[Workspace, BrokerThread]]:
    provision_devices(workspace, ProvisionSpec(count=1, prefix="op", tier="silver"))
    provision_devices(workspace, ProvisionSpec(count=1, prefix="pump", tier="gold"))
    policy = _write(tmp_path, PLANT)
    broker = BrokerThread(settings_for_tests(workspace, policy=policy))
    yield workspace, broker
    broker.stop()


def _connected(workspace: Workspace, port: int, device_id: str) -> mq.RawClient:
    client = mq.RawClient(port, workspace.paths.root_cert, device_credentials(workspace, device_id))
    client.send(mq.connect(device_id))
    assert client.connack() == (0, 0)
    return client


def _topic(packet: mq.Received | None) -> str:
    assert packet is not None and packet.kind == 3, packet  # PUBLISH
    length = int.from_bytes(packet.body[:2], "big")
    return packet.body[2 : 2 + length].decode()


def _suback(workspace: Workspace, broker: BrokerThread, device_id: str, topic_filter: str) -> int:
    client = mq.RawClient(
        broker.port, workspace.paths.root_cert, device_credentials(workspace, device_id)
    )
    try:
        client.send(mq.connect(device_id))
        assert client.connack() == (0, 0)
        client.send(mq.subscribe(1, (topic_filter, 1)))
        answer = client.read()
        assert answer is not None and answer.kind == SUBACK
        return answer.body[2]
    finally:
        client.close()


def test_a_broker_with_a_policy_grants_what_it_says_and_nothing_more(
    plant: tuple[Workspace, BrokerThread],
) -> None:
    workspace, broker = plant
    assert _suback(workspace, broker, "op-00001", "plant/+/alarms") == 1
    # the bystander: a gold pump is not an operator (id op-*), so not granted their alarms
    assert _suback(workspace, broker, "pump-00001", "plant/+/alarms") == 0x80
    # the default model's grants are gone: this policy gives no broadcasts, no telemetry
    assert _suback(workspace, broker, "op-00001", "fleet/broadcast/#") == 0x80
    assert _suback(workspace, broker, "pump-00001", "devices/+/telemetry") == 0x80
    assert _suback(workspace, broker, "pump-00001", "devices/pump-00001/#") == 1


def test_fleet_policy_explain_and_fleet_broker_policy_through_the_cli(
    plant: tuple[Workspace, BrokerThread], tmp_path: Path
) -> None:
    workspace, _ = plant
    root, policy = workspace.paths.root, tmp_path / "policy.yaml"
    allowed = subprocess.run(
        fleet_command("policy", "explain", "op-00001", "--dir", root, "--policy", policy,
                      "--subscribe", "plant/+/alarms"),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert allowed.returncode == 0, allowed.stderr
    assert "allowed by rule 'plant-operators' (plant/+/alarms)" in allowed.stdout
    refused = subprocess.run(
        fleet_command(
            "policy", "explain", "pump-00001", "--dir", root, "--publish", "fleet/broadcast/x"
        ),
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip  (the default policy: gold may broadcast)
    assert refused.returncode == 0 and "'broadcast-and-command'" in refused.stdout
    denied = subprocess.run(
        fleet_command("policy", "explain", "pump-00001", "--dir", root, "--policy", policy,
                      "--publish", "fleet/broadcast/x"),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert denied.returncode == 1 and "refused: no rule grants it" in denied.stdout
    assert "id is 'pump-00001', the rule wants op-*" in denied.stdout
    (tmp_path / "bad").mkdir()
    bad = _write(tmp_path / "bad", "rules:\n  - name: a\n    publish: [a/#/b]\n")
    started = subprocess.run(
        fleet_command("broker", "--dir", root, "--port", "0", "--policy", bad),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert started.returncode == 2 and f"{bad}:3: rules[0] (a).publish[0]" in started.stderr
    emitted = subprocess.run(
        fleet_command("broker", "--dir", root, "--policy", policy, "--emit-mosquitto-conf",
                      tmp_path / "m.conf"),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert emitted.returncode == 0, emitted.stderr
    acl = (tmp_path / "m.acl").read_text()
    assert f"acl_file {(tmp_path / 'm.acl').resolve()}" in (tmp_path / "m.conf").read_text()
    assert (
        "user op-00001\ntopic write devices/op-00001/#\ntopic write plant/op-00001/status\n" in acl
    )
    assert (
        "user pump-00001\ntopic write devices/pump-00001/#\ntopic read devices/pump-00001/#\n\n"
        in acl
    )


def test_what_mosquitto_cannot_enforce_is_said_in_its_acl(workspace: Workspace) -> None:
    from broker.mosquitto_acl import mosquitto_acl

    provision_devices(workspace, ProvisionSpec(count=1, prefix="maint"))
    acl = mosquitto_acl(
        workspace, parse_policy(_windows("-1h", "+1h") + REQUIRE.split("rules:")[0], Path("w.yaml"))
    )
    assert (
        "# Not enforced by Mosquitto: the time windows (night-shift, visit): their devices" in acl
    )
    assert "# Not enforced by Mosquitto: the certificate requirements (require:)" in acl
    assert "user maint-00001\ntopic write devices/maint-00001/#\n" in acl
    plain = mosquitto_acl(workspace, DEFAULT_POLICY)
    assert "time windows" not in plain and "requirements" not in plain


def test_the_policy_holds_on_a_real_mosquitto(workspace: Workspace, tmp_path: Path) -> None:
    """The same rights through Mosquitto's acl_file: a bronze device is refused another device's
    topics there, as here; the silver reader and the other device are still served."""
    provision_devices(workspace, ProvisionSpec(count=2, prefix="dev"))
    provision_devices(workspace, ProvisionSpec(count=1, prefix="reader", tier="silver"))
    shown = subprocess.run(
        fleet_command("policy", "show"), capture_output=True, text=True, timeout=60
    )
    assert shown.returncode == 0 and parse_policy(shown.stdout, Path("shown")) == parse_policy(
        DEFAULT_POLICY_YAML, Path("shown")
    )
    policy = _write(tmp_path, shown.stdout)
    conf = tmp_path / "mosquitto.conf"
    with running_mosquitto(workspace.paths.root, conf, "--policy", policy) as port:
        # Mosquitto grants every SUBSCRIBE and filters at delivery (its acl_file checks
        # 'read' per message): what a device receives is what shows the rights
        reader, thief, owner = (
            _connected(workspace, port, d) for d in ("reader-00001", "dev-00001", "dev-00002")
        )
        for client, topic_filter in [
            (reader, "devices/+/telemetry"),
            (thief, "devices/dev-00002/#"),
            (owner, "devices/dev-00002/#"),
        ]:
            client.send(mq.subscribe(1, (topic_filter, 0)))
            answer = client.read()
            assert answer is not None and answer.kind == SUBACK
        thief.send(mq.publish("devices/dev-00002/commands", b"forged"))  # bronze: not allowed
        owner.send(mq.publish("devices/dev-00002/telemetry", b"t"))
        assert _topic(reader.read()) == "devices/dev-00002/telemetry"  # the bystanders are served
        assert _topic(owner.read()) == "devices/dev-00002/telemetry"  # and the forgery never came
        assert thief.read(timeout=1) is None  # another device's topics never reach the thief
        for client in (reader, thief, owner):
            client.close()
    assert (
        "# Not enforced by Mosquitto: a claim certificate"
        in (tmp_path / "mosquitto.acl").read_text()
    )


def test_the_readme_shows_the_default_policy_as_it_is() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("  ```yaml\n", 1)[1].split("  ```\n", 1)[0]
    shown = parse_policy(textwrap.dedent(block), Path("README.md"))
    strip = [(r.name, r.match, r.publish, r.subscribe) for r in shown.rules]
    assert strip == [(r.name, r.match, r.publish, r.subscribe) for r in DEFAULT_POLICY.rules]


ALARM_SOURCES = """\
  - name: alarm-sources
    match: {id: "pump-*"}
    publish: ["plant/+/alarms"]
"""
RELOADED = PLANT.split("  - name: plant-operators")[0] + ALARM_SOURCES  # operators' rule gone


def test_a_new_policy_applies_live_and_a_broken_one_is_refused(
    workspace: Workspace, tmp_path: Path
) -> None:
    provision_devices(workspace, ProvisionSpec(count=1, prefix="op", tier="silver"))
    provision_devices(workspace, ProvisionSpec(count=1, prefix="pump", tier="gold"))
    policy = _write(tmp_path, PLANT + ALARM_SOURCES)
    broker = BrokerThread(settings_for_tests(workspace, policy=policy, policy_poll_interval=0.05))
    operator, pump = (_connected(workspace, broker.port, d) for d in ("op-00001", "pump-00001"))
    try:
        for client, topic_filter in [
            (operator, "plant/+/alarms"),
            (operator, "devices/op-00001/#"),
            (pump, "devices/pump-00001/#"),
        ]:
            client.send(mq.subscribe(1, (topic_filter, 0)))
            answer = client.read()
            assert answer is not None and answer.kind == SUBACK and answer.body[2] == 0
        pump.send(mq.publish("plant/pump-00001/alarms", b"hot"))
        assert _topic(operator.read()) == "plant/pump-00001/alarms"  # granted before
        operator.send(mq.publish("plant/op-00001/status", b"ok"))  # allowed (and remembered)
        operator.send(mq.publish("devices/op-00001/x", b"sync"))
        assert _topic(operator.read()) == "devices/op-00001/x"
        assert not [e for e in broker.broker.events if e["event"] == "acl_denied"]

        broken = tmp_path / "broken.yaml"
        broken.write_text("rules:\n  - name: x\n    publish: [a/#/b]\n")
        broken.replace(policy)
        refused = broker.wait_for_event(lambda e: e["event"] == "policy_rejected")
        assert f"{policy}:3: rules[0] (x).publish[0]" in refused["detail"]

        fresh = tmp_path / "fresh.yaml"
        fresh.write_text(RELOADED)
        fresh.replace(policy)
        revoked = broker.wait_for_event(lambda e: e["event"] == "subscription_revoked")
        assert (revoked["device"], revoked["detail"]) == ("op-00001", "plant/+/alarms")
        installed = broker.wait_for_event(lambda e: e["event"] == "policy_installed")
        assert installed["detail"].endswith("2 rules, 1 subscription(s) revoked")

        pump.send(mq.publish("plant/pump-00001/alarms", b"hotter"))
        operator.send(mq.publish("plant/op-00001/status", b"ok"))  # granted before, not now
        denied = broker.wait_for_event(lambda e: e["event"] == "acl_denied")
        assert (denied["device"], denied["detail"]) == ("op-00001", "publish plant/op-00001/status")
        # the bystanders: the operator's own subscription and the pump's still deliver
        operator.send(mq.publish("devices/op-00001/x", b"own"))
        assert _topic(operator.read()) == "devices/op-00001/x"  # not the alarm: it was dropped
        pump.send(mq.publish("devices/pump-00001/t", b"own"))
        assert _topic(pump.read()) == "devices/pump-00001/t"
        assert (
            broker.broker.metrics.registry.get_sample_value("mtls_subscriptions_revoked_total") == 1
        )
    finally:
        operator.close()
        pump.close()
        broker.stop()


def _rejected(device_id: str, event: dict[str, Any]) -> bool:
    return bool(event["event"] == "rejected" and event.get("device") == device_id)


REQUIRE = """\
require:
  max_lifetime: 30d
  min_rsa_bits: 3072
  organization: fleet.local
rules:
  - name: own-topics
    publish: ["devices/{id}/#"]
    subscribe: ["devices/{id}/#"]
"""


def test_certificates_that_miss_the_requirements_are_refused_at_connect(
    workspace: Workspace, tmp_path: Path
) -> None:
    """A certificate too long-lived or with a weak key is refused at CONNECT (policy_refused,
    naming the requirement); one that meets them is served beside it."""
    from fleet.kernel.keys import KeyType

    ok = provision_devices(
        workspace, ProvisionSpec(count=1, prefix="ok", valid_for=dt.timedelta(days=10))
    ).device_ids[0]
    long_lived = provision_devices(
        workspace, ProvisionSpec(count=1, prefix="long", valid_for=dt.timedelta(days=90))
    ).device_ids[0]
    weak = provision_devices(
        workspace,
        ProvisionSpec(
            count=1, prefix="weak", key_type=KeyType.RSA2048, valid_for=dt.timedelta(days=10)
        ),
    ).device_ids[0]
    policy = _write(tmp_path, REQUIRE)
    broker = BrokerThread(settings_for_tests(workspace, policy=policy))
    try:
        for device_id, why in [
            (long_lived, "certificate lifetime 90 days exceeds the maximum 30 days"),
            (weak, "RSA key of 2048 bits, at least 3072 required"),
        ]:
            client = mq.RawClient(
                broker.port, workspace.paths.root_cert, device_credentials(workspace, device_id)
            )
            client.send(mq.connect(device_id))
            assert client.connack() == (0, 5)  # not authorized
            client.close()
            event = broker.wait_for_event(functools.partial(_rejected, device_id))
            assert (event["device"], event["reason"], event["detail"]) == (
                device_id,
                "policy_refused",
                why,
            )
        served = _connected(workspace, broker.port, ok)  # the bystander
        served.send(mq.subscribe(1, (f"devices/{ok}/#", 0)))
        answer = served.read()
        assert answer is not None and answer.kind == SUBACK and answer.body[2] == 0
        served.close()
        assert broker.outcome_count("policy_refused") == 2
    finally:
        broker.stop()
    explained = subprocess.run(
        fleet_command("policy", "explain", long_lived, "--dir", workspace.paths.root,
                      "--policy", policy, "--publish", f"devices/{long_lived}/t"),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert explained.returncode == 1
    assert "allowed by rule 'own-topics'" in explained.stdout
    assert "refused at CONNECT (policy_refused): certificate lifetime 90 days" in explained.stdout


# -- time windows ------------------------------------------------------------------------------

WINDOWS = """\
windows:
  - name: night-shift
    match: {id: "night-*"}
    days: [fri, sat]
    hours: "22:00-02:00"
  - name: visit
    match: {id: "maint-*"}
    from: "START"
    until: "END"
rules:
  - name: own-topics
    publish: ["devices/{id}/#"]
    subscribe: ["devices/{id}/#"]
"""


def _windows(start: str, end: str) -> str:
    return WINDOWS.replace("START", start).replace("END", end)


def _at(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC)


def test_windows_by_weekday_and_hours_span_midnight_and_absolute_ones_end() -> None:
    policy = parse_policy(_windows("-1h", "+1h"), Path("w.yaml"))
    night = _identity("night-1")
    friday_late, saturday_early = _at("2026-12-04T23:30:00"), _at("2026-12-05T01:59:00")
    sunday_late, thursday_late = _at("2026-12-06T23:00:00"), _at("2026-12-03T23:00:00")
    assert policy.window(night, friday_late).closes == _at("2026-12-05T02:00:00")
    assert policy.window(night, saturday_early).allowed  # friday's span, past midnight
    assert policy.window(night, _at("2026-12-06T01:00:00")).allowed  # saturday's span
    for outside in (sunday_late, thursday_late, _at("2026-12-05T12:00:00")):
        verdict = policy.window(night, outside)
        assert not verdict.allowed
        assert verdict.text == "outside its window(s) 'night-shift' (fri, sat 22:00-02:00 UTC)"
    now = dt.datetime.now(dt.UTC)
    visit = policy.window(_identity("maint-1"), now)
    assert (
        visit.allowed and visit.closes is not None and 3500 < (visit.closes - now).seconds <= 3600
    )
    assert not policy.window(_identity("maint-1"), now + dt.timedelta(hours=2)).allowed
    assert policy.window(_identity("pump-1"), now).text == "no window applies: any time"


@given(
    at=st.datetimes(min_value=dt.datetime(2020, 1, 1), max_value=dt.datetime(2030, 1, 1)).map(
        lambda t: t.replace(tzinfo=dt.UTC)
    ),
    first=st.integers(0, 1439),
    last=st.integers(1, 1440),
    days=st.sets(st.sampled_from(DAYS), max_size=3),
)
def test_an_open_window_closes_after_now_and_a_closed_one_says_so(
    at: dt.datetime, first: int, last: int, days: set[str]
) -> None:
    if first == last:
        return
    hours = f"{first // 60:02d}:{first % 60:02d}-{last // 60:02d}:{last % 60:02d}"
    day_list = f"[{', '.join(sorted(days))}]" if days else "[]"
    text = f"windows:\n  - name: w\n    hours: '{hours}'\n"
    text += f"    days: {day_list}\n" if days else ""
    text += "rules:\n  - name: r\n    publish: [x]\n"
    policy = parse_policy(text, Path("w.yaml"))
    verdict = policy.window(_identity("d-1"), at)
    if verdict.allowed:
        assert verdict.closes is not None and at < verdict.closes <= at + dt.timedelta(days=1)
        assert not policy.window(
            _identity("d-1"), verdict.closes
        ).allowed or verdict.closes.time() == dt.time(0)
    else:
        assert verdict.closes is None


def test_a_window_admits_then_closes_the_session_and_refuses_after(
    workspace: Workspace, tmp_path: Path
) -> None:
    maint = provision_devices(workspace, ProvisionSpec(count=1, prefix="maint")).device_ids[0]
    other = provision_devices(workspace, ProvisionSpec(count=1, prefix="pump")).device_ids[0]
    policy = _write(tmp_path, _windows("-1m", "+2s"))
    broker = BrokerThread(settings_for_tests(workspace, policy=policy))
    bystander = _connected(workspace, broker.port, other)
    try:
        inside = _connected(workspace, broker.port, maint)  # admitted inside its window
        closed = broker.wait_for_event(lambda e: e["event"] == "session_closed", timeout=10)
        assert (closed["device"], closed["reason"]) == (maint, "window_closed")
        assert closed["detail"].startswith("its access window closed at ")
        assert inside.closed_within(5)
        inside.close()
        late = mq.RawClient(
            broker.port, workspace.paths.root_cert, device_credentials(workspace, maint)
        )
        late.send(mq.connect(maint))
        assert late.connack() == (0, 5)
        late.close()
        refused = broker.wait_for_event(functools.partial(_rejected, maint))
        assert refused["reason"] == "outside_window"
        assert refused["detail"].startswith("outside its window(s) 'visit' (")
        # the bystander, matched by no window, was never touched and is still served
        bystander.send(mq.subscribe(1, (f"devices/{other}/#", 0)))
        answer = bystander.read()
        assert answer is not None and answer.kind == SUBACK and answer.body[2] == 0
        bystander.send(mq.publish(f"devices/{other}/t", b"x"))
        assert _topic(bystander.read()) == f"devices/{other}/t"
    finally:
        bystander.close()
        broker.stop()
    root = workspace.paths.root
    for at, code, said in [
        ("-30s", 0, "may connect: inside window 'visit'"),
        ("+1h", 1, "is refused at CONNECT (outside_window): outside its window(s) 'visit'"),
    ]:
        explained = subprocess.run(
            fleet_command("policy", "explain", maint, "--dir", root, "--policy", policy,
                          "--publish", f"devices/{maint}/t", "--at", at),
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert explained.returncode == code, explained.stdout + explained.stderr
        assert said in " ".join(explained.stdout.split())


def test_a_scenario_names_its_bad_policy_and_a_policy_step_needs_one(tmp_path: Path) -> None:
    from fleet.scenario import ScenarioError, load_scenario, skip_reason
    from fleet.scenario.results import Target

    (tmp_path / "bad.yaml").write_text("rules:\n  - name: a\n    publish: [a/#/b]\n")
    scenario = tmp_path / "s.yaml"
    scenario.write_text(
        "name: s\nbroker:\n  policy: bad.yaml\nfleet:\n  - {name: d, count: 1}\n"
        "steps:\n  - provision: all\n  - policy: bad.yaml\n"
    )
    with pytest.raises(ScenarioError) as raised:
        load_scenario(scenario)
    message = str(raised.value)
    assert (
        f"{scenario}:3: broker.policy: {tmp_path / 'bad.yaml'}:3: rules[0] (a).publish[0]"
        in message
    )
    assert f"{scenario}:8: steps[1].policy.file: {tmp_path / 'bad.yaml'}:3:" in message
    scenario.write_text(
        "name: s\nfleet:\n  - {name: d, count: 1}\nsteps:\n  - provision: all\n"
        "  - policy: good.yaml\n"
    )
    (tmp_path / "good.yaml").write_text(DEFAULT_POLICY_YAML)
    with pytest.raises(ScenarioError, match=r"s.yaml:6: policy: a policy step needs"):
        load_scenario(scenario)
    scenario.write_text(
        "name: s\nbroker:\n  policy: good.yaml\nfleet:\n  - {name: d, count: 1}\n"
        "steps:\n  - provision: all\n"
    )
    reason = skip_reason(load_scenario(scenario), Target("127.0.0.1", 8883))
    assert reason == "needs the mtls-fleet broker: its access policy (broker.policy)"
