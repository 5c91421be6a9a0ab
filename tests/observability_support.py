"""Test helpers for the dashboard and the alerts: ``fleet serve`` as a process, JSON over HTTP."""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from tests.conftest import fleet_command


@dataclass
class ServedControlPlane:
    process: subprocess.Popen[str]
    url: str  # the CRL/OCSP/metrics server
    dashboard: str | None


@contextlib.contextmanager
def served_control_plane(
    root: Path, *options: str | Path, stderr: IO[str] | None = None
) -> Iterator[ServedControlPlane]:
    """``fleet serve --dir ROOT --port 0 OPTIONS`` until the block ends; reads what it announces."""
    process = subprocess.Popen(
        fleet_command("serve", "--dir", root, "--port", "0", *options),
        stdout=subprocess.PIPE, stderr=stderr or subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        first = process.stdout.readline()
        assert first.startswith("serving http://"), first
        url = first.split()[1]
        dashboard = None
        if "--dashboard-port" in [str(o) for o in options]:
            for line in process.stdout:
                if line.startswith("dashboard on "):
                    dashboard = line.split()[2]
                    break
        yield ServedControlPlane(process, url, dashboard)
    finally:
        stop_process(process)


def stop_process(process: subprocess.Popen[str]) -> None:
    """SIGTERM, and SIGKILL if it has not ended within 20 s."""
    if process.poll() is None:
        process.terminate()
    try:
        process.wait(20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def connected_swarm(swarm: subprocess.Popen[str], web: int, devices: int) -> list[str]:
    """Read ``fleet swarm --web``'s output until its page is up, then follow the page until
    ``devices`` are connected; returns what the swarm printed so far."""
    assert swarm.stdout is not None
    said = []
    for line in swarm.stdout:
        said.append(line)
        if line.startswith("web view on "):
            break
    wait_for_snapshot(
        f"http://127.0.0.1:{web}", "swarm",
        lambda s: (s["latest"] or {}).get("connected") == devices, timeout=60,
    )  # fmt: skip
    return said


def get_json(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def wait_for_snapshot(
    dashboard: str, page: str, predicate: Callable[[dict[str, Any]], Any], timeout: float
) -> dict[str, Any]:
    """Follow the page's server-sent events until a snapshot satisfies ``predicate``."""
    deadline = time.monotonic() + timeout
    last: dict[str, Any] = {}
    with urllib.request.urlopen(f"{dashboard}/api/stream/{page}", timeout=timeout) as stream:
        for raw in stream:
            if raw.startswith(b"data: "):
                last = json.loads(raw[len(b"data: ") :])
                if predicate(last):
                    return last
            if time.monotonic() > deadline:
                break
    raise AssertionError(f"no {page} snapshot as expected within {timeout:g} s; last: {last}")
