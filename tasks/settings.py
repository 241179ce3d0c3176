"""Embedded defaults, overridable from the environment, so a new user runs everything at once.

Under Airflow the DAGs resolve connections and variables first (airflow_glue/config.py) and fall
back to these.
"""

import math
import os
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

from storage.errors import UsageError


def vtag_home() -> Path:
    return Path(os.environ.get("VTAG_HOME") or Path.home() / ".vtag").resolve()


def embedded_db_url() -> str:
    """The SQLite file under VTAG_HOME: the command line's own database, which it migrates itself."""
    return f"sqlite:///{vtag_home() / 'vtag.db'}"


def default_db_url() -> str:
    return os.environ.get("VTAG_DB_URL") or embedded_db_url()


def is_embedded_db(url: str) -> bool:
    """Whether `url` names the embedded SQLite file, however spelled (a relative path, `..`, a link)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        return False
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return False
    return Path(parsed.database).resolve() == vtag_home() / "vtag.db"


def default_raw_uri() -> str:
    """Where TFRecord shards arrive."""
    return os.environ.get("VTAG_RAW_URI") or str(vtag_home() / "store" / "raw")


def default_parquet_uri() -> str:
    """Where ingest writes the Parquet layout."""
    return os.environ.get("VTAG_PARQUET_URI") or str(vtag_home() / "store" / "parquet")


def default_models_uri() -> str:
    """Where training writes checkpoints, one folder per run."""
    return os.environ.get("VTAG_MODELS_URI") or str(vtag_home() / "store" / "models")


def default_exports_uri() -> str:
    """Where nightly inference writes Google's CSV and the seed's pickle, a folder per logical date."""
    return os.environ.get("VTAG_EXPORTS_URI") or str(vtag_home() / "store" / "exports")


LOCK_TIMEOUT_S = 600.0  # a night's parts take minutes; a try still holding the lock after 10 is likely hung


def _number(raw, name: str, variable: str, default, convert, valid, wanted: str):
    """`raw` (a flag's or a param's value, checked as `name`), else $`variable`, else `default`: converted,
    and refused naming where it came from unless `valid`."""
    if raw is None:
        raw, name = os.environ.get(variable), variable
        if not raw:
            return default
    try:
        value = convert(raw)
    except (TypeError, ValueError):
        value = None
    if value is None or isinstance(raw, bool) or not valid(value):
        raise UsageError(f"{name} must be {wanted}, not {raw!r}")
    return value


def lock_timeout_s(raw: str | float | None = None, name: str = "") -> float:
    """How long a run waits for the lock of a night another run holds, in seconds: `raw` (a flag's or a
    param's value, checked as `name`), else $VTAG_LOCK_TIMEOUT_S, else 600. A finite number, 0 or more."""
    return _number(
        raw,
        name,
        "VTAG_LOCK_TIMEOUT_S",
        LOCK_TIMEOUT_S,
        float,
        lambda seconds: math.isfinite(seconds) and seconds >= 0,
        "a number of seconds (0 or more)",
    )


NIGHT_LAYERS = 7  # a week of later nights: a lookup probes at most 8 indexes of a version before they merge


def night_layers(raw: str | int | None = None, name: str = "") -> int:
    """How many later nights of a version may stay layers of their own before they are merged into its
    base (storage/database/partitions.py): `raw` (a flag's value, checked as `name`), else
    $VTAG_NIGHT_LAYERS, else 7. 0 merges every night's layer right after it."""
    return _number(
        raw, name, "VTAG_NIGHT_LAYERS", NIGHT_LAYERS, int, lambda n: n >= 0, "a whole number of nights (0 or more)"
    )


# Airflow's schedule presets, besides cron expressions.
SCHEDULE_PRESETS = ("@once", "@continuous", "@hourly", "@daily", "@weekly", "@monthly", "@quarterly", "@yearly")


def schedule(name: str, default: str) -> str | None:
    """$`name` as a DAG's schedule: a cron expression or one of Airflow's presets; set empty, None (manual
    and backfill runs only). Checked where the DAG file is parsed, so that a bad value names its variable."""
    raw = os.environ.get(name, default).strip()
    if not raw:
        return None
    from croniter import croniter  # Airflow's own cron parser

    if raw not in SCHEDULE_PRESETS and not croniter.is_valid(raw):
        raise UsageError(f"{name} must be a cron expression such as '0 2 * * *' (or empty: no schedule), not {raw!r}")
    return raw


def start_date(name: str, default: str) -> datetime:
    """$`name` as a DAG's start date: ISO 8601, UTC when it names no zone."""
    raw = os.environ.get(name) or default
    try:
        when = datetime.fromisoformat(raw.strip())
    except ValueError:
        raise UsageError(f"{name} must be an ISO 8601 date such as 2026-11-01, not {raw!r}") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


NIGHT_DEADLINE = "6h"  # a night takes minutes to a few hours at full size; still running after 6 is stuck
_INTERVAL = re.compile(r"(\d+)\s*([hms])")
_SECONDS = {"h": 3600, "m": 60, "s": 1}


def night_deadline(raw: str | None = None) -> timedelta | None:
    """How long after a nightly run was queued it must have finished ($VTAG_NIGHT_DEADLINE: "6h", "90m",
    "1h30m", "45s"); unset: 6h; empty: no deadline."""
    raw = os.environ.get("VTAG_NIGHT_DEADLINE", NIGHT_DEADLINE) if raw is None else raw
    text = raw.strip().lower()
    if not text:
        return None
    parts = _INTERVAL.findall(text)
    if not parts or _INTERVAL.sub("", text).strip():
        raise UsageError(
            f"VTAG_NIGHT_DEADLINE must be an interval such as 6h, 90m, 1h30m or 45s (empty: none), not {raw!r}"
        )
    interval = timedelta(seconds=sum(int(n) * _SECONDS[unit] for n, unit in parts))
    if interval <= timedelta(0):
        raise UsageError(f"VTAG_NIGHT_DEADLINE must be longer than 0, not {raw!r}")
    return interval
