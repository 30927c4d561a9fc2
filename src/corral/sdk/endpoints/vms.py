"""VMs: create, list, get, start, stop, destroy, the auto-destroy timer, history; running commands; files;
SSH connection info."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence

import httpx

from corral.sdk.call import Call, Route, body, model, nothing, page, params, raw, segment
from corral.sdk.models import ExecResult, FileList, Page, ProxyTicket, SshInfo, Upload, Vm, VmHistory
from corral.sdk.uploads import UploadData, UploadSource

CREATE = Route("POST", "/v1/vms")
LIST = Route("GET", "/v1/vms")
HISTORY = Route("GET", "/v1/vms/history")
GET = Route("GET", "/v1/vms/{vm_id}")
RESET_TIMER = Route("PATCH", "/v1/vms/{vm_id}")
DESTROY = Route("DELETE", "/v1/vms/{vm_id}")
START = Route("POST", "/v1/vms/{vm_id}/start")
STOP = Route("POST", "/v1/vms/{vm_id}/stop")
EXEC = Route("POST", "/v1/vms/{vm_id}/exec")
EXEC_STREAM = Route("POST", "/v1/vms/{vm_id}/exec/stream")
UPLOAD = Route("POST", "/v1/vms/{vm_id}/files/upload")
DOWNLOAD = Route("GET", "/v1/vms/{vm_id}/files/download")
LIST_FILES = Route("GET", "/v1/vms/{vm_id}/files")
SSH = Route("GET", "/v1/vms/{vm_id}/ssh")
PROXY = Route("GET", "/v1/vms/{vm_id}/proxy/{port}/{path}")
PROXY_TICKET = Route("POST", "/v1/vms/{vm_id}/proxy-ticket")

EXEC_TIMEOUT = 60.0
EXEC_MARGIN = 30.0  # the answer comes after the command's own timeout: wait that much longer


def create(
    *,
    name: str,
    public_key: str,
    image: str | None = None,
    vcpus: int | None = None,
    mem_mib: int | None = None,
    disk_mib: int | None = None,
    snapshot_id: str | None = None,
    egress: Mapping[str, object] | None = None,
    timeout: int | None = None,
    idempotency_key: str | None = None,
) -> Call[Vm]:
    """Create a VM; it answers at once (``pending``, or ``ready`` from the warm pool). ``egress``:
    ``{"mode": "enforce"|"warn"|None, "rules": [{"host": ...} | {"cidr": ...}]}``. ``timeout``: seconds
    until it is destroyed (reset with ``reset_timer``). ``idempotency_key`` (default: a new random one per
    call): the server creates one VM for it, so the call is sent again after a connection that broke."""
    json = body(
        name=name,
        public_key=public_key,
        image=image,
        vcpus=vcpus,
        mem_mib=mem_mib,
        disk_mib=disk_mib,
        snapshot_id=snapshot_id,
        egress=dict(egress) if egress is not None else None,
        timeout=timeout,
    )
    return Call(CREATE, model(Vm), json=json, idempotency_key=idempotency_key or uuid.uuid4().hex)


def list_vms(
    *,
    status: str | None = None,
    status_detail: str | None = None,
    name: str | None = None,
    limit: int | None = None,
    cursor: str | None = None,
    sort: str | None = None,
    order: str | None = None,
) -> Call[Page[Vm]]:
    q = params(
        status=status,
        status_detail=status_detail,
        name=name,
        limit=limit,
        cursor=cursor,
        sort=sort,
        order=order,
    )
    return Call(LIST, page(Vm), params=q)


def history(
    *,
    limit: int | None = None,
    cursor: str | None = None,
    sort: str | None = None,
    order: str | None = None,
) -> Call[Page[VmHistory]]:
    """Destroyed VMs with what they used and cost."""
    return Call(HISTORY, page(VmHistory), params=params(limit=limit, cursor=cursor, sort=sort, order=order))


def get(vm_id: str) -> Call[Vm]:
    return Call(GET, model(Vm), path_values={"vm_id": vm_id})


def reset_timer(vm_id: str, timeout: int | None = None) -> Call[Vm]:
    """Restart the auto-destroy timer: ``timeout`` seconds from now (kept as the VM's timeout), or the VM's
    own timeout."""
    return Call(RESET_TIMER, model(Vm), path_values={"vm_id": vm_id}, json=body(timeout=timeout))


def destroy(vm_id: str) -> Call[None]:
    """Destroy a stopped (or hibernated, or failed) VM."""
    return Call(DESTROY, nothing, path_values={"vm_id": vm_id})


def start(vm_id: str) -> Call[Vm]:
    return Call(START, model(Vm), path_values={"vm_id": vm_id})


def stop(vm_id: str) -> Call[Vm]:
    return Call(STOP, model(Vm), path_values={"vm_id": vm_id})


def _exec_body(
    command: str | Sequence[str],
    timeout: float | None,
    env: Mapping[str, str] | None,
    cwd: str | None,
    user: str | None,
) -> dict[str, object]:
    return body(
        command=command if isinstance(command, str) else list(command),
        timeout=timeout,
        env=dict(env) if env is not None else None,
        cwd=cwd,
        user=user,
    )


def exec_command(
    vm_id: str,
    command: str | Sequence[str],
    *,
    timeout: float | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    user: str | None = None,
) -> Call[ExecResult]:
    """Run a command to completion: a string runs under ``/bin/sh -c``, a list as given. Output is capped
    at 1 MiB per stream here; ``exec_stream`` has no cap."""
    return Call(
        EXEC,
        model(ExecResult),
        path_values={"vm_id": vm_id},
        json=_exec_body(command, timeout, env, cwd, user),
        read_timeout=(timeout or EXEC_TIMEOUT) + EXEC_MARGIN,
    )


def exec_stream(
    vm_id: str,
    command: str | Sequence[str],
    *,
    timeout: float | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    user: str | None = None,
) -> Call[httpx.Response]:
    """The request of a streamed command (Server-Sent Events, read by the client)."""
    return Call(
        EXEC_STREAM,
        raw,
        path_values={"vm_id": vm_id},
        json=_exec_body(command, timeout, env, cwd, user),
        stream=True,
        read_timeout=(timeout or EXEC_TIMEOUT) + EXEC_MARGIN,
    )


def upload(
    vm_id: str, path: str, data: UploadData, *, mode: str | int | None = None, parents: bool | None = None
) -> Call[Upload]:
    """Write ``data`` (bytes, text, a path on this machine or an open binary file, streamed) to ``path`` in
    the VM, replacing it atomically. ``mode``: octal permissions (``"0755"`` or ``0o755``)."""
    octal = f"{mode:04o}" if isinstance(mode, int) else mode
    return Call(
        UPLOAD,
        model(Upload),
        path_values={"vm_id": vm_id},
        params=params(path=path, mode=octal, parents=parents),
        upload=UploadSource(data),
    )


def download(vm_id: str, path: str) -> Call[httpx.Response]:
    """The request of a file download (streamed, read by the client)."""
    return Call(DOWNLOAD, raw, path_values={"vm_id": vm_id}, params=params(path=path), stream=True)


def list_files(
    vm_id: str, path: str = "/", *, limit: int | None = None, cursor: str | None = None
) -> Call[FileList]:
    """One page of the entries of a directory in the VM, by name: ``limit`` entries (the server's default
    1000, at most 10000), after ``cursor`` (a page's ``cursor``, with the same ``path``)."""
    q = params(path=path, limit=limit, cursor=cursor)
    return Call(LIST_FILES, model(FileList), path_values={"vm_id": vm_id}, params=q)


def ssh(vm_id: str) -> Call[SshInfo]:
    """How to log in with OpenSSH and the private key of the VM's ``public_key``."""
    return Call(SSH, model(SshInfo), path_values={"vm_id": vm_id})


def proxy_path(vm_id: str, port: int, path: str = "") -> str:
    """The API path that reaches ``http://127.0.0.1:{port}/{path}`` inside the VM (``path`` may carry its
    own query string)."""
    if not 1 <= port <= 65535:
        raise ValueError("port must be 1 to 65535")
    return f"/v1/vms/{segment(vm_id)}/proxy/{port}/{path.lstrip('/')}"


def proxy_ticket(vm_id: str, port: int, path: str = "/") -> Call[ProxyTicket]:
    """A URL for a browser: ``path`` on the server on ``port`` inside the VM, served from that port's own
    origin; it carries a ticket valid once, for 60 s, which the browser trades for a cookie of that VM and
    port only."""
    if not 1 <= port <= 65535:
        raise ValueError("port must be 1 to 65535")
    return Call(
        PROXY_TICKET, model(ProxyTicket), path_values={"vm_id": vm_id}, json=body(port=port, path=path)
    )


def proxy_request(
    vm_id: str,
    port: int,
    path: str = "",
    *,
    method: str = "GET",
    params: Mapping[str, str] | None = None,
    content: bytes | None = None,
) -> Call[httpx.Response]:
    """A request to a server inside the VM, through the API's proxy. The answer is returned whatever its
    status: the guest's own, or the API's errors in their envelope (502 ``upstream_unreachable``, 404
    ``vm_not_found``, ...)."""
    guest_path = path.lstrip("/")
    proxy_path(vm_id, port, guest_path)  # checks the port
    return Call(
        PROXY,
        raw,
        path_values={"vm_id": vm_id, "port": str(port), "path": guest_path},
        params=dict(params or {}),
        upload=UploadSource(content) if content is not None else None,
        http_method=method.upper(),
        raise_errors=False,
    )
