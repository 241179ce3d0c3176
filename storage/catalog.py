"""The catalogue of what ingest brought in: the label vocabulary, the videos and their ground truth."""

import csv

from sqlalchemy import delete, func, select

from storage.db import engine_for, upsert_insert, utcnow
from storage.objectstore import S3Config, store_for
from storage.schema import labels, video_labels, videos

VOCABULARY_COLUMNS = ("Index", "TrainVideoCount", "KnowledgeGraphId", "Name", "WikiUrl", "Vertical1", "Vertical2", "Vertical3")


class VocabularyError(ValueError):
    pass


def load_vocabulary(db_url: str, uri: str, s3: S3Config | None = None) -> int:
    """Load (or refresh) `labels` from a YouTube-8M vocabulary.csv; empty names are kept as ''."""
    import io

    with store_for(uri, s3).open_read(uri) as raw:
        reader = csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8", newline=""))
        missing = [c for c in VOCABULARY_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise VocabularyError(f"{uri}: not a YouTube-8M vocabulary (missing columns {', '.join(missing)})")
        rows = []
        for line, row in enumerate(reader, start=2):
            try:
                rows.append({
                    "label_id": int(row["Index"]), "name": row["Name"] or "", "knowledge_graph_id": row["KnowledgeGraphId"] or None,
                    "train_video_count": int(row["TrainVideoCount"]) if row["TrainVideoCount"] else None,
                    "vertical1": row["Vertical1"] or None, "vertical2": row["Vertical2"] or None,
                    "vertical3": row["Vertical3"] or None, "wiki_url": row["WikiUrl"] or None,
                })
            except ValueError as exc:
                raise VocabularyError(f"{uri}, line {line}: {exc}") from None
    if not rows:
        raise VocabularyError(f"{uri}: no labels in it")
    with engine_for(db_url).begin() as conn:
        statement = upsert_insert(conn)(labels)
        statement = statement.on_conflict_do_update(
            index_elements=["label_id"], set_={c: statement.excluded[c] for c in rows[0] if c != "label_id"})
        conn.execute(statement, rows)
    return len(rows)


def record_videos(db_url: str, ids: list[str], labels_of: list[list[int]], *, split: str, level: str,
                  source_uri: str, parquet_uri: str) -> None:
    """Make the catalogue hold exactly a converted shard's videos and their ground truth, in one transaction."""
    now = utcnow()
    rows = [{"video_id": i, "split": split, "level": level, "source_uri": source_uri, "parquet_uri": parquet_uri,
             "ingested_at": now} for i in ids]
    with engine_for(db_url).begin() as conn:
        conn.execute(delete(videos).where(videos.c.source_uri == source_uri, videos.c.level == level))
        statement = upsert_insert(conn)(videos)
        # An id that came before from another shard moves here (Google's shards never share ids).
        statement = statement.on_conflict_do_update(
            index_elements=["video_id", "level"],
            set_={c: statement.excluded[c] for c in ("split", "source_uri", "parquet_uri", "ingested_at")})
        for start in range(0, len(rows), 5000):
            conn.execute(statement, rows[start:start + 5000])
            conn.execute(delete(video_labels).where(video_labels.c.video_id.in_(ids[start:start + 5000])))
        truth = [{"video_id": i, "label_id": label} for i, ls in zip(ids, labels_of) for label in set(ls)]
        for start in range(0, len(truth), 20000):
            conn.execute(video_labels.insert(), truth[start:start + 20000])


def forget_shard(db_url: str, source_uri: str) -> None:
    """A quarantined shard's videos leave the catalogue: there is no Parquet left to score them from."""
    with engine_for(db_url).begin() as conn:
        conn.execute(delete(videos).where(videos.c.source_uri == source_uri))


def count_labels(db_url: str) -> int:
    with engine_for(db_url).connect() as conn:
        return conn.execute(select(func.count()).select_from(labels)).scalar_one()
