"""Handshake load testing: connection churn with a distinct device certificate per connection.

Each connection is TCP connect, mutual-TLS handshake, MQTT CONNECT/CONNACK and DISCONNECT,
timed phase by phase, on the simulated devices' own TLS stack (pyOpenSSL on OpenSSL 4.0: any
key type, ML-DSA included, and the key-exchange groups of ``groups``); the bytes each
handshake put on the wire, its group and the broker's signature scheme are counted too. Shards run in separate processes (one per core by default), each with
its share of the concurrency, and their statistics (HDR histograms, outcome counts, a
per-second completion series, CPU time) are merged. With ``resume`` every identity first makes
one full handshake to obtain a TLS session, then the timed run resumes those sessions.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import re
import resource
import shutil
import ssl
import subprocess
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from hdrh.histogram import HdrHistogram
from OpenSSL import SSL
from OpenSSL._util import lib as _lib

from device.connect import TlsConnection, open_device_tls, wait_ready
from device.outcomes import CONNACK_V311_REASONS, classify_tls_failure
from fleet.kernel.errors import FleetError
from fleet.kernel.tls import DeviceTls, device_tls

PHASES = ("tcp", "tls", "mqtt", "total")
_MAX_MICROSECONDS = 60_000_000
_CONNACK_ACCEPTED = b"\x20\x02\x00\x00"
_DISCONNECT = b"\xe0\x00"


class BenchError(FleetError):
    """The handshake bench cannot run as asked."""


@dataclass(frozen=True, slots=True)
class Identity:
    """One certificate to connect with, and what the broker should make of it."""

    device_id: str
    cert: Path
    key: Path
    expected: str = "accepted"  # or revoked, expired, rogue-ca


@dataclass(frozen=True, slots=True)
class BenchSettings:
    host: str
    port: int
    trust_anchor: Path
    server_name: str | None = "localhost"
    concurrency: int = 100
    tls_version: str | None = None  # "1.2", "1.3" or None (negotiate, 1.2 minimum)
    resume: bool = False
    timeout: float = 10.0
    groups: tuple[str, ...] = ()  # key-exchange groups offered; (): P-256, as devices do
    key_type: str = ""  # of the identities, for the report


def _connect_packet(client_id: str) -> bytes:
    identifier = client_id.encode()
    body = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(identifier).to_bytes(2, "big") + identifier
    return b"\x10" + bytes([len(body)]) + body  # ids are short: one length byte suffices


def _histogram() -> HdrHistogram:
    return HdrHistogram(1, _MAX_MICROSECONDS, 3)


@dataclass
class ShardResult:
    """One shard's run, picklable: counts, encoded histograms, completions per second."""

    attempts: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)  # "accepted", or outcome: detail
    by_expectation: Counter[str] = field(default_factory=Counter)  # "revoked -> rejected ..."
    histograms: dict[str, bytes] = field(default_factory=dict)
    completions: list[float] = field(default_factory=list)  # wall-clock seconds of each end
    started: float = 0.0
    ended: float = 0.0
    cpu_seconds: float = 0.0
    resumed: int = 0  # connections that resumed a TLS session
    handshake_bytes: int = 0  # TLS records both ways of the accepted connections' handshakes
    groups: Counter[str] = field(default_factory=Counter)  # of the accepted connections
    broker_signatures: Counter[str] = field(default_factory=Counter)


def _credentials(settings: BenchSettings, identity: Identity) -> DeviceTls:
    return device_tls(
        settings.trust_anchor,
        identity.cert,
        identity.key,
        device_id=identity.device_id,
        groups=settings.groups,
        tls_version=settings.tls_version,
    )


