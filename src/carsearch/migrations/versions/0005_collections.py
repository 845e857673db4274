"""collections: more than one image collection side by side, each with its serving version

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 23:00:00

Every existing image and model version belongs to the collection ``vehicles`` (created
here). An image's sha256 is unique within its collection (the same photo may be in two);
at most one version serves per collection.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# SQLite's unique constraint from 0001 has no name; batch mode reflects it under this one.
_SQLITE_NAMES = {"uq": "uq_%(table_name)s_%(column_0_name)s"}


def _drop_sha256_unique(batch: object) -> None:
    name = "uq_images_sha256" if op.get_bind().dialect.name == "sqlite" else "images_sha256_key"
    batch.drop_constraint(name, type_="unique")  # type: ignore[attr-defined]


def upgrade() -> None:
    op.create_table(
        "collections",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    op.execute(sa.text(
        "INSERT INTO collections (name, kind, description, created_at) "
        "VALUES ('vehicles', 'vehicles', 'vehicle photos', CURRENT_TIMESTAMP)"))
    with op.batch_alter_table("images", naming_convention=_SQLITE_NAMES) as batch:
        batch.add_column(sa.Column("collection", sa.String(length=64), nullable=False,
                                   server_default="vehicles"))
        _drop_sha256_unique(batch)
        batch.create_unique_constraint("uq_images_collection_sha256", ["collection", "sha256"])
        batch.create_index("ix_images_collection", ["collection"], unique=False)
    with op.batch_alter_table("model_versions") as batch:
        batch.add_column(sa.Column("image_collection", sa.String(length=64), nullable=False,
                                   server_default="vehicles"))
    op.drop_index("uq_model_versions_one_serving", table_name="model_versions")
    op.create_index(
        "uq_model_versions_one_serving", "model_versions", ["image_collection", "status"],
        unique=True, sqlite_where=sa.text("status = 'serving'"),
        postgresql_where=sa.text("status = 'serving'"),
    )


def downgrade() -> None:
    op.drop_index("uq_model_versions_one_serving", table_name="model_versions")
    op.execute("DELETE FROM model_versions WHERE image_collection <> 'vehicles'")
    op.create_index(
        "uq_model_versions_one_serving", "model_versions", ["status"], unique=True,
        sqlite_where=sa.text("status = 'serving'"),
        postgresql_where=sa.text("status = 'serving'"),
    )
    with op.batch_alter_table("model_versions") as batch:
        batch.drop_column("image_collection")
    op.execute("DELETE FROM images WHERE collection <> 'vehicles'")
    with op.batch_alter_table("images") as batch:
        batch.drop_index("ix_images_collection")
        batch.drop_constraint("uq_images_collection_sha256", type_="unique")
        batch.create_unique_constraint("images_sha256_key" if op.get_bind().dialect.name
                                       == "postgresql" else "uq_images_sha256", ["sha256"])
        batch.drop_column("collection")
    op.drop_table("collections")
