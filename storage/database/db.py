"""Database access: engines for SQLite (embedded default) and PostgreSQL, the unit of work, and Alembic
migrations.

The functions of `storage.database` take a Connection and never commit: the task that owns a unit of work
opens it (`transaction`) and passes it down, so that what belongs together commits together. Only what
spans many transactions takes the Engine (the run lock, the chunk writer's threads).

Migrations run at deploy time (`vtag db upgrade`, and the Airflow images' init step), never inside a task:
work checks the schema is current (`require_current`). The one exception is the command line's embedded
SQLite file under VTAG_HOME, which every `vtag` command migrates on entry (tasks/cli.py).
"""

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import cache
from pathlib import Path

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

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


SUPPORTED = "sqlite:///path or postgresql://user@host/db"


@cache
def engine_for(url: str) -> Engine:
    try:
        parsed = make_url(normalize_url(url))
    except ArgumentError:
        raise DatabaseURLError(f"not a database URL: {url!r} (expected {SUPPORTED})") from None
    shown = parsed.render_as_string(hide_password=True)
    backend = parsed.get_backend_name()
    if backend not in ("sqlite", "postgresql"):
        raise DatabaseURLError(f"{shown}: {backend} databases are not supported (use {SUPPORTED})")
    if backend == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            folder = Path(parsed.database).parent
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise DatabaseURLError(f"{shown}: cannot create its folder {folder}: {exc.strerror or exc}") from None
        # Mapped ingest tasks write the manifest at once: wait for the lock rather than fail.
        engine = create_engine(parsed, connect_args={"timeout": 60})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    try:
        return create_engine(parsed, pool_pre_ping=True)
    except (NoSuchModuleError, ImportError) as exc:  # a driver named that is not installed (postgresql+pg8000)
        raise DatabaseURLError(f"{shown}: its driver is not installed ({exc}); use {SUPPORTED}") from None


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


class SchemaOutOfDate(VtagError):
    pass


class MigrationError(VtagError, ValueError):
    """A migration that cannot be run as asked (a revision that does not exist)."""


def upgrade(url: str, revision: str = "head") -> None:
    """Migrate to `revision`; a database already there costs one query. Concurrent callers are safe:
    one thread at a time here, and on PostgreSQL an advisory lock in env.py across processes."""
    from alembic import command

    config = _alembic_config(engine_for(url))
    current = current_revision(url)
    if revision == "head" and current == head_revision():
        return
    _refuse_unknown(url, current)
    with _migrating, _migration_errors(revision):
        command.upgrade(config, revision)


def downgrade(url: str, revision: str) -> None:
    from alembic import command

    _refuse_unknown(url, current_revision(url))
    with _migrating, _migration_errors(revision):
        command.downgrade(_alembic_config(engine_for(url)), revision)


@contextmanager
def _migration_errors(revision: str) -> Iterator[None]:
    from alembic.util import CommandError

    try:
        yield
    except CommandError as exc:
        raise MigrationError(f"schema revision {revision!r}: {exc}") from None


def known_revisions() -> set[str]:
    from alembic.script import ScriptDirectory

    return {script.revision for script in ScriptDirectory.from_config(_alembic_config(None)).walk_revisions()}


def _refuse_unknown(url: str, current: str | None) -> None:
    """A database a newer release migrated: this one knows neither its schema nor the way back from it."""
    if current is not None and current not in known_revisions():
        raise SchemaOutOfDate(
            f"the database {engine_for(url).url.render_as_string(hide_password=True)} is at schema revision "
            f"{current}, newer than this release knows (its newest is {head_revision()}): use the release "
            "that migrated it, or a newer one"
        )


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_alembic_config(None)).get_current_head()


def require_current(url: str) -> None:
    """Refuse to work on a database whose schema is not the code's: one query. Tasks call it instead of
    migrating, so that a schema change happens once, at deploy time, and never under a running night."""
    current, head = current_revision(url), head_revision()
    _refuse_unknown(url, current)
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
