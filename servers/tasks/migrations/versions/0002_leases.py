"""leases: each attempt's fencing token and lease end

Revision ID: tasks_0002
Revises: tasks_0001
"""

import sqlalchemy as sa
from alembic import op

revision = "tasks_0002"
down_revision = "tasks_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("tasks_tasks") as batch:
        batch.add_column(sa.Column("attempt_token", sa.String(36), nullable=True))
        batch.add_column(sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index("ix_tasks_tasks_lease", "tasks_tasks", ["status", "lease_expires_at"])


def downgrade() -> None:
    op.drop_index("ix_tasks_tasks_lease", "tasks_tasks")
    with op.batch_alter_table("tasks_tasks") as batch:
        batch.drop_column("lease_expires_at")
        batch.drop_column("attempt_token")
