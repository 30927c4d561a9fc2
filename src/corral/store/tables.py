"""The schema. Every change here comes with an Alembic migration (a test compares the two)."""

from __future__ import annotations

from datetime import UTC, date, datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    Date,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class UTCDateTime(TypeDecorator[datetime]):
    """Stores naive UTC, hands back aware UTC, on SQLite and PostgreSQL alike."""

    impl = DateTime(timezone=False)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

ID = String(40)
OWNER = "users.id"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class User(Base):
    __tablename__ = "users"

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    first_name: Mapped[str] = mapped_column(String(100))
    last_name: Mapped[str] = mapped_column(String(100))
    email: Mapped[str] = mapped_column(String(254), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    email_verified: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    user_id: Mapped[str] = mapped_column(ID, ForeignKey(OWNER, ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # the token's first characters (``corral_live_AbCd``), to tell keys apart; null for keys made before 0006
    prefix: Mapped[str | None] = mapped_column(String(32), nullable=True)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)  # to the minute


class LoginFailures(Base):
    """Failed password logins per account name (``/activate``), for the lockout; keyed by a hash of the
    normalised email, so unknown emails are counted (and locked) exactly like known ones."""

    __tablename__ = "login_failures"

    email_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    failures: Mapped[int] = mapped_column(Integer)
    window_start: Mapped[datetime] = mapped_column(UTCDateTime)
    locked_until: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class IdempotencyKey(Base):
    """The first answer to a request sent with an ``Idempotency-Key``, replayed to its retries for a day."""

    __tablename__ = "idempotency_keys"

    user_id: Mapped[str] = mapped_column(ID, ForeignKey(OWNER, ondelete="CASCADE"), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(64))  # SHA-256 of method, path and body
    state: Mapped[str] = mapped_column(String(16))  # started | done
    owner: Mapped[str] = mapped_column(String(32))  # the server process that runs it (a random id per start)
    status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    content_type: Mapped[str | None] = mapped_column(String(100), nullable=True)
    body: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)


class DeviceCode(Base):
    __tablename__ = "device_codes"

    code: Mapped[str] = mapped_column(String(16), primary_key=True)
    status: Mapped[str] = mapped_column(String(16))  # pending | approved | consumed
    user_id: Mapped[str | None] = mapped_column(ID, ForeignKey(OWNER, ondelete="CASCADE"), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)


class EnvVar(Base):
    __tablename__ = "env_vars"
    __table_args__ = (UniqueConstraint("user_id", "key"),)

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    user_id: Mapped[str] = mapped_column(ID, ForeignKey(OWNER, ondelete="CASCADE"))
    key: Mapped[str] = mapped_column(String(256))
    value: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


class Secret(Base):
    __tablename__ = "secrets"
    __table_args__ = (UniqueConstraint("user_id", "name"), UniqueConstraint("user_id", "env_var"))

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    user_id: Mapped[str] = mapped_column(ID, ForeignKey(OWNER, ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(64))
    env_var: Mapped[str] = mapped_column(String(256))
    hosts: Mapped[str] = mapped_column(Text)  # JSON array of host patterns
    ciphertext: Mapped[bytes] = mapped_column(LargeBinary)
    comment: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)

    def __repr__(self) -> str:  # never the ciphertext, let alone the value
        return f"Secret(id={self.id!r}, name={self.name!r})"


class EgressPolicy(Base):
    __tablename__ = "egress_policies"

    user_id: Mapped[str] = mapped_column(ID, ForeignKey(OWNER, ondelete="CASCADE"), primary_key=True)
    mode: Mapped[str] = mapped_column(String(16))
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


class EgressRule(Base):
    __tablename__ = "egress_rules"
    __table_args__ = (
        UniqueConstraint("user_id", "name"),
        Index("ix_egress_rules_user_created", "user_id", "created_at", "id"),
    )

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    user_id: Mapped[str] = mapped_column(ID, ForeignKey(OWNER, ondelete="CASCADE"))
    name: Mapped[str | None] = mapped_column(String(100), nullable=True)
    host: Mapped[str | None] = mapped_column(String(255), nullable=True)
    cidr: Mapped[str | None] = mapped_column(String(64), nullable=True)
    comment: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class EgressEvent(Base):
    """One outbound connection (or intercepted HTTP request), written by the egress proxy.

    ``net_lo``/``net_hi`` are the first and last address of ``cidr`` as the family digit and 32 hex digits,
    so "event inside the network X" is a plain string range test on SQLite and PostgreSQL alike.
    """

    __tablename__ = "egress_events"
    __table_args__ = (Index("ix_egress_events_user_ts", "user_id", "timestamp", "id"),)

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    user_id: Mapped[str] = mapped_column(ID, ForeignKey(OWNER, ondelete="CASCADE"))
    timestamp: Mapped[datetime] = mapped_column(UTCDateTime)
    vm_id: Mapped[str | None] = mapped_column(ID, nullable=True)
    host: Mapped[str | None] = mapped_column(String(255), nullable=True)
    cidr: Mapped[str | None] = mapped_column(String(64), nullable=True)
    net_lo: Mapped[str | None] = mapped_column(String(33), nullable=True)
    net_hi: Mapped[str | None] = mapped_column(String(33), nullable=True)
    protocol: Mapped[str] = mapped_column(String(8))
    verdict: Mapped[str] = mapped_column(String(8))
    allowed: Mapped[bool] = mapped_column(Boolean)
    mode: Mapped[str] = mapped_column(String(8))
    # bytes of an allowed connection (or HTTP request and response), counted by the proxy when it ends:
    # sent up by the sandbox, received down; null on decisions that carried nothing
    bytes_up: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    bytes_down: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class Vm(Base):
    """A sandbox. ``status_detail`` is the desired/observed lifecycle state (``corral.domain.vm_states``);
    ``container_id`` names its sandbox on the node (a warm-pool sandbox keeps the id it was booted with)."""

    __tablename__ = "vms"
    __table_args__ = (
        # names are unique among a user's VMs that are not destroyed
        Index(
            "uq_vms_user_live_name",
            "user_id",
            "name",
            unique=True,
            sqlite_where=text("status_detail != 'destroyed'"),
            postgresql_where=text("status_detail != 'destroyed'"),
        ),
        Index("ix_vms_user_created", "user_id", "created_at", "id"),
        Index("ix_vms_user_updated", "user_id", "updated_at", "id"),
        Index("ix_vms_user_name", "user_id", "name", "id"),
        Index("ix_vms_status_detail", "status_detail"),
        Index("ix_vms_expires_at", "expires_at"),
        Index("ix_vms_user_destroyed", "user_id", "destroyed_at", "id"),
    )

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    user_id: Mapped[str] = mapped_column(ID, ForeignKey(OWNER, ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(64))
    public_key: Mapped[str] = mapped_column(Text)
    status_detail: Mapped[str] = mapped_column(String(16))
    failure_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    image: Mapped[str] = mapped_column(String(128))
    snapshot_id: Mapped[str | None] = mapped_column(ID, nullable=True)
    vcpus: Mapped[int] = mapped_column(Integer)
    mem_mib: Mapped[int] = mapped_column(Integer)
    disk_mib: Mapped[int] = mapped_column(Integer)
    container_id: Mapped[str | None] = mapped_column(String(64), nullable=True, unique=True)
    create_ms: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # per-VM egress overrides: its own mode (else the account's) and rules added to the account's
    egress_mode: Mapped[str | None] = mapped_column(String(16), nullable=True)
    egress_rules: Mapped[str | None] = mapped_column(Text, nullable=True)  # JSON [{"host"|"cidr": ...}]
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # auto-destroy: seconds the timer is set to, and when it fires (null: no timer)
    timeout: Mapped[int | None] = mapped_column(Integer, nullable=True)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    destroy_reason: Mapped[str | None] = mapped_column(String(16), nullable=True)  # api | timeout
    destroyed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # accounting (corral.domain.usage): totals, and the meter of a running VM (its last cgroup sample)
    cpu_us: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    mem_peak_bytes: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    uptime_ms: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    meter_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    meter_cpu_ns: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    meter_mem_bytes: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")


class VmUsageDay(Base):
    """What a VM used on one UTC day, from its cgroup samples (``corral.services.usage``)."""

    __tablename__ = "vm_usage_days"
    __table_args__ = (Index("ix_vm_usage_days_user_day", "user_id", "day"),)

    vm_id: Mapped[str] = mapped_column(ID, ForeignKey("vms.id", ondelete="CASCADE"), primary_key=True)
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    user_id: Mapped[str] = mapped_column(ID, ForeignKey(OWNER, ondelete="CASCADE"))
    cpu_us: Mapped[int] = mapped_column(BigInteger)
    mem_kib_ms: Mapped[int] = mapped_column(BigInteger)
    uptime_ms: Mapped[int] = mapped_column(BigInteger)


class Snapshot(Base):
    """A VM's disk (and, with ``memory``, its processes) saved in the snapshot store. ``status`` moves
    pending (being captured) -> uploading (being written to the store) -> ready, or failed. Soft-deleted."""

    __tablename__ = "snapshots"
    __table_args__ = (
        Index("ix_snapshots_user_created", "user_id", "created_at", "id"),
        Index("ix_snapshots_vm_created", "source_vm_id", "created_at", "id"),
    )

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    user_id: Mapped[str] = mapped_column(ID, ForeignKey(OWNER, ondelete="CASCADE"))
    source_vm_id: Mapped[str] = mapped_column(ID)
    source_base_image: Mapped[str | None] = mapped_column(String(128), nullable=True)
    source_snapshot_id: Mapped[str | None] = mapped_column(ID, nullable=True)
    label: Mapped[str | None] = mapped_column(String(256), nullable=True)
    status: Mapped[str] = mapped_column(String(16))
    storage_key: Mapped[str | None] = mapped_column(String(256), nullable=True)
    size_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    memory: Mapped[bool] = mapped_column(Boolean)
    image: Mapped[str] = mapped_column(String(128))  # the image whose layers the saved disk sits on
    vcpus: Mapped[int] = mapped_column(Integer)
    mem_mib: Mapped[int] = mapped_column(Integer)
    disk_mib: Mapped[int] = mapped_column(Integer)
    failure_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


class Checkpoint(Base):
    """A named, local restore point of a VM (disk and, with ``memory``, processes) kept on its node."""

    __tablename__ = "checkpoints"
    __table_args__ = (
        UniqueConstraint("vm_id", "name"),
        Index("ix_checkpoints_vm_created", "vm_id", "created_at", "id"),
    )

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    user_id: Mapped[str] = mapped_column(ID, ForeignKey(OWNER, ondelete="CASCADE"))
    vm_id: Mapped[str] = mapped_column(ID, ForeignKey("vms.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(128))
    memory: Mapped[bool] = mapped_column(Boolean)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
