"""Run locks: one run of a night (logical date, model version), or of one part of it, scores and
writes at a time; a waiting run gives up after a timeout, naming the holder.

PostgreSQL: session advisory locks; SQLite: a file lock beside the database.
"""

import hashlib
import logging
import os
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import Engine

from storage.errors import VtagError

log = logging.getLogger(__name__)


def _lock_key(logical_date: datetime, model_version: int, part: int | None = None) -> int:
    """A signed 64-bit advisory-lock key for (model version, logical date[, part]). Alembic's lock
    (env.py) and storage.database.partitions.PARTITION_LOCK are small constants: a clash costs at most a wait,
    never a wrong result."""
    suffix = "" if part is None else f":part{part}"
    digest = hashlib.blake2b(
        f"vtag-inference-run:{model_version}:{logical_date.isoformat()}{suffix}".encode(), digest_size=8
    )
    return int.from_bytes(digest.digest(), "big", signed=True)


class LostRunLock(VtagError, RuntimeError):
    """The connection holding a run's lock went away while the run wrote: another run may have taken over."""


@dataclass(frozen=True)
class RunLockHolder:
    """Which PostgreSQL session holds which advisory lock: each chunk checks it still does."""

    pid: int
    key: int

    def check(self, conn) -> None:
        held = conn.exec_driver_sql(
            "SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted AND pid = %s AND objsubid = 1"
            " AND ((classid::bigint << 32) | objid::bigint) = %s",  # the 64-bit key, split in two oids
            (self.pid, self.key),
        ).first()
        if held is None:
            raise LostRunLock(
                f"the connection holding this run's lock (backend {self.pid}) is gone: stopping, "
                "so that a run which may have taken over is not written under"
            )


class FileLockHolder:
    """The SQLite file lock's holder: this process, which cannot lose the lock while it lives (the kernel
    drops it with the process), so there is nothing to check."""

    def check(self, conn) -> None:
        pass


class RunLockTimeout(VtagError, ValueError):
    """Another run held the night's lock longer than the caller would wait (a ValueError: the command
    line prints it as its one line)."""


LOCK_POLL_S = 0.5  # how often a waiting run tries the lock again: a polled wait can give up, a blocked one cannot


def _night_label(logical_date: datetime, model_version: int, part: int | None) -> str:
    return f"night {logical_date.isoformat()} of model version {model_version}" + (
        "" if part is None else f" (part {part})"
    )


def _timed_out(what: str, waited_s: float, holder: str) -> RunLockTimeout:
    return RunLockTimeout(
        f"{what} is locked by another run (waited {waited_s:g} s): {holder}; if that run is hung, "
        "end it, then retry (a longer wait: VTAG_LOCK_TIMEOUT_S or the lock_timeout_s parameter)"
    )


def _poll(try_once, timeout_s: float, warn) -> bool:
    """Call `try_once` until it returns True or `timeout_s` has passed; `warn` once when the first try fails."""
    deadline = time.monotonic() + timeout_s
    if try_once():
        return True
    warn()
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(LOCK_POLL_S, left))
        if try_once():
            return True
    return False


def _pg_holders(conn, key: int) -> str:
    held = conn.exec_driver_sql(
        "SELECT l.pid, a.application_name, a.backend_start FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid"
        " WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1"
        " AND ((l.classid::bigint << 32) | l.objid::bigint) = %s ORDER BY l.pid LIMIT 3",
        (key,),
    ).all()
    conn.commit()
    if not held:
        return "its holder has just let go"
    return (
        "held by "
        + ", ".join(
            f"PostgreSQL backend {pid}"
            + (f" ({app})" if app else "")
            + (f" connected since {since:%Y-%m-%d %H:%M:%S %Z}" if since else "")
            for pid, app, since in held
        )
        + " (pg_terminate_backend(pid) ends one)"
    )


@contextmanager
def _pg_run_lock(engine, what: str, keys: list[tuple[str, int]], timeout_s: float):
    conn = engine.connect()
    taken: list[tuple[str, int]] = []
    started = time.monotonic()
    try:
        for mode, key in keys:

            def try_once(mode=mode, key=key) -> bool:
                got = conn.exec_driver_sql(f"SELECT pg_try_advisory_lock{mode}(%s)", (key,)).scalar()
                conn.commit()  # no transaction (and no snapshot) stays open while this waits
                return bool(got)

            if not _poll(
                try_once,
                max(0.0, timeout_s - (time.monotonic() - started)),
                lambda: log.warning(
                    "another run of %s is in progress: waiting for it to finish (at most %g s)", what, timeout_s
                ),
            ):
                raise _timed_out(what, timeout_s, _pg_holders(conn, key))
            taken.append((mode, key))
        pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
        conn.commit()  # the session locks outlive the transaction; no transaction stays open
        yield RunLockHolder(pid, keys[-1][1])
    finally:
        try:
            for mode, key in reversed(taken):
                conn.exec_driver_sql(f"SELECT pg_advisory_unlock{mode}(%s)", (key,))
            conn.commit()
        except Exception:  # the connection broke (server restarted): the locks went with it
            conn.invalidate()
        conn.close()


@contextmanager
def _file_run_lock(path: Path, what: str, timeout_s: float):
    import fcntl

    with open(path, "a+") as lock_file:

        def try_once() -> bool:
            try:
                fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                return False

        if not _poll(
            try_once,
            timeout_s,
            lambda: log.warning(
                "another inference run on %s is in progress: waiting for it to finish (at most %g s)", path, timeout_s
            ),
        ):
            lock_file.seek(0)
            holder = lock_file.read().strip()
            raise _timed_out(
                what, timeout_s, f"held by process {holder} (lock file {path})" if holder else f"lock file {path}"
            )
        try:
            lock_file.seek(0)
            lock_file.truncate()
            lock_file.write(f"{os.getpid()} on {socket.gethostname()}\n")  # whom a waiting run names
            lock_file.flush()
            yield None  # a file lock cannot be lost while this process lives
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


@contextmanager
def run_lock(engine: Engine, logical_date: datetime, model_version: int, part: int | None = None, *, timeout_s: float):
    """Held while a run of (logical date, model version), or one part of it, scores and writes.

    The whole night (`part` None: planning, or a `vtag infer` run) takes the night's lock exclusively;
    a part running as its own task takes it shared, beside its own part's lock exclusively. So parts
    of one night run side by side on several workers, two tries of one part take turns, and a rerun
    of the night waits for every part still running before it replaces their rows.

    A run waits at most `timeout_s` for an earlier one, then
    raises RunLockTimeout naming the holder: a hung try must not keep the next one waiting forever on
    its GPU slot.

    PostgreSQL: session advisory locks on a connection of their own, released when the run ends or its
    process dies (the server drops them with the connection). SQLite: a file lock beside the database,
    which every run and part shares (SQLite takes one writer at a time anyway). It takes the engine, not
    a caller's connection: the lock outlives the run's many transactions."""
    what = _night_label(logical_date, model_version, part)
    if engine.dialect.name == "postgresql":
        night = _lock_key(logical_date, model_version)
        keys = (
            [("", night)] if part is None else [("_shared", night), ("", _lock_key(logical_date, model_version, part))]
        )
        with _pg_run_lock(engine, what, keys, timeout_s) as holder:
            yield holder
        return
    database = engine.url.database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:":
        yield FileLockHolder()  # one process holds the database: nobody to take turns with
        return
    with _file_run_lock(Path(database).with_name(Path(database).name + "-inference.lock"), what, timeout_s):
        yield FileLockHolder()
