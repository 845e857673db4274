"""image boxes: the vehicle's box [x1, y1, x2, y2] in pixels, stored with the image row

The box came with the image (sidecar, manifest, label import), was clipped to the image
and is what the serving version's image policy crops to before embedding; NULL means the
whole frame was embedded.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06 06:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("images") as batch:
        batch.add_column(sa.Column("box", JSON, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("images") as batch:
        batch.drop_column("box")
