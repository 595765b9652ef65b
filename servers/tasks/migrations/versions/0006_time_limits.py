"""time limits: how long one attempt of a task may run, and when the current one was leased

A task created before this revision has no limit (timeout_seconds 0); the API gives every new
task one. The sweeper finds the attempts past their limit among the held tasks, which the
lease index already narrows down.

Revision ID: tasks_0006
Revises: tasks_0005
"""

import sqlalchemy as sa
from alembic import op

revision = "tasks_0006"
down_revision = "tasks_0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("tasks_tasks") as batch:
        batch.add_column(
            sa.Column("timeout_seconds", sa.Integer(), nullable=False, server_default="0")
        )
        batch.add_column(sa.Column("leased_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("tasks_tasks") as batch:
        batch.drop_column("leased_at")
        batch.drop_column("timeout_seconds")
