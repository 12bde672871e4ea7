"""Client commands of `sms` (login, rooms, members, send, history, chat...). Registered on the main app."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Adds the client commands to `app`."""
