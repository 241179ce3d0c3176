"""Which videos a model has yet to score: what a night plans, and the videos a targeted rescoring
names (`known_videos`), whose earlier scores its rows replace when it publishes."""

from datetime import datetime

from sqlalchemy import Connection, and_, exists, func, select

from storage.database.schema import predictions, videos


def _pending(model_version: int, until: datetime, level: str, exclude_run: int | None):
    """Videos ingested up to `until` that this model has not scored, counting the rows of `exclude_run`
    (the night being rerun) as not scored. One rank-1 probe per video of the version's partition."""
    scored = exists().where(
        and_(
            predictions.c.video_id == videos.c.video_id,
            predictions.c.model_version == model_version,
            predictions.c.rank == 1,
            predictions.c.run_id != (exclude_run or -1),
        )
    )
    return and_(videos.c.level == level, videos.c.ingested_at <= until, ~scored)


def pending_files(
    conn: Connection, model_version: int, until: datetime, level: str, exclude_run: int | None = None
) -> list[tuple[str, int]]:
    """(Parquet URI, videos pending there) in URI order: what a night's plan cuts into parts."""
    query = (
        select(videos.c.parquet_uri, func.count())
        .where(_pending(model_version, until, level, exclude_run))
        .group_by(videos.c.parquet_uri)
        .order_by(videos.c.parquet_uri)
    )
    return [(uri, count) for uri, count in conn.execute(query)]


def pending_videos(
    conn: Connection,
    model_version: int,
    until: datetime,
    level: str,
    exclude_run: int | None = None,
    uri_range: tuple[str, str] | None = None,
) -> list[tuple[str, str]]:
    """(video id, Parquet URI) of the pending videos, optionally of the files in [first, last] only."""
    condition = _pending(model_version, until, level, exclude_run)
    if uri_range is not None:
        condition = and_(condition, videos.c.parquet_uri.between(*uri_range))
    query = (
        select(videos.c.video_id, videos.c.parquet_uri)
        .where(condition)
        .order_by(videos.c.parquet_uri, videos.c.video_id)
    )
    return [tuple(row) for row in conn.execute(query)]


def known_videos(conn: Connection, ids: list[str], level: str) -> dict[str, str]:
    found = {}
    for start in range(0, len(ids), 5000):
        query = select(videos.c.video_id, videos.c.parquet_uri).where(
            videos.c.level == level, videos.c.video_id.in_(ids[start : start + 5000])
        )
        found.update(dict(conn.execute(query).all()))
    return found
