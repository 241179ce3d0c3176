"""Batch inference: score the videos the production model has not scored yet, keep each video's top k
labels in the database, and write the exports people know (Google's CSV, the seed's pickle).

A night is planned, then scored in parts, then finished:

- `plan_night` starts (or restarts) the night's run and cuts its pending videos into parts: contiguous
  ranges of Parquet files of about `part_videos` videos each (a small night is one part, a full
  rescore of 6.1 M videos about 25, never more than MAX_PARTS).
- `tag_part` scores one part, on whichever GPU worker runs it, with one data loader over all of the
  part's files, writing rows in chunks and its export fragments as it goes; a retry redoes only its part.
- `finish_night` joins the fragments into the night's exports and closes the run.

The DAG runs the parts as mapped tasks; `run_inference` (the command line, and the tests) runs all
three in one process.
"""

import fnmatch
import logging
import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime

import numpy as np

from storage.database import db, label_counts, partitions, pending, prediction_writes, registry, run_locks, runs
from storage.errors import VtagError
from storage.formats import exports
from storage.formats.yt8m_spec import NUL_REFUSED, NUM_CLASSES, TOP_K
from storage.objectstore import S3Config, StoreError, canonical_uri, join, store_for
from tasks import settings

log = logging.getLogger(__name__)

MAX_K = NUM_CLASSES
CSV_TOP = exports.CSV_TOP
CHUNK_VIDEOS = 2000
PART_VIDEOS = 250_000  # about 25 s of a GPU at the 10,000 videos/s target: worth a task's start-up
MAX_PARTS = 512  # well under Airflow's [core] max_map_length (1,024)


class InferenceError(VtagError, ValueError):
    pass


class NoProductionModel(InferenceError):
    pass


class NonFiniteScores(InferenceError):
    """The model scored some videos NaN or infinite: nothing of theirs may be stored or exported."""


class IncompleteNight(InferenceError):
    """Some video of a night was not written with its k rows: the night must not look succeeded."""


@dataclass
class InferenceReport:
    run_id: int | None
    model_version: int
    videos: int
    rows_written: int
    exports: list[str] = field(default_factory=list)


@dataclass
class NightPlan:
    """What every part of a night needs to know; JSON-serialisable for XCom (`as_dict`/`from_dict`)."""

    run_id: int
    model_version: int
    checkpoint_uri: str
    level: str
    top_k: int
    logical_date: datetime
    exports_uri: str
    parts: list[dict]
    video_ids: list[str] | None = None
    shard_pattern: str | None = None
    rows_per_video: int | None = None  # top_k, or fewer when the model has fewer classes; None: top_k
    checkpoint_sha256: str | None = None  # the version's registered content, checked when a part loads it
    weights_uri: str | None = None  # its inference artifact, which parts load instead when it has one
    weights_sha256: str | None = None

    @property
    def weights(self) -> tuple[str, str] | None:
        return (self.weights_uri, self.weights_sha256) if self.weights_uri else None

    @property
    def k(self) -> int:
        return self.rows_per_video or self.top_k

    def as_dict(self) -> dict:
        return {**asdict(self), "logical_date": self.logical_date.isoformat()}

    @classmethod
    def from_dict(cls, values: dict) -> "NightPlan":
        known = {f.name for f in fields(cls)}  # a plan of an older release may carry what this one dropped
        values = {k: v for k, v in values.items() if k in known}
        return cls(**{**values, "logical_date": datetime.fromisoformat(values["logical_date"])})

    def part_table(self, part: int) -> str:
        return partitions.part_table_name(self.model_version, self.run_id, part)


def _lock_timeout(seconds: float | None) -> float:
    """The caller's limit on waiting for another run's lock, else the deployment's ($VTAG_LOCK_TIMEOUT_S)."""
    return settings.lock_timeout_s(seconds, "lock_timeout_s")


def _model_version(conn, level: str, version: int | None) -> dict:
    if version is not None:
        return registry.get_version(conn, version)
    current = registry.production(conn, level)
    if current is None:
        raise NoProductionModel(
            f"no production model for level {level!r} yet: train one (yt8m_train) or name a version"
        )
    return current


