"""The body of every service's Alembic env.py: run on the connection Database.migrate passes."""

from __future__ import annotations

from alembic import context
from sqlalchemy import MetaData


def run(target_metadata: MetaData) -> None:
    config = context.config
    connection = config.attributes["connection"]
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        version_table=config.attributes["version_table"],
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()
