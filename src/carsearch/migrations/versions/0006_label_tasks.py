"""labelling tasks: each isolated drift cluster becomes a task holding all its images

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 23:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "label_tasks",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("drift_report_id", sa.Integer(), nullable=True),
        sa.Column("cluster", sa.Integer(), nullable=False),
        sa.Column("collection", sa.String(length=64), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("nearest_class_name", sa.String(length=256), nullable=True),
        sa.Column("suggested", JSON, nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("done_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["drift_report_id"], ["drift_reports.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("drift_report_id", "cluster", name="uq_label_tasks_report_cluster"),
    )
    op.create_table(
        "label_task_images",
        sa.Column("task_id", sa.Integer(), nullable=False),
        sa.Column("image_id", sa.BigInteger(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("labelled_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["task_id"], ["label_tasks.id"]),
        sa.PrimaryKeyConstraint("task_id", "image_id"),
    )


def downgrade() -> None:
    op.drop_table("label_task_images")
    op.drop_table("label_tasks")
