"""``fleet alerts check``: the alert rules ``fleet serve --alerts`` evaluates, checked."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fleet.cli.support import friendly_errors, out

alerts_app = typer.Typer(
    help="Alert rules for 'fleet serve --alerts': expiry, refused certificates, spikes, CRL.",
    no_args_is_help=True,
)


@alerts_app.command("check")
@friendly_errors
def alerts_check(
    path: Annotated[Path, typer.Argument(metavar="FILE", help="The alert rules file to check.")],
) -> None:
    """Check an alert rules file: errors name the file, the line and the field."""
    from fleet.controlplane.alert_rules import load_alert_rules

    rules = load_alert_rules(path)
    delivery = rules.delivery
    channels = [
        name
        for name, on in (
            ("log", delivery.log),
            (f"mqtt {delivery.mqtt_topic}/<rule>", delivery.mqtt_topic),
            (f"webhook {delivery.webhook}", delivery.webhook),
        )
        if on
    ]
    out.print(
        f"{path}: {len(rules.rules)} rule(s), delivered to {', '.join(channels) or 'nothing'}"
    )
    for rule in rules.rules:
        out.print(
            f"  line {rule.line}: {rule.name} ({rule.kind}, {rule.severity})", highlight=False
        )
