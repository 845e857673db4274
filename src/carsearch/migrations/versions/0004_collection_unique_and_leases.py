"""one collection per version (unique), and named leases

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 18:00:00

Upgrading fails where two existing versions already share a collection (names that differ
only in ". - _"): retire and rename one of them first.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("model_versions") as batch:
        batch.create_unique_constraint("uq_model_versions_collection", ["collection"])
    op.create_table(
        "leases",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("holder", sa.String(length=128), nullable=False),
        sa.Column("acquired_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )


def downgrade() -> None:
    op.drop_table("leases")
    with op.batch_alter_table("model_versions") as batch:
        batch.drop_constraint("uq_model_versions_collection", type_="unique")
