"""Alembic environment: migrations run on a connection handed over by `Database._migrate`."""
from alembic import context

from storage.models import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("Run migrations through `dreamloom db upgrade` (storage.database.Database.upgrade).")
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
