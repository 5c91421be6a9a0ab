"""``make bench``: every benchmark, each beside a reference measured in the same run."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.table import Table

from benchmarks import provisioning


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--dir", type=Path, default=Path("bench-data"), help="scratch directory")
    parser.add_argument("--devices", type=int, default=10_000, help="devices to provision")
    args = parser.parse_args()
    console = Console()

    console.rule("provisioning")
    figures = provisioning.run(args.dir / "provisioning", count=args.devices)
    table = Table(title=f"provisioning {args.devices} devices (EC P-256)")
    for column in ("what", "count", "processes", "seconds", "per second"):
        table.add_column(column, justify="left" if column == "what" else "right")
    for figure in figures:
        table.add_row(
            figure.name,
            f"{figure.count:,}",
            str(figure.processes),
            f"{figure.seconds:.2f}",
            f"{figure.rate:,.0f}",
        )
    console.print(table)
    ours, reference = figures[0], figures[2]
    console.print(
        f"fleet provision reaches {ours.rate / reference.rate:.0%} of the bare-cryptography rate "
        f"on {reference.processes} processes; 10,000 devices in {10_000 / ours.rate:.2f} s "
        "(target: at most 2 s)"
    )


if __name__ == "__main__":
    main()
