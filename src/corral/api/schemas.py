"""Request and response bodies, exactly as the iron.sh reference shows them.

Requests are strict (no type coercion, unknown fields rejected); responses are built from service results.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, SecretStr, model_validator

from corral.domain.clock import iso
from corral.domain.validation import is_storable

T = TypeVar("T")

Timestamp = Annotated[
    datetime,
    PlainSerializer(iso, return_type=str),
    Field(json_schema_extra={"format": "date-time", "example": "2026-02-28T12:00:00Z"}),
]


def _storable_text(value: Any) -> None:
    if isinstance(value, str):
        if not is_storable(value):
            raise ValueError("strings must be valid Unicode text without NUL characters")
    elif isinstance(value, dict):
        for key, item in value.items():
            _storable_text(key)
            _storable_text(item)
    elif isinstance(value, list):
        for item in value:
            _storable_text(item)


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _text_is_unicode(cls, data: Any) -> Any:
        _storable_text(data)
        return data


class Response(BaseModel):
    model_config = ConfigDict(extra="forbid", from_attributes=True)


# --- errors ---------------------------------------------------------------------------------------------


class ErrorBody(Response):
    code: str = Field(examples=["vm_not_found"])
    message: str = Field(examples=["No VM with ID vm_k3mf9xvw2p"])


class ErrorEnvelope(Response):
    error: ErrorBody


# --- lists ----------------------------------------------------------------------------------------------


class ListEnvelope[T](Response):
    data: list[T]
    has_more: bool
    cursor: str | None = Field(description="Pass as `cursor` to get the next page; null on the last page.")


class DataEnvelope[T](Response):
    data: T


# --- health ---------------------------------------------------------------------------------------------


class Health(Response):
    status: Literal["ok", "ready"]


class PartHealth(Response):
    """One part of the server in ``/readyz``: ``ok``, ``down`` (``detail`` says why) or ``off`` (not run by
    this server's configuration)."""

    status: Literal["ok", "down", "off"]
    detail: str | None = None


class Readiness(Response):
    """``/readyz`` when ready: every part (``store``, ``node``, ``egress``, ``resolver``, ``ssh``) ok or off."""

    status: Literal["ready"]
    parts: dict[str, PartHealth]


class NotReady(ErrorEnvelope):
    """``/readyz`` when not ready (503 ``not_ready``): the message names the parts that are down."""

    parts: dict[str, PartHealth]


# --- users ----------------------------------------------------------------------------------------------


class SignupRequest(Request):
    first_name: str = Field(min_length=1, max_length=100)
    last_name: str = Field(min_length=1, max_length=100)
    email: str = Field(min_length=3, max_length=254)
    password: SecretStr = Field(min_length=8, max_length=1024)


class UserOut(Response):
    id: str
    first_name: str
    last_name: str
    email: str
    email_verified: bool
    created_at: Timestamp


class ApiKeyOut(Response):
    id: str
    name: str
    token: str = Field(description="Shown once. Use it as `Authorization: Bearer <token>`.")
    created_at: Timestamp


class SignupResponse(Response):
    api_key: ApiKeyOut
    user: UserOut


class ApiKeyCreateRequest(Request):
    name: str = Field(min_length=1, max_length=100, description="What the key is for, e.g. `ci`")


class ApiKeyInfo(Response):
    id: str
    name: str
    prefix: str | None = Field(
        description="The token's first characters (`corral_live_AbCd`); null for keys made before Corral kept it"
    )
    created_at: Timestamp
    last_used_at: Timestamp | None = Field(description="The last request made with it, to the minute")
    current: bool = Field(description="True for the key this request was made with")


class PasswordChangeRequest(Request):
    current_password: SecretStr = Field(min_length=1, max_length=1024)
    new_password: SecretStr = Field(min_length=8, max_length=1024)


class PasswordChangeOut(Response):
    revoked_keys: int = Field(description="How many of the account's other API keys were revoked")


# --- device-code login ------------------------------------------------------------------------------------


class DeviceCodeOut(Response):
    code: str = Field(examples=["ABCD-1234"])
    verification_uri: str
    expires_at: Timestamp


class DevicePollOut(Response):
    status: Literal["pending", "authorized", "expired"]
    token: str | None = Field(default=None, description="Present only when status is authorized.")


class DeviceApproveRequest(Request):
    code: str = Field(min_length=1, max_length=32)


class DeviceApproveOut(Response):
    code: str
    status: Literal["approved"]


# --- environment variables --------------------------------------------------------------------------------


class EnvPutRequest(Request):
    value: str


class EnvOut(Response):
    id: str
    key: str
    value: str
    created_at: Timestamp
    updated_at: Timestamp


# --- secrets ----------------------------------------------------------------------------------------------


class SecretCreateRequest(Request):
    name: str = Field(max_length=64, json_schema_extra={"pattern": "^[A-Za-z0-9_-]{1,64}$"})
    secret: SecretStr = Field(description="Write-only: encrypted at rest, never returned")
    env_var: str = Field(max_length=256, json_schema_extra={"pattern": "^[A-Z][A-Z0-9_]*$"})
    hosts: list[str] | None = Field(default=None, max_length=100)
    comment: str | None = None


class SecretUpdateRequest(Request):
    """All fields optional; only those present change. ``name`` cannot change."""

    @model_validator(mode="before")
    @classmethod
    def _name_is_immutable(cls, data: Any) -> Any:
        if isinstance(data, dict) and "name" in data:
            raise ValueError("name cannot be changed after creation: delete and recreate the secret instead")
        return data

    secret: SecretStr | None = None
    env_var: str | None = Field(
        default=None, max_length=256, json_schema_extra={"pattern": "^[A-Z][A-Z0-9_]*$"}
    )
    hosts: list[str] | None = Field(default=None, max_length=100)
    comment: str | None = None


class SecretOut(Response):
    id: str
    name: str
    env_var: str
    hosts: list[str]
    proxy_value: str
    comment: str | None
    created_at: Timestamp
    updated_at: Timestamp


# --- egress -----------------------------------------------------------------------------------------------


class PolicyIn(Request):
    mode: Literal["enforce", "warn"]


class PolicyOut(Response):
    mode: Literal["enforce", "warn"]


class RuleCreateRequest(Request):
    name: str | None = None
    host: str | None = None
    cidr: str | None = None
    comment: str | None = None


class RuleOut(Response):
    id: str
    name: str | None
    host: str | None
    cidr: str | None
    comment: str | None
    created_at: Timestamp


class EgressEventOut(Response):
    id: str
    timestamp: Timestamp
    vm_id: str | None
    host: str | None
    cidr: str | None
    protocol: Literal["http", "tls", "tcp", "dns"] = Field(
        description="http (each request the proxy reads), tls (by SNI), tcp (raw), or dns: a lookup of a "
        "name the policy does not allow (answered NXDOMAIN in enforce mode, so no connection follows)."
    )
    verdict: Literal["allowed", "denied"]
    allowed: bool
    mode: Literal["enforce", "warn"]


# --- VMs ------------------------------------------------------------------------------------------------


class VmEgressRule(Request):
    host: str | None = Field(
        default=None, max_length=255, description="Exact host or `*.example.org`; give host or cidr."
    )
    cidr: str | None = Field(default=None, max_length=64, description="A network, e.g. `203.0.113.0/24`.")


class VmEgress(Request):
    mode: Literal["enforce", "warn"] | None = Field(
        default=None, description="This VM's mode; null: the account's (GET /v1/egress/policy)."
    )
    rules: list[VmEgressRule] = Field(
        default_factory=list,
        max_length=100,
        description="Allowlist entries for this VM only, added to the account's rules.",
    )


class VmEgressOut(Response):
    mode: Literal["enforce", "warn"] | None
    rules: list[dict[str, str]]


class VmCreateRequest(Request):
    name: str = Field(
        min_length=1,
        max_length=64,
        description="Unique among your VMs that are not destroyed; reusable once the VM is destroyed. "
        "Letters, digits, '.', '_' and '-', starting with a letter or digit.",
        examples=["my-dev-env"],
    )
    public_key: str = Field(
        min_length=1,
        max_length=16384,
        description="OpenSSH public key for SSH access (`ssh-ed25519 AAAA...`).",
    )
    snapshot_id: str | None = Field(
        default=None, max_length=80, description="Snapshot to boot from instead of the base image."
    )
    image: str | None = Field(
        default=None,
        max_length=128,
        description="Image to boot (see GET /v1/images); default `debian:bookworm`.",
    )
    vcpus: int | None = Field(
        default=None, description="CPU cores (cgroup quota). Default 1, at most the node's cores."
    )
    mem_mib: int | None = Field(default=None, description="Memory limit in MiB. Default 1024, 64 to 8192.")
    disk_mib: int | None = Field(default=None, description="Disk quota in MiB. Default 4096, 64 to 65536.")
    egress: VmEgress | None = Field(
        default=None,
        description="Per-VM egress overrides: its own mode, and rules added to the account's. "
        "Default: the account's policy and rules as they are at each connection.",
    )
    timeout: int | None = Field(
        default=None,
        description="Auto-destroy: the VM is stopped and destroyed this many seconds after it is created "
        "(1 to 604800). `PATCH /v1/vms/{vm_id}` resets the timer. Default: no timer.",
    )


class SshOut(Response):
    host: str = Field(examples=["203.0.113.10"])
    port: int = Field(examples=[2222])
    username: str = Field(
        examples=["vm_k3mf9xvw2p"], description="The VM's id: it picks the VM; you are root inside"
    )
    command: str = Field(examples=["ssh -p 2222 vm_k3mf9xvw2p@203.0.113.10"])
    host_key: str = Field(
        description="The gateway's host key, as in known_hosts", examples=["ssh-ed25519 AAAA..."]
    )


class VmOut(Response):
    id: str = Field(examples=["vm_k3mf9xvw2p"])
    name: str = Field(examples=["my-dev-env"])
    status: Literal["pending", "running", "stopped", "destroyed", "failed"]
    status_detail: Literal[
        "queued",
        "creating",
        "starting",
        "running",
        "ready",
        "stopping",
        "stopped",
        "destroying",
        "destroyed",
        "failed",
        "hibernating",
        "hibernated",
        "resuming",
        "rolling_back",
    ]
    created_at: Timestamp
    updated_at: Timestamp
    image: str = Field(examples=["debian:bookworm"])
    vcpus: int
    mem_mib: int
    disk_mib: int
    snapshot_id: str | None = None
    create_ms: int | None = Field(default=None, description="Measured time from create to ready, in ms.")
    failure_reason: str | None = Field(default=None, description="Why the VM is `failed`; null otherwise.")
    egress: VmEgressOut | None = Field(default=None, description="The VM's egress overrides, if it has any.")
    timeout: int | None = Field(default=None, description="Auto-destroy timer in seconds; null: none.")
    expires_at: Timestamp | None = Field(
        default=None, description="When the auto-destroy timer fires; null: no timer (or destroyed)."
    )
    cpu_ms: int = Field(default=0, description="CPU time used, from the cgroup (as of the last sample).")
    mem_peak_bytes: int = Field(default=0, description="Most memory in use at once, from the cgroup.")
    uptime_ms: int = Field(
        default=0, description="Time spent running, across stops and resumes (as of the last sample)."
    )
    destroy_reason: Literal["api", "timeout"] | None = Field(
        default=None, description="Why the VM was destroyed: `api` (DELETE) or `timeout` (auto-destroy)."
    )
    destroyed_at: Timestamp | None = None


class VmTimerRequest(Request):
    timeout: int | None = Field(
        default=None,
        description="New timer in seconds (1 to 604800), kept as the VM's timeout; default: the VM's own.",
    )


class VmHistoryOut(VmOut):
    cost_cents: float = Field(description="What the VM cost over its life, from the price table.")


# --- usage ----------------------------------------------------------------------------------------------


class PricesOut(Response):
    cpu_second_cents: float
    mem_gib_second_cents: float
    disk_gib_hour_cents: float
    egress_gib_cents: float


class UsageTotalsOut(Response):
    cpu_seconds: float = Field(description="CPU time used (cgroup CPU accounting).")
    mem_gib_seconds: float = Field(description="Memory in use integrated over time (cgroup samples).")
    disk_gib_hours: float = Field(description="Disk allocated (disk_mib) times the time the VM existed.")
    egress_bytes: int = Field(description="Bytes through the egress proxy, sent and received.")
    cost_cents: float = Field(description="From the price table, to a millionth of a cent.")


class UsageLineOut(UsageTotalsOut):
    date: str = Field(examples=["2026-02-28"], description="The UTC day.")
    vm_id: str
    vm_name: str | None


class UsageOut(Response):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    from_: str = Field(alias="from", examples=["2026-02-01"])
    to: str = Field(examples=["2026-02-28"])
    prices: PricesOut
    data: list[UsageLineOut] = Field(description="One line per day and VM, by day then VM.")
    total: UsageTotalsOut = Field(description="The sums of the lines.")


class ExecRequest(Request):
    command: str | list[str] = Field(
        description="A shell string (run by `/bin/sh -c`) or an argv list (run as given).",
        examples=['python3 -c "print(1+1)"'],
    )
    timeout: float = Field(
        default=60,
        gt=0,
        le=3600,
        description="Seconds before the whole process tree is killed (exit_code 124).",
    )
    env: dict[str, str] = Field(
        default_factory=dict, description="Extra environment variables; they override your /v1/env ones."
    )
    cwd: str | None = Field(default=None, max_length=4096, description="Working directory (default `/root`).")
    user: str | None = Field(
        default=None,
        max_length=64,
        description="User name, uid or uid:gid inside the sandbox (default root).",
    )


class ExecOut(Response):
    exit_code: int
    stdout: str
    stderr: str
    stdout_truncated: bool = Field(
        description="stdout went past the 1 MiB cap; only its first 1 MiB is here."
    )
    stderr_truncated: bool = Field(
        description="stderr went past the 1 MiB cap; only its first 1 MiB is here."
    )
    timed_out: bool
    duration_ms: int


class FileEntryOut(Response):
    name: str
    type: Literal["file", "directory", "symlink", "other"]
    size: int
    mode: str = Field(examples=["0644"])
    mtime: Timestamp


class FileListOut(Response):
    path: str
    data: list[FileEntryOut]
    has_more: bool
    cursor: str | None = Field(
        description="Pass as `cursor` (with the same `path`) for the next page; null on the last."
    )


class UploadOut(Response):
    path: str
    size: int


class ImageOut(Response):
    name: str = Field(examples=["debian:bookworm"])
    size_bytes: int
    created_at: Timestamp
    source: str
    default: bool


class SnapshotCreateRequest(Request):
    label: str | None = Field(default=None, max_length=256, description="Optional label for the snapshot.")
    disk_only: bool = Field(
        default=False,
        description="Capture the disk only. By default the memory and process tree are captured too, and a "
        "VM booted from the snapshot continues the processes where they were.",
    )


class SnapshotOut(Response):
    id: str = Field(examples=["snap_abc123"])
    source_virtual_machine_id: str
    source_base_image: str | None = Field(description="Present if the VM had no prior snapshot.")
    source_snapshot_id: str | None = Field(description="Present if the VM was booted from a snapshot.")
    label: str | None
    status: Literal["pending", "uploading", "ready", "failed"]
    r2_key: str | None = Field(description="Storage key of the snapshot's data; present once uploaded.")
    size_bytes: int | None = Field(description="Bytes stored; present once uploaded.")
    created_at: Timestamp
    memory: bool = Field(description="Whether the memory and process tree were captured (not disk only).")
    failure_reason: str | None = Field(default=None, description="Why the snapshot is `failed`.")


class ForkRequest(Request):
    count: int = Field(default=1, ge=1, le=16, description="How many children to make (1 to 16).")


class CheckpointCreateRequest(Request):
    name: str = Field(
        min_length=1,
        max_length=64,
        description="Unique among the VM's checkpoints. Letters, digits, '.', '_' and '-'.",
        json_schema_extra={"pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"},
        examples=["before-migration"],
    )
    disk_only: bool = Field(default=False, description="Keep the disk only (rollback then reboots from it).")


class CheckpointOut(Response):
    id: str = Field(examples=["ckpt_k3mf9xvw2p"])
    vm_id: str
    name: str
    memory: bool
    size_bytes: int = Field(description="Bytes of memory images kept (the disk shares unchanged blocks).")
    created_at: Timestamp


class RollbackRequest(Request):
    checkpoint_id: str = Field(max_length=80, description="The checkpoint to go back to.")
