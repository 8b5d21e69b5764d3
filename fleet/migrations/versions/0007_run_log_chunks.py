"""Run logs shipped to the database in chunks, so `fleet logs` and the page work from any host.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "run_log_chunks",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("offset", sa.BigInteger(), nullable=False),
        sa.Column("at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("run_id", "attempt", "offset", name="uq_run_log_chunks_piece"),
    )
    op.create_index("ix_run_log_chunks_run_id", "run_log_chunks", ["run_id", "id"])


def downgrade() -> None:
    op.drop_index("ix_run_log_chunks_run_id", table_name="run_log_chunks")
    op.drop_table("run_log_chunks")