def _check_request(top_k: int, logical_date: datetime) -> datetime:
    if not 1 <= top_k <= MAX_K:
        raise InferenceError(f"top_k must be in 1..{MAX_K}, not {top_k}")
    if logical_date.tzinfo is None:
        raise InferenceError(f"logical date {logical_date} has no time zone")
    return logical_date.astimezone(UTC)  # SQLite keeps no offset: compare in UTC everywhere


def _rows_per_video(version: dict, top_k: int) -> int:
    """Rows each video gets: the top k, or every class of a model that has fewer."""
    config = version.get("config") or {}
    if isinstance(config, str):
        import json

        config = json.loads(config)
    return min(top_k, int(config.get("num_classes") or MAX_K))


def _resolve_request(
    db_url: str,
    logical_date: datetime,
    top_k: int,
    level: str,
    model_version: int | None,
    checkpoint_uri: str | None,
    s3: S3Config | None,
) -> tuple[datetime, dict]:
    """(the logical date in UTC, the registry row of the model version to score with). The request is
    checked before the database is, so that a bad one fails the same everywhere; a checkpoint given by
    URI is registered if it is not yet."""
    logical_date = _check_request(top_k, logical_date)
    db.require_current(db_url)
    if checkpoint_uri is not None:
        from tasks.training import ensure_registered

        model_version = ensure_registered(db_url, checkpoint_uri, s3)
    with db.transaction(db_url) as conn:
        return logical_date, _model_version(conn, level, model_version)


def _known(conn, video_ids: list[str], level: str) -> dict[str, str]:
    if nul := [v for v in video_ids if "\x00" in v]:
        raise InferenceError(f"video id {nul[0]!r} holds a NUL byte ({NUL_REFUSED})")
    known = pending.known_videos(conn, video_ids, level)
    missing = [v for v in video_ids if v not in known]
    if missing:
        raise InferenceError(
            f"never ingested at {level} level: {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}"
        )
    return known


def _matches(uri: str, shard_pattern: str | None) -> bool:
    return shard_pattern is None or fnmatch.fnmatchcase(uri.rsplit("/", 1)[-1], shard_pattern)


def cut_parts(files: list[tuple[str, int]], part_videos: int = PART_VIDEOS, max_parts: int = MAX_PARTS) -> list[dict]:
    """Cut (Parquet URI, videos) in URI order into contiguous parts of at least `part_videos` videos
    (the last may hold fewer), so that no more than `max_parts` come out however large the night."""
    if part_videos < 1:
        raise InferenceError(f"part_videos must be at least 1, not {part_videos}")
    target = max(part_videos, math.ceil(sum(n for _, n in files) / max_parts))
    parts, start, videos = [], 0, 0
    for i, (_, count) in enumerate(files):
        videos += count
        if videos >= target or i == len(files) - 1:
            parts.append(
                {
                    "part": len(parts),
                    "first_uri": files[start][0],
                    "last_uri": files[i][0],
                    "files": i - start + 1,
                    "videos": videos,
                }
            )
            start, videos = i + 1, 0
    return parts


def _pending_files(
    conn,
    version: int,
    logical_date: datetime,
    level: str,
    run_id: int | None,
    video_ids: list[str] | None,
    shard_pattern: str | None,
) -> list[tuple[str, int]]:
    if video_ids:
        counts: dict[str, int] = {}
        for uri in _known(conn, video_ids, level).values():
            counts[uri] = counts.get(uri, 0) + 1
        return sorted(counts.items())
    files = pending.pending_files(conn, version, logical_date, level, exclude_run=run_id)
    return [(uri, n) for uri, n in files if _matches(uri, shard_pattern)]


