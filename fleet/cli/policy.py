"""``fleet policy check|explain``: the broker's access policy, checked and explained."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Annotated

import typer

from fleet.cli.support import DirOption, friendly_errors, out
from fleet.kernel.durations import parse_instant
from fleet.kernel.errors import UsageError
from fleet.kernel.identity import identity_from_certificate
from fleet.store.workspace import DEFAULT_DIR, Workspace

policy_app = typer.Typer(
    help="The broker's access policy: rules that grant topics by certificate attributes.",
    no_args_is_help=True,
)

PolicyOption = Annotated[
    Path | None,
    typer.Option("--policy", help="The policy file (default: the tier model the broker uses)."),
]


@policy_app.command("show")
@friendly_errors
def policy_show() -> None:
    """Print the default policy (the tier model), a start for your own file."""
    from broker.policy import DEFAULT_POLICY_YAML

    print(DEFAULT_POLICY_YAML, end="")


@policy_app.command("check")
@friendly_errors
def policy_check(
    path: Annotated[Path, typer.Argument(metavar="FILE", help="The policy file to check.")],
) -> None:
    """Check a policy file: errors name the file, the line and the field."""
    from broker.policy import load_policy

    policy = load_policy(path)
    out.print(f"{path}: {len(policy.rules)} rule(s), OK")
    for rule in policy.rules:
        out.print(f"  line {rule.line}: {rule.name}", highlight=False)


@policy_app.command("explain")
@friendly_errors
def policy_explain(
    device_id: Annotated[str, typer.Argument(metavar="DEVICE", help="A provisioned device.")],
    directory: DirOption = DEFAULT_DIR,
    publish: Annotated[
        str | None, typer.Option("--publish", metavar="TOPIC", help="May it publish here?")
    ] = None,
    subscribe: Annotated[
        str | None,
        typer.Option("--subscribe", metavar="FILTER", help="May it subscribe to this filter?"),
    ] = None,
    policy_file: PolicyOption = None,
    at: Annotated[
        str,
        typer.Option(help="When: now, ISO 8601 (UTC unless it says), or relative (+2h, -1d)."),
    ] = "now",
) -> None:
    """Say which rule lets DEVICE publish or subscribe, or why none does, whether its
    certificate meets the policy's requirements and whether a window admits it AT (exit 1:
    refused)."""
    from cryptography import x509

    from broker.policy import DEFAULT_POLICY, filter_problem, load_policy

    if (publish is None) == (subscribe is None):
        raise UsageError("give one of --publish TOPIC or --subscribe FILTER")
    action, topic = ("publish", publish) if publish is not None else ("subscribe", subscribe)
    assert topic is not None
    problem = filter_problem(topic)
    if problem is not None or (action == "publish" and ("+" in topic or "#" in topic)):
        raise UsageError(f"--{action} {topic!r}: {problem or 'a topic has no wildcards'}")
    policy = load_policy(policy_file) if policy_file is not None else DEFAULT_POLICY
    workspace = Workspace.open(directory)
    workspace.registry.get(device_id)  # an unknown device is named as such
    cert = x509.load_pem_x509_certificate(workspace.paths.device_cert(device_id).read_bytes())
    identity = identity_from_certificate(cert)  # what the broker decides from
    decision = policy.explain(identity, action, topic)
    who = f"{device_id} (tier {identity.tier}, env {identity.env})"
    out.print(f"{who} {action} {topic}: {decision.text()}", highlight=False)
    problem = policy.requirements.problem(cert)
    if problem is not None:  # then it cannot connect at all
        out.print(f"{device_id} is refused at CONNECT (policy_refused): {problem}", highlight=False)
    when = parse_instant(at, now=dt.datetime.now(dt.UTC))
    window = policy.window(identity, when)
    verdict = "may connect" if window.allowed else "is refused at CONNECT (outside_window)"
    out.print(
        f"at {when:%Y-%m-%d %H:%M:%S} UTC {device_id} {verdict}: {window.text}", highlight=False
    )
    if not decision.allowed or problem is not None or not window.allowed:
        raise typer.Exit(1)
