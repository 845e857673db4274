"""loop status: the newest state of every background loop of every process

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 17:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "loop_status",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("process", sa.String(length=128), nullable=False),
        sa.Column("role", sa.String(length=32), nullable=False),
        sa.Column("loop", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("detail", JSON, nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("uq_loop_status_process_loop", "loop_status", ["process", "loop"],
                    unique=True)
    op.create_index("ix_loop_status_updated_at", "loop_status", ["updated_at"])


def downgrade() -> None:
    op.drop_index("ix_loop_status_updated_at", table_name="loop_status")
    op.drop_index("uq_loop_status_process_loop", table_name="loop_status")
    op.drop_table("loop_status")
