"""The catalogue of what ingest brought in: the label vocabulary, the videos and their ground truth."""

import codecs
import csv
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, delete, exists, select, update

from storage.database import label_counts
from storage.database.db import upsert_insert, utcnow
from storage.database.schema import labels, model_versions, predictions, segment_predictions, video_labels, videos
from storage.errors import VtagError
from storage.formats.yt8m_spec import LEVELS, NUL_REFUSED, NUM_CLASSES
from storage.objectstore import S3Config, store_for

VOCABULARY_COLUMNS = (
    "Index",
    "TrainVideoCount",
    "KnowledgeGraphId",
    "Name",
    "WikiUrl",
    "Vertical1",
    "Vertical2",
    "Vertical3",
)


class VocabularyError(VtagError, ValueError):
    pass


def load_vocabulary(conn: Connection, uri: str, s3: S3Config | None = None) -> int:
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
    try:
        for row in reader:
            _vocabulary_row(row, reader.line_num, uri, rows, first_line_of)
    except csv.Error as exc:  # a field past csv's limit (131,072 characters), a broken quote
        raise VocabularyError(f"{uri}, line {reader.line_num + 1}: {exc}") from None  # the line it could not finish
    if not rows:
        raise VocabularyError(f"{uri}: no labels in it")
    statement = upsert_insert(conn)(labels)
    statement = statement.on_conflict_do_update(
        index_elements=["label_id"], set_={c: statement.excluded[c] for c in rows[0] if c != "label_id"}
    )
    conn.execute(statement, rows)
    return len(rows)


def _vocabulary_row(row: dict, line: int, uri: str, rows: list[dict], first_line_of: dict[int, int]) -> None:
    """One line of vocabulary.csv checked and appended to `rows`."""
    nul = next((column for column, value in row.items() if isinstance(value, str) and "\x00" in value), None)
    if nul is not None:
        raise VocabularyError(f"{uri}, line {line}: column {nul} holds a NUL byte ({NUL_REFUSED})")
    try:
        label_id = int(row["Index"])
        rows.append(
            {
                "label_id": label_id,
                "name": row["Name"] or "",
                "knowledge_graph_id": row["KnowledgeGraphId"] or None,
                "train_video_count": int(row["TrainVideoCount"]) if row["TrainVideoCount"] else None,
                "vertical1": row["Vertical1"] or None,
                "vertical2": row["Vertical2"] or None,
                "vertical3": row["Vertical3"] or None,
                "wiki_url": row["WikiUrl"] or None,
            }
        )
    except (ValueError, TypeError) as exc:  # TypeError: a short line leaves columns None
        raise VocabularyError(f"{uri}, line {line}: {exc}") from None
    if not 0 <= label_id < NUM_CLASSES:
        raise VocabularyError(f"{uri}, line {line}: Index {label_id} outside 0..{NUM_CLASSES - 1}")
    if label_id in first_line_of:
        raise VocabularyError(f"{uri}, line {line}: Index {label_id} already given on line {first_line_of[label_id]}")
    first_line_of[label_id] = line


@dataclass(frozen=True)
class ShardVideos:
    """A converted shard's videos, in its order: their ids, ground-truth labels and content fingerprints."""

    ids: list[str]
    labels: list[list[int]]
    fingerprints: list[str]


def record_videos(
    conn: Connection,
    shard_videos: ShardVideos,
    *,
    split: str,
    level: str,
    source_uri: str,
    parquet_uri: str,
    replacing: str | None = None,
) -> int:
    """Make the catalogue hold exactly a converted shard's videos, each with its content's fingerprint, and
    their ground truth; `replacing`: the other source whose videos this shard's output takes over. A video
    whose content changed since it was last ingested here (or there), or that left the shard, loses its
    predictions by every model version of the level in this transaction, so that the views stop showing
    them and every such model scores it again; an unchanged one keeps them, and its `ingested_at` (the time
    its content arrived: what a night's publish compares with the time it scored it). Returns how many lost
    them. An id another shard of the level holds is refused by the primary key: check with
    `ingested_elsewhere` first to name that shard."""
    ids, labels_of, fingerprints = shard_videos.ids, shard_videos.labels, shard_videos.fingerprints
    now = utcnow()
    before = _forget(conn, source_uri, level)
    if replacing is not None:
        before.update(_forget(conn, replacing, level))
    now_held = dict(zip(ids, fingerprints))
    # NULL: ingested before fingerprints were recorded, so its content is not known to be the same
    stale = [i for i, (fingerprint, _) in before.items() if fingerprint is None or now_held.get(i) != fingerprint]
    _drop_predictions(conn, stale, level)
    unchanged = {
        i: arrived
        for i, (fingerprint, arrived) in before.items()
        if fingerprint is not None and now_held.get(i) == fingerprint
    }
    rows = [
        {
            "video_id": i,
            "split": split,
            "level": level,
            "source_uri": source_uri,
            "parquet_uri": parquet_uri,
            "ingested_at": unchanged.get(i, now),
            "content_fingerprint": fingerprint,
        }
        for i, fingerprint in zip(ids, fingerprints)
    ]
    for start in range(0, len(rows), 5000):
        conn.execute(videos.insert(), rows[start : start + 5000])
        # The other level's row of a video shares its ground truth: the newest shard's labels win.
        conn.execute(delete(video_labels).where(video_labels.c.video_id.in_(ids[start : start + 5000])))
    truth = [{"video_id": i, "label_id": label} for i, ls in zip(ids, labels_of) for label in set(ls)]
    for start in range(0, len(truth), 20000):
        conn.execute(video_labels.insert(), truth[start : start + 20000])
    return len(stale)


