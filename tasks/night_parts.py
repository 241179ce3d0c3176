"""One part of a planned night, on whichever GPU worker runs it: its videos scored with one data loader
over all of the part's files, each batch's top k written in chunks into the part's own table and its export
fragments as it goes; a retry redoes only its part. Nothing of it is served before the night publishes."""

import logging
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np

from storage.database import db, label_counts, partitions, pending, prediction_writes, run_locks, runs
from storage.formats import exports, segment_exports
from storage.formats.segment_rows import TopSegments
from storage.objectstore import S3Config, StoreError, store_for
from tasks import native_memory
from tasks.night_plan import MAX_K, InferenceError, NightPlan, known, lock_timeout, matches

log = logging.getLogger(__name__)

CSV_TOP = exports.CSV_TOP
CHUNK_VIDEOS = 2000


class NonFiniteScores(InferenceError):
    """The model scored some videos NaN or infinite: nothing of theirs may be stored or exported."""


class IncompleteNight(InferenceError):
    """Some video of a night was not written with its k rows: the night must not look succeeded."""


@dataclass(frozen=True)
class NightOptions:
    """How this process does a night's work (not what the night is): videos a scoring batch and a write
    transaction, a progress bar, a precision other than the checkpoint's (model/precision.py), and how long
    to wait for another run's lock (default: tasks.settings)."""

    batch_size: int = 256
    chunk_videos: int = CHUNK_VIDEOS
    progress: bool = False
    precision: str | None = None
    lock_timeout_s: float | None = None


@dataclass
class PartReport:
    part: int
    videos: int = 0
    rows_written: int = 0


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
    from model.devices import pick_device
    from model.evaluate import load_model

    device = pick_device()
    model, config = load_model(checkpoint_uri, device, s3, sha256=sha256, precision=precision, weights=weights)
    return model, config, device


def tag_part(
    db_url: str,
    plan: NightPlan,
    part: dict,
    *,
    s3: S3Config | None = None,
    scorer=None,
    lock: run_locks.RunLockHolder | run_locks.FileLockHolder | None = None,
    score_batches=None,
    **options,
) -> PartReport:
    """Score one part of a planned night. `options`: NightOptions' fields.
    `scorer`: (model, config, device), loaded here if not given;
    `lock`: the holder of the night's run_lock, which the caller holds; without it this takes the part's own.
    `score_batches(by_file, num_classes)`, given, replaces the model: benchmarks.scale measures everything
    around the model with it (its batches: (ids, scores), or with the plan's segments (ids, scores,
    TopSegments))."""
    how, number = NightOptions(**options), part["part"]
    if plan.segments:  # the segment pass's large temporaries must not grow the heap with the night
        native_memory.keep_large_blocks_mapped()
    with (
        nullcontext(lock)
        if lock is not None
        else run_locks.run_lock(
            db.engine_for(db_url),
            plan.logical_date,
            plan.model_version,
            number,
            timeout_s=lock_timeout(how.lock_timeout_s),
        )
    ) as held:
        with db.transaction(db_url) as conn:
            attempt = runs.start_part(conn, plan.run_id, number)["attempt"]
        try:
            # The earlier try's rows go with the part's new total: a failure between them leaves neither.
            with db.transaction(db_url) as conn:
                prediction_writes.create_part_table(conn, plan.model_version, plan.run_id, number)
                if plan.segments:
                    prediction_writes.create_part_table(
                        conn, plan.model_version, plan.run_id, number, partitions.SEGMENTS
                    )
                work = _PartWork(plan, number, attempt, _part_videos(conn, plan, part))
                runs.set_part_total(conn, plan.run_id, number, work.total)
            if score_batches is None:
                model, config, device = scorer or load_scorer(
                    plan.checkpoint_uri, s3, plan.checkpoint_sha256, how.precision, plan.weights
                )
                segments = (plan.segments, plan.segment_method) if plan.segments else None
                batches = _score(model, config, work.by_file, device, s3, how.batch_size, segments)
                num_classes = config.num_classes
            else:
                num_classes = MAX_K
                batches = score_batches(work.by_file, num_classes)
            report = work.write(db_url, batches, num_classes, s3, held, how)
        except BaseException as exc:
            with db.transaction(db_url) as conn:
                runs.finish_part(conn, plan.run_id, number, error=f"{type(exc).__name__}: {exc}", attempt=attempt)
            raise
    log.info("run %d part %d: %d videos, %d rows", plan.run_id, number, report.videos, report.rows_written)
    return report


