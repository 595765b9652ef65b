"""agent index: tasks by the agent that ran their last attempt, and status

GET /api/v1/agents shows what each agent has finished (TasksInternalService.GetAgentFigures),
counted over its tasks; without this index every page of agents read the whole table.

Revision ID: tasks_0007
Revises: tasks_0006
"""

from alembic import op

revision = "tasks_0007"
down_revision = "tasks_0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_tasks_tasks_agent", "tasks_tasks", ["assigned_agent", "status"])


def downgrade() -> None:
    op.drop_index("ix_tasks_tasks_agent", "tasks_tasks")
