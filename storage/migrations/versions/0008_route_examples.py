"""Learned routing examples: prompts members chose a model or LoRA for, whose results others liked

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-24
"""
import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "route_examples",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("scope", sa.String(length=100), nullable=False),
        sa.Column("text", sa.String(length=300), nullable=False),
        sa.Column("target", sa.String(length=200), nullable=False),
        sa.Column("embedding", sa.LargeBinary(), nullable=False),
        sa.Column("job_id", sa.Integer(), sa.ForeignKey("jobs.id", ondelete="SET NULL"), nullable=True),
        sa.Column("chosen_by", sa.String(length=100), nullable=False),
        sa.Column("up_votes", sa.Integer(), nullable=False),
        sa.Column("learned_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("uq_route_examples", "route_examples", ["scope", "target", "text"], unique=True)
    op.create_index("ix_route_examples_scope_learned", "route_examples", ["scope", "learned_at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_route_examples_scope_learned", table_name="route_examples")
    op.drop_index("uq_route_examples", table_name="route_examples")
    op.drop_table("route_examples")
