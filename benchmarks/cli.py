"""`sms bench`: registered on the main app."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Adds the `bench` command to `app`."""
