"""The fleet CLI: the commands a user copies from the README, and one-line errors with exit codes."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import Result

from tests.conftest import fleet_command

Cli = Callable[..., Result]


@pytest.fixture
def fleet_dir(tmp_path: Path, cli: Cli) -> Path:
    directory = tmp_path / "fleet"
    result = cli("init", "--dir", directory, "--trust-domain", "acme.test")
    assert result.exit_code == 0, result.output
    return directory


def _inventory(cli: Cli, fleet_dir: Path, *args: str) -> dict[str, Any]:
    result = cli("inventory", "--dir", fleet_dir, "--json", *args)
    assert result.exit_code == 0, result.output
    listing: dict[str, Any] = json.loads(result.stdout)
    return listing


def test_provision_revoke_inventory_show(cli: Cli, fleet_dir: Path) -> None:
    result = cli(
        "provision", "--dir", fleet_dir, "--count", "3", "--prefix", "sensor", "--tier", "silver"
    )
    assert result.exit_code == 0, result.output
    assert "provisioned 3 devices (sensor-00001 .. sensor-00003)" in result.stdout

    result = cli("revoke", "sensor-00002", "--dir", fleet_dir, "--reason", "key-compromise")
    assert result.exit_code == 0 and "revoked sensor-00002" in result.stdout
    result = cli("revoke", "sensor-00002", "--dir", fleet_dir)
    assert result.exit_code == 0 and "already revoked; nothing changed" in result.stdout

    listing = _inventory(cli, fleet_dir)
    assert listing["count"] == 3
    by_id = {d["id"]: d for d in listing["devices"]}
    assert by_id["sensor-00002"]["status"] == "revoked"
    assert by_id["sensor-00002"]["revocation_reason"] == "key-compromise"
    assert by_id["sensor-00001"]["tier"] == "silver"
    assert Path(by_id["sensor-00001"]["cert_path"]).is_file()
    assert Path(by_id["sensor-00001"]["key_path"]).is_file()
    assert [d["id"] for d in _inventory(cli, fleet_dir, "--status", "revoked")["devices"]] == [
        "sensor-00002"
    ]

    result = cli("show", "sensor-00001", "--dir", fleet_dir)
    assert result.exit_code == 0
    assert "spiffe://acme.test/device/sensor-00001" in result.stdout
    assert "clientAuth" in result.stdout

    table = cli("inventory", "--dir", fleet_dir)
    assert table.exit_code == 0 and "3 device(s)" in table.stdout


def test_expiring_within_lists_only_those_that_end_soon(cli: Cli, fleet_dir: Path) -> None:
    assert cli("provision", "--dir", fleet_dir, "-n", "2", "--prefix", "long").exit_code == 0
    assert (
        cli(
            "provision", "--dir", fleet_dir, "-n", "2", "--prefix", "short", "--valid-for", "2d"
        ).exit_code
        == 0
    )
    assert (
        cli(
            "provision",
            "--dir",
            fleet_dir,
            "-n",
            "1",
            "--prefix",
            "gone",
            "--not-before",
            "-2d",
            "--valid-for",
            "1d",
        ).exit_code
        == 0
    )
    soon = _inventory(cli, fleet_dir, "--expiring-within", "7d")
    assert [d["id"] for d in soon["devices"]] == ["short-00001", "short-00002"]
    assert all(d["expiring_soon"] for d in soon["devices"])
    assert [d["id"] for d in _inventory(cli, fleet_dir, "--status", "expired")["devices"]] == [
        "gone-00001"
    ]


def test_export_writes_a_bundle(cli: Cli, fleet_dir: Path, tmp_path: Path) -> None:
    cli("provision", "--dir", fleet_dir)
    result = cli(
        "export",
        "device-00001",
        "--dir",
        fleet_dir,
        "--p12",
        tmp_path / "d.p12",
        "--password",
        "pw",
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "d.p12").stat().st_size > 0


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["provision", "--count", "0"], 2, "invalid count 0: give a positive number of devices"),
        (["provision", "--valid-for", "ninety days"], 2, "invalid duration 'ninety days'"),
        (["provision", "--not-before", "someday"], 2, "invalid instant 'someday'"),
        (["provision", "--key-type", "dsa"], 2, "unknown key type 'dsa'"),
        (["provision", "--tier", "platinum"], 2, "invalid tier 'platinum'"),
        (
            ["provision", "--csr", "missing.csr", "--id", "x-1"],
            1,
            "missing.csr: cannot read the CSR",
        ),
        (["provision", "--csr", "missing.csr"], 1, "--csr needs --id"),
        (["revoke", "nobody-1"], 1, "unknown device 'nobody-1'"),
        (["revoke", "nobody-1", "--reason", "lost"], 2, "unknown revocation reason 'lost'"),
        (["show", "nobody-1"], 1, "unknown device 'nobody-1'"),
        (["inventory", "--status", "sleeping"], 1, "invalid --status 'sleeping'"),
        (["inventory", "--expiring-within", "soon"], 2, "invalid duration 'soon'"),
    ],
)
def test_bad_input_gives_one_line_and_an_exit_code(
    cli: Cli, fleet_dir: Path, args: list[str], code: int, message: str
) -> None:
    result = cli(*args, "--dir", fleet_dir)
    assert result.exit_code == code, result.output
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.output


def test_a_missing_workspace_tells_the_user_to_run_init(tmp_path: Path) -> None:
    # A real process, as a user would see it.
    result = subprocess.run(
        fleet_command("inventory", "--dir", tmp_path / "nothing"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "no fleet workspace here; run 'fleet init --dir" in result.stderr
    assert "Traceback" not in result.stderr
