"""Ingest: convert YouTube-8M TFRecord shards into the Parquet layout, skipping what is already done.

A `Converter` (one destination, one database) finds the shards to convert (`pending`), converts a batch
of them shard by shard (`convert_batch`) and tells which are done (`converted`, `summary`); `plan_batches`
cuts the pending into a bounded number of batches (one mapped DAG task each); `ingest` runs it all for the
command line, and the module's functions of the same names are the DAG's one-call entry points.
`converted` and `summary` read the manifest, so that the DAG publishes even the shards of a batch that
failed. A bad shard is quarantined: no Parquet file, a failed manifest row naming the record and byte offset,
and the other shards go on.

Integrity rules: every entry point takes src and dest through `canonical_uri` once, so one location is one
manifest key however it is spelled. A shard's Parquet file becomes visible only together with its catalogue
rows and succeeded manifest row (one transaction, the file published just before the commit and deleted
again if the commit fails). One output file holds one source: a second source of the same name is
quarantined unless the caller asks to replace the first. A video id appears once per level: repeated
within a shard or already ingested from another shard, the shard is quarantined naming both.
"""

import itertools
import logging
from collections import defaultdict
from dataclasses import dataclass, field

import google_crc32c
import xxhash
from sqlalchemy.exc import SQLAlchemyError

from storage.database import catalog, db, manifest
from storage.database.manifest import ShardFailure
from storage.errors import UsageError
from storage.formats.parquet_layout import LayoutError, ShardParquetWriter, output_uri, split_of
from storage.formats.tfrecord import BadRecordError, read_records
from storage.formats.yt8m_records import RecordDecodeError, decode_frame_level, decode_video_level, detect_level
from storage.formats.yt8m_spec import FRAME, LEVELS, VIDEO
from storage.objectstore import ObjectInfo, ObjectStore, S3Config, StoreError, canonical_uri, store_for

log = logging.getLogger(__name__)

DEFAULT_PATTERN = "*.tfrecord"
_DECODERS = {FRAME.name: decode_frame_level, VIDEO.name: decode_video_level}

# How many mapped tasks an ingest run fans out to at most. Airflow refuses more than [core] max_map_length
# (1,024), and every task instance costs the scheduler, the metadata database and the UI a row, a state
# machine and a log. 128 bounds that cost at any number of shards, far below the limit, while each
# batch (~30 shards of one 3,844-shard split, ~90 of all three) still converts shard by shard and a
# retry redoes only its unfinished shards, so bigger batches waste no work; and 128 is still 32 rounds
# of the DAG's 4 concurrent slots, enough to even out shards of uneven size.
MAX_BATCHES = 128
# An asset event's extra lives in a metadata-database row and is shown in the UI: keep it small.
MAX_EVENT_OUTPUTS = 100
# Failures of the environment (store, disk, network, database) that a retry may cure: one log line each. A
# traceback is kept for anything else, which is a bug.
_ENVIRONMENT_ERRORS = (StoreError, OSError, SQLAlchemyError)


class ShardFailedError(Exception):
    """A shard that cannot be converted because of its content; retrying will not help."""


class OutputTakenError(Exception):
    """The shard's output file holds another source's conversion: converting would silently replace it."""


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
        raise UsageError(f"max_batches must be at least 1, not {max_batches}")
    ordered = sorted(pending, key=lambda shard: shard.uri)
    count = min(len(ordered), max_batches)
    batches, start = [], 0
    for i in range(count):
        end = start + len(ordered) // count + (i < len(ordered) % count)
        batches.append(ordered[start:end])
        start = end
    return batches


def _describe(exc: BaseException) -> str:
    """The error in one line, naming its type: a database error's text goes on over more lines (the SQL,
    a link to SQLAlchemy's documentation) that a per-shard log line and the manifest do without."""
    if isinstance(exc, StoreError):
        return str(exc)
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _canonical_shards(shards: list[ObjectInfo]) -> list[ObjectInfo]:
    return [
        shard if shard.uri == (uri := canonical_uri(shard.uri)) else ObjectInfo(uri, shard.size, shard.fingerprint)
        for shard in shards
    ]


