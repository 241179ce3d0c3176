"""Batch inference: score the videos the production model has not scored yet, keep each video's top k
labels in the database, and write the exports people know (Google's CSV, the seed's pickle)."""

import csv
import fnmatch
import logging
import pickle
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from storage import db, predictions, registry
from storage.objectstore import S3Config, join, store_for

log = logging.getLogger(__name__)

MAX_K = 3862
CSV_TOP = 20  # Google's inference.py writes the top 20
CHUNK_VIDEOS = 2000


class InferenceError(ValueError):
    pass


class NoProductionModel(InferenceError):
    pass


@dataclass
class InferenceReport:
    run_id: int | None
    model_version: int
    videos: int
    rows_written: int
    exports: list[str] = field(default_factory=list)
    preview: list[tuple[str, list[tuple[int, float]]]] = field(default_factory=list)


def _model_version(db_url: str, level: str, version: int | None) -> dict:
    if version is not None:
        return registry.get_version(db_url, version)
    current = registry.production(db_url, level)
    if current is None:
        raise NoProductionModel(f"no production model for level {level!r} yet: train one (yt8m_train) or name a version")
    return current


def _select(db_url: str, model_version: int, until: datetime, level: str, video_ids: list[str] | None,
            shard_pattern: str | None) -> list[tuple[str, str]]:
    if video_ids:
        known = predictions.known_videos(db_url, video_ids, level)
        missing = [v for v in video_ids if v not in known]
        if missing:
            raise InferenceError(f"never ingested at {level} level: {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}")
        return sorted((v, known[v]) for v in set(video_ids))
    pending = predictions.pending_videos(db_url, model_version, until, level)
    if shard_pattern:
        pending = [(v, uri) for v, uri in pending if fnmatch.fnmatchcase(uri.rsplit("/", 1)[-1], shard_pattern)]
    return pending


def _score_files(model, config, by_file: dict[str, set[str]], device, s3, batch_size: int):
    """(ids, top-k labels, top-k scores) per batch, for the wanted videos of each Parquet file."""
    import pyarrow.parquet as pq

    from model.data import ParquetBatches, RowGroup, loader
    from model.evaluate import predict

    for uri, wanted in by_file.items():
        with store_for(uri, s3).open_read(uri) as f:
            metadata = pq.ParquetFile(f).metadata
        groups = [RowGroup(uri, i, metadata.row_group(i).num_rows) for i in range(metadata.num_row_groups)]
        dataset = ParquetBatches(groups, config.level, batch_size, config.num_classes, config.max_frames,
                                 shuffle=False, drop_last=False, workers=config.num_workers, s3=s3)
        for ids, scores, _labels in predict(model, config, loader(dataset, config.num_workers, device.type == "cuda"), device):
            keep = [i for i, v in enumerate(ids) if v in wanted]
            if keep:
                yield [ids[i] for i in keep], scores[keep]


def _top(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1, kind="stable")
    labels = np.take_along_axis(top, order, axis=1)
    return labels, np.take_along_axis(scores, labels, axis=1)


def run_inference(db_url: str, logical_date: datetime, *, top_k: int = 20, level: str = "frame",
                  model_version: int | None = None, checkpoint_uri: str | None = None, video_ids: list[str] | None = None,
                  shard_pattern: str | None = None, dry_run: bool = False, exports_uri: str | None = None,
                  s3: S3Config | None = None, airflow_run_id: str | None = None, batch_size: int = 256,
                  progress: bool = False) -> InferenceReport:
    """Score what the model has not scored up to `logical_date` (or the given videos) and store the top k."""
    if not 1 <= top_k <= MAX_K:
        raise InferenceError(f"top_k must be in 1..{MAX_K}, not {top_k}")
    if logical_date.tzinfo is None:
        raise InferenceError(f"logical date {logical_date} has no time zone")
    logical_date = logical_date.astimezone(timezone.utc)  # SQLite keeps no offset: compare in UTC everywhere
    db.upgrade(db_url)
    if checkpoint_uri is not None:
        from tasks.training import ensure_registered

        model_version = ensure_registered(db_url, checkpoint_uri, s3)
    version = _model_version(db_url, level, model_version)
    number, level = version["version"], version["level"]
    from model.evaluate import load_model
    from model.train import pick_device

    device = pick_device()
    model, config = load_model(version["checkpoint_uri"], device, s3)
    if dry_run:
        return InferenceReport(None, number, len(_select(db_url, number, logical_date, level, video_ids, shard_pattern)), 0)
    # Two tries of the same night at once (a task's retry while a lost try still runs, `vtag infer`
    # beside the DAG) would share one run: the later start would empty the earlier one's rows under it
    # and both would count their videos into it. They take turns instead, the later replacing the run.
    with predictions.run_lock(db_url, logical_date, number) as lock:
        return _write_run(db_url, logical_date, model, config, device, number, top_k=top_k, level=level,
                          video_ids=video_ids, shard_pattern=shard_pattern, exports_uri=exports_uri, s3=s3,
                          airflow_run_id=airflow_run_id, batch_size=batch_size, progress=progress, lock=lock)


