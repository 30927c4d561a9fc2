"""``corral key ...`` and ``corral password``: the account's API keys and its password, through the API."""

from __future__ import annotations

from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.table import Table

from corral.cli import credentials
from corral.cli.errors import raise_for

app = typer.Typer(help="The account's API keys: list, create, revoke.", no_args_is_help=True)
out = Console()
err = Console(stderr=True)


def _client() -> httpx.Client:
    creds = credentials.load()
    if not creds.api_key:
        err.print("Not logged in: run `corral login` or set CORRAL_API_KEY.")
        raise typer.Exit(1)
    return httpx.Client(
        base_url=creds.url, headers={"Authorization": f"Bearer {creds.api_key}"}, timeout=30.0
    )


def _check(resp: httpx.Response) -> Any:
    raise_for(resp)
    return resp.json() if resp.content else None


@app.command("list")
def list_() -> None:
    """List the account's keys (never their tokens), with their last use; * marks the one in use here."""
    table = Table("", "ID", "NAME", "PREFIX", "CREATED", "LAST USED")
    with _client() as client:
        cursor: str | None = None
        while True:
            params: dict[str, str | int] = {"limit": 200}
            if cursor:
                params["cursor"] = cursor
            page = _check(client.get("/v1/api-keys", params=params))
            for key in page["data"]:
                table.add_row(
                    "*" if key["current"] else "",
                    key["id"],
                    key["name"],
                    key["prefix"] or "-",
                    key["created_at"],
                    key["last_used_at"] or "never",
                )
            cursor = page["cursor"]
            if not page["has_more"] or not cursor:
                break
    out.print(table)


@app.command()
def create(name: Annotated[str, typer.Argument(help="What the key is for, e.g. ci")]) -> None:
    """Create a key; its token is printed once (on stdout, alone, for scripts)."""
    with _client() as client:
        key = _check(client.post("/v1/api-keys", json={"name": name}))
    err.print(f"Created {key['id']} ({key['name']}). The token is shown only now:")
    print(key["token"])


@app.command()
def revoke(key_id: Annotated[str, typer.Argument(help="The key's ID (key_...)")]) -> None:
    """Revoke a key at once: the next request with it is refused."""
    with _client() as client:
        _check(client.delete(f"/v1/api-keys/{key_id}"))
    out.print(f"Revoked {key_id}.")


def password(
    current: Annotated[str, typer.Option(prompt=True, hide_input=True, help="The current password")],
    new: Annotated[
        str, typer.Option(prompt=True, hide_input=True, confirmation_prompt=True, help="The new password")
    ],
) -> None:
    """Change the account's password; every other API key of the account is revoked (this login's stays)."""
    with _client() as client:
        done = _check(
            client.post("/v1/users/me/password", json={"current_password": current, "new_password": new})
        )
    out.print(f"Password changed; {done['revoked_keys']} other API key(s) revoked.")
