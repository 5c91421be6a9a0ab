"""The scenario engine: files checked before anything runs, the library replayed for real,
verdicts that can fail, JUnit and JSON that add up, and the same scenarios against Mosquitto."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from fleet import FleetConfig, init_workspace
from fleet.scenario import LIBRARY, STEPS, ScenarioError, load_scenario
from tests.broker_support import running_mosquitto
from tests.conftest import fleet_command

_LIBRARY_NAMES = {
    "expiry",
    "unknown-authority",
    "revoke-one",
    "emergency-revocation",
    "revocation-while-down",
    "rotation",
    "rogue-broker",
    "spoofing",
    "tiers",
    "dev-vs-prod",
    "stale-crl",
    "reconnect-storm",
    "ca-rotation",
    "duplicate-identity",
    "quickstart",
    "revocation-unreachable",
    "bootstrap",
    "short-lived",
    "pinning",
    "impostors",
    "replacement",
    "ca-compromise",
    "access-policy",
    "pq-migration",
    "pq-legacy-broker",
    "pq-revoke",
    "pq-lifetime-compression",
}
_LONG = {
    "short-lived",
    "pq-lifetime-compression",
}  # 5 minutes: run by hand or in a nightly job, and below in miniature


@pytest.mark.slow
def test_pq_lifetime_compression_in_miniature(tmp_path: Path) -> None:
    """pq-lifetime-compression at a quarter of its length: 40 devices, 8-second certificates."""
    text = (LIBRARY / "pq-lifetime-compression.yaml").read_text()
    for old, new in (
        ("count: 200", "count: 40"),
        ("valid_for: 20s", "valid_for: 8s"),
        ("wait: 60s", "wait: 16s"),
        ("delivered_at_least: 20", "delivered_at_least: 6"),
    ):
        assert old in text, old
        text = text.replace(old, new)
    path = tmp_path / "pq-lifetime-compression.yaml"
    path.write_text(text)
    report = tmp_path / "report.json"
    result = _run(path, "--quiet", "--json", report, timeout=150)
    assert result.returncode == 0, result.stdout[-4000:]
    (scenario,) = json.loads(report.read_text())["scenarios"]
    assert scenario["status"] == "passed"
    renewal = scenario["expectations"][-1]
    assert "renewals per device" in renewal["observed"] and "0 failed" in renewal["observed"]


@pytest.mark.slow
def test_short_lived_certificates_renew_themselves_in_miniature(tmp_path: Path) -> None:
    """The short-lived scenario at a tenth of its length: 100 devices, 9-second certificates."""
    text = (LIBRARY / "short-lived.yaml").read_text()
    for old, new in (
        ("count: 500", "count: 100"),
        ("valid_for: 60s", "valid_for: 9s"),
        ("wait: 5m", "wait: 30s"),
        ("delivered_at_least: 100", "delivered_at_least: 10"),
        ("publish_every: 2s", "publish_every: 1s"),
        ("renewed_at_least: 5", "renewed_at_least: 3"),
    ):
        assert old in text
        text = text.replace(old, new)
    miniature = tmp_path / "short-lived-miniature.yaml"
    miniature.write_text(text)
    report = tmp_path / "report.json"
    result = _run("--quiet", "--json", report, miniature, timeout=200)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    (scenario,) = json.loads(report.read_text())["scenarios"]
    final = scenario["expectations"][-1]
    assert final["passed"] and "renewals per device" in final["observed"]


_GOOD = """\
name: tiny
fleet:
  - name: fleet
    count: 3
steps:
  - provision: all
  - connect: fleet
  - expect: {devices: fleet, state: connected}
