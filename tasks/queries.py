"""The SQL queries users run (sql/queries/*.sql): listed, described and run with bound parameters."""

import math
import re
from pathlib import Path

from sqlalchemy import text

from storage.database import db
from storage.errors import VtagError
from storage.formats.yt8m_spec import NUL_REFUSED, NUM_CLASSES

QUERIES = Path(__file__).resolve().parent.parent / "sql" / "queries"


class QueryError(VtagError, ValueError):
    pass


def available() -> dict[str, Path]:
    return {path.stem: path for path in sorted(QUERIES.glob("*.sql"))}


def describe(name: str) -> tuple[str, dict[str, str]]:
    """(the header comment, {parameter: type}) of a query; types come from its `Parameters:` line."""
    sql = _path(name).read_text()
    header = " ".join(line[2:].strip() for line in sql.splitlines() if line.startswith("--"))
    declared = dict(re.findall(r"(\w+) \((text|integer|number)", header))
    used = set(re.findall(r"(?<!:):([a-z_]+)", sql))
    return header, {p: declared.get(p, "text") for p in sorted(used)}


def _path(name: str) -> Path:
    queries = available()
    if name not in queries:
        raise QueryError(f"no query {name!r} (known: {', '.join(queries)})")
    return queries[name]


MAX_ROWS = 100_000  # a `limit` beyond this is an export's job, not a terminal table's
MAX_LABELS = NUM_CLASSES
INTEGER_COLUMN = 2**31 - 1  # ids, versions and ranks are 32-bit integer columns
RANGES = {"limit": (1, MAX_ROWS), "k": (1, MAX_LABELS), "label_id": (0, MAX_LABELS - 1)}


def _value(name: str, kind: str, raw):
    """A parameter as its declared type, within its range, or a QueryError naming it: a value the
    database would refuse (LIMIT -1, a number beyond bigint) must not reach it as a traceback."""
    if kind == "text":
        if "\x00" in str(raw):
            raise QueryError(f"parameter {name} holds a NUL byte ({NUL_REFUSED})")
        return raw
    low, high = RANGES.get(name, (0, INTEGER_COLUMN))
    wanted = f"an integer from {low} to {high}" if kind == "integer" else "a finite number"
    try:
        value = int(raw) if kind == "integer" else float(raw)
    except (TypeError, ValueError):
        raise QueryError(f"parameter {name} must be {wanted}, not {raw!r}") from None
    if (kind == "integer" and not low <= value <= high) or not math.isfinite(value) or isinstance(raw, bool):
        raise QueryError(f"parameter {name} must be {wanted}, not {raw!r}")
    return value


def run(db_url: str, name: str, params: dict) -> tuple[list[str], list[tuple]]:
    """Run a query with its parameters bound (never formatted into the SQL); return (columns, rows)."""
    _, needed = describe(name)
    missing = [p for p in needed if p not in params]
    if missing:
        raise QueryError(f"query {name!r} needs {', '.join(f'{p}=...' for p in missing)}")
    unknown = sorted(set(params) - set(needed))
    if unknown:
        raise QueryError(f"query {name!r} takes no parameter {', '.join(unknown)} (it takes {', '.join(needed)})")
    values = {k: _value(k, needed[k], v) for k, v in params.items()}
    with db.transaction(db_url) as conn:
        result = conn.execute(text(_path(name).read_text()), values)
        return list(result.keys()), [tuple(row) for row in result]
