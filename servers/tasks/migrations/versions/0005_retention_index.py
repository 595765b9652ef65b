"""retention index: tasks by status and last change

Ended tasks are deleted once they are older than the retention (AGENTMESH_TASK_RETENTION_DAYS):
an ended task's updated_at is when it ended, and this index finds the old ones without reading
the others.

Revision ID: tasks_0005
Revises: tasks_0004
"""

from alembic import op

revision = "tasks_0005"
down_revision = "tasks_0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_tasks_tasks_changed", "tasks_tasks", ["status", "updated_at"])


def downgrade() -> None:
    op.drop_index("ix_tasks_tasks_changed", "tasks_tasks")
