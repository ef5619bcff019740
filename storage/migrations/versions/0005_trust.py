"""Trust: vote provenance (verified votes alone are counted), web sessions and Discord sign-ins

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23
"""
import math

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def _wilson(up: int, down: int, z: float = 1.959964) -> float:
    # A copy of storage.ranking.wilson_lower_bound as it is today: a migration must not change when the code does.
    n = up + down
    if n <= 0 or up <= 0:
        return 0.0
    share = up / n
    centre = share + z * z / (2 * n)
    margin = z * math.sqrt((share * (1 - share) + z * z / (4 * n)) / n)
    return (centre - margin) / (1 + z * z / n)


def upgrade() -> None:
    with op.batch_alter_table("votes") as batch:
        batch.add_column(sa.Column("verified", sa.Boolean(), nullable=False, server_default=sa.true()))
    op.create_index("ix_votes_user_created", "votes", ["user_id", "created_at"], unique=False)
    # Web votes so far came from a cookie anyone could choose: kept, but no longer counted.
    connection = op.get_bind()
    votes = sa.table("votes", sa.column("user_id", sa.String()), sa.column("image_id", sa.Integer()),
                     sa.column("value", sa.Integer()), sa.column("verified", sa.Boolean()))
    images = sa.table("images", sa.column("id", sa.Integer()), sa.column("up_votes", sa.Integer()),
                      sa.column("down_votes", sa.Integer()), sa.column("score", sa.Float()))
    touched = [row[0] for row in connection.execute(
        sa.select(votes.c.image_id).where(votes.c.user_id.like("web:%")).distinct())]
    connection.execute(votes.update().where(votes.c.user_id.like("web:%")).values(verified=False))
    for image_id in touched:
        up = connection.scalar(sa.select(sa.func.count()).where(votes.c.image_id == image_id, votes.c.verified,
                                                                votes.c.value > 0))
        down = connection.scalar(sa.select(sa.func.count()).where(votes.c.image_id == image_id, votes.c.verified,
                                                                  votes.c.value < 0))
        connection.execute(images.update().where(images.c.id == image_id)
                           .values(up_votes=up, down_votes=down, score=_wilson(up, down)))
    op.create_table(
        "web_sessions",
        sa.Column("token_sha256", sa.String(length=64), primary_key=True),
        sa.Column("user_id", sa.String(length=100), sa.ForeignKey("users.id"), nullable=False),
        sa.Column("verified", sa.Boolean(), nullable=False),
        sa.Column("csrf_token", sa.String(length=64), nullable=False),
        sa.Column("guild_ids", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_web_sessions_user", "web_sessions", ["user_id"], unique=False)
    op.create_index("ix_web_sessions_expires", "web_sessions", ["expires_at"], unique=False)
    op.create_table(
        "sign_ins",
        sa.Column("state_sha256", sa.String(length=64), primary_key=True),
        sa.Column("code_verifier", sa.String(length=128), nullable=False),
        sa.Column("return_to", sa.String(length=300), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("sign_ins")
    op.drop_index("ix_web_sessions_expires", table_name="web_sessions")
    op.drop_index("ix_web_sessions_user", table_name="web_sessions")
    op.drop_table("web_sessions")
    op.drop_index("ix_votes_user_created", table_name="votes")
    with op.batch_alter_table("votes") as batch:
        batch.drop_column("verified")
