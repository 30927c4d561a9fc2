"""``corral image ...`` and ``corral node ...``: operator commands that act on this host's node directly
(as root, on the data directory ``corral serve`` uses)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from corral.cli.progress import image_progress
from corral.config import Settings
from corral.node.setup import make_node
from corral.runtime.images import DEFAULT_IMAGE, DEFAULT_PACKAGES, ImageError

app = typer.Typer(help="Images on this host: build from Debian packages, import, list.", no_args_is_help=True)
node_app = typer.Typer(help="This host's node.", no_args_is_help=True)
out = Console()
err = Console(stderr=True)


@app.command("build")
def build(
    name: Annotated[str, typer.Option(help="Image name")] = DEFAULT_IMAGE,
    packages: Annotated[str, typer.Option(help="Comma-separated Debian packages")] = ",".join(
        DEFAULT_PACKAGES
    ),
    suite: Annotated[str, typer.Option(help="Debian suite")] = "bookworm",
) -> None:
    """Build an image from Debian packages with mmdebstrap (about 20 s); replaces one of the same name."""
    node = make_node(Settings.from_env())
    try:
        with image_progress(err) as progress:
            image = node.images.build(name, tuple(p for p in packages.split(",") if p), suite, progress)
    except ImageError as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None
    out.print(f"{image.name}: {image.size_bytes / 1e6:.0f} MB")


@app.command("import")
def import_(
    source: Annotated[
        Path, typer.Argument(help="An OCI image layout (directory or tar) or a docker save tarball")
    ],
    name: Annotated[str, typer.Option(help="Image name")],
) -> None:
    """Import an image from a file."""
    node = make_node(Settings.from_env())
    try:
        image = node.images.import_file(source, name)
    except ImageError as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None
    out.print(f"{image.name}: {image.size_bytes / 1e6:.0f} MB")


@app.command("list")
def list_() -> None:
    """List the images on this host."""
    node = make_node(Settings.from_env())
    table = Table("NAME", "SIZE", "CREATED", "SOURCE")
    for image in node.images.all():
        table.add_row(
            image.name, f"{image.size_bytes / 1e6:.0f} MB", image.created_at.isoformat(), image.source
        )
    out.print(table)


@node_app.command("reset")
def reset(yes: Annotated[bool, typer.Option("--yes", help="Do not ask")] = False) -> None:
    """Remove every sandbox of this host's node (containers, mounts, cgroups) and unmount its disk pool.
    The store still lists the VMs: the next `corral serve` marks them failed. For tests and recovery."""
    settings = Settings.from_env()
    if not yes:
        typer.confirm(f"Remove every sandbox under {settings.data_dir / 'node'}?", abort=True)
    node = make_node(settings)
    node.attach()
    for line in node.teardown():
        err.print(f"[yellow]left on the host: {line}[/yellow]")


@node_app.command("show")
def show() -> None:
    """This node's capacity, what VMs have committed and what they use (GET /v1/node; operators only)."""
    import httpx

    from corral.cli import credentials
    from corral.cli.errors import raise_for

    creds = credentials.load()
    with httpx.Client(base_url=creds.url, timeout=30.0) as client:
        resp = client.get("/v1/node", headers={"Authorization": f"Bearer {creds.api_key or ''}"})
    raise_for(resp)
    node = resp.json()
    table = Table("", "VCPUS", "MEMORY (MiB)", "DISK (MiB)")
    for row in ("capacity", "admittable", "committed"):
        table.add_row(row, *(str(node[row][k]) for k in ("vcpus", "mem_mib", "disk_mib")))
    used = node["used"]
    table.add_row(
        "used",
        "",
        "" if used["mem_bytes"] is None else str(used["mem_bytes"] >> 20),
        "" if used["disk_bytes"] is None else str(used["disk_bytes"] >> 20),
    )
    out.print(
        f"node {node['id']}: {node['committed']['vms']} VMs, {node['committed']['warm_pool']} in the warm pool"
    )
    out.print(table)


@app.command("rm")
def remove(name: Annotated[str, typer.Argument(help="Image name")]) -> None:
    """Remove an image. VMs that use it must be destroyed first (their root filesystem is built on it)."""
    node = make_node(Settings.from_env())
    if not node.images.remove(name):
        err.print(f"[red]No image named {name}[/red]")
        raise typer.Exit(1)
    out.print(f"removed {name}")