def _write_run(db_url: str, logical_date: datetime, model, config, device, number: int, *, top_k: int, level: str,
               video_ids: list[str] | None, shard_pattern: str | None, exports_uri: str | None, s3: S3Config | None,
               airflow_run_id: str | None, batch_size: int, progress: bool,
               lock: predictions.RunLockHolder | None) -> InferenceReport:
    if video_ids:
        predictions.forget(db_url, number, video_ids)
    selected = _select(db_url, number, logical_date, level, video_ids, shard_pattern)
    by_file: dict[str, set[str]] = defaultdict(set)
    for video, uri in selected:
        by_file[uri].add(video)

    # A targeted (re)scoring adds to the night's run; only a whole night replaces it.
    run_id = predictions.start_run(db_url, logical_date, number, top_k, airflow_run_id,
                                   clear=not (video_ids or shard_pattern))
    predictions.set_total(db_url, run_id, len(selected))
    report = InferenceReport(run_id, number, 0, 0)
    csv_top = max(top_k, CSV_TOP)
    try:
        with tempfile.TemporaryDirectory(prefix="vtag-infer-") as tmp:
            csv_path, pickle_rows = Path(tmp) / "predictions.csv", []
            with open(csv_path, "w", newline="") as csv_file:
                writer = csv.writer(csv_file)
                writer.writerow(["VideoId", "LabelConfidencePairs"])
                pending_ids, pending_labels, pending_scores = [], [], []
                chunks = predictions.ChunkWriter(db_url, run_id, number, lock)

                def flush():
                    if pending_ids:
                        labels, scores = np.concatenate(pending_labels), np.concatenate(pending_scores)
                        chunks.submit(list(pending_ids), labels[:, :top_k], scores[:, :top_k])
                        pending_ids.clear(), pending_labels.clear(), pending_scores.clear()

                bar = _progress(len(selected), progress)
                try:
                    for ids, scores in _score_files(model, config, by_file, device, s3, batch_size):
                        labels, top_scores = _top(scores, csv_top)
                        for i, video in enumerate(ids):
                            pairs = [(int(l), float(s)) for l, s in zip(labels[i], top_scores[i])]
                            writer.writerow([video, " ".join(f"{l} {s:g}" for l, s in pairs[:CSV_TOP])])
                            pickle_rows.append((video, pairs[:top_k]))
                            if len(report.preview) < 5:
                                report.preview.append((video, pairs[:3]))
                        pending_ids.extend(ids), pending_labels.append(labels), pending_scores.append(top_scores)
                        report.videos += len(ids)
                        if bar is not None:
                            bar.update(len(ids))
                        if len(pending_ids) >= CHUNK_VIDEOS:
                            flush()
                    flush()
                except BaseException:
                    chunks.abandon()
                    raise
                report.rows_written = chunks.close()
                if bar is not None:
                    bar.close()
            with open(Path(tmp) / "AttentionLSTM_infer_result", "wb") as f:
                pickle.dump(pickle_rows, f, protocol=pickle.HIGHEST_PROTOCOL)
            exports = exports_uri or join(_default_exports(), f"{logical_date:%Y-%m-%dT%H%M%S}_v{number}")
            for name in ("predictions.csv", "AttentionLSTM_infer_result"):
                uri = join(exports, name)
                with store_for(uri, s3).publish(uri) as path:
                    path.write_bytes((Path(tmp) / name).read_bytes())
                report.exports.append(uri)
    except BaseException as exc:
        predictions.finish_run(db_url, run_id, error=f"{type(exc).__name__}: {exc}")
        raise
    predictions.finish_run(db_url, run_id)
    log.info("run %d: %d videos, %d rows, model version %d", run_id, report.videos, report.rows_written, number)
    return report


def _default_exports() -> str:
    from tasks.settings import default_exports_uri

    return default_exports_uri()


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="inference", unit="video", dynamic_ncols=True)
