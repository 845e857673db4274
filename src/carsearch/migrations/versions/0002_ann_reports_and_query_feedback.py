"""ann reports and query feedback

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 10:50:32.721813
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "ann_reports",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("model_version_id", sa.Integer(), nullable=True),
        sa.Column("index_type", sa.String(length=32), nullable=False),
        sa.Column("params", JSON, nullable=True),
        sa.Column("n_queries", sa.Integer(), nullable=False),
        sa.Column("n_vectors", sa.Integer(), nullable=False),
        sa.Column("recall_at_10", sa.Float(), nullable=True),
        sa.Column("report", JSON, nullable=True),
        sa.ForeignKeyConstraint(
            ["model_version_id"],
            ["model_versions.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("ann_reports", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_ann_reports_created_at"), ["created_at"], unique=False)

    op.create_table(
        "query_feedback",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column(
            "query_log_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.Column("image_id", sa.BigInteger(), nullable=False),
        sa.Column("vote", sa.Integer(), nullable=False),
        sa.Column("query", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["query_log_id"],
            ["query_log.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )


def downgrade() -> None:
    op.drop_table("query_feedback")
    with op.batch_alter_table("ann_reports", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_ann_reports_created_at"))

    op.drop_table("ann_reports")
