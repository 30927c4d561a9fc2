"""auto-destroy timers, accounting, egress byte counts

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23 22:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from corral.store.tables import UTCDateTime

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("vms", schema=None) as batch_op:
        batch_op.add_column(sa.Column("timeout", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("expires_at", UTCDateTime(), nullable=True))
        batch_op.add_column(sa.Column("destroy_reason", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("destroyed_at", UTCDateTime(), nullable=True))
        for name in ("cpu_us", "mem_peak_bytes", "uptime_ms", "meter_cpu_ns", "meter_mem_bytes"):
            batch_op.add_column(sa.Column(name, sa.BigInteger(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("meter_at", UTCDateTime(), nullable=True))
        batch_op.create_index("ix_vms_expires_at", ["expires_at"])
        batch_op.create_index("ix_vms_user_destroyed", ["user_id", "destroyed_at", "id"])
    # VMs destroyed before: their last change was the destroy
    op.execute(
        "UPDATE vms SET destroyed_at = updated_at, destroy_reason = 'api' WHERE status_detail = 'destroyed'"
    )
    with op.batch_alter_table("egress_events", schema=None) as batch_op:
        batch_op.add_column(sa.Column("bytes_up", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("bytes_down", sa.BigInteger(), nullable=True))
    op.create_table(
        "vm_usage_days",
        sa.Column("vm_id", sa.String(length=40), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("user_id", sa.String(length=40), nullable=False),
        sa.Column("cpu_us", sa.BigInteger(), nullable=False),
        sa.Column("mem_kib_ms", sa.BigInteger(), nullable=False),
        sa.Column("uptime_ms", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["vm_id"], ["vms.id"], name=op.f("fk_vm_usage_days_vm_id_vms"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_vm_usage_days_user_id_users"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("vm_id", "day", name=op.f("pk_vm_usage_days")),
    )
    op.create_index("ix_vm_usage_days_user_day", "vm_usage_days", ["user_id", "day"])


def downgrade() -> None:
    op.drop_index("ix_vm_usage_days_user_day", table_name="vm_usage_days")
    op.drop_table("vm_usage_days")
    with op.batch_alter_table("egress_events", schema=None) as batch_op:
        batch_op.drop_column("bytes_down")
        batch_op.drop_column("bytes_up")
    with op.batch_alter_table("vms", schema=None) as batch_op:
        batch_op.drop_index("ix_vms_user_destroyed")
        batch_op.drop_index("ix_vms_expires_at")
        for name in (
            "meter_at",
            "meter_mem_bytes",
            "meter_cpu_ns",
            "uptime_ms",
            "mem_peak_bytes",
            "cpu_us",
            "destroyed_at",
            "destroy_reason",
            "expires_at",
            "timeout",
        ):
            batch_op.drop_column(name)
