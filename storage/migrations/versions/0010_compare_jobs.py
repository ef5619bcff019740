"""Comparison jobs: X/Y grids an admin asks for in Discord (kind `compare`)

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-24
"""
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # On SQLite this rebuilds the table (Database._migrate turns foreign keys off around it, as SQLite asks).
    with op.batch_alter_table("jobs") as batch:
        batch.drop_constraint("ck_jobs_kind", type_="check")
        batch.create_check_constraint("ck_jobs_kind",
                                      "kind IN ('imagine', 'upscale', 'vary', 'reroll', 'learn', 'compare')")


def downgrade() -> None:
    op.execute("DELETE FROM jobs WHERE kind = 'compare'")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_constraint("ck_jobs_kind", type_="check")
        batch.create_check_constraint("ck_jobs_kind", "kind IN ('imagine', 'upscale', 'vary', 'reroll', 'learn')")