async def _send(loop: asyncio.AbstractEventLoop, sock: TlsConnection, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            sent = sock.send(bytes(view))
            view = view[sent:]
        except (ssl.SSLWantWriteError, BlockingIOError):
            await wait_ready(loop, sock, readable=False)
        except ssl.SSLWantReadError:
            await wait_ready(loop, sock, readable=True)


async def _receive(loop: asyncio.AbstractEventLoop, sock: TlsConnection, size: int) -> bytes:
    data = b""
    while len(data) < size:
        try:
            chunk = sock.recv(size - len(data))
        except (ssl.SSLWantReadError, BlockingIOError):
            await wait_ready(loop, sock, readable=True)
            continue
        if not chunk:
            raise ConnectionResetError("connection closed by the broker")
        data += chunk
    return data


class _Shard:
    """Runs one process's share of the connections on its own event loop."""

    def __init__(self, settings: BenchSettings, identities: list[Identity]) -> None:
        self.settings = settings
        self.identities = identities
        self.credentials = [_credentials(settings, identity) for identity in identities]
        self.sessions: list[SSL.Session | None] = [None] * len(identities)
        self.result = ShardResult()
        self.histograms = {phase: _histogram() for phase in PHASES}

    async def run(self, start_at: float) -> list[ShardResult]:
        """One timed pass of full handshakes; with ``resume`` a second that resumes them."""
        loop = asyncio.get_running_loop()
        await asyncio.sleep(max(0.0, start_at - time.time()))
        passes = [await self._timed_pass(loop)]
        if self.settings.resume:
            passes.append(await self._timed_pass(loop))
        return passes

    async def _timed_pass(self, loop: asyncio.AbstractEventLoop) -> ShardResult:
        self.result = ShardResult()
        self.histograms = {phase: _histogram() for phase in PHASES}
        indexes = iter(range(len(self.identities)))

        async def worker() -> None:
            for index in indexes:
                await self._one(loop, index)

        cpu_before = _cpu_seconds()
        self.result.started = time.time()
        await asyncio.gather(*(worker() for _ in range(max(1, self.settings.concurrency))))
        self.result.ended = time.time()
        self.result.cpu_seconds = _cpu_seconds() - cpu_before
        self.result.histograms = {p: h.encode() for p, h in self.histograms.items()}
        return self.result

    async def _one(self, loop: asyncio.AbstractEventLoop, index: int) -> None:
        s, identity = self.settings, self.identities[index]
        outcome, phases, resumed = "accepted", None, False
        try:
            tls = await open_device_tls(
                s.host,
                s.port,
                self.credentials[index],
                server_name=s.server_name,
                timeout=s.timeout,
                session=self.sessions[index],
                no_delay=True,  # a latency measurement: no Nagle (see open_device_tls)
            )
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            failure = classify_tls_failure(exc)
            outcome = f"{failure.outcome.value}: {failure.reason}"
        else:
            sock = tls.tls
            try:
                started = time.perf_counter()
                async with asyncio.timeout(s.timeout):
                    await _send(loop, sock, _connect_packet(identity.device_id))
                    connack = await _receive(loop, sock, 4)
                    if connack != _CONNACK_ACCEPTED:
                        code = connack[-1]
                        named = CONNACK_V311_REASONS.get(code, f"code {code}")
                        outcome = f"connack_refused: {named}"
                    else:
                        mqtt_seconds = time.perf_counter() - started
                        phases = (tls.tcp_seconds, tls.tls_seconds, mqtt_seconds)
                        resumed = bool(_lib.SSL_session_reused(sock.connection._ssl))
                        if s.resume and self.sessions[index] is None:
                            self.sessions[index] = sock.connection.get_session()
                        self._note_handshake(tls.group, tls.broker_signature, tls.handshake_bytes)
                        await _send(loop, sock, _DISCONNECT)
            except (OSError, ssl.SSLError, TimeoutError) as exc:
                failure = classify_tls_failure(exc)
                outcome = f"{failure.outcome.value}: {failure.reason}"
            finally:
                sock.close()
        self._record(identity, outcome, phases, resumed)

    def _note_handshake(self, group: str | None, signature: str | None, size: int) -> None:
        self.result.handshake_bytes += size
        self.result.groups[group or "-"] += 1
        self.result.broker_signatures[signature or "-"] += 1

    def _record(
        self,
        identity: Identity,
        outcome: str,
        phases: tuple[float, float, float] | None,
        resumed: bool,
    ) -> None:
        result = self.result
        result.attempts += 1
        result.outcomes[outcome] += 1
        result.completions.append(time.time())
        verdict = "accepted" if outcome == "accepted" else "rejected"
        result.by_expectation[f"{identity.expected} -> {verdict}"] += 1
        result.resumed += resumed
        if phases is not None:
            for phase, seconds in zip(PHASES, (*phases, sum(phases)), strict=True):
                self.histograms[phase].record_value(max(1, int(seconds * 1_000_000)))


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float:
    """User and system CPU seconds process ``pid`` has used so far (Linux's /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def run_bench_shard(
    settings: BenchSettings, identities: list[Identity], start_at: float
) -> list[ShardResult]:
    """One shard's churn from ``start_at`` (wall clock); one result per pass (two with resume)."""
    try:
        import uvloop

        return uvloop.run(_Shard(settings, identities).run(start_at))
    except ImportError:
        return asyncio.run(_Shard(settings, identities).run(start_at))


@dataclass
class BenchResult:
    """The merged run: what ``fleet bench handshake`` prints and writes to report.json."""

    settings: dict[str, Any]
    attempts: int
    outcomes: dict[str, int]
    by_expectation: dict[str, int]
    seconds: float
    rate: float  # accepted connections per second (the full churn: TLS + CONNECT + DISCONNECT)
    attempt_rate: float
    latency_ms: dict[str, dict[str, float]]  # phase -> p50/p90/p99/p99.9/max
    histogram_ms: dict[str, list[tuple[float, int]]]  # phase -> (value, count) buckets
    per_second: list[int]  # completed attempts in each second of the run
    cpu_seconds_per_handshake: float
    processes: int
    resumed: int
    full: dict[str, Any] | None = None  # --resume: rate and latency of the full handshakes
    bytes_per_handshake: float = float("nan")  # TLS bytes both ways, accepted connections
    groups: dict[str, int] = field(default_factory=dict)  # negotiated, accepted connections
    broker_signatures: dict[str, int] = field(default_factory=dict)
    broker_cpu_seconds_per_handshake: float | None = None  # the embedded broker's, per attempt

    @property
    def accepted(self) -> int:
        return self.outcomes.get("accepted", 0)


def _percentiles(histogram: HdrHistogram) -> dict[str, float]:
    if histogram.get_total_count() == 0:
        return {key: float("nan") for key in ("p50", "p90", "p99", "p99.9", "max")}
    return {
        "p50": histogram.get_value_at_percentile(50) / 1000,
        "p90": histogram.get_value_at_percentile(90) / 1000,
        "p99": histogram.get_value_at_percentile(99) / 1000,
        "p99.9": histogram.get_value_at_percentile(99.9) / 1000,
        "max": histogram.get_max_value() / 1000,
    }


def _buckets(histogram: HdrHistogram) -> list[tuple[float, int]]:
    return [
        (item.value_iterated_to / 1000, item.count_added_in_this_iter_step)
        for item in histogram.get_recorded_iterator()
    ]


def merge(shards: list[ShardResult], settings: BenchSettings, processes: int) -> BenchResult:
    histograms = {phase: _histogram() for phase in PHASES}
    outcomes: Counter[str] = Counter()
    expectations: Counter[str] = Counter()
    groups: Counter[str] = Counter()
    signatures: Counter[str] = Counter()
    for shard in shards:
        outcomes.update(shard.outcomes)
        expectations.update(shard.by_expectation)
        groups.update(shard.groups)
        signatures.update(shard.broker_signatures)
        for phase, encoded in shard.histograms.items():
            histograms[phase].add(HdrHistogram.decode(encoded))
    started = min(s.started for s in shards)
    ended = max(s.ended for s in shards)
    seconds = max(ended - started, 1e-9)
    per_second = Counter(int(t - started) for s in shards for t in s.completions)
    attempts = sum(s.attempts for s in shards)
    return BenchResult(
        settings={
            "target": f"mqtts://{settings.host}:{settings.port}",
            "concurrency": settings.concurrency,
            "tls": settings.tls_version or "negotiated",
            "resume": settings.resume,
            "key_type": settings.key_type,
            "groups": ",".join(settings.groups) or "P-256",
        },
        attempts=attempts,
        outcomes=dict(outcomes.most_common()),
        by_expectation=dict(sorted(expectations.items())),
        seconds=seconds,
        rate=outcomes.get("accepted", 0) / seconds,
        attempt_rate=attempts / seconds,
        latency_ms={phase: _percentiles(h) for phase, h in histograms.items()},
        histogram_ms={phase: _buckets(h) for phase, h in histograms.items()},
        per_second=[per_second.get(i, 0) for i in range(max(per_second) + 1)] if per_second else [],
        cpu_seconds_per_handshake=sum(s.cpu_seconds for s in shards) / max(1, attempts),
        processes=processes,
        resumed=sum(s.resumed for s in shards),
        bytes_per_handshake=(
            sum(s.handshake_bytes for s in shards) / sum(groups.values())
            if groups
            else float("nan")
        ),
        groups=dict(groups.most_common()),
        broker_signatures=dict(signatures.most_common()),
    )


def run_handshake_bench(
    settings: BenchSettings, identities: list[Identity], *, processes: int | None = None
) -> BenchResult:
    """Connect once with every identity (``concurrency`` in flight overall); merged result."""
    if not identities:
        raise BenchError("no identities to connect with")
    count = max(1, min(processes or os.cpu_count() or 1, len(identities)))
    per_shard = max(1, settings.concurrency // count)
    shards = [identities[i::count] for i in range(count)]
    shard_settings = replace(settings, concurrency=per_shard)
    start_at = time.time() + 1.0 + len(identities) / max(1, count) * 0.0005  # contexts first
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=count, mp_context=context) as pool:
        futures = [pool.submit(run_bench_shard, shard_settings, s, start_at) for s in shards]
        passes = [future.result() for future in futures]
    return bench_result(passes, settings, count)


def bench_result(
    passes: list[list[ShardResult]], settings: BenchSettings, shards: int
) -> BenchResult:
    """The merged result of every shard's passes (the last pass; with resume, the first too)."""
    result = merge([p[-1] for p in passes], settings, shards)
    if settings.resume:
        full = merge([p[0] for p in passes], replace(settings, resume=False), shards)
        result.full = {
            "rate": full.rate,
            "accepted": full.accepted,
            "seconds": full.seconds,
            "latency_ms": full.latency_ms,
            "cpu_seconds_per_handshake": full.cpu_seconds_per_handshake,
        }
    return result


@dataclass(frozen=True)
class STimeResult:
    """What ``openssl s_time -new`` achieved: handshakes per second, and its own CPU (user and
    system, all processes) per handshake."""

    rate: float
    cpu_per_handshake: float


def openssl_s_time_rate(
    settings: BenchSettings, identity: Identity, *, seconds: float, processes: int
) -> float | None:
    """Handshakes per second of ``openssl s_time -new`` with a client certificate (one per process).

    s_time does the TLS handshake only (no MQTT): a ceiling for any client on this machine.
    None when openssl is missing or says something unexpected.
    """
    result = openssl_s_time(settings, identity, seconds=seconds, processes=processes)
    return result.rate if result is not None else None


def openssl_s_time(
    settings: BenchSettings, identity: Identity, *, seconds: float, processes: int
) -> STimeResult | None:
    """:func:`openssl_s_time_rate`, with the CPU the s_time processes used per handshake."""
    binary = shutil.which("openssl")
    if binary is None:
        return None
    command = [
        binary, "s_time", "-connect", f"{settings.host}:{settings.port}", "-new",
        "-time", str(max(1, round(seconds))), "-CAfile", str(settings.trust_anchor),
        "-cert", str(identity.cert), "-key", str(identity.key),
    ]  # fmt: skip
    if settings.tls_version in ("1.2", "1.3"):
        command.append("-tls1_2" if settings.tls_version == "1.2" else "-tls1_3")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    runs = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(processes)
    ]
    total, handshakes = 0.0, 0
    for run in runs:
        output, _ = run.communicate(timeout=seconds + 60)
        match = re.search(r"(\d+) connections in (\d+(?:\.\d+)?) real seconds", output)
        if match is None:
            return None
        handshakes += int(match[1])
        total += int(match[1]) / float(match[2])
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return STimeResult(total, cpu / max(1, handshakes))
