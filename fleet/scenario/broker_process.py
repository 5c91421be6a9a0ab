"""The embedded broker of a scenario: ``fleet broker`` in its own process, its events read live.

A separate process gives the broker its own core (devices and broker would otherwise share one
event loop) and makes a restart a real restart: everything the broker knows after it comes
from the workspace on disk. The broker writes one JSON line per event on stderr
(``--log-connections`` adds admissions and session ends); each line becomes an event stamped
with the scenario clock, and every other line is kept as log evidence.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker import BrokerError, broker_command, listening_port

_START_TIMEOUT = 30.0
_STOP_TIMEOUT = 20.0


@dataclass(frozen=True, slots=True)
class BrokerOptions:
    env: str | None = None
    revocation_policy: str = "fail-closed"
    crl_url: str | None = None  # fetch the CRL from the control plane (every 200 ms)
    policy: Path | None = None  # the access policy file the broker reads (and watches)
    groups: tuple[str, ...] = ()  # the key-exchange groups it accepts (--groups)


@dataclass
class BrokerLog:
    """What the broker said: structured events and other log lines, stamped in seconds."""

    events: list[dict[str, Any]] = field(default_factory=list)
    lines: list[tuple[float, str]] = field(default_factory=list)


class EmbeddedBroker:
    """Starts, restarts and stops ``fleet broker`` on one port for a whole scenario."""

    def __init__(
        self, workspace: Path, options: BrokerOptions, *, clock: Callable[[], float]
    ) -> None:
        self.workspace = workspace
        self.options = options
        self.port = 0
        self.log = BrokerLog()
        self._clock = clock
        self._process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None

    def _command(self) -> list[str]:
        options = ["--log-connections", "--revocation-policy", self.options.revocation_policy]
        if self.options.env is not None:
            options += ["--env", self.options.env]
        if self.options.crl_url is not None:
            options += ["--crl-url", self.options.crl_url, "--crl-url-every", "0.2s"]
        if self.options.policy is not None:
            options += ["--policy", str(self.options.policy)]
        if self.options.groups:
            options += ["--groups", ",".join(self.options.groups)]
        return broker_command(self.workspace, *options, port=self.port)

    async def start(self) -> None:
        process = await asyncio.create_subprocess_exec(
            *self._command(),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        self._process = process
        assert process.stdout is not None and process.stderr is not None
        self._reader = asyncio.create_task(self._read_events(process.stderr))
        try:
            line = await asyncio.wait_for(process.stdout.readline(), _START_TIMEOUT)
        except TimeoutError:
            line = b""
        text = line.decode().strip()
        try:
            self.port = listening_port(text)
        except BrokerError:
            await self.stop()
            said = "; ".join(line for _, line in self.log.lines[-5:]) or "nothing"
            raise BrokerError(f"the embedded broker did not start; it said: {said}") from None
        self.log.lines.append((self._clock(), text))

    async def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), _STOP_TIMEOUT)
            except TimeoutError:
                process.kill()
                await process.wait()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader

    async def restart(self, options: BrokerOptions, *, down_for: float = 0.0) -> None:
        """Stop, stay down ``down_for`` seconds, start on the same port with ``options``."""
        await self.stop()
        self.log.lines.append((self._clock(), f"broker stopped; restarting with {options}"))
        if down_for:
            await asyncio.sleep(down_for)
        self.options = options
        await self.start()

    async def _read_events(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            text = line.decode(errors="replace").rstrip()
            at = self._clock()
            try:
                record = json.loads(text)
            except ValueError:
                record = None
            if isinstance(record, dict) and "event" in record:
                record["at"] = at
                self.log.events.append(record)
            elif text:
                self.log.lines.append((at, text))
