"""How the CLI reports an API error: the envelope's code and message on stderr, exit status 1."""

from __future__ import annotations

import httpx
import typer
from rich.console import Console

err = Console(stderr=True)


def raise_for(resp: httpx.Response) -> None:
    if resp.is_success:
        return
    try:
        error = resp.json()["error"]
        message = f"{error['code']}: {error['message']}"
    except (ValueError, KeyError, TypeError):
        message = resp.text[:200]
    err.print(f"[red]Error {resp.status_code}[/red] {message}")
    raise typer.Exit(1)
