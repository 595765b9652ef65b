"""ended index: tasks by status and end time

The metrics read the tasks that completed or failed since a moment (today, the last 24 hours);
without this index each scrape would read every ended task ever kept.

Revision ID: tasks_0004
Revises: tasks_0003
"""

from alembic import op

revision = "tasks_0004"
down_revision = "tasks_0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_tasks_tasks_ended", "tasks_tasks", ["status", "completed_at"])


def downgrade() -> None:
    op.drop_index("ix_tasks_tasks_ended", "tasks_tasks")
