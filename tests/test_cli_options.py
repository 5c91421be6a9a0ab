"""Options the README shows for 'fleet init' and 'fleet claim create', run as a user runs them
(through the CLI process), each checked for its effect on what gets written."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
from pathlib import Path

from cryptography import x509

from fleet import Workspace
from tests.conftest import fleet_command


def _fleet(*args: str | Path) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(fleet_command(*args), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result


def test_init_validity_and_crl_options_shape_what_is_issued(tmp_path: Path) -> None:
    root = tmp_path / "fleet"
    _fleet("init", "--dir", root, "--device-valid-for", "12h", "--crl-valid-for", "2d",
           "--crl-url", "http://crl.example:8080/crl")  # fmt: skip
    _fleet("provision", "--dir", root, "--count", "1", "--prefix", "dev")
    cert = x509.load_pem_x509_certificate(
        (root / "devices" / "dev-00001" / "cert.pem").read_bytes()
    )
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime == dt.timedelta(hours=12)  # --device-valid-for
    points = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    urls = [name.value for point in points for name in point.full_name or ()]
    assert urls == ["http://crl.example:8080/crl"]  # --crl-url
    crl = x509.load_pem_x509_crl((root / "ca" / "crl.pem").read_bytes())
    assert crl.next_update_utc is not None
    assert crl.next_update_utc - crl.last_update_utc == dt.timedelta(days=2)  # --crl-valid-for


def test_claim_create_allow_ids_and_device_validity(tmp_path: Path) -> None:
    root = tmp_path / "fleet"
    _fleet("init", "--dir", root)
    _fleet("claim", "create", "--dir", root, "--name", "batch-1", "--allow-ids", "sensor-*",
           "--device-valid-for", "1d", "--max-uses", "5")  # fmt: skip
    (claim,) = json.loads(_fleet("claim", "list", "--dir", root, "--json").stdout)["claims"]
    assert (claim["allow_ids"], claim["max_uses"]) == ("sensor-*", 5)
    assert claim["device_valid_for_seconds"] == 86400
    assert Workspace.open(root).registry.claim("batch-1").allow_ids == "sensor-*"