"""


def _write(tmp_path: Path, text: str, name: str = "scenario.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def _run(*args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        fleet_command("scenario", "run", *args), capture_output=True, text=True, timeout=timeout
    )


# -- the format -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "line", "message"),
    [
        (("- connect: fleet", "- conect: fleet"), 7, r"unknown step 'conect' \(did you mean 'connect'\?\)"),
        (("state: connected", "stat: connected"), 8, r"unknown field 'stat' \(did you mean 'state'\?\)"),
        (("state: connected", "state: conected"), 8, r"steps\[2\]\.expect\.state: 'conected' is not one of .*did you mean 'connected'"),
        (("devices: fleet,", "devices: fleet#4,"), 8, r"'fleet#4': members of 'fleet' are numbered 1 to 3"),
        (("devices: fleet,", "devices: flet,"), 8, r"no group 'flet' \(did you mean 'fleet'\?\)"),
        (("count: 3", "count: -3"), 4, r"fleet\[0\]\.count: expected a whole number"),
        (("- provision: all", "- provision: all\n  - wait: 5 parsecs"), 7, r"steps\[1\]\.wait\.for: invalid duration '5 parsecs'"),
        (("  - provision: all\n", ""), 6, r"group 'fleet' is used before its provision step"),
        (("  - expect: {devices: fleet, state: connected}", "  - expect: {devices: fleet, state: connected"), 9, r"YAML: "),
    ],
)  # fmt: skip
def test_a_malformed_scenario_names_file_line_and_field(
    tmp_path: Path, change: tuple[str, str], line: int, message: str
) -> None:
    path = _write(tmp_path, _GOOD.replace(*change))
    with pytest.raises(ScenarioError, match=message) as caught:
        load_scenario(path)
    assert str(caught.value).startswith(f"{path}:{line}: "), str(caught.value)


def test_every_file_is_checked_before_any_scenario_runs(tmp_path: Path) -> None:
    good = _write(tmp_path, _GOOD, "a-good.yaml")
    bad = _write(tmp_path, _GOOD.replace("count: 3", "count: three"), "b-bad.yaml")
    result = _run(good, bad, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"{bad}:4: fleet[0].count: expected a whole number" in result.stderr
    assert "running" not in result.stdout  # nothing was started


def _listing(*paths: Path) -> list[str]:
    """``fleet scenario list`` as an 80-column terminal shows it."""
    env = {**os.environ, "COLUMNS": "80"}
    listing = subprocess.run(
        fleet_command("scenario", "list", *paths),
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert listing.returncode == 0, listing.stderr
    return listing.stdout.splitlines()


def test_the_library_lists_every_scenario() -> None:
    names = {load_scenario(path).name for path in LIBRARY.glob("*.yaml")}
    assert names == _LIBRARY_NAMES
    lines = _listing()
    first_cells = {line.split("│")[1].strip() for line in lines if line.startswith("│")}
    assert first_cells >= _LIBRARY_NAMES
    assert all(len(line) <= 80 for line in lines), max(lines, key=len)
    header = [cell.strip() for cell in lines[1].strip("┃").split("┃")]
    assert header == ["scenario", "steps", "devices", "description"]  # no file: it is name.yaml
    rows = [line for line in lines if line.startswith("│")]
    assert len(rows) < 12 * len(_LIBRARY_NAMES)  # descriptions wrap by phrase, not by word


def test_the_listing_shows_the_file_when_it_is_not_the_name(tmp_path: Path) -> None:
    _write(tmp_path, _GOOD, "smoke.yaml")
    lines = _listing(tmp_path)
    header = [cell.strip() for cell in lines[1].strip("┃").split("┃")]
    assert header == ["scenario", "file", "steps", "devices", "description"]
    assert [cell.strip() for cell in lines[3].strip("│").split("│")][:4] == [
        "tiny",
        "smoke.yaml",
        "3",
        "3",
    ]


def test_every_step_and_field_is_documented() -> None:
    readme = (LIBRARY / "README.md").read_text()
    steps_section = readme.split("## Steps", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^### `([a-z_]+)`", steps_section, re.MULTILINE))
    assert documented == set(STEPS)  # every kind registered, every heading a kind
    from fleet.scenario.loader import _GROUP_FIELDS

    for field in _GROUP_FIELDS:
        assert f" {field}: " in readme, field
    for kind, step in STEPS.items():
        assert step.kind == kind
        assert f"### `{kind}`" in readme, kind
        for field in step.fields:
            assert f"`{field}`" in readme, (kind, field)


def test_a_step_kind_is_one_class_registered_by_its_name() -> None:
    """A new kind registers itself; one without ``run`` cannot be built (mypy says so where
    ``read`` builds it: the ignore below is an error if mypy stops seeing it); a name is unique."""
    from dataclasses import dataclass

    from fleet.scenario.steps import Step

    @dataclass(frozen=True, slots=True)
    class Incomplete(Step):  # no run()
        kind = "test_incomplete"

        @classmethod
        def read(cls, reader: Any, fields: Any, line: int) -> Step:
            return Incomplete(line)  # type: ignore[abstract]

    try:
        assert STEPS["test_incomplete"] is Incomplete
        with pytest.raises(TypeError, match="abstract"):
            Incomplete.read(None, None, 1)
        with pytest.raises(TypeError, match="'connect' is defined twice"):

            class Again(Step):
                kind = "connect"
    finally:
        del STEPS["test_incomplete"]
    assert STEPS["connect"].__name__ == "ConnectStep"


# -- the library, replayed against the embedded broker ------------------------------------------


@pytest.mark.slow
def test_the_whole_library_passes_against_the_embedded_broker(tmp_path: Path) -> None:
    junit, report = tmp_path / "junit.xml", tmp_path / "report.json"
    result = _run(
        "--quiet", "--skip-tag", "long", "--jobs", "2", "--junit", junit, "--json", report,
        timeout=400,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert "2 at a time, each in its own process" in result.stdout

    document: dict[str, Any] = json.loads(report.read_text())
    assert document["passed"] is True
    scenarios = {s["name"]: s for s in document["scenarios"]}
    assert set(scenarios) == _LIBRARY_NAMES - _LONG
    for name, scenario in scenarios.items():
        assert scenario["status"] == "passed", (name, scenario["reason"])
        assert scenario["expectations"], name
        times = [e["at_ms"] for e in scenario["expectations"]]
        assert times == sorted(times), name  # observed in order, on one clock
        assert all(e["passed"] and not e["failures"] for e in scenario["expectations"]), name
        for group, counts in scenario["messages"].items():
            assert counts["acknowledged"] <= counts["sent"], (name, group)
    storm = scenarios["reconnect-storm"]
    assert sum(storm["connections_per_second"]) == storm["messages"]["fleet"]["connections"]
    assert storm["messages"]["fleet"]["connections"] >= 4000  # everyone, twice

    suite = ET.parse(junit).getroot()
    assert suite.get("tests") == str(len(_LIBRARY_NAMES - _LONG))
    assert suite.get("failures") == "0" and suite.get("errors") == "0"
    assert len(suite.findall("testcase")) == len(_LIBRARY_NAMES - _LONG)
    assert "scenarios in" in result.stdout


def test_a_failed_expectation_fails_the_run_with_evidence(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """\
        name: wrong-on-purpose
        fleet:
          - name: fleet
            count: 3
        steps:
          - provision: all
          - connect: fleet
          - expect: {devices: fleet, state: connected}
          - revoke: fleet#2
          - expect: {devices: fleet#2, state: connected, broker: ok, within: 1s}
        """,
    )
    junit, report = tmp_path / "junit.xml", tmp_path / "report.json"
    result = _run(path, "--junit", junit, "--json", report, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAILED wrong-on-purpose" in result.stdout

    scenario = json.loads(report.read_text())["scenarios"][0]
    assert scenario["status"] == "failed"
    held, broken = scenario["expectations"]
    assert held["passed"] and not broken["passed"]
    assert broken["line"] == 10
    (failure_line,) = broken["failures"]
    assert failure_line.startswith("fleet#2 (fleet-00002): state rejected, broker saw ['revoked'")
    assert any("reason=revoked" in line for line in broken["evidence"])
    assert any("certificate_revoked" in line for line in broken["evidence"])
    failure = ET.parse(junit).getroot().find("testcase/failure")
    assert failure is not None and "line 10" in (failure.text or "")


# -- against a broker that is not ours ----------------------------------------------------------


@pytest.mark.slow
def test_standard_scenarios_run_against_mosquitto_and_the_others_say_why_not(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "fleet"
    init_workspace(directory, config=FleetConfig())
    report = tmp_path / "report.json"
    with running_mosquitto(directory, tmp_path / "mosquitto.conf") as port:
        result = _run(
            *sorted(LIBRARY.glob("*.yaml")),
            "--skip-tag",
            "long",
            "--target",
            f"mqtts://127.0.0.1:{port}",
            "--dir",
            directory,
            "--quiet",
            "--json",
            report,
            timeout=120,
        )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr
    scenarios = {s["name"]: s for s in json.loads(report.read_text())["scenarios"]}
    authority = scenarios["unknown-authority"]
    assert authority["status"] == "passed"
    rejected = next(e for e in authority["expectations"] if "broker=unknown_ca" in e["text"])
    assert "unknown_ca" in rejected["observed"]  # what the devices saw from Mosquitto
    assert rejected["unchecked"] and "not observable" in rejected["unchecked"][0]
    assert scenarios["rogue-broker"]["status"] == "skipped"
    assert "acts on the embedded broker" in scenarios["rogue-broker"]["reason"]
    assert scenarios["rotation"]["status"] == "passed"  # renewal needs nothing but standards
    assert scenarios["expiry"]["status"] == "skipped"
    assert "notAfter" in scenarios["expiry"]["reason"]
    # the whole library: on another broker every scenario passes or says why it cannot run
    statuses = {name: s["status"] for name, s in scenarios.items()}
    assert set(statuses) == _LIBRARY_NAMES - _LONG
    assert set(statuses.values()) <= {"passed", "skipped"}, statuses
    assert all(s["reason"] for s in scenarios.values() if s["status"] == "skipped")
    assert "only what our broker logs" in scenarios["stale-crl"]["reason"]


def test_keep_workspace_keeps_it_for_inspection(tmp_path: Path) -> None:
    path = _write(tmp_path, _GOOD)
    kept_report, gone_report = tmp_path / "kept.json", tmp_path / "gone.json"
    kept = _run(path, "--quiet", "--keep-workspace", "--json", kept_report, timeout=120)
    gone = _run(path, "--quiet", "--json", gone_report, timeout=120)
    assert kept.returncode == 0 and gone.returncode == 0, kept.stdout + gone.stdout
    (with_it,) = json.loads(kept_report.read_text())["scenarios"]
    (without,) = json.loads(gone_report.read_text())["scenarios"]
    workspace = Path(with_it["workspace"])
    assert (workspace / "fleet.db").is_file() and (workspace / "ca" / "root.crt").is_file()
    assert len(list((workspace / "devices").iterdir())) == 3  # the scenario's fleet, on disk
    assert without["workspace"] is None
    shutil.rmtree(workspace)  # kept for us: ours to remove


def test_jobs_need_a_fresh_workspace_per_scenario(tmp_path: Path) -> None:
    result = _run(
        LIBRARY / "tiers.yaml", LIBRARY / "spoofing.yaml", "--jobs", "2", "--dir", tmp_path,
        timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert "--jobs runs each scenario in a fresh workspace of its own" in result.stderr


def test_target_needs_the_workspace_the_broker_trusts() -> None:
    result = _run(LIBRARY / "tiers.yaml", "--target", "mqtts://127.0.0.1:1", timeout=60)
    assert result.returncode == 2
    assert "--target needs --dir" in result.stderr


def test_a_device_that_leaves_and_comes_back_keeps_its_counts(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """\
        name: come-back
        devices: {publish_every: 200ms}
        fleet:
          - name: fleet
            count: 2
        steps:
          - provision: all
          - connect: fleet
          - expect: {devices: fleet, state: connected, delivered_at_least: 2}
          - disconnect: fleet#1
          - expect: {devices: fleet#1, state: disconnected, drops: 0}
          - expect: {devices: fleet#2, state: connected, others_unaffected: true}
          - connect: fleet#1
          - expect: {devices: fleet, state: connected, delivered_at_least: 2, drops: 0, lost: 0}
        """,
    )
    report = tmp_path / "report.json"
    result = _run(path, "--json", report, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    scenario = json.loads(report.read_text())["scenarios"][0]
    counts = scenario["messages"]["fleet"]
    assert counts["connections"] == 3 and counts["drops"] == 0
    assert counts["acknowledged"] == counts["sent"] >= 8


def test_a_defect_in_one_scenario_is_reported_and_the_next_still_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fleet.scenario import ScenarioRun, load_scenarios, run_scenarios
    from fleet.scenario.steps import ConnectStep

    original = ConnectStep.run
    calls = 0

    async def broken_once(self: ConnectStep, run: ScenarioRun) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("simulated defect")
        await original(self, run)

    monkeypatch.setattr(ConnectStep, "run", broken_once)
    first = _write(tmp_path, _GOOD, "a.yaml")
    second = _write(tmp_path, _GOOD.replace("name: tiny", "name: tiny-2"), "b.yaml")
    broken, fine = run_scenarios(load_scenarios([first, second]))
    assert broken.status == "error" and not broken.passed
    assert "internal error RuntimeError: simulated defect" in broken.reason
    assert broken.traceback is not None and "simulated defect" in broken.traceback
    assert fine.status == "passed", fine.reason


def test_a_device_task_that_raises_errors_the_scenario_naming_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Before, a device's crash was swallowed and a scenario that only waited passed."""
    from device import Device
    from fleet.scenario import load_scenarios, run_scenarios

    original = Device.run

    async def crashing(self: Device, stop: Any) -> None:
        if self.settings.device_id.endswith("00002"):
            raise RuntimeError("simulated device defect")
        await original(self, stop)

    monkeypatch.setattr(Device, "run", crashing)
    waits_only = _GOOD.replace("  - expect: {devices: fleet, state: connected}", "  - wait: 0.5s")
    assert waits_only != _GOOD
    path = _write(tmp_path, waits_only)
    (result,) = run_scenarios(load_scenarios([path]))
    assert result.status == "error", result.reason
    assert result.reason.startswith("device fleet#2 (")
    assert (
        "crashed at" in result.reason and "RuntimeError: simulated device defect" in result.reason
    )
    assert result.traceback is not None and "simulated device defect" in result.traceback


# -- verdicts that cannot pass for the wrong reason ---------------------------------------------

FIXTURES = Path(__file__).parent / "scenarios"


def test_a_refusal_is_never_taken_for_an_enrollment(tmp_path: Path) -> None:
    """The fixture passed when enrollment outcomes were compared as substrings."""
    report = tmp_path / "report.json"
    result = _run(FIXTURES / "enrolled-on-a-refusal.yaml", "--quiet", "--json", report, timeout=120)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr
    (scenario,) = json.loads(report.read_text())["scenarios"]
    first, second = scenario["expectations"]
    assert first["passed"] and not second["passed"]
    assert "enrollment refused id_taken" in second["failures"][0]


def test_counts_over_a_group_are_exact(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    result = _run(FIXTURES / "enrollment-counts.yaml", "--quiet", "--json", report, timeout=120)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr
    (scenario,) = json.loads(report.read_text())["scenarios"]
    verdicts = [e["passed"] for e in scenario["expectations"]]
    # a zero count names an outcome nobody had: that holds too
    assert verdicts == [True, False, False, True]
    partial = scenario["expectations"][1]["failures"][0]
    assert partial == (
        "enrollment outcomes 2x enrolled, 1x refused claim_exhausted, expected 2x enrolled"
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("broker: revokd", r"'revokd' is not one of .*\(did you mean 'revoked'\?\)"),
        ("broker_event: crl_stael", r"'crl_stael' is not one of .*\(did you mean 'crl_stale'\?\)"),
        ("enrollment: enroled", r"'enroled' is not one of .*\(did you mean 'enrolled'\?\)"),
        ("enrollment: refused id_takn", r"did you mean 'refused id_taken'"),
    ],
)
def test_misspelled_reasons_and_events_are_refused_when_the_file_loads(
    tmp_path: Path, change: str, message: str
) -> None:
    path = _write(tmp_path, _GOOD.replace("state: connected}", f"state: connected, {change}}}"))
    with pytest.raises(ScenarioError, match=message):
        load_scenario(path)


@pytest.mark.parametrize(
    ("device", "message"),
    [
        # free text that a substring match used to accept: each names no reason exactly
        ("not authorized", r"did you mean 'not_authorized'"),
        ("revoked", r"did you mean 'certificate_revoked'"),
        ("hostname mismatch", r"did you mean 'hostname_mismatch'"),
        ("broker_untrusted: certificate_revoked_now", r"is neither an outcome"),
        ("rejected_by_broker: pin_mismatch", r"is neither an outcome"),  # not that outcome's
    ],
)
def test_what_a_device_saw_is_a_named_outcome_or_reason(
    tmp_path: Path, device: str, message: str
) -> None:
    path = _write(tmp_path, _GOOD.replace("state: connected}", f"device: '{device}'}}"))
    with pytest.raises(ScenarioError, match=message):
        load_scenario(path)


def test_device_sightings_compare_outcome_and_reason_exactly() -> None:
    from fleet.scenario.model import sighting_matches

    assert sighting_matches("certificate_revoked", "rejected_by_broker", "certificate_revoked")
    assert sighting_matches("rejected_by_broker", "rejected_by_broker", "certificate_revoked")
    assert sighting_matches("dropped: certificate_expired", "dropped", "certificate_expired")
    # the same reason under another outcome, a prefix, another outcome: no match
    assert not sighting_matches(
        "dropped: certificate_expired", "rejected_by_broker", "certificate_expired"
    )
    assert not sighting_matches(
        "certificate_revoked", "rejected_by_broker", "certificate_revoked_x"
    )
    assert not sighting_matches("rejected_by_broker", "broker_untrusted", "certificate_revoked")
    assert not sighting_matches("certificate_expired", "dropped", None)


def test_every_error_of_a_file_is_reported_at_once(tmp_path: Path) -> None:
    from fleet.scenario import ScenarioErrors

    path = _write(
        tmp_path,
        """\
        name: multi
        fleet:
          - name: fleet
            count: three
          - name: other
            count: 2
            tier: platinum
        steps:
          - provision: all
          - conect: fleet
          - expect: {devices: other, stat: connected, broker: revokd}
          - provision: other
          - revoke: other#1
          - rotate: other
          - expect: {devices: fleet, state: connected}
        """,
    )
    with pytest.raises(ScenarioErrors) as caught:
        load_scenario(path)
    found = [(e.line, e.where) for e in caught.value.errors]
    assert found == [
        (4, "fleet[0].count"),
        (7, "fleet[1].tier"),
        (10, "steps[1]"),
        (11, "steps[2].expect"),  # the unknown field 'stat' ...
        (11, "steps[2].expect.broker"),  # ... and the misspelt reason on the same line
        (12, "steps[3].provision.groups"),  # provisioned twice: the first devices would vanish
        (14, "steps[5].rotate.devices"),  # a revoked device cannot renew
    ]  # and nothing about 'fleet' at line 15: its group's own error says it all
    text = str(caught.value)
    assert "'other' is already provisioned (line 9)" in text
    assert "other#1 is revoked (line 13)" in text
    assert text.endswith("(7 errors)")


def test_errors_of_several_files_are_reported_together(tmp_path: Path) -> None:
    first = _write(tmp_path, _GOOD.replace("count: 3", "count: three"), "a.yaml")
    second = _write(tmp_path, _GOOD.replace("- connect: fleet", "- conect: fleet"), "b.yaml")
    result = subprocess.run(
        fleet_command("scenario", "list", first, second), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert f"{first}:4: fleet[0].count" in result.stderr
    assert f"{second}:7: steps[1]" in result.stderr


def test_an_expectation_only_our_broker_can_see_is_skipped_on_another_broker(
    tmp_path: Path,
) -> None:
    from fleet.scenario import Target, skip_reason

    only_broker = _write(
        tmp_path, _GOOD.replace("state: connected}", "broker: ok}"), "only-broker.yaml"
    )
    waits_for_event = _write(
        tmp_path,
        _GOOD.replace(
            "  - expect: {devices: fleet, state: connected}",
            "  - wait: {until: {broker_event: crl_stale}}",
        ),
        "waits.yaml",
    )
    both = _write(
        tmp_path, _GOOD.replace("state: connected}", "state: connected, broker: ok}"), "both.yaml"
    )
    target = Target("127.0.0.1", 8883)
    for path in (only_broker, waits_for_event):
        reason = skip_reason(load_scenario(path), target)
        assert reason is not None and "only what our broker logs" in reason, path
        assert skip_reason(load_scenario(path), None) is None  # the embedded broker shows it
    assert skip_reason(load_scenario(both), target) is None  # the devices' side is evidence


def test_a_refused_publication_is_acknowledged_but_never_delivered(tmp_path: Path) -> None:
    """The fixture passed when 'delivered' counted acknowledgements."""
    report = tmp_path / "report.json"
    result = _run(
        FIXTURES / "delivered-on-a-refusal.yaml", "--quiet", "--json", report, timeout=120
    )
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr
    (scenario,) = json.loads(report.read_text())["scenarios"]
    connected, acknowledged, delivered = scenario["expectations"]
    assert connected["passed"] and acknowledged["passed"] and not delivered["passed"]
    assert "0 delivered" in delivered["failures"][0]
