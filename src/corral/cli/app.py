"""``corral``: run the server, log in, and (later) drive sandboxes."""

from __future__ import annotations

import time
from typing import Annotated

import httpx
import typer
from rich.console import Console

from corral import __version__
from corral.cli import credentials
from corral.cli.errors import raise_for

app = typer.Typer(help="Corral: sandboxes for AI agents and untrusted code.", no_args_is_help=True)
err = Console(stderr=True)
out = Console()


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on")] = 8000,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error")] = "info",
) -> None:
    """Run the API server (with the embedded SQLite store unless CORRAL_DATABASE_URL says otherwise)."""
    import logging
    import os

    from corral.api.app import create_app
    from corral.cli import logs, serving

    logging.basicConfig(level=log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    logs.install_on_root()  # no API key or proxy ticket in any log line
    os.environ.setdefault("CORRAL_SSH_LISTEN", host)  # SSH where the API is, unless told otherwise
    proxy_socket = serving.proxy_listener(host)  # the guest proxy's own origin (CORRAL_PROXY_PORT)
    with image_progress() as progress:
        application = create_app(progress=progress)
    # X-Forwarded-* only from the proxies the operator names (CORRAL_TRUSTED_PROXIES), never by default:
    # uvicorn's own default believes any client on loopback, which let one rotate its rate-limit address
    trusted = list(application.state.corral.settings.trusted_proxies)
    serving.run(  # the API, and the guest proxy origin on proxy_socket
        application,
        proxy_socket,
        host=host,
        port=port,
        log_level=log_level,
        server_header=False,
        proxy_headers=bool(trusted),
        forwarded_allow_ips=trusted or [],
    )


@app.command()
def egress(
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error")] = "info",
) -> None:
    """Run the egress proxy and resolver. `corral serve` starts this itself, inside the gateway namespace."""
    import logging
    import os
    from pathlib import Path

    from corral.config import Settings
    from corral.egress.main import run

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("mitmproxy").setLevel(max(logging.WARNING, logging.getLogger().level))
    ready = os.environ.get("CORRAL_EGRESS_READY_FILE")
    run(Settings.from_env(), Path(ready) if ready else None)


@app.command()
def login(
    url: Annotated[str | None, typer.Option(help="The Corral server (default: CORRAL_URL or saved)")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for approval")] = 900.0,
    interval: Annotated[float, typer.Option(help="Seconds between polls")] = 2.0,
) -> None:
    """Log in with a device code: approve it in a browser (or with another signed-in client)."""
    base = (url or credentials.load().url).rstrip("/")
    with httpx.Client(base_url=base, timeout=30.0) as client:
        resp = client.post("/v1/auth/device/code")
        raise_for(resp)
        data = resp.json()["data"]
        code = data["code"]
        err.print(f"Open [bold]{data['verification_uri']}?code={code}[/bold] and approve the code:")
        out.print(code)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            time.sleep(interval)
            resp = client.get("/v1/auth/device/poll", params={"code": code})
            if resp.status_code == 429:
                time.sleep(float(resp.headers.get("Retry-After", "1")))
                continue
            raise_for(resp)
            poll = resp.json()["data"]
            if poll["status"] == "authorized":
                path = credentials.save(base, poll["token"])
                err.print(f"Logged in to {base}. Key saved in {path}")
                return
            if poll["status"] == "expired":
                err.print("The code expired before it was approved. Run `corral login` again.")
                raise typer.Exit(1)
        err.print("Timed out waiting for approval.")
        raise typer.Exit(1)


@app.command()
def whoami() -> None:
    """Show the account the saved login (or CORRAL_API_KEY) belongs to."""
    creds = credentials.load()
    if not creds.api_key:
        err.print("Not logged in: run `corral login` or set CORRAL_API_KEY.")
        raise typer.Exit(1)
    with httpx.Client(base_url=creds.url, timeout=30.0) as client:
        resp = client.get("/v1/users/me", headers={"Authorization": f"Bearer {creds.api_key}"})
    raise_for(resp)
    user = resp.json()
    out.print(f"{user['email']} ({user['id']}) on {creds.url}")


@app.command()
def version() -> None:
    """Print Corral's version."""
    out.print(__version__)


from corral.cli import images as _images  # noqa: E402
from corral.cli import keys as _keys  # noqa: E402
from corral.cli import vm as _vm  # noqa: E402
from corral.cli.progress import image_progress  # noqa: E402

app.add_typer(_images.app, name="image")
app.add_typer(_images.node_app, name="node")
app.add_typer(_vm.app, name="vm")
app.add_typer(_keys.app, name="key")
app.command("password")(_keys.password)


def main() -> None:
    app()
