"""access tokens issued before a disable or a deletion are refused in every service: a token
generation per account, and the cutoffs of the last access-token lifetime

Revision ID: auth_0006
Revises: auth_0005
"""

import sqlalchemy as sa
from alembic import op

revision = "auth_0006"
down_revision = "auth_0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("auth_users") as batch:
        batch.add_column(
            sa.Column("token_generation", sa.Integer(), nullable=False, server_default="0")
        )
    op.create_table(
        "auth_token_cutoffs",
        sa.Column("user_id", sa.String(36), primary_key=True),
        sa.Column("min_generation", sa.Integer(), nullable=False),
        sa.Column("changed_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_auth_token_cutoffs_changed_at", "auth_token_cutoffs", ["changed_at"])


def downgrade() -> None:
    op.drop_index("ix_auth_token_cutoffs_changed_at", table_name="auth_token_cutoffs")
    op.drop_table("auth_token_cutoffs")
    with op.batch_alter_table("auth_users") as batch:
        batch.drop_column("token_generation")