def _part_videos(conn, plan: NightPlan, part: dict) -> dict[str, set[str]]:
    """The videos this part scores, by Parquet file."""
    uri_range = (part["first_uri"], part["last_uri"])
    if plan.video_ids:
        wanted = [
            (v, uri)
            for v, uri in known(conn, plan.video_ids, plan.level).items()
            if uri_range[0] <= uri <= uri_range[1]
        ]
    else:
        wanted = pending.pending_videos(
            conn, plan.model_version, plan.logical_date, plan.level, exclude_run=plan.run_id, uri_range=uri_range
        )
        wanted = [(v, uri) for v, uri in wanted if matches(uri, plan.shard_pattern)]
    by_file: dict[str, set[str]] = {}
    for video, uri in wanted:
        by_file.setdefault(uri, set()).add(video)
    return by_file


def _score(model, config, by_file: dict[str, set[str]], device, s3, batch_size: int, segments=None):
    """(ids, scores) per batch for the wanted videos, from one data loader over all the part's files; with
    `segments` (M, method), (ids, scores, TopSegments)."""
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
    for ids, scores, _labels, *top in predict_row_groups(model, config, groups, device, batch_size, s3, segments):
        keep = [i for i, v in enumerate(ids) if v in wanted]
        if keep:
            yield [ids[i] for i in keep], scores[keep], *(t.take(keep) for t in top)


