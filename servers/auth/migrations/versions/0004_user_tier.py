"""a quota tier per user (seed 000's free, pro, enterprise; empty: the mesh's default)

Revision ID: auth_0004
Revises: auth_0003
"""

import sqlalchemy as sa
from alembic import op

revision = "auth_0004"
down_revision = "auth_0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("auth_users") as batch:
        batch.add_column(sa.Column("tier", sa.String(16), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("auth_users") as batch:
        batch.drop_column("tier")
