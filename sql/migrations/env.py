"""Alembic environment: runs against the engine storage.database.db hands over (SQLite or PostgreSQL)."""

from alembic import context

from storage.database.schema import metadata

engine = context.config.attributes["engine"]
with engine.begin() as connection:
    if connection.dialect.name == "postgresql":  # two processes migrating at once: the second waits
        connection.exec_driver_sql("SELECT pg_advisory_xact_lock(4242001)")
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters tables by copying them
    )
    context.run_migrations()
