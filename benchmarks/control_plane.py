"""OCSP answers per second from ``fleet serve`` (HTTP, end to end) beside the bare cost of
building and signing the same answers with ``cryptography`` in one process (the ceiling)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import ocsp

from fleet import FleetConfig, ProvisionSpec, Workspace, init_workspace, provision_devices
from fleet.ocsp import OcspResponder


@dataclass
class OcspFigures:
    requests: int
    bare_per_second: float
    http_per_second: float
    http_clients: int


def _requests(workspace: Workspace, device_ids: list[str]) -> list[bytes]:
    issuer = workspace.ca.issuing_cert
    out = []
    for device_id in device_ids:
        cert = x509.load_pem_x509_certificate(workspace.paths.device_cert(device_id).read_bytes())
        builder = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, hashes.SHA1())
        out.append(builder.build().public_bytes(Encoding.DER))
    return out


def run(base: Path, *, requests: int = 2000, clients: int = 8) -> OcspFigures:
    shutil.rmtree(base, ignore_errors=True)
    init_workspace(base / "ws", config=FleetConfig())
    workspace = Workspace.open(base / "ws")
    ids = provision_devices(workspace, ProvisionSpec(count=200, prefix="o")).device_ids
    bodies = (_requests(workspace, ids) * (requests // len(ids) + 1))[:requests]

    responder = OcspResponder(workspace.registry, [workspace.ca])
    started = time.perf_counter()
    for body in bodies:
        assert responder.answer(body).status == "good"
    bare = requests / (time.perf_counter() - started)

    server = subprocess.Popen(
        [sys.executable, "-m", "fleet", "serve", "--dir", str(base / "ws"), "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        assert server.stdout is not None
        url = server.stdout.readline().split()[1] + "/ocsp"

        def ask(body: bytes) -> bytes:
            request = urllib.request.Request(
                url, data=body, headers={"Content-Type": "application/ocsp-request"}
            )
            with urllib.request.urlopen(request, timeout=30) as response:
                return bytes(response.read())

        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(ask, bodies[:100]))  # warm up
            started = time.perf_counter()
            answers = list(pool.map(ask, bodies))
            http = requests / (time.perf_counter() - started)
        assert all(
            ocsp.load_der_ocsp_response(a).certificate_status is ocsp.OCSPCertStatus.GOOD
            for a in answers[:50]
        )
    finally:
        server.terminate()
        server.wait(10)
    return OcspFigures(requests, bare, http, clients)
