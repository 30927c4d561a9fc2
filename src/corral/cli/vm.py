"""``corral vm ...``: VMs through the API, with the saved login (or CORRAL_URL / CORRAL_API_KEY)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.table import Table

from corral.cli import credentials
from corral.cli.errors import raise_for

app = typer.Typer(help="Create, use and remove VMs.", no_args_is_help=True)
out = Console()
err = Console(stderr=True)


def _client() -> httpx.Client:
    creds = credentials.load()
    if not creds.api_key:
        err.print("Not logged in: run `corral login` or set CORRAL_API_KEY.")
        raise typer.Exit(1)
    return httpx.Client(
        base_url=creds.url,
        headers={"Authorization": f"Bearer {creds.api_key}"},
        timeout=httpx.Timeout(30.0, read=None),
    )


def _check(resp: httpx.Response) -> Any:
    """The answer's JSON (None when empty); an API error ends the command."""
    raise_for(resp)
    return resp.json() if resp.content else None


def _resolve(client: httpx.Client, ref: str) -> str:
    """A VM id, or the id of the live VM with that name."""
    if ref.startswith("vm_"):
        return ref
    page = _check(client.get("/v1/vms", params={"name": ref, "limit": 100}))
    live = [vm for vm in page["data"] if vm["status"] != "destroyed"]
    if not live:
        err.print(f"[red]No VM named {ref}[/red]")
        raise typer.Exit(1)
    return str(live[0]["id"])


def _show(vm: dict[str, Any]) -> None:
    out.print_json(json.dumps(vm))


@app.command()
def create(
    name: Annotated[str, typer.Argument(help="VM name")],
    public_key: Annotated[Path, typer.Option(help="SSH public key file")] = Path.home()
    / ".ssh"
    / "id_ed25519.pub",
    image: Annotated[str | None, typer.Option(help="Image (default: the server's)")] = None,
    vcpus: Annotated[int | None, typer.Option()] = None,
    mem_mib: Annotated[int | None, typer.Option()] = None,
    disk_mib: Annotated[int | None, typer.Option()] = None,
    snapshot: Annotated[str | None, typer.Option(help="Boot from this snapshot (snap_...)")] = None,
    timeout: Annotated[
        int | None, typer.Option(help="Destroy the VM after this many seconds (`corral vm keep` resets it)")
    ] = None,
    wait: Annotated[bool, typer.Option(help="Wait until the VM is ready")] = True,
) -> None:
    """Create a VM (and wait until it is ready)."""
    try:
        key = public_key.read_text().strip()
    except OSError:
        err.print(f"[red]Cannot read {public_key}; pass --public-key FILE[/red]")
        raise typer.Exit(1) from None
    body: dict[str, Any] = {"name": name, "public_key": key}
    fields = (
        ("image", image),
        ("vcpus", vcpus),
        ("mem_mib", mem_mib),
        ("disk_mib", disk_mib),
        ("snapshot_id", snapshot),
        ("timeout", timeout),
    )
    for field, value in fields:
        if value is not None:
            body[field] = value
    with _client() as client:
        vm = _check(client.post("/v1/vms", json=body))
        deadline = time.monotonic() + 120
        while wait and vm["status"] == "pending" and time.monotonic() < deadline:
            time.sleep(0.05)
            vm = _check(client.get(f"/v1/vms/{vm['id']}"))
    _show(vm)
    if vm["status"] == "failed":
        raise typer.Exit(1)


@app.command()
def keep(
    vm: Annotated[str, typer.Argument(help="VM id or name")],
    timeout: Annotated[
        int | None, typer.Option(help="New timeout in seconds (default: the VM's own)")
    ] = None,
) -> None:
    """Reset a VM's auto-destroy timer (PATCH /v1/vms/{id})."""
    with _client() as client:
        vm_id = _resolve(client, vm)
        body = {} if timeout is None else {"timeout": timeout}
        _show(_check(client.patch(f"/v1/vms/{vm_id}", json=body)))


