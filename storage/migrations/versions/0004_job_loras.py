"""job_loras: one row per LoRA a job used, so the gallery can list a LoRA's images on every database

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22
"""
import json

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

BATCH = 1000


def upgrade() -> None:
    op.create_table(
        "job_loras",
        sa.Column("job_id", sa.Integer(), sa.ForeignKey("jobs.id"), primary_key=True),
        sa.Column("name", sa.String(length=200), primary_key=True),
    )
    op.create_index("ix_job_loras_name", "job_loras", ["name", "job_id"], unique=False)
    # Backfill from the JSON list each job already carries ([{"name": ..., "weight": ...}, ...]).
    connection = op.get_bind()
    jobs = sa.table("jobs", sa.column("id", sa.Integer()), sa.column("loras", sa.JSON()))
    job_loras = sa.table("job_loras", sa.column("job_id", sa.Integer()), sa.column("name", sa.String()))
    rows = []
    for job_id, loras in connection.execute(sa.select(jobs.c.id, jobs.c.loras).where(jobs.c.loras.is_not(None))):
        if isinstance(loras, str):  # some drivers hand JSON back as text
            loras = json.loads(loras)
        names = {entry["name"] for entry in loras or [] if isinstance(entry, dict) and entry.get("name")}
        rows += [{"job_id": job_id, "name": str(name)[:200]} for name in sorted(names)]
        if len(rows) >= BATCH:
            connection.execute(job_loras.insert(), rows)
            rows = []
    if rows:
        connection.execute(job_loras.insert(), rows)


def downgrade() -> None:
    op.drop_index("ix_job_loras_name", table_name="job_loras")
    op.drop_table("job_loras")
