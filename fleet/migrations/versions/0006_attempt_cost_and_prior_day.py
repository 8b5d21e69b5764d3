"""Book each attempt's cumulative cost (a step is never counted twice), and keep what a run spent on the
budget day before its retry started.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("attempt_cost_micros", sa.BigInteger(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("prior_day", sa.String(length=10), nullable=True))
        batch_op.add_column(sa.Column("prior_cost_micros", sa.BigInteger(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_column("prior_cost_micros")
        batch_op.drop_column("prior_day")
        batch_op.drop_column("attempt_cost_micros")