def plan_night(
    db_url: str,
    logical_date: datetime,
    *,
    top_k: int = TOP_K,
    level: str = "frame",
    model_version: int | None = None,
    checkpoint_uri: str | None = None,
    video_ids: list[str] | None = None,
    shard_pattern: str | None = None,
    exports_uri: str | None = None,
    s3: S3Config | None = None,
    airflow_run_id: str | None = None,
    part_videos: int = PART_VIDEOS,
    locked: bool = False,
    lock_timeout_s: float | None = None,
) -> NightPlan:
    """Start the night's run and cut what it must score into parts. A whole night's rows, once published,
    replace the run's earlier ones; a targeted one (video ids, file pattern) adds to them (the given
    videos' earlier scores by the version replaced, when it publishes). `locked`: the caller holds
    the night's run_lock; otherwise this waits for it at most `lock_timeout_s` (default: settings).
    Everything a caller gave is checked before the run's row exists: a refused request leaves no row."""
    if not (isinstance(part_videos, int) and part_videos >= 1):
        raise InferenceError(f"part_videos must be a whole number of videos, at least 1, not {part_videos!r}")
    logical_date, version = _resolve_request(db_url, logical_date, top_k, level, model_version, checkpoint_uri, s3)
    number, level = version["version"], version["level"]
    try:  # a URI no store serves fails now, not after the night has scored
        exports_uri = canonical_uri(
            exports_uri or exports.night_folder(settings.default_exports_uri(), logical_date, number)
        )
        store_for(exports_uri, s3)
    except StoreError as exc:
        raise InferenceError(f"exports: {exc}") from None
    video_ids = sorted(set(video_ids)) if video_ids else None
    if video_ids:
        with db.transaction(db_url) as conn:
            _known(conn, video_ids, level)  # before anything is forgotten
    whole = not (video_ids or shard_pattern)
    with (
        nullcontext()
        if locked
        else run_locks.run_lock(db.engine_for(db_url), logical_date, number, timeout_s=_lock_timeout(lock_timeout_s))
    ):
        with db.transaction(db_url) as conn:
            run_id = runs.start_run(conn, logical_date, number, top_k, airflow_run_id, clear=whole)
        try:
            with db.transaction(db_url) as conn:
                files = _pending_files(conn, number, logical_date, level, run_id, video_ids, shard_pattern)
                parts = runs.record_parts(conn, run_id, cut_parts(files, part_videos))
        except BaseException as exc:  # never leave the night looking as if it were running
            _fail_run(db_url, run_id, f"planning: {type(exc).__name__}: {exc}")
            raise
    if not whole and parts:  # a targeted rescoring's exports, beside the night's, not over them
        exports_uri = join(exports_uri, f"rescored-part{parts[0]['part']:05d}")
    log.info("run %d: %d videos in %d files, %d parts", run_id, sum(p["videos"] for p in parts), len(files), len(parts))
    return NightPlan(
        run_id,
        number,
        version["checkpoint_uri"],
        level,
        top_k,
        logical_date,
        exports_uri,
        parts,
        video_ids,
        shard_pattern,
        _rows_per_video(version, top_k),
        version["checkpoint_sha256"],
        version["weights_uri"],
        version["weights_sha256"],
    )


def count_pending(
    db_url: str,
    logical_date: datetime,
    *,
    top_k: int = TOP_K,
    level: str = "frame",
    model_version: int | None = None,
    checkpoint_uri: str | None = None,
    video_ids: list[str] | None = None,
    shard_pattern: str | None = None,
    s3: S3Config | None = None,
) -> tuple[int, int]:
    """A dry run: (model version, how many videos a run would score), writing nothing."""
    logical_date, version = _resolve_request(db_url, logical_date, top_k, level, model_version, checkpoint_uri, s3)
    with db.transaction(db_url) as conn:
        if video_ids:
            return version["version"], len(_known(conn, sorted(set(video_ids)), version["level"]))
        files = _pending_files(conn, version["version"], logical_date, version["level"], None, None, shard_pattern)
    return version["version"], sum(n for _, n in files)


class DryRunOnly(Exception):
    """Not an error: a dry run's finding (what a night would score), for the DAG to show as a skip."""


def open_night(
    db_url: str,
    logical_date: datetime,
    request: dict,
    *,
    dry_run: bool = False,
    s3: S3Config | None = None,
    **planning,
) -> NightPlan:
    """The nightly DAG's first task in one call: `plan_night(request, **planning)`, a night with nothing to
    score finished at once (its run closed, empty exports: no part to wait for); with `dry_run`, only
    count_pending, told by DryRunOnly. `request`: what count_pending and plan_night share (top_k, level,
    model_version, video_ids, shard_pattern)."""
    if dry_run:
        version, videos = count_pending(db_url, logical_date, s3=s3, **request)
        raise DryRunOnly(f"dry run: model version {version} would score {videos} videos")
    plan = plan_night(db_url, logical_date, s3=s3, **request, **planning)
    if not plan.parts:
        finish_night(db_url, plan, s3)
    return plan


@dataclass
class PartReport:
    part: int
    videos: int = 0
    rows_written: int = 0


