"""owner index: a user's tasks by status

Creating a task counts the owner's unfinished ones (AGENTMESH_OPEN_TASKS_PER_USER); this index
lets that count read only those, never the user's finished history.

Revision ID: tasks_0008
Revises: tasks_0007
"""

from alembic import op

revision = "tasks_0008"
down_revision = "tasks_0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_tasks_tasks_owner_status", "tasks_tasks", ["owner_id", "status"])


def downgrade() -> None:
    op.drop_index("ix_tasks_tasks_owner_status", "tasks_tasks")
