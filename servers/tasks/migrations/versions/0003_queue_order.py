"""queue order: an index in the order claims read the queue

Claims take the queued task of highest priority, oldest first. The index of tasks_0001 has
priority ascending, so both SQLite and PostgreSQL sorted every queued task of a priority on each
claim; this one is read in that order and stops at the first rows.

Revision ID: tasks_0003
Revises: tasks_0002
"""

import sqlalchemy as sa
from alembic import op

revision = "tasks_0003"
down_revision = "tasks_0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "ix_tasks_tasks_queue",
        "tasks_tasks",
        ["status", sa.text("priority DESC"), "created_at", "task_id"],
    )
    op.drop_index("ix_tasks_tasks_status_priority", "tasks_tasks")


def downgrade() -> None:
    op.create_index(
        "ix_tasks_tasks_status_priority", "tasks_tasks", ["status", "priority", "created_at"]
    )
    op.drop_index("ix_tasks_tasks_queue", "tasks_tasks")
