"""The ingest manifest: which shards were converted, from what content, to where, and which failed.

Each function works in its caller's transaction: ingest writes a shard's succeeded row in the same
transaction as its catalogue rows.
"""

from dataclasses import dataclass

from sqlalchemy import Connection, select, update

from storage.database.db import upsert_insert, utcnow
from storage.database.schema import ingested_shards as t
from storage.objectstore import ObjectInfo


@dataclass(frozen=True)
class ShardFailure:
    error: str
    record: int | None = None
    offset: int | None = None


def _upsert(conn: Connection, source: ObjectInfo, dest: str, values: dict) -> None:
    insert = upsert_insert(conn)
    row = {
        "source_uri": source.uri,
        "dest_uri": dest,
        "size_bytes": source.size,
        "fingerprint": source.fingerprint,
        **values,
    }
    statement = insert(t).values(**row)
    statement = statement.on_conflict_do_update(
        index_elements=["source_uri", "dest_uri"],
        set_={k: statement.excluded[k] for k in row if k not in ("source_uri", "dest_uri")},
    )
    conn.execute(statement)


def _update(conn: Connection, source_uri: str, dest: str, values: dict) -> None:
    statement = update(t).where(t.c.source_uri == source_uri, t.c.dest_uri == dest).values(**values)
    conn.execute(statement)


def mark_running(conn: Connection, source: ObjectInfo, dest: str) -> None:
    """Start (or restart) the shard's row; the outcome is written over it by mark_succeeded/mark_failed."""
    _upsert(
        conn,
        source,
        dest,
        {
            "status": "running",
            "started_at": utcnow(),
            "finished_at": None,
            "error": None,
            "error_record": None,
            "error_offset": None,
            "rows": None,
            "checksum": None,
            "output_uri": None,
        },
    )


def mark_succeeded(
    conn: Connection,
    source: ObjectInfo,
    dest: str,
    *,
    output_uri: str,
    level: str,
    split: str,
    rows: int,
    checksum: str,
) -> None:
    _update(
        conn,
        source.uri,
        dest,
        {
            "status": "succeeded",
            "output_uri": output_uri,
            "level": level,
            "split": split,
            "rows": rows,
            "checksum": checksum,
            "finished_at": utcnow(),
        },
    )


def mark_failed(conn: Connection, source: ObjectInfo, dest: str, failure: ShardFailure) -> None:
    _update(
        conn,
        source.uri,
        dest,
        {
            "status": "failed",
            "error": failure.error,
            "error_record": failure.record,
            "error_offset": failure.offset,
            "finished_at": utcnow(),
        },
    )


def mark_replaced(conn: Connection, source_uri: str, dest: str, output_uri: str, by: str) -> None:
    """`source_uri`'s output now holds `by`'s videos: its row stops counting as converted (a rerun of it
    tries again, and is quarantined unless it replaces `by` in turn)."""
    _update(
        conn,
        source_uri,
        dest,
        {
            "status": "replaced",
            "error": f"{output_uri} now holds the videos of {by} (converted with replace)",
            "error_record": None,
            "error_offset": None,
            "finished_at": utcnow(),
        },
    )


def output_owner(conn: Connection, dest: str, output_uri: str) -> str | None:
    """The source whose succeeded conversion `output_uri` holds, if any."""
    query = select(t.c.source_uri).where(t.c.dest_uri == dest, t.c.output_uri == output_uri, t.c.status == "succeeded")
    return conn.execute(query.limit(1)).scalar()


def succeeded(conn: Connection, dest: str) -> dict[str, dict]:
    """Succeeded rows for `dest`, by source URI."""
    query = select(t).where(t.c.dest_uri == dest, t.c.status == "succeeded")
    return {row.source_uri: row._asdict() for row in conn.execute(query)}


def rows(conn: Connection, dest: str | None = None) -> list[dict]:
    query = select(t).order_by(t.c.dest_uri, t.c.source_uri)
    if dest is not None:
        query = query.where(t.c.dest_uri == dest)
    return [row._asdict() for row in conn.execute(query)]
