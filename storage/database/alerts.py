"""Alerts kept in the database: nights that missed their deadline."""

from datetime import datetime

from sqlalchemy import Connection, select

from storage.database.db import upsert_insert, utcnow
from storage.database.schema import night_deadline_misses


def record_deadline_miss(
    conn: Connection,
    *,
    deadline_id: str,
    dag_id: str,
    dag_run_id: str,
    logical_date: datetime | None,
    deadline_time: datetime,
) -> bool:
    """Record that a run missed `deadline_id`; the same deadline again records nothing. True if new."""
    inserted = conn.execute(
        upsert_insert(conn)(night_deadline_misses)
        .values(
            deadline_id=deadline_id,
            dag_id=dag_id,
            dag_run_id=dag_run_id,
            logical_date=logical_date,
            deadline_time=deadline_time,
            recorded_at=utcnow(),
        )
        .on_conflict_do_nothing(index_elements=["deadline_id"])
    )
    return inserted.rowcount == 1


def deadline_misses(conn: Connection) -> list[dict]:
    return [row._asdict() for row in conn.execute(select(night_deadline_misses).order_by(night_deadline_misses.c.id))]
