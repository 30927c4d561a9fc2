"""What the API answers, as typed objects. Every field the API documents is declared (a renamed or missing
field fails to parse); fields a newer server adds are kept (``model_extra``) rather than refused, and values
of open sets (statuses, reasons) are plain strings so a new one does not break an old client."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Model(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True, populate_by_name=True)


class Page[T](Model):
    """One page of a list: pass ``cursor`` back (or use the ``iter`` methods) for the next."""

    data: list[T]
    has_more: bool
    cursor: str | None


# ---- account -------------------------------------------------------------------------------------------


class User(Model):
    id: str
    first_name: str
    last_name: str
    email: str
    email_verified: bool
    created_at: datetime


class ApiKey(Model):
    id: str
    name: str
    token: str
    created_at: datetime


class Signup(Model):
    api_key: ApiKey
    user: User


class ApiKeyInfo(Model):
    """A key of the account as listed: never its token."""

    id: str
    name: str
    prefix: str | None  # the token's first characters, corral_live_AbCd
    created_at: datetime
    last_used_at: datetime | None  # to the minute
    current: bool  # the key this client uses


class PasswordChange(Model):
    revoked_keys: int  # the account's other keys, revoked by the change


class DeviceCode(Model):
    code: str
    verification_uri: str
    expires_at: datetime


class DevicePoll(Model):
    status: str  # pending, authorized, expired
    token: str | None = None


class DeviceApproval(Model):
    code: str
    status: str


class Health(Model):
    status: str


class EnvVar(Model):
    id: str
    key: str
    value: str
    created_at: datetime
    updated_at: datetime


class Secret(Model):
    id: str
    name: str
    env_var: str
    hosts: list[str]
    proxy_value: str
    comment: str | None
    created_at: datetime
    updated_at: datetime


class EgressPolicy(Model):
    mode: str  # enforce, warn


class EgressRule(Model):
    id: str
    name: str | None
    host: str | None
    cidr: str | None
    comment: str | None
    created_at: datetime


class EgressEvent(Model):
    id: str
    timestamp: datetime
    vm_id: str | None
    host: str | None
    cidr: str | None
    protocol: str  # http, tls, tcp, dns
    verdict: str  # allowed, denied
    allowed: bool
    mode: str


class Prices(Model):
    cpu_second_cents: float
    mem_gib_second_cents: float
    disk_gib_hour_cents: float
    egress_gib_cents: float


class UsageTotals(Model):
    cpu_seconds: float
    mem_gib_seconds: float
    disk_gib_hours: float
    egress_bytes: int
    cost_cents: float


class UsageLine(UsageTotals):
    date: str
    vm_id: str
    vm_name: str | None


class Usage(Model):
    from_: str = Field(alias="from")
    to: str
    prices: Prices
    data: list[UsageLine]
    total: UsageTotals


# ---- VMs -----------------------------------------------------------------------------------------------


class VmEgress(Model):
    mode: str | None
    rules: list[dict[str, str]]


class Vm(Model):
    id: str
    name: str
    status: str  # pending, running, stopped, destroyed, failed
    status_detail: str  # queued, creating, starting, running, ready, ..., hibernated
    created_at: datetime
    updated_at: datetime
    image: str
    vcpus: int
    mem_mib: int
    disk_mib: int
    snapshot_id: str | None = None
    create_ms: int | None = None
    failure_reason: str | None = None
    egress: VmEgress | None = None
    timeout: int | None = None
    expires_at: datetime | None = None
    cpu_ms: int | None = None
    mem_peak_bytes: int | None = None
    uptime_ms: int | None = None
    destroy_reason: str | None = None
    destroyed_at: datetime | None = None


class VmHistory(Vm):
    cost_cents: float


class Image(Model):
    name: str
    size_bytes: int
    created_at: datetime
    source: str
    default: bool


class SshInfo(Model):
    host: str
    port: int
    username: str
    command: str
    host_key: str


class ProxyTicket(Model):
    """A one-time URL that opens a VM's port in a browser, on the port's own origin (never the API's)."""

    url: str
    origin: str
    expires_in: int


# ---- exec and files ------------------------------------------------------------------------------------


class ExecResult(Model):
    exit_code: int
    stdout: str
    stderr: str
    stdout_truncated: bool
    stderr_truncated: bool
    timed_out: bool
    duration_ms: int


class ExecOutput(Model):
    """A chunk a streamed command wrote (UTF-8 text; invalid bytes replaced)."""

    stream: Literal["stdout", "stderr"]
    data: str


class ExecExit(Model):
    """The end of a streamed command."""

    exit_code: int
    timed_out: bool
    duration_ms: int


type ExecEvent = ExecOutput | ExecExit


class FileEntry(Model):
    name: str
    type: str  # file, directory, symlink, other
    size: int
    mode: str
    mtime: datetime


class FileList(Page[FileEntry]):
    """One page of a directory's entries, by name (``iter_files`` goes through every page)."""

    path: str


class Upload(Model):
    path: str
    size: int


# ---- state ---------------------------------------------------------------------------------------------


class Snapshot(Model):
    id: str
    source_virtual_machine_id: str
    source_base_image: str | None
    source_snapshot_id: str | None
    label: str | None
    status: str  # pending, uploading, ready, failed
    r2_key: str | None
    size_bytes: int | None
    created_at: datetime
    memory: bool
    failure_reason: str | None = None


class Checkpoint(Model):
    id: str
    vm_id: str
    name: str
    memory: bool
    size_bytes: int
    created_at: datetime
