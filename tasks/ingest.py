"""Ingest: convert YouTube-8M TFRecord shards into the Parquet layout, skipping what is already done.

`list_pending` finds the shards to convert, `plan_batches` cuts them into a bounded number of batches
(one mapped DAG task each), `convert_batch` converts a batch shard by shard; `ingest` runs the three
for the command line. `converted` tells which of some shards are done and `summary` what a run
converted, both from the manifest, so that the DAG publishes even the shards of a batch that failed.
A bad shard is quarantined: no Parquet file, a failed manifest row naming the record and byte offset,
and the other shards go on.
"""

import itertools
import logging
from collections import defaultdict
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

# How many mapped tasks an ingest run fans out to at most. Airflow refuses more than [core] max_map_length
# (1,024), and every task instance costs the scheduler, the metadata database and the UI a row, a state
# machine and a log. 128 bounds that cost at any number of shards, far below the limit, while each
# batch (~30 shards of one 3,844-shard split, ~90 of all three) still converts shard by shard and a
# retry redoes only its unfinished shards, so bigger batches waste no work; and 128 is still 32 rounds
# of the DAG's 4 concurrent slots, enough to even out shards of uneven size.
MAX_BATCHES = 128
# An asset event's extra lives in a metadata-database row and is shown in the UI: keep it small.
MAX_EVENT_OUTPUTS = 100


class ShardFailedError(Exception):
    """A shard that cannot be converted because of its content; retrying will not help."""


class TransientBatchError(Exception):
    """Some shards of a batch failed on the store, the disk or the database: a retry redoes only the
    shards not converted yet."""


@dataclass
class BatchReport:
    """What converting some shards came to. `failed` holds every shard that did not convert, with its error
    (which names it); those also in `retryable` failed on the store, the disk or the database."""

    converted: list[dict] = field(default_factory=list)  # convert_shard's results
    skipped: int = 0  # already converted in their current content
    failed: dict[str, str] = field(default_factory=dict)  # source URI -> error
    retryable: set[str] = field(default_factory=set)

    @property
    def quarantined(self) -> dict[str, str]:
        """The shards that failed on their content: no retry will convert them."""
        return {uri: error for uri, error in self.failed.items() if uri not in self.retryable}


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

    Returns (pending, number skipped), pending sorted by URI. Brings the database schema up to date
    first, so the embedded SQLite needs no set-up. Costs one listing of `src`, one manifest query and
    one listing per destination folder, whatever the number of shards.
    """
    db.upgrade(db_url)
    shards = store_for(src, s3).list(src, pattern)
    if force:
        return shards, 0
    done = converted(shards, dest, db_url, s3)
    pending = [shard for shard in shards if shard.uri not in done]
    return pending, len(shards) - len(pending)


def converted(shards: list[ObjectInfo], dest: str, db_url: str, s3: S3Config | None = None) -> dict[str, dict]:
    """Manifest rows, by source URI, of those `shards` converted to `dest` in their current content.

    A shard counts as converted while its manifest row succeeded with the same size and fingerprint and
    its Parquet file is still there.
    """
    rows = manifest.succeeded(db_url, dest)
    unchanged = {}
    for shard in shards:
        row = rows.get(shard.uri)
        if row and row["size_bytes"] == shard.size and row["fingerprint"] == shard.fingerprint:
            unchanged[shard.uri] = row
    present = _existing_outputs([row["output_uri"] for row in unchanged.values()], s3)
    return {uri: row for uri, row in unchanged.items() if row["output_uri"] in present}


def _existing_outputs(uris: list[str], s3: S3Config | None) -> set[str]:
    """Those of `uris` that exist, with one listing per folder: on S3 a HEAD per file would take minutes
    at 11,532 shards, a listing takes one request per 1,000 files."""
    by_folder = defaultdict(list)
    for uri in uris:
        by_folder[uri.rpartition("/")[0]].append(uri)
    present = set()
    for folder, wanted in by_folder.items():
        store = store_for(folder, s3)
        try:
            listed = {info.uri for info in store.list(folder, "*.parquet")}
        except StoreError:  # a local folder that is gone; file by file, exists() raises any worse problem
            listed = {uri for uri in wanted if store.exists(uri)}
        present.update(uri for uri in wanted if uri in listed)
    return present


def plan_batches(pending: list[ObjectInfo], max_batches: int = MAX_BATCHES) -> list[list[ObjectInfo]]:
    """Cut `pending`, in name order, into min(len(pending), max_batches) contiguous batches whose sizes
    differ by at most one (the larger first): a small ingest stays one shard per batch."""
    if max_batches < 1:
        raise ValueError(f"max_batches must be at least 1, not {max_batches}")
    ordered = sorted(pending, key=lambda shard: shard.uri)
    count = min(len(ordered), max_batches)
    batches, start = [], 0
    for i in range(count):
        end = start + len(ordered) // count + (i < len(ordered) % count)
        batches.append(ordered[start:end])
        start = end
    return batches


def convert_batch(shards: list[ObjectInfo], dest: str, db_url: str, s3: S3Config | None = None,
                  force: bool = False) -> BatchReport:
    """Convert `shards` one by one, logging a line per shard; one that fails never stops the others.

    Shards already converted in their current content are skipped, so a retried batch redoes only the
    rest; `force` converts them all again (a retried forced batch too: the manifest cannot tell this
    run's conversions from earlier ones of the same content).
    """
    report = BatchReport()
    done = {} if force else converted(shards, dest, db_url, s3)
    for n, shard in enumerate(shards, start=1):
        step = f"[{n}/{len(shards)}]"
        if shard.uri in done:
            report.skipped += 1
            log.info("%s %s: already converted to %s", step, shard.uri, done[shard.uri]["output_uri"])
            continue
        try:
            result = convert_shard(shard, dest, db_url, s3)
        except ShardFailedError as exc:
            log.error("%s quarantined %s", step, exc)
            report.failed[shard.uri] = str(exc)
        except Exception as exc:  # the store, the disk or the database: worth a retry
            error = f"{shard.uri}: {exc}" if isinstance(exc, StoreError) else f"{shard.uri}: {type(exc).__name__}: {exc}"
            log.error("%s could not convert %s", step, error, exc_info=not isinstance(exc, StoreError))
            report.failed[shard.uri] = error
            report.retryable.add(shard.uri)
        else:
            report.converted.append(result)
            log.info("%s converted %s -> %s (%d videos)", step, shard.uri, result["output_uri"], result["rows"])
    return report


def summary(planned: list[ObjectInfo], dest: str, db_url: str, s3: S3Config | None = None,
            max_outputs: int = MAX_EVENT_OUTPUTS) -> dict:
    """What a run made of the shards it planned, read from the manifest (so that a batch that failed still
    counts the shards it converted): {"dest", "shards" (how many converted), "rows" (their videos),
    "outputs" (the first `max_outputs` of their Parquet URIs, in order, so the dict stays small at any size)}.
    """
    done = converted(planned, dest, db_url, s3)
    outputs = sorted(row["output_uri"] for row in done.values())
    return {"dest": dest, "shards": len(done), "rows": sum(row["rows"] for row in done.values()),
            "outputs": outputs[:max_outputs]}


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
           s3: S3Config | None = None) -> BatchReport:
    """Convert every pending shard under `src` as one batch; one bad shard never stops the others."""
    pending, skipped = list_pending(src, dest, db_url, pattern, force, s3)
    # list_pending just skipped the converted ones: force spares convert_batch asking again.
    report = convert_batch(pending, dest, db_url, s3, force=True)
    report.skipped += skipped
    return report