def _part_videos(conn, plan: NightPlan, part: dict) -> dict[str, set[str]]:
    """The videos this part scores, by Parquet file."""
    uri_range = (part["first_uri"], part["last_uri"])
    if plan.video_ids:
        wanted = [
            (v, uri)
            for v, uri in _known(conn, plan.video_ids, plan.level).items()
            if uri_range[0] <= uri <= uri_range[1]
        ]
    else:
        wanted = pending.pending_videos(
            conn, plan.model_version, plan.logical_date, plan.level, exclude_run=plan.run_id, uri_range=uri_range
        )
        wanted = [(v, uri) for v, uri in wanted if _matches(uri, plan.shard_pattern)]
    by_file: dict[str, set[str]] = {}
    for video, uri in wanted:
        by_file.setdefault(uri, set()).add(video)
    return by_file


def _score(model, config, by_file: dict[str, set[str]], device, s3, batch_size: int):
    """(ids, scores) per batch for the wanted videos, from one data loader over all the part's files."""
    import pyarrow.parquet as pq

    from model.data import RowGroup
    from model.evaluate import predict_row_groups

    groups = []
    for uri in sorted(by_file):
        store = store_for(uri, s3)
        info = store.info(uri)
        if info is None:
            raise StoreError(
                f"no such file: {uri}, which the catalogue lists for {len(by_file[uri])} videos of this part"
            )
        # Pinned: a file replaced while the part reads it fails the part (its retry reads the new content)
        # instead of mixing two contents under one catalogue.
        with store.open_read(uri, fingerprint=info.fingerprint) as f:
            metadata = pq.ParquetFile(f).metadata
        groups += [
            RowGroup(uri, i, metadata.row_group(i).num_rows, info.fingerprint) for i in range(metadata.num_row_groups)
        ]
    if not groups:
        return
    wanted = set().union(*by_file.values())
    for ids, scores, _labels in predict_row_groups(model, config, groups, device, batch_size, s3):
        keep = [i for i, v in enumerate(ids) if v in wanted]
        if keep:
            yield [ids[i] for i in keep], scores[keep]