class Converter:
    """Converts shards into one destination, recording them in one database: built once with the canonical
    destination, so that every method speaks of the same location however the caller spelled it. A shard's
    conversion is the publish-then-commit-or-unpublish protocol: the Parquet file goes out just before the
    transaction holding its catalogue and manifest rows commits (`_convert`, `_record`), and is taken back
    if that commit fails (`_unpublish`); a shard bad in content is quarantined (`_quarantine`). `replace`
    lets a shard take over the output file another source of the same name converted to."""

    def __init__(self, dest: str, db_url: str, s3: S3Config | None = None, replace: bool = False):
        self.dest, self.db_url, self.s3, self.replace = canonical_uri(dest), db_url, s3, replace

    def pending(self, src: str, pattern: str = DEFAULT_PATTERN, force: bool = False) -> tuple[list[ObjectInfo], int]:
        """Shards under `src` matching `pattern` not converted here in their current content: (pending, number
        skipped), pending sorted by URI. Raises SchemaOutOfDate when the database was not migrated (`vtag db
        upgrade`) and StoreError (one line) when the destination cannot be written, before any shard is
        converted. Costs one listing of `src`, one manifest query and one listing per destination folder,
        whatever the number of shards."""
        src = canonical_uri(src)
        db.require_current(self.db_url)
        store_for(self.dest, self.s3).check_writable(self.dest)
        shards = store_for(src, self.s3).list(src, pattern)
        if force:
            return shards, 0
        done = self.converted(shards)
        pending = [shard for shard in shards if shard.uri not in done]
        return pending, len(shards) - len(pending)

    def converted(self, shards: list[ObjectInfo]) -> dict[str, dict]:
        """Manifest rows, by (canonical) source URI, of those `shards` converted here in their current
        content: a succeeded row with the same size and fingerprint, whose Parquet file is still there."""
        with db.transaction(self.db_url) as conn:
            rows = manifest.succeeded(conn, self.dest)
        unchanged = {}
        for shard in _canonical_shards(shards):
            row = rows.get(shard.uri)
            if row and row["size_bytes"] == shard.size and row["fingerprint"] == shard.fingerprint:
                unchanged[shard.uri] = row
        present = _existing_outputs([row["output_uri"] for row in unchanged.values()], self.s3)
        return {uri: row for uri, row in unchanged.items() if row["output_uri"] in present}

    def convert_batch(self, shards: list[ObjectInfo], force: bool = False, done: dict | None = None) -> BatchReport:
        """Convert `shards` one by one, logging a line per shard; one that fails never stops the others.

        Shards already converted in their current content (`done`, else asked of the manifest) are skipped,
        so a retried batch redoes only the rest; `force` converts them all again (a retried forced batch too:
        the manifest cannot tell this run's conversions from earlier ones of the same content)."""
        shards = _canonical_shards(shards)
        if done is None:
            done = {} if force else self.converted(shards)
        report = BatchReport()
        for n, shard in enumerate(shards, start=1):
            step = f"[{n}/{len(shards)}]"
            if shard.uri in done:
                report.skipped += 1
                log.info("%s %s: already converted to %s", step, shard.uri, done[shard.uri]["output_uri"])
                continue
            try:
                result = self.convert_shard(shard)
            except ShardFailedError as exc:
                log.error("%s quarantined %s", step, exc)
                report.failed[shard.uri] = str(exc)
            except Exception as exc:  # the store, the disk or the database: worth a retry
                error = f"{shard.uri}: {_describe(exc)}"
                log.error("%s could not convert %s", step, error, exc_info=not isinstance(exc, _ENVIRONMENT_ERRORS))
                report.failed[shard.uri] = error
                report.retryable.add(shard.uri)
            else:
                report.converted.append(result)
                log.info("%s converted %s -> %s (%d videos)", step, shard.uri, result["output_uri"], result["rows"])
        return report

    def summary(self, planned: list[ObjectInfo], max_outputs: int = MAX_EVENT_OUTPUTS) -> dict:
        """What a run made of the shards it planned, read from the manifest (so that a batch that failed
        still counts the shards it converted): {"dest", "shards" (how many converted), "rows" (their videos),
        "outputs" (the first `max_outputs` of their Parquet URIs, in order, so the dict stays small at any
        size)}."""
        done = self.converted(planned)
        outputs = sorted(row["output_uri"] for row in done.values())
        return {
            "dest": self.dest,
            "shards": len(done),
            "rows": sum(row["rows"] for row in done.values()),
            "outputs": outputs[:max_outputs],
        }

    def convert_shard(self, shard: ObjectInfo) -> dict:
        """Convert one shard; record the outcome in the manifest. Raises ShardFailedError for bad content, and
        when the output file holds another source's conversion, unless `replace`: then that source's videos
        leave the catalogue and its manifest row is no longer succeeded."""
        (shard,) = _canonical_shards([shard])
        with db.transaction(self.db_url) as conn:
            manifest.mark_running(conn, shard, self.dest)
        try:
            return self._convert(shard)
        except BadRecordError as exc:
            self._quarantine(shard, ShardFailure(str(exc), exc.index, exc.offset))
            raise ShardFailedError(str(exc)) from None
        except (LayoutError, OutputTakenError) as exc:
            failure = ShardFailure(f"{shard.uri}: {exc}")
            self._quarantine(shard, failure)
            raise ShardFailedError(failure.error) from None
        except (
            BaseException
        ) as exc:  # the store, the disk or the database failed: worth a retry, but recorded meanwhile
            with db.transaction(self.db_url) as conn:
                manifest.mark_failed(conn, shard, self.dest, ShardFailure(f"{shard.uri}: {_describe(exc)}"))
            raise

    def _quarantine(self, shard: ObjectInfo, failure: ShardFailure) -> None:
        """A shard that turned bad must not leave the Parquet or the videos of its earlier content behind; an
        output another source converted to is that source's and stays."""
        try:
            outputs = [output_uri(self.dest, level, shard.name) for level in LEVELS]
        except LayoutError:  # a name without a split never had an output
            outputs = []
        with db.transaction(self.db_url) as conn:
            owners = {out: manifest.output_owner(conn, self.dest, out) for out in outputs}
        for out, owner in owners.items():
            if owner in (None, shard.uri):
                store_for(out, self.s3).delete(out)
        with db.transaction(self.db_url) as conn:  # its videos leave with its failed row, together
            catalog.forget_shard(conn, shard.uri)
            manifest.mark_failed(conn, shard, self.dest, failure)

    def _convert(self, shard: ObjectInfo) -> dict:
        """Convert one shard and publish it with its catalogue rows and manifest row; return the manifest fields."""
        split = split_of(shard.name)
        # The fingerprint is the content the manifest will vouch for: a shard rewritten since it was listed
        # fails here (retryable) rather than being recorded with its old size and fingerprint.
        with store_for(shard.uri, self.s3).open_read(shard.uri, fingerprint=shard.fingerprint) as raw:
            stream = _Crc32cReader(raw)
            records = read_records(stream, shard.uri, shard.size)
            first = next(records, None)
            if first is None:
                raise BadRecordError(shard.uri, 0, 0, "the shard holds no records")
            try:
                level = detect_level(first.data)
            except RecordDecodeError as exc:
                raise BadRecordError(shard.uri, first.index, first.offset, str(exc)) from None
            out = output_uri(self.dest, level, shard.name)
            # Asked before the whole shard is read; asked again in the transaction that publishes.
            with db.transaction(self.db_url) as conn:
                owner = manifest.output_owner(conn, self.dest, out)
            _taken_over(owner, shard, out, self.replace)
            out_store = store_for(out, self.s3)
            # An earlier try of this shard killed mid-write (SIGKILL, OOM) left its temporary behind (and on
            # S3 maybe an incomplete upload); this try runs only once that one is dead, so nothing else writes it.
            for stale in out_store.remove_stale_temporaries(out):
                log.warning("removed %s, left by a killed earlier try of %s", stale, shard.uri)
            published = False
            try:
                # The file goes out after every row is written and before the commit; the transaction ends (and
                # its connection, with any lock, is released) before a failed commit takes the file back.
                with db.transaction(self.db_url) as conn:
                    recorded_from = db.utcnow()
                    with out_store.publish(out) as tmp_path:
                        videos = _write_parquet(tmp_path, level, split, itertools.chain([first], records), shard)
                        result = {
                            "source_uri": shard.uri,
                            "output_uri": out,
                            "level": level,
                            "split": split,
                            "rows": len(videos.ids),
                            "checksum": f"crc32c:{stream.crc:08x}",
                        }
                        self._record(conn, shard, result, videos)
                    catalog.stamp_arrival(conn, shard.uri, level, since=recorded_from)
                    published = True
            except BaseException:
                if published:
                    self._unpublish(out_store, out, shard, level)
                raise
        return result

    def _record(self, conn, shard: ObjectInfo, result: dict, videos: "_ShardVideos") -> None:
        """In the caller's transaction: take the output over from its earlier source if replacing, refuse ids
        another shard of the level holds, then write the catalogue rows and the succeeded manifest row."""
        out, level = result["output_uri"], result["level"]
        replaced = _taken_over(manifest.output_owner(conn, self.dest, out), shard, out, self.replace)
        if replaced is not None:
            manifest.mark_replaced(conn, replaced, self.dest, out, by=shard.uri)
        elsewhere = catalog.ingested_elsewhere(conn, videos.ids, level=level, source_uri=shard.uri, replacing=replaced)
        if elsewhere:
            video_id = min(elsewhere, key=lambda i: videos.records[i][0])
            index, offset = videos.records[video_id]
            more = f" (and {len(elsewhere) - 1} more ids of this shard)" if len(elsewhere) > 1 else ""
            raise BadRecordError(
                shard.uri,
                index,
                offset,
                f"video id {video_id!r} is already ingested at {level} level from {elsewhere[video_id]}{more}",
            )
        stale = catalog.record_videos(
            conn,
            catalog.ShardVideos(videos.ids, videos.labels, videos.fingerprints),
            split=result["split"],
            level=level,
            source_uri=shard.uri,
            parquet_uri=out,
            replacing=replaced,
        )
        if stale:
            log.info("%s: %d videos changed or left: their predictions dropped, to be scored again", shard.uri, stale)
        manifest.mark_succeeded(conn, shard, self.dest, **{k: v for k, v in result.items() if k != "source_uri"})

    def _unpublish(self, out_store: ObjectStore, out: str, shard: ObjectInfo, level: str) -> None:
        """The commit failed after the file went out: take it back, so that no file is visible without its
        rows. Its earlier content was overwritten, so its earlier catalogue rows go too, if the database
        lets us."""
        try:
            out_store.delete(out)
        except StoreError as exc:
            log.warning("could not take back %s after its database commit failed: %s", out, exc)
        try:
            with db.transaction(self.db_url) as conn:
                catalog.forget_shard(conn, shard.uri, level)
        except SQLAlchemyError as exc:
            log.warning(
                "the catalogue may still list the videos of %s, whose Parquet is gone: %s", shard.uri, _describe(exc)
            )


