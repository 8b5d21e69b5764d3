"""A dead letter's id is never handed out again: SQLite reused a purged one's (the page and `fleet dlq` act by id).

PostgreSQL's sequence never reuses an id; SQLite's INTEGER PRIMARY KEY takes the largest id left plus one, so after
`fleet dlq purge --all` the next dead letter was id 1 again. AUTOINCREMENT (a table rebuild on SQLite) keeps the
largest id ever given in sqlite_sequence.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    with op.batch_alter_table("dead_letters", recreate="always", table_kwargs={"sqlite_autoincrement": True}):
        pass


def downgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    with op.batch_alter_table("dead_letters", recreate="always", table_kwargs={"sqlite_autoincrement": False}):
        pass
