"""images: up/down vote counts and the Wilson score, for ranking by index

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""
import math

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def _wilson(up: int, down: int, z: float = 1.959964) -> float:
    # A copy of storage.ranking.wilson_lower_bound: a migration must not change when the code does.
    n = up + down
    if n <= 0:
        return 0.0
    share = up / n
    centre = share + z * z / (2 * n)
    margin = z * math.sqrt((share * (1 - share) + z * z / (4 * n)) / n)
    return (centre - margin) / (1 + z * z / n)


def upgrade() -> None:
    with op.batch_alter_table("images", schema=None) as batch_op:
        batch_op.add_column(sa.Column("up_votes", sa.Integer(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("down_votes", sa.Integer(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("score", sa.Float(), server_default="0", nullable=False))
        batch_op.create_index("ix_images_score", ["score", "id"], unique=False)
        batch_op.create_index("ix_images_created", ["created_at"], unique=False)
    # Backfill from the votes already cast.
    connection = op.get_bind()
    rows = connection.execute(sa.text(
        "SELECT image_id, SUM(CASE WHEN value > 0 THEN 1 ELSE 0 END), SUM(CASE WHEN value < 0 THEN 1 ELSE 0 END) "
        "FROM votes GROUP BY image_id")).all()
    for image_id, up, down in rows:
        connection.execute(sa.text("UPDATE images SET up_votes = :up, down_votes = :down, score = :score WHERE id = :id"),
                           {"up": int(up), "down": int(down), "score": _wilson(int(up), int(down)), "id": image_id})


def downgrade() -> None:
    with op.batch_alter_table("images", schema=None) as batch_op:
        batch_op.drop_index("ix_images_created")
        batch_op.drop_index("ix_images_score")
        batch_op.drop_column("score")
        batch_op.drop_column("down_votes")
        batch_op.drop_column("up_votes")
