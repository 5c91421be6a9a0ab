"""The ``fleet`` command: one module per command area over the layers below."""

from fleet.cli.app import app, main

__all__ = ["app", "main"]
