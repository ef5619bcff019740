"""The result cache: what determines a job's pictures, and the job a cache hit was answered from

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-24
"""
import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("result_key", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("cached_from_job_id", sa.Integer(), nullable=True))
    op.create_index("ix_jobs_result_key", "jobs", ["result_key", "status"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_jobs_result_key", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("cached_from_job_id")
        batch.drop_column("result_key")
