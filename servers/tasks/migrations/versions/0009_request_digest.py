"""request digest: what a create with an idempotency key asked for

A repeat of the key is answered with the first task only when it is the same request; the
digest (SHA-256 hex of the create's fields, servers/tasks/domain.py) tells. Tasks created
before this revision have none and answer any repeat, as they did.

Revision ID: tasks_0009
Revises: tasks_0008
"""

import sqlalchemy as sa
from alembic import op

revision = "tasks_0009"
down_revision = "tasks_0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("tasks_tasks") as batch:
        batch.add_column(sa.Column("request_digest", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("tasks_tasks") as batch:
        batch.drop_column("request_digest")
