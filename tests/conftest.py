"""Shared fixtures: real workspaces on disk, the real CLI, real openssl."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from fleet import FleetConfig, ProvisionSpec, Workspace, init_workspace, provision_devices
from fleet.cli import app

OPENSSL = shutil.which("openssl")


def require_tool(name: str) -> str:
    """The path of ``name``, or skip the test saying what is missing and how to get it."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (run 'make tools' as root to install it)")
    return path


def openssl(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    binary = require_tool("openssl")
    return subprocess.run([binary, *args], capture_output=True, text=True, check=check, timeout=60)


def openssl_verify(workspace: Workspace, cert: Path, *extra: str, purpose: str) -> str:
    """``openssl verify`` of ``cert`` against the workspace's root and intermediate: its output."""
    paths = workspace.paths
    result = openssl(
        "verify", "-CAfile", str(paths.root_cert), "-untrusted", str(paths.issuing_cert),
        "-purpose", purpose, *extra, str(cert), check=False,
    )  # fmt: skip
    return result.stdout + result.stderr


@pytest.fixture
def cli() -> Callable[..., Result]:
    """Invoke the ``fleet`` CLI in-process; returns click's Result (exit_code, stdout, stderr)."""
    runner = CliRunner()

    def invoke(*args: str | Path) -> Result:
        return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)

    return invoke


def fleet_command(*args: str | Path) -> list[str]:
    """The argv to run the real ``fleet`` CLI in a subprocess."""
    return [sys.executable, "-m", "fleet", *(str(a) for a in args)]


def fleet_killed_at(syscall: str, nth: int, *args: str | Path) -> int:
    """Run ``fleet ARGS`` under strace, killed (SIGKILL) at its ``nth`` ``syscall``: what a
    power cut or kill -9 at that write does. Returns its exit code (0: it made fewer calls)."""
    strace = require_tool("strace")
    command = [
        strace, "-f", "-o", "/dev/null", "-e", f"trace={syscall}",
        "-e", f"inject={syscall}:signal=KILL:when={nth}", *fleet_command(*args),
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=60).returncode


@pytest.fixture
def workspace(tmp_path: Path) -> Workspace:
    """A fresh, empty workspace."""
    init_workspace(tmp_path / "fleet", config=FleetConfig())
    return Workspace.open(tmp_path / "fleet")


@pytest.fixture(scope="session")
def shared_workspace(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    """A workspace with 12 bronze prod sensors and 3 gold dev gateways; tests must not mutate it."""
    root = tmp_path_factory.mktemp("shared") / "fleet"
    init_workspace(root, config=FleetConfig(trust_domain="test.example"))
    workspace = Workspace.open(root)
    provision_devices(workspace, ProvisionSpec(count=12, prefix="sensor"))
    provision_devices(workspace, ProvisionSpec(count=3, prefix="gateway", tier="gold", env="dev"))
    return workspace


@pytest.fixture
def api(workspace: Workspace) -> Iterator[str]:
    """The admin API of a control plane on ``workspace`` (HTTPS, mutual TLS): its base URL."""
    from fleet.controlplane.server import ControlPlane

    plane = ControlPlane(workspace, port=0)
    plane.start()
    plane.serve_admin_api(port=0)
    assert plane.api is not None
    yield f"https://localhost:{plane.api.port}"
    plane.stop()
