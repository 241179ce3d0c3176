"""The ingest manifest: which shards were converted, from what content, to where, and which failed."""

from dataclasses import dataclass

from sqlalchemy import select, update

from storage.db import engine_for, upsert_insert, utcnow
from storage.objectstore import ObjectInfo
from storage.schema import ingested_shards as t



@dataclass(frozen=True)
class ShardFailure:
    error: str
    record: int | None = None
    offset: int | None = None


def _upsert(db_url: str, source: ObjectInfo, dest: str, values: dict) -> None:
    engine = engine_for(db_url)
    insert = upsert_insert(engine)
    row = {"source_uri": source.uri, "dest_uri": dest, "size_bytes": source.size, "fingerprint": source.fingerprint, **values}
    statement = insert(t).values(**row)
    statement = statement.on_conflict_do_update(
        index_elements=["source_uri", "dest_uri"], set_={k: statement.excluded[k] for k in row if k not in ("source_uri", "dest_uri")}
    )
    with engine.begin() as conn:
        conn.execute(statement)


def _update(db_url: str, source: ObjectInfo, dest: str, values: dict) -> None:
    statement = update(t).where(t.c.source_uri == source.uri, t.c.dest_uri == dest).values(**values)
    with engine_for(db_url).begin() as conn:
        conn.execute(statement)


def mark_running(db_url: str, source: ObjectInfo, dest: str) -> None:
    """Start (or restart) the shard's row; the outcome is written over it by mark_succeeded/mark_failed."""
    _upsert(db_url, source, dest, {
        "status": "running", "started_at": utcnow(), "finished_at": None, "error": None,
        "error_record": None, "error_offset": None, "rows": None, "checksum": None, "output_uri": None,
    })


def mark_succeeded(db_url: str, source: ObjectInfo, dest: str, *, output_uri: str, level: str, split: str,
                   rows: int, checksum: str) -> None:
    _update(db_url, source, dest, {
        "status": "succeeded", "output_uri": output_uri, "level": level, "split": split, "rows": rows,
        "checksum": checksum, "finished_at": utcnow(),
    })


def mark_failed(db_url: str, source: ObjectInfo, dest: str, failure: ShardFailure) -> None:
    _update(db_url, source, dest, {
        "status": "failed", "error": failure.error, "error_record": failure.record,
        "error_offset": failure.offset, "finished_at": utcnow(),
    })


def succeeded(db_url: str, dest: str) -> dict[str, dict]:
    """Succeeded rows for `dest`, by source URI."""
    query = select(t).where(t.c.dest_uri == dest, t.c.status == "succeeded")
    with engine_for(db_url).connect() as conn:
        return {row.source_uri: row._asdict() for row in conn.execute(query)}


def rows(db_url: str, dest: str | None = None) -> list[dict]:
    query = select(t).order_by(t.c.dest_uri, t.c.source_uri)
    if dest is not None:
        query = query.where(t.c.dest_uri == dest)
    with engine_for(db_url).connect() as conn:
        return [row._asdict() for row in conn.execute(query)]