# The entry points the DAG, the command line and the tests call, each one converter's method.


def list_pending(
    src: str, dest: str, db_url: str, pattern: str = DEFAULT_PATTERN, force: bool = False, s3: S3Config | None = None
) -> tuple[list[ObjectInfo], int]:
    return Converter(dest, db_url, s3).pending(src, pattern, force)


def converted(shards: list[ObjectInfo], dest: str, db_url: str, s3: S3Config | None = None) -> dict[str, dict]:
    return Converter(dest, db_url, s3).converted(shards)


def convert_batch(
    shards: list[ObjectInfo],
    dest: str,
    db_url: str,
    s3: S3Config | None = None,
    force: bool = False,
    replace: bool = False,
) -> BatchReport:
    return Converter(dest, db_url, s3, replace).convert_batch(shards, force)


def convert_shard(shard: ObjectInfo, dest: str, db_url: str, s3: S3Config | None = None, replace: bool = False) -> dict:
    return Converter(dest, db_url, s3, replace).convert_shard(shard)


def summary(
    planned: list[ObjectInfo], dest: str, db_url: str, s3: S3Config | None = None, max_outputs: int = MAX_EVENT_OUTPUTS
) -> dict:
    return Converter(dest, db_url, s3).summary(planned, max_outputs)


def ingest(
    src: str,
    dest: str,
    db_url: str,
    pattern: str = DEFAULT_PATTERN,
    force: bool = False,
    s3: S3Config | None = None,
    replace: bool = False,
) -> BatchReport:
    """Convert every pending shard under `src` as one batch; one bad shard never stops the others. Raises
    StoreError before converting anything when `dest` cannot be written."""
    converter = Converter(dest, db_url, s3, replace)
    pending, skipped = converter.pending(src, pattern, force)
    report = converter.convert_batch(pending, done={})  # pending() just skipped the converted ones
    report.skipped += skipped
    return report