def stamp_arrival(conn: Connection, source_uri: str, level: str, since: datetime) -> None:
    """The shard's videos recorded at or after `since` (new or changed content; unchanged ones kept their
    time) arrive now. Called once the shard's Parquet is out and before the commit, so that a night's part
    whose try started before the file changed (and may have read the old one) is seen to be older than the
    content, and its rows of these videos are not published (machines' clocks kept in step, as by NTP)."""
    conn.execute(
        update(videos)
        .where(videos.c.source_uri == source_uri, videos.c.level == level, videos.c.ingested_at >= since)
        .values(ingested_at=utcnow())
    )


def ingested_elsewhere(
    conn: Connection, ids: list[str], *, level: str, source_uri: str, replacing: str | None = None
) -> dict[str, str]:
    """Those of `ids` the catalogue holds at `level` from another shard than `source_uri` (and than
    `replacing`, the source whose output it takes over): id -> that shard."""
    found = {}
    for start in range(0, len(ids), 5000):
        query = select(videos.c.video_id, videos.c.source_uri).where(
            videos.c.level == level,
            videos.c.video_id.in_(ids[start : start + 5000]),
            videos.c.source_uri.not_in([uri for uri in (source_uri, replacing) if uri is not None]),
        )
        found.update(conn.execute(query).all())
    return found


def forget_shard(conn: Connection, source_uri: str, level: str | None = None) -> None:
    """A shard's videos (of `level`, or both) leave the catalogue with the ground truth no other row shares
    and their predictions by every model version of that level (the views with them), in the caller's
    transaction: a quarantined shard has no Parquet left to score them from, nor labels to show for them."""
    for one in LEVELS if level is None else (level,):
        _drop_predictions(conn, list(_forget(conn, source_uri, one)), one)


def _drop_predictions(conn: Connection, ids: list[str], level: str) -> None:
    """The predictions (and segment predictions) of these videos by every model version of `level` (a video
    has a row at each level, and a model scores one level's content; the primary key leads with the id: one
    index probe per partition and id)."""
    of_level = select(model_versions.c.version).where(model_versions.c.level == level)
    for start in range(0, len(ids), 5000):
        some = ids[start : start + 5000]
        these = predictions.c.video_id.in_(some) & predictions.c.model_version.in_(of_level)
        label_counts.take_off(conn, these)
        conn.execute(delete(predictions).where(these))
        segments = segment_predictions.c
        conn.execute(
            delete(segment_predictions).where(segments.video_id.in_(some), segments.model_version.in_(of_level))
        )


def _forget(conn: Connection, source_uri: str, level: str) -> dict[str, tuple[str | None, datetime]]:
    """Remove a shard's videos of `level` and the ground truth no other row shares; returns what they were:
    {video id: (content fingerprint, ingested_at)}."""
    leaving = (videos.c.source_uri == source_uri) & (videos.c.level == level)
    gone = {
        video: (fingerprint, arrived)
        for video, fingerprint, arrived in conn.execute(
            select(videos.c.video_id, videos.c.content_fingerprint, videos.c.ingested_at).where(leaving)
        )
    }
    other = videos.alias("other")
    still_held = select(other.c.video_id).where(
        other.c.video_id == video_labels.c.video_id, ~((other.c.source_uri == source_uri) & (other.c.level == level))
    )
    conn.execute(
        delete(video_labels).where(
            video_labels.c.video_id.in_(select(videos.c.video_id).where(leaving)), ~exists(still_held)
        )
    )
    conn.execute(delete(videos).where(leaving))
    return gone
