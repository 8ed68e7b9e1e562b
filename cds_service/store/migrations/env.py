"""Alembic environment: runs on the connection cds_service.store.schema hands over (no alembic.ini needed)."""

from __future__ import annotations

from alembic import context

from cds_service.store.models import metadata
from cds_service.store.schema import VERSION_TABLE

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=metadata,
    version_table=VERSION_TABLE,
    render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters tables by copying them
)
with context.begin_transaction():
    context.run_migrations()