@dataclass
class _ShardVideos:
    ids: list[str] = field(default_factory=list)
    labels: list[list[int]] = field(default_factory=list)
    # each video's content (its whole record: features and labels), what its predictions were scored from
    fingerprints: list[str] = field(default_factory=list)
    records: dict[str, tuple[int, int]] = field(default_factory=dict)  # id -> (record index, byte offset)


def _write_parquet(path, level: str, split: str, records, shard: ObjectInfo) -> _ShardVideos:
    """Decode every record into the Parquet file at `path`; refuses a record that is not a valid video, or
    whose id an earlier record of the shard has."""
    decode = _DECODERS[level]
    require_labels = split != "test"  # Google's test split carries no labels
    videos = _ShardVideos()
    writer = ShardParquetWriter(path, level)
    try:
        for record in records:
            try:
                video = decode(record.data, require_labels)
            except RecordDecodeError as exc:
                raise BadRecordError(shard.uri, record.index, record.offset, str(exc)) from None
            earlier = videos.records.setdefault(video.id, (record.index, record.offset))
            if earlier[0] != record.index:
                raise BadRecordError(
                    shard.uri,
                    record.index,
                    record.offset,
                    f"video id {video.id!r} repeats the id of record {earlier[0]} of this shard",
                )
            try:
                writer.add(video)
            except LayoutError as exc:  # segment ratings on some records only
                raise BadRecordError(shard.uri, record.index, record.offset, str(exc)) from None
            videos.ids.append(video.id)
            videos.labels.append(video.labels)
            videos.fingerprints.append(xxhash.xxh3_128_hexdigest(record.data))
    finally:
        writer.close()
    return videos


def _taken_over(owner: str | None, shard: ObjectInfo, out: str, replace: bool) -> str | None:
    """The other source whose output `shard` takes over (with `replace`), None if the output is free or
    already `shard`'s; raises OutputTakenError otherwise."""
    if owner is None or owner == shard.uri:
        return None
    if not replace:
        raise OutputTakenError(
            f"{out} already holds the videos of {owner}, a shard of the same name from another "
            "source: not converted (replace=True, `vtag ingest --replace`, replaces it)"
        )
    return owner
