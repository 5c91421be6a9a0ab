"""Schemathesis against the live admin API: whatever the schema lets a client send (and what it
does not), the answer is never a 500, and every refusal is the documented error object."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from fleet import FleetConfig, ProvisionSpec, Workspace, init_workspace, provision_devices
from fleet.controlplane.admin_openapi import OPENAPI
from fleet.controlplane.server import ControlPlane

schema = schemathesis.openapi.from_dict(OPENAPI)


@dataclass
class LiveApi:
    url: str
    ca: Path
    cert: tuple[str, str]


@pytest.fixture(scope="module")
def live_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveApi]:
    root = tmp_path_factory.mktemp("schema") / "fleet"
    init_workspace(root, config=FleetConfig())
    workspace = Workspace.open(root)
    provision_devices(workspace, ProvisionSpec(count=3, prefix="dev"))
    plane = ControlPlane(workspace, port=0)
    plane.start()
    plane.serve_admin_api(port=0)
    assert plane.api is not None
    paths = workspace.paths
    yield LiveApi(
        f"https://localhost:{plane.api.port}",
        paths.root_cert,
        (str(paths.admin_cert), str(paths.admin_key)),
    )
    plane.stop()


@pytest.mark.slow
@schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_request_gets_a_server_error(case: schemathesis.Case, live_api: LiveApi) -> None:  # type: ignore[type-arg]
    response = case.call(
        base_url=live_api.url,
        verify=str(live_api.ca),
        cert=live_api.cert,
        timeout=60,  # provisioning a batch on a loaded 2-core machine can take more than 10 s
    )
    assert response.status_code < 500, (case.as_curl_command(), response.text)
    if response.status_code >= 400:
        body = response.json()
        assert body["status"] == response.status_code and body["error"], body
