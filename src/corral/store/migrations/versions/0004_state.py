"""snapshots and checkpoints

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23 19:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from corral.store.tables import UTCDateTime

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "snapshots",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("user_id", sa.String(length=40), nullable=False),
        sa.Column("source_vm_id", sa.String(length=40), nullable=False),
        sa.Column("source_base_image", sa.String(length=128), nullable=True),
        sa.Column("source_snapshot_id", sa.String(length=40), nullable=True),
        sa.Column("label", sa.String(length=256), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("storage_key", sa.String(length=256), nullable=True),
        sa.Column("size_bytes", sa.BigInteger(), nullable=True),
        sa.Column("memory", sa.Boolean(), nullable=False),
        sa.Column("image", sa.String(length=128), nullable=False),
        sa.Column("vcpus", sa.Integer(), nullable=False),
        sa.Column("mem_mib", sa.Integer(), nullable=False),
        sa.Column("disk_mib", sa.Integer(), nullable=False),
        sa.Column("failure_reason", sa.Text(), nullable=True),
        sa.Column("deleted_at", UTCDateTime(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_snapshots_user_id_users"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_snapshots")),
    )
    op.create_index("ix_snapshots_user_created", "snapshots", ["user_id", "created_at", "id"])
    op.create_index("ix_snapshots_vm_created", "snapshots", ["source_vm_id", "created_at", "id"])
    op.create_table(
        "checkpoints",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("user_id", sa.String(length=40), nullable=False),
        sa.Column("vm_id", sa.String(length=40), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("memory", sa.Boolean(), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_checkpoints_user_id_users"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["vm_id"], ["vms.id"], name=op.f("fk_checkpoints_vm_id_vms"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_checkpoints")),
        sa.UniqueConstraint("vm_id", "name", name=op.f("uq_checkpoints_vm_id_name")),
    )
    op.create_index("ix_checkpoints_vm_created", "checkpoints", ["vm_id", "created_at", "id"])


def downgrade() -> None:
    op.drop_index("ix_checkpoints_vm_created", table_name="checkpoints")
    op.drop_table("checkpoints")
    op.drop_index("ix_snapshots_vm_created", table_name="snapshots")
    op.drop_index("ix_snapshots_user_created", table_name="snapshots")
    op.drop_table("snapshots")
