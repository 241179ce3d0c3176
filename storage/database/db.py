"""Database access: engines for SQLite (embedded default) and PostgreSQL, the unit of work, and Alembic
migrations.

The functions of `storage.database` take a Connection and never commit: the task that owns a unit of work
opens it (`transaction`) and passes it down, so that what belongs together commits together. Only what
spans many transactions takes the Engine (the run lock, the chunk writer's threads).

Migrations run at deploy time (`vtag db upgrade`, which every `vtag` command also runs at its start, and
the Airflow images' init step), never inside a task: work checks the schema is current (`require_current`).
"""

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
def transaction(url: str) -> Iterator[Connection]:
    """One unit of work: a connection in a transaction, committed on clean exit, rolled back on an error,
    and returned to the pool either way (before the caller's error handling runs)."""
    with engine_for(url).begin() as conn:
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


def _alembic_config(engine: Engine | None):
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

    config = _alembic_config(engine_for(url))
    if revision == "head" and current_revision(url) == head_revision():
        return
    with _migrating:
        command.upgrade(config, revision)


def downgrade(url: str, revision: str) -> None:
    from alembic import command

    with _migrating:
        command.downgrade(_alembic_config(engine_for(url)), revision)


class SchemaOutOfDate(VtagError):
    pass


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_alembic_config(None)).get_current_head()


def require_current(url: str) -> None:
    """Refuse to work on a database whose schema is not the code's: one query. Tasks call it instead of
    migrating, so that a schema change happens once, at deploy time, and never under a running night."""
    current, head = current_revision(url), head_revision()
    if current != head:
        state = "has no vtag schema" if current is None else f"is at schema revision {current}"
        raise SchemaOutOfDate(
            f"the database {engine_for(url).url.render_as_string(hide_password=True)} {state}, this release "
            f"needs {head}: run `vtag db upgrade --db <url>` (the Airflow image's init step runs it)"
        )


def current_revision(url: str) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine_for(url).connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()
