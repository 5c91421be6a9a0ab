"""``fleet broker`` in a process of its own: its command line, and knowing when it listens.

One launcher for every caller that needs a broker process (the swarm's embedded broker, the
scenario engine, the tests): it builds the command, reads what the broker announces on stdout
(``listening on mqtts://HOST:PORT``, then ``metrics on URL`` when metrics are served) and stops
it with SIGTERM. The scenario engine drives the same command and parser from asyncio.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from broker.tls import BrokerError

LISTENING = "listening on "
METRICS = "metrics on "
_STOP_TIMEOUT = 20.0


def broker_command(
    workspace: Path, *options: str, port: int = 0, metrics_port: int = -1
) -> list[str]:
    """``python -m fleet broker --dir WORKSPACE --port PORT --metrics-port M OPTIONS…``.

    ``port`` 0 lets the system choose (read it from :func:`listening_port`); ``metrics_port``
    -1 serves no metrics, 0 any free port.
    """
    return [
        sys.executable, "-m", "fleet", "broker", "--dir", str(workspace),
        "--port", str(port), "--metrics-port", str(metrics_port), *options,
    ]  # fmt: skip


def listening_port(line: str) -> int:
    """The port of ``listening on mqtts://HOST:PORT``; anything else means it did not start."""
    text = line.strip()
    port = text.rsplit(":", 1)[-1]
    if not text.startswith(LISTENING + "mqtts://") or not port.isascii() or not port.isdigit():
        raise BrokerError(
            f"the broker did not start (it said {text or 'nothing'!r}); "
            "run 'fleet broker --dir DIR' to see why"
        )
    return int(port)


def metrics_url(line: str) -> str:
    """The URL of ``metrics on http://HOST:PORT/metrics``."""
    text = line.strip()
    if not text.startswith(METRICS):
        raise BrokerError(f"the broker announced no metrics endpoint (it said {text!r})")
    return text[len(METRICS) :]


@dataclass(frozen=True, slots=True)
class LaunchedBroker:
    process: subprocess.Popen[str]
    port: int
    metrics_url: str | None  # when launched with metrics

    @property
    def target(self) -> str:
        return f"mqtts://127.0.0.1:{self.port}"


@contextmanager
def launched_broker(
    workspace: Path,
    *options: str,
    metrics: bool = False,
    stderr: int | IO[str] | None = subprocess.DEVNULL,
) -> Iterator[LaunchedBroker]:
    """Run ``fleet broker`` on a free port until the block ends, then SIGTERM it.

    ``metrics``: serve Prometheus metrics on a free port too. The exit status is in
    ``process.returncode`` after the block (0: it stopped cleanly).
    """
    command = broker_command(workspace, *options, metrics_port=0 if metrics else -1)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True)
    try:
        assert process.stdout is not None
        port = listening_port(process.stdout.readline())
        url = metrics_url(process.stdout.readline()) if metrics else None
        yield LaunchedBroker(process, port, url)
    finally:
        process.terminate()
        try:
            process.wait(_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
