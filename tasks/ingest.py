"""Ingest: convert YouTube-8M TFRecord shards into the Parquet layout, skipping what is already done.

`list_pending` and `convert_shard` are the two DAG tasks; `ingest` runs both for the command line.
A bad shard is quarantined: no Parquet file, a failed manifest row naming the record and byte offset,
and the other shards go on.
"""

import itertools
import logging
from dataclasses import dataclass, field

import google_crc32c

from storage import catalog, db, manifest
from storage.manifest import ShardFailure
from storage.objectstore import ObjectInfo, S3Config, StoreError, store_for
from storage.parquet_layout import LayoutError, ShardParquetWriter, output_uri, split_of
from storage.tfrecord import BadRecordError, read_records
from storage.yt8m_records import RecordDecodeError, decode_frame_level, decode_video_level, detect_level, LEVELS

log = logging.getLogger(__name__)

DEFAULT_PATTERN = "*.tfrecord"
_DECODERS = {"frame": decode_frame_level, "video": decode_video_level}


class ShardFailedError(Exception):
    """A shard that cannot be converted because of its content; retrying will not help."""


@dataclass
class IngestReport:
    converted: list[dict] = field(default_factory=list)
    skipped: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # source URI -> error


class _Crc32cReader:
    """Passes reads through while keeping the CRC32C of every byte read: the shard's checksum."""

    def __init__(self, stream):
        self._stream, self.crc = stream, 0

    def read(self, n: int = -1) -> bytes:
        data = self._stream.read(n)
        self.crc = google_crc32c.extend(self.crc, data)
        return data


def list_pending(src: str, dest: str, db_url: str, pattern: str = DEFAULT_PATTERN, force: bool = False,
                 s3: S3Config | None = None) -> tuple[list[ObjectInfo], int]:
    """Shards under `src` matching `pattern` that are not converted to `dest` in their current content.

    Returns (pending, number skipped). A shard counts as done while its manifest row succeeded with the
    same size and fingerprint and its Parquet file is still there. Brings the database schema up to date
    first, so the embedded SQLite needs no set-up.
    """
    db.upgrade(db_url)
    shards = store_for(src, s3).list(src, pattern)
    if force:
        return shards, 0
    done = manifest.succeeded(db_url, dest)
    dest_store = store_for(dest, s3)
    pending = []
    for shard in shards:
        row = done.get(shard.uri)
        unchanged = row and row["size_bytes"] == shard.size and row["fingerprint"] == shard.fingerprint
        if not (unchanged and dest_store.exists(row["output_uri"])):
            pending.append(shard)
    return pending, len(shards) - len(pending)


def convert_shard(shard: ObjectInfo, dest: str, db_url: str, s3: S3Config | None = None) -> dict:
    """Convert one shard; record the outcome in the manifest. Raises ShardFailedError for bad content."""
    manifest.mark_running(db_url, shard, dest)
    try:
        result, ids, labels = _convert(shard, dest, s3)
        catalog.record_videos(db_url, ids, labels, split=result["split"], level=result["level"], source_uri=shard.uri,
                              parquet_uri=result["output_uri"])
    except BadRecordError as exc:
        _remove_stale_outputs(shard, dest, s3)
        catalog.forget_shard(db_url, shard.uri)
        manifest.mark_failed(db_url, shard, dest, ShardFailure(str(exc), exc.index, exc.offset))
        raise ShardFailedError(str(exc)) from None
    except LayoutError as exc:
        manifest.mark_failed(db_url, shard, dest, ShardFailure(f"{shard.uri}: {exc}"))
        raise ShardFailedError(f"{shard.uri}: {exc}") from None
    except BaseException as exc:  # the store or the disk failed: worth a retry, but recorded meanwhile
        manifest.mark_failed(db_url, shard, dest, ShardFailure(f"{shard.uri}: {type(exc).__name__}: {exc}"))
        raise
    manifest.mark_succeeded(db_url, shard, dest, **{k: v for k, v in result.items() if k != "source_uri"})
    log.info("converted %s -> %s (%d videos)", shard.uri, result["output_uri"], result["rows"])
    return result


def _remove_stale_outputs(shard: ObjectInfo, dest: str, s3: S3Config | None) -> None:
    """A shard that turned bad must not leave the Parquet of its earlier content behind."""
    for level in LEVELS:
        out = output_uri(dest, level, shard.name)
        store_for(out, s3).delete(out)


def _convert(shard: ObjectInfo, dest: str, s3: S3Config | None) -> tuple[dict, list[str], list[list[int]]]:
    """Convert one shard; return the manifest fields and the ids and labels of its videos."""
    split = split_of(shard.name)
    ids, labels = [], []
    require_labels = split != "test"  # Google's test split carries no labels
    with store_for(shard.uri, s3).open_read(shard.uri) as raw:
        stream = _Crc32cReader(raw)
        records = read_records(stream, shard.uri, shard.size)
        first = next(records, None)
        if first is None:
            raise BadRecordError(shard.uri, 0, 0, "the shard holds no records")
        try:
            level = detect_level(first.data)
        except RecordDecodeError as exc:
            raise BadRecordError(shard.uri, first.index, first.offset, str(exc)) from None
        decode = _DECODERS[level]
        out = output_uri(dest, level, shard.name)
        out_store = store_for(out, s3)
        # An earlier try of this shard killed mid-write (SIGKILL, OOM) left its temporary behind (and on
        # S3 maybe an incomplete upload); this try runs only once that one is dead, so nothing else writes it.
        for stale in out_store.remove_stale_temporaries(out):
            log.warning("removed %s, left by a killed earlier try of %s", stale, shard.uri)
        with out_store.publish(out) as tmp_path:
            writer = ShardParquetWriter(tmp_path, level)
            try:
                for record in itertools.chain([first], records):
                    try:
                        video = decode(record.data, require_labels)
                    except RecordDecodeError as exc:
                        raise BadRecordError(shard.uri, record.index, record.offset, str(exc)) from None
                    writer.add(video)
                    ids.append(video.id)
                    labels.append(video.labels)
            finally:
                writer.close()
    result = {
        "source_uri": shard.uri, "output_uri": out, "level": level, "split": split,
        "rows": writer.rows_written, "checksum": f"crc32c:{stream.crc:08x}",
    }
    return result, ids, labels


def ingest(src: str, dest: str, db_url: str, pattern: str = DEFAULT_PATTERN, force: bool = False,
           s3: S3Config | None = None) -> IngestReport:
    """Convert every pending shard under `src`; one bad shard never stops the others."""
    pending, skipped = list_pending(src, dest, db_url, pattern, force, s3)
    report = IngestReport(skipped=skipped)
    for shard in pending:
        try:
            report.converted.append(convert_shard(shard, dest, db_url, s3))
        except ShardFailedError as exc:
            log.error("quarantined %s", exc)
            report.failed[shard.uri] = str(exc)
        except StoreError as exc:
            log.error("could not convert %s: %s", shard.uri, exc)
            report.failed[shard.uri] = f"{shard.uri}: {exc}"
        except Exception as exc:
            log.exception("could not convert %s", shard.uri)
            report.failed[shard.uri] = f"{shard.uri}: {type(exc).__name__}: {exc}"
    return report