def _top(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k best labels (every label, when there are fewer) and their scores, best first.
    torch.topk: 21 ms for 1,024 x 3,862 here, against 38 ms for numpy's argpartition and argsort."""
    import torch

    values, labels = torch.topk(torch.from_numpy(scores), min(k, scores.shape[1]), dim=1, sorted=True)
    return labels.numpy(), values.numpy()


class _PartWork:
    """A part's try: the videos it must score by file, and the checks that every one comes out once."""

    def __init__(self, plan: NightPlan, number: int, attempt: int, by_file: dict[str, set[str]]):
        self.plan, self.number, self.attempt, self.by_file = plan, number, attempt, by_file
        self.total = sum(len(v) for v in by_file.values())
        self.scored: set[str] = set()

    def write(self, db_url: str, batches, num_classes: int, s3, lock, how: NightOptions) -> PartReport:
        """Rows in chunks, export fragments and label counts from (ids, scores) batches; the part succeeds
        only if every video it had to score was written with its k rows."""
        plan = self.plan
        top_k, csv_top = min(plan.top_k, num_classes), max(plan.top_k, CSV_TOP)
        counts = label_counts.LabelCounts(top_k, num_classes)
        into = prediction_writes.PartTable(
            plan.run_id,
            plan.model_version,
            self.number,
            plan.part_table(self.number),
            self.attempt,
            partitions.part_table_name(plan.model_version, plan.run_id, self.number, partitions.SEGMENTS)
            if plan.segments
            else None,
        )
        chunks = prediction_writes.ChunkWriter(db.engine_for(db_url), into, lock, counts)
        waiting = _Chunks(chunks, how.chunk_videos)
        segment_fragment = segment_exports.PartSegments(plan.exports_uri, self.number, s3=s3) if plan.segments else None
        bar = _progress(self.total, how.progress)
        try:
            with exports.PartExports(plan.exports_uri, self.number, top_k, s3) as fragments:
                for ids, scores, *top in batches:
                    segments = self._segments(ids, top)
                    self._check_finite(ids, scores)
                    self._check_once(ids)
                    labels, top_scores = _top(scores, csv_top)
                    fragments.add(ids, labels, top_scores)
                    if segments is not None:
                        segment_fragment.add(ids, segments)
                    waiting.add(ids, labels[:, :top_k], top_scores[:, :top_k], segments)
                    if bar is not None:
                        bar.update(len(ids))
                waiting.flush(everything=True)
                rows = chunks.close()  # before the fragments are published: a failed write publishes none
                self._check_all_scored()
                if segment_fragment is not None:
                    segment_fragment.write()
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
        with db.transaction(db_url) as conn:
            lost = runs.finish_part(conn, plan.run_id, self.number, counts, attempt=self.attempt, rows_per_video=top_k)
        if lost is not None:  # the part is marked failed, committed
            raise lost
        return PartReport(self.number, chunks.videos_written, rows)

    def _segments(self, ids: list[str], top: list) -> TopSegments | None:
        """A batch's segments: there exactly when the plan asks for them, finite where present."""
        if not self.plan.segments:
            return None
        if not top:
            raise IncompleteNight(
                f"run {self.plan.run_id} part {self.number}: the night asks for segments and the scorer gave none"
            )
        (segments,) = top
        bad = (segments.present & ~np.isfinite(segments.scores)).any(axis=1)
        if bad.any():
            videos = [v for v, b in zip(ids, bad) if b]
            raise NonFiniteScores(
                f"model version {self.plan.model_version} gave NaN or infinite segment scores to {len(videos)} "
                f"videos of a batch: {self._named(videos)}; nothing of this part counts"
            )
        return segments

    def _where(self, video: str) -> str:
        return next((uri for uri, wanted in self.by_file.items() if video in wanted), "?")

    def _named(self, videos: list[str]) -> str:
        return f"{', '.join(f'{v} ({self._where(v)})' for v in videos[:3])}{' ...' if len(videos) > 3 else ''}"

    def _check_finite(self, ids: list[str], scores: np.ndarray) -> None:
        """Refuse a batch with NaN or infinite scores before any of it is exported or written: SQLite
        stores NaN as NULL, the CSV as `nan`, and a top k of NaNs means nothing."""
        bad = ~np.isfinite(scores).all(axis=1)
        if bad.any():
            videos = [v for v, b in zip(ids, bad) if b]
            raise NonFiniteScores(
                f"model version {self.plan.model_version} ({self.plan.checkpoint_uri}) gave NaN or infinite scores "
                f"to {len(videos)} of the {len(ids)} videos of a batch: {self._named(videos)}; nothing of this part "
                "counts: check those videos' features and the model"
            )

    def _check_once(self, ids: list[str]) -> None:
        """Add a batch's videos to those scored, refusing one that comes out twice (its k rows would not be k)."""
        repeated = [v for v in ids if v in self.scored]
        if not repeated and len(set(ids)) == len(ids):
            self.scored.update(ids)
            return
        video = repeated[0] if repeated else next(v for v, n in Counter(ids).items() if n > 1)
        raise IncompleteNight(
            f"run {self.plan.run_id} part {self.number}: video {video} ({self._where(video)}) came out of "
            "the part's files twice"
        )

    def _check_all_scored(self) -> None:
        missing = sorted(set().union(*self.by_file.values()) - self.scored) if self.by_file else []
        if missing:
            raise IncompleteNight(
                f"run {self.plan.run_id} part {self.number}: {len(missing)} videos the catalogue places in the "
                f"part's files were not in them: {self._named(missing)}"
            )


class _Chunks:
    """Scored batches gathered into whole chunks of `size` videos for the writer (the last may be short)."""

    def __init__(self, writer: prediction_writes.ChunkWriter, size: int):
        self.writer, self.size = writer, size
        self.ids: list[str] = []
        self.labels: list[np.ndarray] = []
        self.scores: list[np.ndarray] = []
        self.segments: list[TopSegments] = []

    def add(self, ids: list[str], labels: np.ndarray, scores: np.ndarray, segments: TopSegments | None) -> None:
        self.ids.extend(ids)
        self.labels.append(labels)
        self.scores.append(scores)
        if segments is not None:
            self.segments.append(segments)
        if len(self.ids) >= self.size:
            self.flush()

    def flush(self, everything: bool = False) -> None:
        if not self.ids:
            return
        labels, scores = np.concatenate(self.labels), np.concatenate(self.scores)
        segments = TopSegments.concat(self.segments) if self.segments else None
        end = len(self.ids) if everything else len(self.ids) - len(self.ids) % self.size
        for start in range(0, end, self.size):
            stop = min(start + self.size, end)
            these = segments.take(slice(start, stop)) if segments is not None else None
            self.writer.submit(self.ids[start:stop], labels[start:stop], scores[start:stop], these)
        del self.ids[:end]
        self.labels[:], self.scores[:] = [labels[end:]], [scores[end:]]
        self.segments[:] = [segments.take(slice(end, None))] if segments is not None else []


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="inference", unit="video", dynamic_ncols=True)