def _top(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k best labels (every label, when there are fewer) and their scores, best first.
    torch.topk: 21 ms for 1,024 x 3,862 here, against 38 ms for numpy's argpartition and argsort."""
    import torch

    values, labels = torch.topk(torch.from_numpy(scores), min(k, scores.shape[1]), dim=1, sorted=True)
    return labels.numpy(), values.numpy()


def load_scorer(
    checkpoint_uri: str,
    s3: S3Config | None = None,
    sha256: str | None = None,
    precision: str | None = None,
    weights: tuple[str, str] | None = None,
):
    """(model, config, device) on the best device here, from the version's inference artifact `weights`
    (URI, sha256) when it has one, else its checkpoint; with `sha256`, refuses a checkpoint whose content is
    no longer the one registered; `precision`: another policy than the checkpoint's (model/precision.py)."""
    from model.evaluate import load_model
    from model.train import pick_device

    device = pick_device()
    model, config = load_model(checkpoint_uri, device, s3, sha256=sha256, precision=precision, weights=weights)
    return model, config, device


def tag_part(
    db_url: str,
    plan: NightPlan,
    part: dict,
    *,
    s3: S3Config | None = None,
    batch_size: int = 256,
    scorer=None,
    lock: run_locks.RunLockHolder | None = None,
    locked: bool = False,
    progress: bool = False,
    score_batches=None,
    lock_timeout_s: float | None = None,
    chunk_videos: int = CHUNK_VIDEOS,
) -> PartReport:
    """Score one part of a planned night, writing `chunk_videos` videos a transaction.
    `scorer`: (model, config, device), loaded here if not given;
    `locked`: the caller holds the night's run_lock (`lock`), else this takes the part's own, waiting
    for it at most `lock_timeout_s` (default: settings).
    `score_batches(by_file, num_classes)`, given, replaces the model: benchmarks.scale measures everything
    around the model with it."""
    number = part["part"]
    with (
        nullcontext()
        if locked
        else run_locks.run_lock(
            db.engine_for(db_url),
            plan.logical_date,
            plan.model_version,
            number,
            timeout_s=_lock_timeout(lock_timeout_s),
        )
    ) as own:
        lock = lock if locked else own
        with db.transaction(db_url) as conn:
            before = runs.start_part(conn, plan.run_id, number)
        attempt = before["attempt"]
        try:
            # The earlier try's rows go with the part's new total: a failure between them leaves neither.
            with db.transaction(db_url) as conn:
                prediction_writes.create_part_table(conn, plan.model_version, plan.run_id, number)
                by_file = _part_videos(conn, plan, part)
                runs.set_part_total(conn, plan.run_id, number, sum(len(v) for v in by_file.values()))
            if score_batches is None:
                model, config, device = scorer or load_scorer(
                    plan.checkpoint_uri, s3, plan.checkpoint_sha256, weights=plan.weights
                )
                batches, num_classes = _score(model, config, by_file, device, s3, batch_size), config.num_classes
            else:
                num_classes = MAX_K
                batches = score_batches(by_file, num_classes)
            report = _write_part(
                db_url, plan, number, attempt, batches, num_classes, s3, lock, progress, by_file, chunk_videos
            )
        except BaseException as exc:
            with db.transaction(db_url) as conn:
                runs.finish_part(conn, plan.run_id, number, error=f"{type(exc).__name__}: {exc}", attempt=attempt)
            raise
    log.info("run %d part %d: %d videos, %d rows", plan.run_id, number, report.videos, report.rows_written)
    return report


def _file_of(by_file: dict[str, set[str]], video: str) -> str:
    return next((uri for uri, wanted in by_file.items() if video in wanted), "?")


def _check_finite(plan: NightPlan, ids: list[str], scores: np.ndarray, by_file: dict[str, set[str]]) -> None:
    """Refuse a batch with NaN or infinite scores before any of it is exported or written: SQLite
    stores NaN as NULL, the CSV as `nan`, and a top k of NaNs means nothing."""
    bad = ~np.isfinite(scores).all(axis=1)
    if bad.any():
        videos = [v for v, b in zip(ids, bad) if b]
        raise NonFiniteScores(
            f"model version {plan.model_version} ({plan.checkpoint_uri}) gave NaN or infinite scores to {len(videos)} of "
            f"the {len(ids)} videos of a batch: {', '.join(f'{v} ({_file_of(by_file, v)})' for v in videos[:3])}"
            f"{' ...' if len(videos) > 3 else ''}; nothing of this part counts: check those videos' features and the model"
        )


def _check_all_scored(plan: NightPlan, number: int, by_file: dict[str, set[str]], scored: set[str]) -> None:
    missing = sorted(set().union(*by_file.values()) - scored) if by_file else []
    if missing:
        raise IncompleteNight(
            f"run {plan.run_id} part {number}: {len(missing)} videos the catalogue places in the part's files were not in "
            f"them: {', '.join(f'{v} ({_file_of(by_file, v)})' for v in missing[:3])}{' ...' if len(missing) > 3 else ''}"
        )


def _check_once(plan: NightPlan, number: int, ids: list[str], scored: set[str], by_file: dict[str, set[str]]) -> None:
    """Add a batch's videos to those scored, refusing one that comes out twice (its k rows would not be k)."""
    repeated = [v for v in ids if v in scored]
    if not repeated and len(set(ids)) == len(ids):
        scored.update(ids)
        return
    from collections import Counter

    video = repeated[0] if repeated else next(v for v, n in Counter(ids).items() if n > 1)
    raise IncompleteNight(
        f"run {plan.run_id} part {number}: video {video} ({_file_of(by_file, video)}) came out of "
        "the part's files twice"
    )


def _write_part(
    db_url: str,
    plan: NightPlan,
    number: int,
    attempt: int,
    batches,
    num_classes: int,
    s3,
    lock,
    progress: bool,
    by_file: dict[str, set[str]],
    chunk_videos: int,
) -> PartReport:
    """Rows in chunks, export fragments and label counts from (ids, scores) batches; the part succeeds
    only if every video it had to score was written with its k rows."""
    top_k, csv_top = min(plan.top_k, num_classes), max(plan.top_k, CSV_TOP)
    report = PartReport(number)
    counts = label_counts.LabelCounts(top_k, num_classes)
    chunks = prediction_writes.ChunkWriter(
        db.engine_for(db_url),
        plan.run_id,
        plan.model_version,
        number,
        plan.part_table(number),
        lock,
        attempt,
        counts=counts,
    )
    pending_ids, pending_labels, pending_scores = [], [], []
    scored: set[str] = set()

    def flush(everything: bool = False):
        """Send whole chunks of `chunk_videos` (and, at the end, the rest) to the writer."""
        if not pending_ids:
            return
        labels, scores = np.concatenate(pending_labels), np.concatenate(pending_scores)
        end = len(pending_ids) if everything else len(pending_ids) - len(pending_ids) % chunk_videos
        for start in range(0, end, chunk_videos):
            stop = min(start + chunk_videos, end)
            chunks.submit(pending_ids[start:stop], labels[start:stop], scores[start:stop])
        del pending_ids[:end]
        pending_labels[:], pending_scores[:] = [labels[end:]], [scores[end:]]

    bar = _progress(sum(len(v) for v in by_file.values()), progress)
    try:
        with exports.PartExports(plan.exports_uri, number, top_k, s3) as fragments:
            for ids, scores in batches:
                _check_finite(plan, ids, scores, by_file)
                _check_once(plan, number, ids, scored, by_file)
                labels, top_scores = _top(scores, csv_top)
                fragments.add(ids, labels, top_scores)
                (
                    pending_ids.extend(ids),
                    pending_labels.append(labels[:, :top_k]),
                    pending_scores.append(top_scores[:, :top_k]),
                )
                report.videos += len(ids)
                if bar is not None:
                    bar.update(len(ids))
                if len(pending_ids) >= chunk_videos:
                    flush()
            flush(everything=True)
            report.rows_written = chunks.close()  # before the fragments are published: a failed write publishes none
            _check_all_scored(plan, number, by_file, scored)
    except BaseException:
        chunks.abandon()
        # A scorer left suspended keeps torch's inference mode on in this thread (until it is collected,
        # which the exception's traceback prevents): a later training here would get no gradients.
        if hasattr(batches, "close"):
            batches.close()
        raise
    finally:
        if bar is not None:
            bar.close()
    report.videos = chunks.videos_written
    with db.transaction(db_url) as conn:
        lost = runs.finish_part(conn, plan.run_id, number, counts, attempt=attempt, rows_per_video=top_k)
    if lost is not None:  # the part is marked failed, committed
        raise lost
    return report


def finish_night(db_url: str, plan: NightPlan, s3: S3Config | None = None) -> InferenceReport:
    """Close the night: if every part succeeded, join their export fragments, then publish the parts' rows
    and mark the run succeeded in one transaction; otherwise mark it failed, naming the parts, and raise.
    A night that fails here (exports unwritable, a row that would not land) publishes nothing: what the
    views served before stays served."""
    ours = sorted(p["part"] for p in plan.parts)
    with db.transaction(db_url) as conn:
        parts = [p for p in runs.parts_of(conn, plan.run_id) if p["part"] in ours]
    unfinished = [p for p in parts if p["status"] != "succeeded"]
    if unfinished:
        error = "parts not succeeded: " + ", ".join(
            f"{p['part']} ({p['status']}{': ' + p['error'] if p['error'] else ''})" for p in unfinished[:10]
        )
        _fail_run(db_url, plan.run_id, error)
        raise InferenceError(f"run {plan.run_id}: {error}")
    # The parts' committed counters, whatever wrote them (a try of an older release, a part's row edited):
    short = [(p["part"], gap) for p in parts if (gap := runs.shortfall(p, plan.k))]
    if len(parts) != len(ours) or short:
        error = "incomplete: " + (
            "; ".join(f"part {n}: {gap}" for n, gap in short[:10])
            or f"{len(ours) - len(parts)} planned parts missing from inference_parts"
        )
        _fail_run(db_url, plan.run_id, error)
        raise IncompleteNight(f"run {plan.run_id}: {error}")
    try:
        uris = exports.join_night(plan.exports_uri, ours, s3)
        with db.transaction(db_url) as conn:  # the night's rows become the version's with its success
            prediction_writes.publish(
                conn, plan.run_id, plan.model_version, plan.level, ours, plan.k, replace_any=bool(plan.video_ids)
            )
            # a targeted rescoring's exports hold its videos alone: the night's own stay the ones served
            whole = not (plan.video_ids or plan.shard_pattern)
            run = runs.finish_run(conn, plan.run_id, exports_uri=plan.exports_uri if whole else None)
            parts = [p for p in runs.parts_of(conn, plan.run_id) if p["part"] in ours]  # less what was left out
    except BaseException as exc:
        _fail_run(db_url, plan.run_id, f"finishing: {type(exc).__name__}: {exc}")
        raise
    log.info(
        "run %d: %d videos, %d rows, model version %d",
        plan.run_id,
        run["videos_done"],
        run["rows_written"],
        plan.model_version,
    )
    return InferenceReport(
        plan.run_id,
        plan.model_version,
        sum(p["videos_done"] for p in parts),
        sum(p["rows_written"] for p in parts),
        uris,
    )


def run_inference(
    db_url: str,
    logical_date: datetime,
    *,
    top_k: int = TOP_K,
    level: str = "frame",
    model_version: int | None = None,
    checkpoint_uri: str | None = None,
    video_ids: list[str] | None = None,
    shard_pattern: str | None = None,
    dry_run: bool = False,
    exports_uri: str | None = None,
    s3: S3Config | None = None,
    airflow_run_id: str | None = None,
    batch_size: int = 256,
    part_videos: int = PART_VIDEOS,
    progress: bool = False,
    lock_timeout_s: float | None = None,
    chunk_videos: int = CHUNK_VIDEOS,
    precision: str | None = None,
) -> InferenceReport:
    """Score what the model has not scored up to `logical_date` (or the given videos) and store the
    top k: the whole night in this process, its parts one after another, in `precision` if given (else
    the checkpoint's policy). Waits at most `lock_timeout_s`
    (default: tasks.settings.lock_timeout_s()) for another run of the same night to let go."""
    request = {
        "top_k": top_k,
        "level": level,
        "model_version": model_version,
        "checkpoint_uri": checkpoint_uri,
        "video_ids": video_ids,
        "shard_pattern": shard_pattern,
        "s3": s3,
    }
    if dry_run:
        return InferenceReport(None, *count_pending(db_url, logical_date, **request), 0)
    logical_date, version = _resolve_request(db_url, logical_date, top_k, level, model_version, checkpoint_uri, s3)
    weights = (version["weights_uri"], version["weights_sha256"]) if version["weights_uri"] else None
    scorer = load_scorer(version["checkpoint_uri"], s3, version["checkpoint_sha256"], precision, weights)
    # Two runs of the same night at once (a task's retry while a lost try still runs, `vtag infer`
    # beside the DAG) would share one run: the later start would empty the earlier one's rows under it.
    # They take turns instead, the later replacing the run.
    engine = db.engine_for(db_url)
    with run_locks.run_lock(engine, logical_date, version["version"], timeout_s=_lock_timeout(lock_timeout_s)) as lock:
        plan = plan_night(
            db_url,
            logical_date,
            **{**request, "model_version": version["version"], "checkpoint_uri": None},
            exports_uri=exports_uri,
            airflow_run_id=airflow_run_id,
            part_videos=part_videos,
            locked=True,
        )
        for part in plan.parts:
            try:
                tag_part(
                    db_url,
                    plan,
                    part,
                    s3=s3,
                    batch_size=batch_size,
                    scorer=scorer,
                    lock=lock,
                    locked=True,
                    progress=progress,
                    chunk_videos=chunk_videos,
                )
            except BaseException as exc:
                _fail_run(db_url, plan.run_id, f"part {part['part']}: {type(exc).__name__}: {exc}")
                raise
        return finish_night(db_url, plan, s3)


def retire_old_versions(db_url: str, keep: int) -> list[int]:
    """Retire the predictions of every model version but the newest `keep` that have predictions;
    a production version always keeps them. Returns the versions retired."""
    if keep < 1:
        raise InferenceError(f"keep must be at least 1, not {keep}")
    db.require_current(db_url)
    with db.transaction(db_url) as conn:
        older = partitions.versions_with_predictions(conn)[keep:]
    retired = [v["version"] for v in older if v["status"] != "production"]
    for version in retired:  # one transaction each: a version retired stays retired if a later one fails
        with db.transaction(db_url) as conn:
            partitions.retire(conn, version)
    return retired


def _fail_run(db_url: str, run_id: int, error: str) -> None:
    """Mark the night failed, in a transaction of its own: the work that failed rolled its own back."""
    with db.transaction(db_url) as conn:
        runs.finish_run(conn, run_id, error=error)


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="inference", unit="video", dynamic_ncols=True)