@app.command()
def history(limit: Annotated[int, typer.Option(help="How many")] = 20) -> None:
    """Destroyed VMs, newest first, with their CPU, memory peak, uptime and cost."""
    with _client() as client:
        page = _check(client.get("/v1/vms/history", params={"limit": limit}))
    table = Table("ID", "NAME", "DESTROYED", "REASON", "CPU MS", "MEM PEAK MIB", "UPTIME S", "COST CENTS")
    for row in page["data"]:
        table.add_row(
            row["id"],
            row["name"],
            str(row.get("destroyed_at") or ""),
            str(row.get("destroy_reason") or ""),
            str(row.get("cpu_ms") or 0),
            f"{(row.get('mem_peak_bytes') or 0) / 2**20:.1f}",
            f"{(row.get('uptime_ms') or 0) / 1000:.1f}",
            str(row.get("cost_cents") or 0),
        )
    out.print(table)


@app.command("list")
def list_(
    status: Annotated[str | None, typer.Option(help="pending, running, stopped, destroyed, failed")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Include destroyed VMs")] = False,
) -> None:
    """List your VMs."""
    params: dict[str, Any] = {"limit": 100}
    if status:
        params["status"] = status
    table = Table("ID", "NAME", "STATUS", "DETAIL", "IMAGE", "CREATED")
    with _client() as client:
        while True:
            page = _check(client.get("/v1/vms", params=params))
            for vm in page["data"]:
                if vm["status"] == "destroyed" and not (all_ or status):
                    continue
                table.add_row(
                    vm["id"], vm["name"], vm["status"], vm["status_detail"], vm["image"], vm["created_at"]
                )
            if not page["has_more"]:
                break
            params["cursor"] = page["cursor"]
    out.print(table)


@app.command()
def get(vm: Annotated[str, typer.Argument(help="VM id or name")]) -> None:
    """Show a VM."""
    with _client() as client:
        _show(_check(client.get(f"/v1/vms/{_resolve(client, vm)}")))


@app.command("open")
def open_(
    vm: Annotated[str, typer.Argument(help="VM id or name")],
    port: Annotated[int, typer.Argument(help="A TCP port inside the VM")],
    path: Annotated[str, typer.Option(help="The path (and query) to open")] = "/",
) -> None:
    """Print a URL that opens a web server inside the VM in a browser, on its own origin (once, within 60 s)."""
    with _client() as client:
        vm_id = _resolve(client, vm)
        ticket = _check(client.post(f"/v1/vms/{vm_id}/proxy-ticket", json={"port": port, "path": path}))
    err.print(
        f"Open within {ticket['expires_in']} s, once (the browser keeps a cookie for {ticket['origin']}):"
    )
    sys.stdout.write(ticket["url"] + "\n")


@app.command()
def stop(vm: Annotated[str, typer.Argument(help="VM id or name")]) -> None:
    """Stop a VM (keeps its disk)."""
    with _client() as client:
        _show(_check(client.post(f"/v1/vms/{_resolve(client, vm)}/stop")))


@app.command()
def start(vm: Annotated[str, typer.Argument(help="VM id or name")]) -> None:
    """Start a stopped VM."""
    with _client() as client:
        _show(_check(client.post(f"/v1/vms/{_resolve(client, vm)}/start")))


@app.command()
def destroy(
    vm: Annotated[str, typer.Argument(help="VM id or name")],
    force: Annotated[bool, typer.Option("--force", help="Stop it first if it runs")] = False,
) -> None:
    """Destroy a stopped VM."""
    with _client() as client:
        vm_id = _resolve(client, vm)
        if force and _check(client.get(f"/v1/vms/{vm_id}"))["status"] == "running":
            _check(client.post(f"/v1/vms/{vm_id}/stop"))
        _check(client.delete(f"/v1/vms/{vm_id}"))
    err.print(f"{vm_id} destroyed")


@app.command()
def hibernate(vm: Annotated[str, typer.Argument(help="VM id or name")]) -> None:
    """Save a VM's memory and processes and free its CPU and memory (resume brings it back)."""
    with _client() as client:
        _show(_check(client.post(f"/v1/vms/{_resolve(client, vm)}/hibernate")))


@app.command()
def resume(vm: Annotated[str, typer.Argument(help="VM id or name")]) -> None:
    """Bring a hibernated VM back, its processes as they were."""
    with _client() as client:
        _show(_check(client.post(f"/v1/vms/{_resolve(client, vm)}/resume")))


@app.command()
def fork(
    vm: Annotated[str, typer.Argument(help="VM id or name")],
    count: Annotated[int, typer.Option(help="How many children (1 to 16)")] = 1,
) -> None:
    """Make running copies of a VM (disk and memory); it runs on."""
    with _client() as client:
        kids = _check(client.post(f"/v1/vms/{_resolve(client, vm)}/fork", json={"count": count}))["data"]
    out.print_json(json.dumps(kids))
    if any(k["status"] == "failed" for k in kids):
        raise typer.Exit(1)


@app.command()
def snapshot(
    vm: Annotated[str, typer.Argument(help="VM id or name")],
    label: Annotated[str | None, typer.Option(help="A label for the snapshot")] = None,
    disk_only: Annotated[bool, typer.Option("--disk-only", help="The disk only, not the memory")] = False,
    wait: Annotated[bool, typer.Option(help="Wait until it is ready")] = True,
) -> None:
    """Snapshot a running VM (boot a new one from it with `create --snapshot`)."""
    with _client() as client:
        body: dict[str, Any] = {"disk_only": disk_only, **({"label": label} if label else {})}
        snap = _check(client.post(f"/v1/vms/{_resolve(client, vm)}/snapshots", json=body))["data"]
        deadline = time.monotonic() + 600
        while wait and snap["status"] in ("pending", "uploading") and time.monotonic() < deadline:
            time.sleep(0.1)
            snap = _check(client.get(f"/v1/snapshots/{snap['id']}"))["data"]
    out.print_json(json.dumps(snap))
    if snap["status"] == "failed":
        raise typer.Exit(1)


@app.command()
def checkpoint(
    vm: Annotated[str, typer.Argument(help="VM id or name")],
    name: Annotated[str, typer.Argument(help="Checkpoint name")],
    disk_only: Annotated[bool, typer.Option("--disk-only", help="The disk only, not the memory")] = False,
) -> None:
    """Take a named checkpoint of a running VM (roll back to it with `rollback`)."""
    with _client() as client:
        body = {"name": name, "disk_only": disk_only}
        out.print_json(
            json.dumps(_check(client.post(f"/v1/vms/{_resolve(client, vm)}/checkpoints", json=body))["data"])
        )


@app.command()
def rollback(
    vm: Annotated[str, typer.Argument(help="VM id or name")],
    to: Annotated[str, typer.Argument(help="Checkpoint id or name")],
) -> None:
    """Put a VM back as it was at a checkpoint (disk, and processes if it has them)."""
    with _client() as client:
        vm_id = _resolve(client, vm)
        ckpt = to
        if not to.startswith("ckpt_"):
            found = [
                c["id"]
                for c in _check(client.get(f"/v1/vms/{vm_id}/checkpoints", params={"limit": 100}))["data"]
                if c["name"] == to
            ]
            if not found:
                err.print(f"[red]No checkpoint named {to}[/red]")
                raise typer.Exit(1)
            ckpt = found[0]
        _show(_check(client.post(f"/v1/vms/{vm_id}/rollback", json={"checkpoint_id": ckpt})))


@app.command("exec")
def exec_(
    vm: Annotated[str, typer.Argument(help="VM id or name")],
    command: Annotated[list[str], typer.Argument(help="The command and its arguments")],
    timeout: Annotated[float, typer.Option(help="Seconds")] = 600,
    cwd: Annotated[str | None, typer.Option()] = None,
    user: Annotated[str | None, typer.Option()] = None,
    env: Annotated[list[str] | None, typer.Option("--env", "-e", help="KEY=VALUE")] = None,
) -> None:
    """Run a command in a VM, streaming its output; exits with the command's exit code."""
    body: dict[str, Any] = {"command": command, "timeout": timeout}
    if cwd:
        body["cwd"] = cwd
    if user:
        body["user"] = user
    if env:
        body["env"] = dict(item.split("=", 1) for item in env if "=" in item)
    code = 1
    with _client() as client:
        vm_id = _resolve(client, vm)
        with client.stream("POST", f"/v1/vms/{vm_id}/exec/stream", json=body) as resp:
            if not resp.is_success:
                resp.read()
                _check(resp)
            event = ""
            for line in resp.iter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    data = json.loads(line[6:])
                    if event == "stdout":
                        sys.stdout.write(data["data"])
                        sys.stdout.flush()
                    elif event == "stderr":
                        sys.stderr.write(data["data"])
                        sys.stderr.flush()
                    elif event == "exit":
                        code = int(data["exit_code"])
    raise typer.Exit(code)


@app.command()
def cp(
    source: Annotated[str, typer.Argument(help="LOCAL_PATH or VM:PATH")],
    dest: Annotated[str, typer.Argument(help="VM:PATH or LOCAL_PATH")],
) -> None:
    """Copy a file into a VM (`corral vm cp f.txt myvm:/root/f.txt`) or out of it (`myvm:/etc/os-release .`)."""
    with _client() as client:
        if ":" in source and not Path(source).exists():
            ref, _, remote = source.partition(":")
            vm_id = _resolve(client, ref)
            target = Path(dest)
            if target.is_dir():
                target = target / Path(remote).name
            with client.stream("GET", f"/v1/vms/{vm_id}/files/download", params={"path": remote}) as resp:
                if not resp.is_success:
                    resp.read()
                    _check(resp)
                with open(target, "wb") as f:
                    for chunk in resp.iter_bytes():
                        f.write(chunk)
            err.print(f"{remote} -> {target}")
            return
        ref, sep, remote = dest.partition(":")
        if not sep:
            err.print("[red]One side must be VM:PATH[/red]")
            raise typer.Exit(2)
        vm_id = _resolve(client, ref)
        local = Path(source)
        if remote.endswith("/"):
            remote += local.name
        mode = f"{local.stat().st_mode & 0o7777:04o}"
        with open(local, "rb") as f:
            result = _check(
                client.post(
                    f"/v1/vms/{vm_id}/files/upload",
                    params={"path": remote, "mode": mode},
                    content=iter(lambda: f.read(1 << 20), b""),
                )
            )
        err.print(f"{local} -> {vm_id}:{result['path']} ({result['size']} bytes)")


def known_hosts_path() -> Path:
    """Where `corral vm ssh` keeps the gateways' host keys (beside the saved login)."""
    return credentials.credentials_path().parent / "known_hosts"


def ssh_argv(info: dict[str, Any], known_hosts: Path, identity: Path | None, rest: list[str]) -> list[str]:
    """The OpenSSH command for ``GET /v1/vms/{id}/ssh``'s answer, pinned to the gateway's host key."""
    argv = ["ssh", "-p", str(info["port"]), "-o", f"UserKnownHostsFile={known_hosts}"]
    argv += ["-o", "StrictHostKeyChecking=yes"]
    if identity is not None:
        argv += ["-i", str(identity), "-o", "IdentitiesOnly=yes"]
    return [*argv, f"{info['username']}@{info['host']}", *rest]


def remember_host_key(info: dict[str, Any], path: Path) -> None:
    """Add the gateway's host key to ``path`` (once): ssh then checks it is talking to this server."""
    host = info["host"] if int(info["port"]) == 22 else f"[{info['host']}]:{info['port']}"
    line = f"{host} {info['host_key']}"
    lines = path.read_text().splitlines() if path.exists() else []
    if line in lines:
        return
    kept = [existing for existing in lines if not existing.startswith(f"{host} ")]  # a key that changed
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.write_text("".join(f"{entry}\n" for entry in [*kept, line]))


@app.command()
def ssh(
    vm: Annotated[str, typer.Argument(help="VM id or name")],
    command: Annotated[list[str] | None, typer.Argument(help="A command to run instead of a shell")] = None,
    identity: Annotated[
        Path | None, typer.Option("--identity", "-i", help="Private key (default: ssh's own choice)")
    ] = None,
) -> None:
    """Open an SSH session in a VM with your OpenSSH client (`corral vm ssh myvm`, `corral vm ssh myvm -- ls`)."""
    import os
    import shutil

    with _client() as client:
        vm_id = _resolve(client, vm)
        info = _check(client.get(f"/v1/vms/{vm_id}/ssh"))
    if shutil.which("ssh") is None:
        err.print("[red]ssh (OpenSSH's client) is not installed[/red]")
        raise typer.Exit(1)
    known = known_hosts_path()
    remember_host_key(info, known)
    argv = ssh_argv(info, known, identity, list(command or []))
    sys.stdout.flush()
    os.execvp(argv[0], argv)  # noqa: S606 (ssh takes over the terminal)
