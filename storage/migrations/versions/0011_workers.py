"""Workers' heartbeats (which worker processes are alive, what they hold and run), the latest preview of each
running job (progress events between processes carry ids; the preview is read from here), and how often a job
was passed over for one on a model a worker had loaded (model affinity)

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-24
"""
import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("affinity_skips", sa.Integer(), nullable=False, server_default="0"))
    op.create_table(
        "workers",
        sa.Column("id", sa.String(length=100), primary_key=True),
        sa.Column("host", sa.String(length=200), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("device", sa.String(length=50), nullable=False),
        sa.Column("models", sa.JSON(), nullable=False),
        sa.Column("current_job_id", sa.Integer(), nullable=True),
        sa.Column("memory_mb", sa.Float(), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "job_previews",
        sa.Column("job_id", sa.Integer(), sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("png", sa.LargeBinary(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("job_previews")
    op.drop_table("workers")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("affinity_skips")
