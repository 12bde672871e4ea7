"""Operator commands of `sms` (nodes list/remove, bootstrap peers). Registered on the main app."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Adds the operator commands to `app`."""
