"""Database access: engines for SQLite (embedded default) and PostgreSQL, and Alembic migrations."""

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import cache
from pathlib import Path

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from storage.errors import VtagError

MIGRATIONS = Path(__file__).resolve().parents[2] / "sql" / "migrations"


class DatabaseURLError(VtagError, ValueError):
    pass


def normalize_url(url: str) -> str:
    """Accept the URL spellings Airflow connections and libpq users write, and pick our drivers."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg2://" + url[len(prefix) :]
    return url


@cache
def engine_for(url: str) -> Engine:
    try:
        parsed = make_url(normalize_url(url))
    except ArgumentError:
        raise DatabaseURLError(f"not a database URL: {url!r} (expected sqlite:///path or postgresql://...)") from None
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        # Mapped ingest tasks write the manifest at once: wait for the lock rather than fail.
        engine = create_engine(parsed, connect_args={"timeout": 60})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(parsed, pool_pre_ping=True)


@contextmanager
def transaction(db: "str | Connection") -> Iterator[Connection]:
    """A connection in a transaction: the caller's own when given a Connection (the caller commits or rolls
    back the whole unit of work), else a new one on the URL's engine, committed on clean exit."""
    if isinstance(db, Connection):
        yield db
        return
    with engine_for(db).begin() as conn:
        yield conn


def utcnow() -> datetime:
    """Timestamps for the tables: timezone-aware UTC, so SQLite and PostgreSQL rows compare alike."""
    return datetime.now(UTC)


def upsert_insert(bind):
    """The dialect's INSERT, which has ON CONFLICT DO UPDATE / DO NOTHING, for an engine or connection."""
    from sqlalchemy.dialects import postgresql, sqlite

    return (postgresql if bind.dialect.name == "postgresql" else sqlite).insert


def _sqlite_pragmas(dbapi_connection, _record):
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _alembic_config(engine: Engine):
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["engine"] = engine
    return config


_migrating = threading.Lock()  # Alembic's context is process-global: one migration at a time


def upgrade(url: str, revision: str = "head") -> None:
    """Migrate to `revision`; a database already there costs one query. Concurrent callers are safe:
    one thread at a time here, and on PostgreSQL an advisory lock in env.py across processes."""
    from alembic import command
    from alembic.script import ScriptDirectory

    config = _alembic_config(engine_for(url))
    if revision == "head" and current_revision(url) == ScriptDirectory.from_config(config).get_current_head():
        return
    with _migrating:
        command.upgrade(config, revision)


def downgrade(url: str, revision: str) -> None:
    from alembic import command

    with _migrating:
        command.downgrade(_alembic_config(engine_for(url)), revision)


def current_revision(url: str) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine_for(url).connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()
