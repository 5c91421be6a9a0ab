"""The package layers: the import graph the closing notes quote, checked on the repository and
on a tree made to hold a cycle (lint-imports, in make lint, enforces the layers themselves)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "import_graph.py"


def _graph(root: Path) -> list[str]:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(root)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_the_repository_has_no_package_cycle() -> None:
    lines = _graph(ROOT)
    assert lines[-1] == "package cycles: 0"
    edges = {tuple(line.split()[:2]) for line in lines[1:-1]}
    assert ("fleet.cli", "fleet.scenario") in edges and ("broker", "fleet.kernel") in edges
    assert not {(a, b) for a, b in edges if a in ("broker", "device") and b in ("broker", "device")}


def test_a_cycle_through_three_packages_is_found(tmp_path: Path) -> None:
    for package, imports in {
        "broker": "import device",
        "device": "from fleet.store import x",
        "fleet": "",
        "fleet/store": "import broker",
    }.items():
        (tmp_path / package).mkdir(parents=True)
        (tmp_path / package / "__init__.py").write_text(imports + "\n")
    assert _graph(tmp_path)[-2:] == ["package cycles: 1", "  broker -> device -> fleet.store"]
