"""A provisioning run stopped half way leaves registry and files in agreement (real processes)."""

from __future__ import annotations

import json
import re
import signal
import subprocess

import pytest

from fleet import ProvisionSpec, Workspace, provision_devices
from tests.conftest import fleet_command
from tests.test_provisioning import assert_registry_matches_files

BIG = 20000


def _start_big_run(workspace: Workspace) -> subprocess.Popen[str]:
    """Start a run large enough to be interrupted, and return once it is writing files."""
    process = subprocess.Popen(
        fleet_command(
            "provision", "--dir", workspace.paths.root, "--count", str(BIG), "--prefix", "big"
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    for line in process.stderr:  # progress lines: "provisioning: DONE/TOTAL"
        match = re.match(r"provisioning: (\d+)/(\d+)", line)
        if match and 0 < int(match[1]) < BIG:
            return process
    process.kill()
    pytest.fail(f"the run ended before it could be interrupted (exit {process.wait()})")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_an_interrupted_run_rolls_itself_back(workspace: Workspace, signum: int) -> None:
    provision_devices(workspace, ProvisionSpec(count=3, prefix="keep"))
    process = _start_big_run(workspace)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert re.search(r"provisioning interrupted: rolled back the \d+ unfinished devices", stderr)
    assert workspace.registry.pending_batches() == {}
    assert [r.device_id for r in workspace.registry.devices()] == [
        "keep-00001",
        "keep-00002",
        "keep-00003",
    ]
    assert_registry_matches_files(workspace)


def test_a_killed_run_is_rolled_back_by_the_next_command(workspace: Workspace) -> None:
    provision_devices(workspace, ProvisionSpec(count=2, prefix="keep"))
    process = _start_big_run(workspace)
    process.kill()  # SIGKILL: no handler runs, as in a crash or power loss of the process
    process.communicate(timeout=60)
    with workspace.lock("provision"):  # returns once the dead run's workers are gone too
        pass
    abandoned = workspace.registry.pending_batches()
    assert len(abandoned) == 1, "the killed run left its pending batch behind"
    written = {p.name for p in workspace.paths.devices_dir.iterdir()} - {"keep-00001", "keep-00002"}
    assert written, "the killed run had written device files"
    assert written <= set(next(iter(abandoned.values())))

    listed = subprocess.run(
        fleet_command("inventory", "--dir", workspace.paths.root, "--json"),
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert json.loads(listed.stdout)["count"] == 2
    reopened = Workspace.open(workspace.paths.root)
    assert reopened.registry.pending_batches() == {}
    assert_registry_matches_files(reopened)
