"""retrain requests: one per drift event (or per `carsearch retrain request`), claimed once

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02 02:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "retrain_requests",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("drift_report_id", sa.Integer(), nullable=True),
        sa.Column("collection", sa.String(length=64), nullable=False),
        sa.Column("requested_by", sa.String(length=128), nullable=False),
        sa.Column("task_ids", JSON, nullable=False),
        sa.Column("state", sa.String(length=24), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("holder", sa.String(length=256), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("training_run_id", sa.Integer(), nullable=True),
        sa.Column("version", sa.String(length=128), nullable=True),
        sa.Column("result", JSON, nullable=True),
        sa.ForeignKeyConstraint(["drift_report_id"], ["drift_reports.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("drift_report_id", name="uq_retrain_requests_report"),
    )
    op.create_index("ix_retrain_requests_state", "retrain_requests", ["state"])


def downgrade() -> None:
    op.drop_index("ix_retrain_requests_state", table_name="retrain_requests")
    op.drop_table("retrain_requests")
