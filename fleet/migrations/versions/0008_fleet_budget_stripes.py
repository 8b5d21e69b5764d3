"""The fleet's daily budget held in stripes ('*0' to '*7') with allotments, not one row every dispatch locks.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("spend_days") as batch:
        batch.add_column(sa.Column("allot_micros", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("cap_micros", sa.BigInteger(), nullable=True))
    # What the single fleet row holds moves to the first stripe; its allotment is shared out at the next
    # reservation under a cap (no allotment yet: the first one rebalances). The sums stay what they were.
    op.execute("UPDATE spend_days SET scope = '*0' WHERE scope = '*'")


def downgrade() -> None:
    op.execute("INSERT INTO spend_days (day, scope, reserved_micros, spent_micros, runs, updated_at) "
               "SELECT day, '*', SUM(reserved_micros), SUM(spent_micros), 0, MAX(updated_at) FROM spend_days "
               "WHERE scope LIKE '*_' GROUP BY day")
    op.execute("DELETE FROM spend_days WHERE scope LIKE '*_'")
    with op.batch_alter_table("spend_days") as batch:
        batch.drop_column("cap_micros")
        batch.drop_column("allot_micros")
