"""The catalogue of what ingest brought in: the label vocabulary, the videos and their ground truth."""

import codecs
import csv

from sqlalchemy import delete, func, select

from storage.db import engine_for, upsert_insert, utcnow
from storage.objectstore import S3Config, store_for
from storage.schema import labels, video_labels, videos
from storage.yt8m_records import NUM_CLASSES

VOCABULARY_COLUMNS = ("Index", "TrainVideoCount", "KnowledgeGraphId", "Name", "WikiUrl", "Vertical1", "Vertical2", "Vertical3")


class VocabularyError(ValueError):
    pass


def load_vocabulary(db_url: str, uri: str, s3: S3Config | None = None) -> int:
    """Load (or refresh) `labels` from a YouTube-8M vocabulary.csv; empty names are kept as ''.

    Accepts the UTF-8 byte-order mark spreadsheets write; refuses, naming file and line, a line that is
    not UTF-8, an Index outside 0..3861 and an Index given twice.
    """
    import io

    with store_for(uri, s3).open_read(uri) as raw:
        data = raw.read()  # 3,862 short lines: reading it whole lets a bad byte be placed on its line
    data = data.removeprefix(codecs.BOM_UTF8)  # as spreadsheets save "CSV UTF-8"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise VocabularyError(f"{uri}, line {line}: not UTF-8 ({exc.reason}: byte {data[exc.start]:#04x})") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    missing = [c for c in VOCABULARY_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise VocabularyError(f"{uri}: not a YouTube-8M vocabulary (missing columns {', '.join(missing)})")
    rows, first_line_of = [], {}
    for row in reader:
        line = reader.line_num
        try:
            label_id = int(row["Index"])
            rows.append({
                "label_id": label_id, "name": row["Name"] or "", "knowledge_graph_id": row["KnowledgeGraphId"] or None,
                "train_video_count": int(row["TrainVideoCount"]) if row["TrainVideoCount"] else None,
                "vertical1": row["Vertical1"] or None, "vertical2": row["Vertical2"] or None,
                "vertical3": row["Vertical3"] or None, "wiki_url": row["WikiUrl"] or None,
            })
        except (ValueError, TypeError) as exc:  # TypeError: a short line leaves columns None
            raise VocabularyError(f"{uri}, line {line}: {exc}") from None
        if not 0 <= label_id < NUM_CLASSES:
            raise VocabularyError(f"{uri}, line {line}: Index {label_id} outside 0..{NUM_CLASSES - 1}")
        if label_id in first_line_of:
            raise VocabularyError(f"{uri}, line {line}: Index {label_id} already given on line {first_line_of[label_id]}")
        first_line_of[label_id] = line
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
