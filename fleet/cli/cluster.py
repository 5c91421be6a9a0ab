"""``fleet cluster certs`` and the Dask client behind ``fleet swarm --scheduler``."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from fleet.cli.support import DirOption, friendly_errors, out
from fleet.kernel.durations import parse_positive_duration
from fleet.kernel.errors import UsageError
from fleet.store.workspace import DEFAULT_DIR, Workspace

cluster_app = typer.Typer(
    help="Run the swarm on a Dask cluster: certificates for its mutual-TLS comms.",
    no_args_is_help=True,
)

_SCHEDULER = re.compile(r"^tls://(\[[^\]]+\]|[^:/\s]+):\d{1,5}$")
CONNECT_TIMEOUT = "20s"


@cluster_app.command("certs")
@friendly_errors
def cluster_certs(
    directory: DirOption = DEFAULT_DIR,
    out_dir: Annotated[
        Path, typer.Option("--out", help="Where to write ca.pem and the role certificates.")
    ] = Path("cluster-certs"),
    host: Annotated[
        list[str] | None,
        typer.Option(help="A host name or IP of the cluster for the SANs (repeatable)."),
    ] = None,
    valid_for: Annotated[str, typer.Option(help="Validity, e.g. 7d, 12h.")] = "7d",
) -> None:
    """Issue the scheduler's, workers' and client's certificates from the fleet CA."""
    from fleet.store.cluster_certs import ROLES, issue_cluster_certificates

    files = issue_cluster_certificates(
        Workspace.open(directory),
        out_dir,
        hosts=tuple(host or ("localhost", "127.0.0.1")),
        valid_for=parse_positive_duration(valid_for),
    )
    out.print(f"wrote {files.ca} and {', '.join(ROLES)} certificates in {out_dir} (keys 0600)")
    tls = f"--tls-ca-file {files.ca}"
    out.print(
        f"  dask scheduler {tls} --tls-cert {files.cert('scheduler')} "
        f"--tls-key {files.key('scheduler')}",
        highlight=False,
        soft_wrap=True,
    )
    out.print(
        f"  dask worker tls://SCHEDULER:8786 {tls} --tls-cert {files.cert('worker')} "
        f"--tls-key {files.key('worker')}",
        highlight=False,
        soft_wrap=True,
    )
    out.print(
        f"  fleet swarm --scheduler tls://SCHEDULER:8786 --cluster-certs {out_dir} ...",
        highlight=False,
        soft_wrap=True,
    )


@contextmanager
def cluster_client(scheduler: str, certs: Path) -> Iterator[Any]:
    """A Dask client of ``scheduler`` (``tls://HOST:PORT``, mutual TLS with ``certs``)."""
    from distributed import Client

    from fleet.store.cluster_certs import ClusterCertificates

    if not _SCHEDULER.fullmatch(scheduler):
        raise UsageError(
            f"invalid --scheduler {scheduler!r}: give tls://HOST:PORT (device keys travel to the "
            "workers, so only a mutual-TLS scheduler is accepted)"
        )
    files = ClusterCertificates(certs)
    missing = files.missing()
    if missing:
        raise UsageError(
            f"--cluster-certs {certs}: missing {', '.join(p.name for p in missing)}; "
            "run 'fleet cluster certs --out DIR' first"
        )
    try:
        client = Client(scheduler, security=files.security(), timeout=CONNECT_TIMEOUT)
    except (OSError, TimeoutError) as exc:
        raise UsageError(f"cannot reach the Dask scheduler {scheduler}: {exc}") from None
    try:
        yield client
    finally:
        client.close()
