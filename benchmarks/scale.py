"""Every stage of the pipeline at fractions of YouTube-8M's real size, up to the whole 2nd edition.

    python -m benchmarks.scale [--sizes 1,10,100] [--stages shards,catalogue,pending,rescore,queries,pages,segments,plan]
                               [--pg postgresql://postgres@127.0.0.1:5432/postgres] [--work DIR] [--json FILE]

The shape is the real one, scaled: 3,844 shards in each of train, validate and test; 3,888,919 /
1,112,356 / 1,133,323 videos (6,134,598); 20 prediction rows a video (122.7 M); ~3 ground-truth labels a
video, popular labels far more frequent than rare ones. What is built cheaply, and how:

- shards: thousands of tiny real TFRecord shards (one video each) on local disk; the manifest (and the
  destination's Parquet files, empty) filled as a finished earlier ingest leaves them.
- catalogue, ground truth, manifest and the production model's 20 rows a video are filled directly in
  PostgreSQL with generate_series (labelled "fill" below; not a pipeline path); every figure after the
  fill runs the pipeline's own code: catalog.record_videos and the manifest per shard, pending
  selection, plan_night, tag_part and finish_night, the SQL in sql/queries.
- rescore: a new model version scores every video. Its scores come from a STAND-IN (a fixed random
  score matrix, 1,024 videos a batch) instead of the AttentionLSTM, so the figure measures everything
  around the model: the top k, label counts, export fragments, COPY on two connections into a table
  already holding the production model's rows, the night's join of the exports.
- segments: tonight's videos scored at 5-second resolution (60 segments x 1,000 rated classes a video, from
  a stand-in too), each video's best 5 kept in segment_predictions, against the same night without them.

Each stage runs in a fresh process, so its peak RSS is its own. Per stage and size: seconds, items/s,
peak RSS, and the growth exponent e between consecutive sizes (time ~ n^e). A scratch database is
created on the server and dropped at the end; the disk work goes under --work (deleted at the end).
"""

import argparse
import json
import math
import multiprocessing
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from storage.formats.yt8m_spec import NUM_CLASSES

SPLITS = {"train": 3_888_919, "validate": 1_112_356, "test": 1_133_323}
SHARDS_PER_SPLIT = 3_844
K = 20
# In the past: a night publishes only videos whose content arrived before the part that scored them started.
BEFORE = datetime(2026, 1, 1, tzinfo=UTC)  # when everything but tonight's videos arrived
NIGHT = datetime(2026, 1, 2, 2, 0, tzinfo=UTC)  # the night being measured
NEW_TONIGHT = 100  # one video in 100 arrived today: the production model has not scored it yet
PARQUET = "s3://yt8m/parquet/frame"
SEGMENTS_PER_VIDEO = 60  # 5-second segments of a 300-frame video (YouTube-8M's longest; frames are seconds)


@dataclass(frozen=True)
class Size:
    percent: float

    def shards(self, split: str) -> int:
        return max(1, round(SHARDS_PER_SPLIT * self.percent / 100))

    def videos(self, split: str) -> int:
        return max(1, round(SPLITS[split] * self.percent / 100))

    @property
    def total_shards(self) -> int:
        return sum(self.shards(s) for s in SPLITS)

    @property
    def total_videos(self) -> int:
        return sum(self.videos(s) for s in SPLITS)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _in_child(function, *args):
    """Run a stage in a fresh interpreter; return its figures and peak RSS."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_measured, (function, *args))


def _measured(function, *args):
    result = function(*args)
    return {**result, "rss_mb": _peak_rss_mb()}


def _timed(function, *args, **kwargs):
    started = time.perf_counter()
    value = function(*args, **kwargs)
    return value, time.perf_counter() - started


# --- shards: listing and planning, the ingest DAG's expansion ----------------------------------------------


def _write_shards(folder: Path, size: Size) -> None:
    """Tiny real shards (one video each), named as Google's, written once per size."""
    from tasks.synth import SynthConfig, synth

    if (folder / ".complete").is_file():
        return
    folder.mkdir(parents=True, exist_ok=True)
    template = Path(
        synth(str(folder / "template"), SynthConfig("video", "train", shards=1, videos_per_shard=1))[0]
    ).read_bytes()
    for split in SPLITS:
        for i in range(size.shards(split)):
            (folder / f"{split}{i:04d}.tfrecord").write_bytes(template)
    shutil.rmtree(folder / "template")
    (folder / ".complete").touch()


def stage_shards(db_url: str, work: str, size: Size) -> dict:
    from sqlalchemy import insert

    from storage.database import db
    from storage.database.db import engine_for, utcnow
    from storage.database.schema import ingested_shards
    from storage.objectstore import store_for
    from tasks.ingest import list_pending, plan_batches

    src, dest = Path(work) / f"shards-{size.percent:g}", Path(work) / f"dest-{size.percent:g}"
    _write_shards(src, size)
    db.upgrade(db_url)
    (pending, skipped), first = _timed(list_pending, str(src), str(dest), db_url)
    assert len(pending) == size.total_shards and skipped == 0
    batches, expand = _timed(plan_batches, pending)
    payload = [
        [{"uri": s.uri, "size": s.size, "fingerprint": s.fingerprint, "dest": str(dest)} for s in b] for b in batches
    ]
    xcom_bytes = len(json.dumps(payload))
    # As a finished ingest leaves them: a succeeded manifest row and a Parquet file for every shard.
    rows = []
    for shard in store_for(str(src)).list(str(src), "*.tfrecord"):
        split = shard.name[: -len("0000.tfrecord")]
        out = dest / "video" / split / (shard.name[: -len(".tfrecord")] + ".parquet")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.touch()
        rows.append(
            {
                "source_uri": shard.uri,
                "dest_uri": str(dest),
                "output_uri": str(out),
                "level": "video",
                "split": split,
                "size_bytes": shard.size,
                "fingerprint": shard.fingerprint,
                "rows": 1,
                "status": "succeeded",
                "started_at": utcnow(),
                "finished_at": utcnow(),
            }
        )
    with engine_for(db_url).begin() as conn:
        conn.execute(insert(ingested_shards), rows)
    (again, skipped), rerun = _timed(list_pending, str(src), str(dest), db_url)
    assert not again and skipped == size.total_shards
    return {
        "items": size.total_shards,
        "figures": {
            "list_pending, nothing converted yet (s)": first,
            "list_pending, all converted (s)": rerun,
            "plan_batches (s)": expand,
            "mapped tasks": len(batches),
            "largest batch": max(len(b) for b in batches),
            "XCom of the expansion (KB)": xcom_bytes / 1024,
        },
        "seconds": first + rerun + expand,
    }


# --- the catalogue, filled at size, then the real per-shard path ---------------------------------------------


def _fill_sql(size: Size) -> list[tuple[str, dict]]:
    """Statements that fill videos, ground truth and the manifest at `size`, indexes built afterwards."""
    statements = []
    for split in SPLITS:
        shards, videos = size.shards(split), size.videos(split)
        params = {
            "split": split,
            "letter": split[0],
            "n": videos,
            "shards": shards,
            "before": BEFORE,
            "tonight": NIGHT - timedelta(hours=3),
            "every": NEW_TONIGHT,
            "root": PARQUET,
        }
        # Videos lie in shards contiguously, as ingest writes them; ids look random, as YouTube's do.
        shard = "lpad((i::bigint * :shards / :n)::text, 4, '0')"
        statements.append(
            (
                f"""
            INSERT INTO videos (video_id, level, split, source_uri, parquet_uri, ingested_at)
            SELECT substr(md5(:split || i), 1, 6) || to_hex(i) || :letter, 'frame', :split,
                   's3://yt8m/raw/' || :split || {shard} || '.tfrecord',
                   :root || '/' || :split || '/' || :split || {shard} || '.parquet',
                   CASE WHEN i % :every = 0 THEN CAST(:tonight AS timestamptz) ELSE CAST(:before AS timestamptz) END
            FROM generate_series(0, :n - 1) i""",
                params,
            )
        )
        statements.append(
            (
                """
            INSERT INTO ingested_shards (source_uri, dest_uri, output_uri, level, split, size_bytes, fingerprint,
                                         checksum, rows, status, started_at, finished_at)
            SELECT 's3://yt8m/raw/' || :split || lpad(s::text, 4, '0') || '.tfrecord', 's3://yt8m/parquet',
                   :root || '/' || :split || '/' || :split || lpad(s::text, 4, '0') || '.parquet', 'frame', :split,
                   400000000, 'etag=' || md5(s::text), 'crc32c:00000000', :n / :shards, 'succeeded', now(), now()
            FROM generate_series(0, :shards - 1) s""",
                params,
            )
        )
    statements.append(
        (
            "INSERT INTO labels (label_id, name) SELECT g, 'label ' || g FROM generate_series(0, :classes - 1) g",
            {"classes": NUM_CLASSES},
        )
    )
    statements.append(
        (
            """
        INSERT INTO video_labels (video_id, label_id)
        SELECT DISTINCT v.video_id, floor(:classes * power(random(), 3))::int
        FROM videos v, generate_series(1, 3) WHERE v.split <> 'test'""",
            {"classes": NUM_CLASSES},
        )
    )
    return statements


_CATALOGUE_INDEXES = [
    ("ALTER TABLE videos DROP CONSTRAINT videos_pkey", "ALTER TABLE videos ADD PRIMARY KEY (video_id, level)"),
    ("DROP INDEX ix_videos_ingested_at", "CREATE INDEX ix_videos_ingested_at ON videos (ingested_at)"),
    ("DROP INDEX ix_videos_source_uri", "CREATE INDEX ix_videos_source_uri ON videos (source_uri)"),
    ("DROP INDEX ix_videos_id_prefix", "CREATE INDEX ix_videos_id_prefix ON videos (video_id varchar_pattern_ops)"),
    (
        "DROP INDEX ix_videos_level_parquet_uri",
        "CREATE INDEX ix_videos_level_parquet_uri ON videos (level, parquet_uri)",
    ),
    (
        "ALTER TABLE video_labels DROP CONSTRAINT video_labels_pkey",
        "ALTER TABLE video_labels ADD PRIMARY KEY (video_id, label_id)",
    ),
]


def _fill_production(conn, size: Size) -> None:
    """Version 1 in production, with 20 rows for every video but tonight's, in its partition's base: filled
    apart, indexed, then attached (so the partition constraint is proven by a CHECK, not a scan)."""
    from storage.database import registry
    from storage.database.partitions import attach_version, base_name, layer_definition

    assert [_register(conn, 1), _register(conn, 2)] == [1, 2]  # a fresh database: its first versions
    registry.make_production(conn, 1, None)
    conn.exec_driver_sql(
        "INSERT INTO inference_runs (run_id, logical_date, model_version, top_k, status, videos_total, videos_done, "
        "rows_written, started_at, finished_at) VALUES (1, %s, 1, 20, 'succeeded', 0, 0, 0, now(), now())",
        (BEFORE,),
    )
    conn.exec_driver_sql("SELECT setval(pg_get_serial_sequence('inference_runs', 'run_id'), 1)")
    table = base_name(1)
    conn.exec_driver_sql(f"CREATE TABLE {table} ({layer_definition(1)})")
    conn.exec_driver_sql(
        f"""
        INSERT INTO {table} (video_id, model_version, rank, label_id, score, run_id)
        SELECT v.video_id, 1, r, floor({NUM_CLASSES} * power(random(), 3))::int, (21 - r) / 21.0 * (0.5 + random() / 2), 1
        FROM videos v, generate_series(1, {K}) r WHERE v.ingested_at <= %s""",
        (BEFORE,),
    )
    attach_version(conn, 1, layer=0)
    conn.exec_driver_sql(
        "UPDATE inference_runs SET videos_total = n, videos_done = n, rows_written = n * 20 "
        "FROM (SELECT COUNT(*) AS n FROM videos WHERE ingested_at <= %s) c WHERE run_id = 1",
        (BEFORE,),
    )


def _register(conn, n: int) -> int:
    """A model version as training registers one (its checkpoint is never read: the stand-in scores)."""
    from storage.database import registry

    return registry.register(
        conn,
        level="frame",
        preset="seed",
        checkpoint_uri=f"s3://yt8m/models/v{n}/final.pt",
        config={},
        data_uri="s3://yt8m/parquet",
        train_split="train",
        epochs=5,
        steps=19000,
    )


def stage_fill(db_url: str, size: Size) -> dict:
    from sqlalchemy import text

    from storage.database import db
    from storage.database.db import engine_for

    db.upgrade(db_url)
    engine = engine_for(db_url)
    started = time.perf_counter()
    with engine.begin() as conn:
        conn.exec_driver_sql("SET maintenance_work_mem = '1GB'")
        for drop, _ in _CATALOGUE_INDEXES:
            conn.exec_driver_sql(drop)
        for statement, params in _fill_sql(size):
            conn.execute(text(statement), params)
        for _, create in _CATALOGUE_INDEXES:
            conn.exec_driver_sql(create)
    catalogue = time.perf_counter() - started
    with engine.begin() as conn:
        conn.exec_driver_sql("SET maintenance_work_mem = '1GB'")
        _fill_production(conn, size)
    production = time.perf_counter() - started - catalogue
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("VACUUM ANALYZE")
        rows = conn.exec_driver_sql("SELECT COUNT(*) FROM predictions").scalar()
        labels = conn.exec_driver_sql("SELECT COUNT(*) FROM video_labels").scalar()
        disk = conn.exec_driver_sql("SELECT pg_database_size(current_database())").scalar()
    return {
        "items": size.total_videos,
        "seconds": catalogue + production,
        "figures": {
            "fill: catalogue, ground truth, manifest (s)": catalogue,
            "fill: production rows (s)": production,
            "videos": size.total_videos,
            "ground-truth rows": labels,
            "production rows": rows,
            "database (GB)": disk / 1e9,
        },
    }


def stage_catalogue(db_url: str, size: Size) -> dict:
    """The pipeline's own per-shard writes for a few train shards, into the catalogue at full size, as ingest
    makes them: the manifest's running row, then in one transaction the output's owner, the ids another shard
    holds, the catalogue rows and the succeeded manifest row."""
    from storage.database import catalog, db, manifest
    from storage.objectstore import ObjectInfo

    per_shard = round(SPLITS["train"] / SHARDS_PER_SPLIT)
    shards = 20
    dest = "s3://yt8m/parquet"
    started = time.perf_counter()
    for s in range(shards):
        name = f"train9{s:03d}"  # new shards, beside those filled
        source = ObjectInfo(f"s3://yt8m/raw/{name}.tfrecord", 400_000_000, f"etag=new{s}")
        out = f"{PARQUET}/train/{name}.parquet"
        ids = [f"new{s:03d}x{i:04d}" for i in range(per_shard)]
        labels = [[(i * 7 + j) % NUM_CLASSES for j in range(3)] for i in range(per_shard)]
        with db.transaction(db_url) as conn:
            manifest.mark_running(conn, source, dest)
        with db.transaction(db_url) as conn:
            assert manifest.output_owner(conn, dest, out) is None
            assert not catalog.ingested_elsewhere(conn, ids, level="frame", source_uri=source.uri)
            fingerprints = [f"{i:032x}" for i in range(per_shard)]
            shard_videos = catalog.ShardVideos(ids, labels, fingerprints)
            catalog.record_videos(
                conn, shard_videos, split="train", level="frame", source_uri=source.uri, parquet_uri=out
            )
            manifest.mark_succeeded(
                conn,
                source,
                dest,
                output_uri=out,
                level="frame",
                split="train",
                rows=per_shard,
                checksum="crc32c:00000000",
            )
    seconds = time.perf_counter() - started
    _forget_new_shards(db_url)
    return {
        "items": shards * per_shard,
        "seconds": seconds,
        "figures": {
            "catalogue size (videos)": size.total_videos,
            "per shard (s)": seconds / shards,
            "videos/s": shards * per_shard / seconds,
        },
    }


def _forget_new_shards(db_url: str) -> None:
    from storage.database.db import engine_for

    with engine_for(db_url).begin() as conn:
        conn.exec_driver_sql("DELETE FROM video_labels WHERE video_id LIKE 'new%%'")
        conn.exec_driver_sql("DELETE FROM videos WHERE video_id LIKE 'new%%'")
        conn.exec_driver_sql("DELETE FROM ingested_shards WHERE source_uri LIKE 's3://yt8m/raw/train9%%'")


# --- pending selection, the full rescore -------------------------------------------------------------------


def stage_pending(db_url: str, size: Size) -> dict:
    from storage.database import db, pending
    from tasks.inference import cut_parts

    with db.transaction(db_url) as conn:
        tonight, night = _timed(pending.pending_files, conn, 1, NIGHT, "frame")
        everything, rescore = _timed(pending.pending_files, conn, 2, NIGHT, "frame")
    parts, cut = _timed(cut_parts, everything)
    new = sum(n for _, n in tonight)
    assert sum(n for _, n in everything) == size.total_videos
    return {
        "items": size.total_videos,
        "seconds": night + rescore,
        "figures": {
            "a night's pending, production model (s)": night,
            "videos new tonight": new,
            "a full rescore's pending, new model (s)": rescore,
            "cut into parts (s)": cut,
            "parts": len(parts),
        },
    }


def _stand_in_scores(seed: int = 0, batch: int = 1024, segments: int = 0):
    """score_batches for tag_part: a fixed random score matrix instead of a model. With `segments` (M), each
    batch also gets its videos' best M segments, chosen by model.segments.top_segments (the night's own
    selection, run on every batch) from a fixed random SEGMENTS_PER_VIDEO x 1,000 segment scores a video."""
    import numpy as np

    rng = np.random.default_rng(seed)
    matrix = rng.random((batch, NUM_CLASSES), dtype=np.float32)
    if segments:
        import torch

        from model.segments import rated_classes, top_segments

        rated = torch.from_numpy(rng.random((batch, SEGMENTS_PER_VIDEO, len(rated_classes(NUM_CLASSES))), np.float32))
        counts = torch.full((batch,), SEGMENTS_PER_VIDEO)

    def score_batches(by_file: dict, num_classes: int):
        for uri in sorted(by_file):
            ids = sorted(by_file[uri])
            for start in range(0, len(ids), batch):
                these = ids[start : start + batch]
                if not segments:
                    yield these, matrix[: len(these)]
                else:
                    top = top_segments(rated[: len(these)], counts[: len(these)], NUM_CLASSES, segments)
                    yield these, matrix[: len(these)], top

    return score_batches


def stage_segments(db_url: str, work: str, size: Size, per_video: int) -> dict:
    """Tonight's videos (one in 100) scored by the production model at 5-second resolution: every video
    SEGMENTS_PER_VIDEO segments (a 300-frame video) x the 1,000 rated classes, its best `per_video` kept,
    written by the parts into segment_predictions beside its 20 labels and published with them, and the
    night's segments.csv. The baseline, first, in the same run: the same night without segments (its rows
    then removed, so that the videos are pending again). Stand-in scores (as the rescore's), in batches of
    256 videos both times."""
    from storage.database import label_counts, partitions
    from storage.database.db import engine_for
    from storage.database.schema import predictions, segment_predictions
    from tasks.inference import finish_night, plan_night, tag_part

    figures: dict = {}
    for label, m, day in (("without segments", 0, 60), (f"with {per_video} segments a video", per_video, 61)):
        exports = str(Path(work) / f"segments-{size.percent:g}-{m}")
        plan = plan_night(
            db_url, NIGHT + timedelta(days=day), top_k=K, model_version=1, exports_uri=exports, segments=m
        )
        figures[f"{label}: peak RSS after plan_night (MB)"] = _peak_rss_mb()
        score_batches = _stand_in_scores(batch=256, segments=m)
        started = time.perf_counter()
        for part in plan.parts:
            tag_part(db_url, plan, part, score_batches=score_batches)
        parts = time.perf_counter() - started
        figures[f"{label}: peak RSS after the parts (MB)"] = _peak_rss_mb()
        report, finishing = _timed(finish_night, db_url, plan)
        figures[f"{label}: peak RSS after finish_night (MB)"] = _peak_rss_mb()
        videos = report.videos
        figures[f"{label}: parts (s)"] = parts
        figures[f"{label}: finish_night (s)"] = finishing
        figures[f"{label}: videos/s, finish included"] = videos / (parts + finishing)
        if m:
            with engine_for(db_url).connect() as conn:
                rows = conn.exec_driver_sql("SELECT COUNT(*) FROM segment_predictions").scalar()
                table = conn.exec_driver_sql(
                    "SELECT pg_total_relation_size(%s)", (partitions.partition_name(1, partitions.SEGMENTS),)
                ).scalar()
            assert rows == videos * m, (rows, videos, m)
            figures.update(
                {
                    "segments scored": videos * SEGMENTS_PER_VIDEO,
                    "segments scored/s (parts)": videos * SEGMENTS_PER_VIDEO / parts,
                    "segment rows written": rows,
                    "segment rows/s, finish included": rows / (parts + finishing),
                    "segment_predictions size per night, indexes included (MB)": table / 1e6,
                    "bytes a segment row": table / rows,
                    "a full rescore's segment rows, projected (GB)": table / rows * size.total_videos * m / 1e9,
                    "segments.csv (MB)": Path(exports, "segments.csv").stat().st_size / 1e6,
                }
            )
        with engine_for(db_url).begin() as conn:  # the night's rows go: the next night scores its videos again
            night = (predictions.c.model_version == 1) & (predictions.c.run_id == plan.run_id)
            label_counts.take_off(conn, night)
            conn.execute(predictions.delete().where(night))
            conn.execute(segment_predictions.delete().where(segment_predictions.c.run_id == plan.run_id))
        shutil.rmtree(exports)
    return {
        "items": videos * SEGMENTS_PER_VIDEO,
        "seconds": figures[f"with {per_video} segments a video: parts (s)"]
        + figures[f"with {per_video} segments a video: finish_night (s)"],
        "figures": figures,
    }


_BULK_WAYS = [
    ("base", "into the base, 1st"),
    ("layer", "layer, 1st"),
    ("base", "into the base, 2nd"),
    ("layer", "layer, 2nd"),
    ("load", "load"),
]
_WEEK = 7  # the default VTAG_NIGHT_LAYERS: the most layers a lookup meets


def _lookups_ms(db_url: str, ids: list[str]) -> dict[str, float]:
    """A video's rows of the production model, one query each after a warm-up: median and p95 in ms."""
    import numpy as np

    from storage.database.db import engine_for

    times = []
    with engine_for(db_url).connect() as conn:
        for i, video in enumerate(ids[:100] + ids):
            started = time.perf_counter()
            conn.exec_driver_sql(
                "SELECT rank, label_id, score FROM predictions WHERE model_version = 1 AND video_id = %s ORDER BY rank",
                (video,),
            ).all()
            if i >= 100:
                times.append((time.perf_counter() - started) * 1000)
    return {"median ms": float(np.median(times)), "p95 ms": float(np.percentile(times, 95))}


def _bulk_night(db_url: str, mode: str, day: int, ids: list[str], labels, scores) -> dict:
    """One night of `ids` written by the bulk path into its part's table, then published `mode`'s way."""
    from storage.database import partitions, prediction_writes, runs
    from storage.database.db import engine_for

    with engine_for(db_url).begin() as conn:
        version = 1 if mode != "load" else _register(conn, 3)
        run = runs.start_run(conn, NIGHT + timedelta(days=day), version, K, None)
        part = {"part": 0, "first_uri": "", "last_uri": "~", "files": 0, "videos": len(ids)}
        runs.record_parts(conn, run, [part])
        attempt = runs.start_part(conn, run, 0)["attempt"]
        target = prediction_writes.create_part_table(conn, version, run, 0)
    started = time.perf_counter()
    writer = prediction_writes.ChunkWriter(
        engine_for(db_url), prediction_writes.PartTable(run, version, 0, target, attempt)
    )
    for start in range(0, len(ids), 2000):
        chunk = ids[start : start + 2000]
        writer.submit(chunk, labels[: len(chunk)], scores[: len(chunk)])
    rows = writer.close()
    seconds = time.perf_counter() - started
    with engine_for(db_url).begin() as conn:
        runs.finish_part(conn, run, 0, rows_per_video=K)
        if mode == "base":
            columns = ", ".join(prediction_writes.COLUMNS)
            _, publishing = _timed(
                conn.exec_driver_sql,
                f"INSERT INTO {partitions.base_name(1)} ({columns}) SELECT {columns} FROM {target} "
                "ORDER BY video_id, rank",
            )
            conn.exec_driver_sql(f"DROP TABLE {target}")
        else:
            published, publishing = _timed(
                prediction_writes.publish, conn, run, version, "frame", [0], K, replace_any=False
            )
            assert published.rows == rows, (published, rows)
        runs.finish_run(conn, run)
    if mode != "base":
        _, vacuum = _timed(partitions.vacuum_analyze, db_url, published.filled)  # as finish_night does
        publishing += vacuum
    return {"run": run, "version": version, "rows": rows, "copy": seconds, "publish": publishing}


def _remove_nights(db_url: str, runs: list[int]) -> tuple[int, float]:
    """Delete the production model's rows of these runs again: (rows, seconds)."""
    from storage.database import label_counts
    from storage.database.db import engine_for
    from storage.database.schema import predictions

    with engine_for(db_url).begin() as conn:
        nights = (predictions.c.model_version == 1) & predictions.c.run_id.in_(runs)
        label_counts.take_off(conn, nights)
        deleted, seconds = _timed(conn.execute, predictions.delete().where(nights))
    return deleted.rowcount, seconds


def _merge(db_url: str) -> tuple[int, float, float]:
    """The production model's layers merged into its base, as merge_night_layers does: (rows, s, VACUUM s)."""
    from storage.database import partitions
    from storage.database.db import engine_for

    with engine_for(db_url).begin() as conn:
        merged, merging = _timed(partitions.merge_layers, conn, 1)
    _, vacuum = _timed(partitions.vacuum_analyze, db_url, partitions.base_name(1))
    return merged, merging, vacuum


def stage_bulk_write(db_url: str, size: Size, limit: int | None) -> dict:
    """The bulk path alone (storage.database.prediction_writes.ChunkWriter: COPY on two connections, chunks of
    2,000 videos x 20 rows, a transaction each, into a part's table), then published, for tonight's videos
    (or the first `limit` of the catalogue), three ways:
    - layer: a normal night of the production model (121 M rows at 100%), published by
      prediction_writes.publish as a layer of its own: a probe per video, one sorted INSERT ... SELECT into
      the night's table, its indexes built, attached, vacuumed (the pipeline's way); then single-video
      lookups with the layer in place, the layer merged into the base (partitions.merge_layers and the
      base's VACUUM, off the night's path), lookups again;
    - into the base: the same rows in one sorted INSERT ... SELECT into the version's base, through its
      indexes (the candidate: the pipeline's way before, less its probes);
    - load: a new version's first night: its part table indexed and attached as the version's partition.
    The first two run twice, alternating (base, layer, base, layer), so that neither has the cache to itself.
    Then a week: tonight's videos as 7 nights of a seventh each, 7 layers, looked up, merged at once. Every
    night's rows are deleted again after, the new version retired."""
    import random

    import numpy as np

    from storage.database import partitions
    from storage.database.db import engine_for

    with engine_for(db_url).begin() as conn:
        before = conn.exec_driver_sql("SELECT COUNT(*) FROM predictions").scalar()
        ids = [
            r[0]
            for r in conn.exec_driver_sql(
                "SELECT video_id FROM videos WHERE (%s OR ingested_at > %s) ORDER BY parquet_uri, video_id LIMIT %s",
                (limit is not None, BEFORE, limit or size.total_videos),
            )
        ]
        old = [
            r[0]
            for r in conn.exec_driver_sql(
                "SELECT video_id FROM videos TABLESAMPLE SYSTEM (1) WHERE ingested_at <= %s LIMIT 500", (BEFORE,)
            )
        ]
    rng = np.random.default_rng(0)
    labels = np.floor(NUM_CLASSES * rng.random((2000, K)) ** 3).astype(np.int32)
    scores = np.sort(rng.random((2000, K)), axis=1)[:, ::-1]
    sample = random.Random(0).sample(ids, min(500, len(ids))) + old  # tonight's (in the layers) and older
    figures = {"rows already in the table": before, "videos written each way": len(ids)}
    for day, (mode, label) in enumerate(_BULK_WAYS, start=30):
        night = _bulk_night(db_url, mode, day, ids, labels, scores)
        rows = night["rows"]
        figures.update(
            {
                f"{label}: COPY into the part's table, rows/s": rows / night["copy"],
                f"{label}: publish (s)": night["publish"],
                f"{label}: rows/s, publish included": rows / (night["copy"] + night["publish"]),
            }
        )
        if mode == "layer":
            figures.update({f"{label}: lookups with the layer, {k}": v for k, v in _lookups_ms(db_url, sample).items()})
            merged, merging, vacuum = _merge(db_url)
            assert merged == rows
            figures.update(
                {
                    f"{label}: merged into the base, off the night's path (s)": merging,
                    f"{label}: the base's VACUUM after the merge (s)": vacuum,
                    **{f"{label}: lookups after the merge, {k}": v for k, v in _lookups_ms(db_url, sample).items()},
                }
            )
        if mode == "load":
            with engine_for(db_url).begin() as conn:
                dropped, removing = _timed(partitions.retire, conn, night["version"])
        else:
            dropped, removing = _remove_nights(db_url, [night["run"]])
        assert rows == dropped == len(ids) * K
        figures[f"{label}: remove the rows again (s)"] = removing
    week = [_bulk_night(db_url, "layer", 40 + n, ids[n::_WEEK], labels, scores)["run"] for n in range(_WEEK)]  # noqa: E501
    with engine_for(db_url).connect() as conn:
        assert partitions.layers(conn, 1) == week
    figures.update({f"a week, {_WEEK} layers: lookups, {k}": v for k, v in _lookups_ms(db_url, sample).items()})
    merged, merging, vacuum = _merge(db_url)
    assert merged == len(ids) * K and _remove_nights(db_url, week)[0] == merged
    figures.update(
        {
            f"a week, {_WEEK} layers: merged at once (s)": merging,
            f"a week, {_WEEK} layers: merge, rows/s": merged / merging,
            f"a week, {_WEEK} layers: the base's VACUUM after (s)": vacuum,
        }
    )
    return {
        "items": len(ids) * K,
        "seconds": len(ids) * K / figures["layer, 2nd: rows/s, publish included"],
        "figures": {"rows written each way": len(ids) * K, **figures},
    }


def stage_rescore(db_url: str, work: str, size: Size, max_parts: int | None) -> dict:
    """Model version 2 scores every video: plan_night, each part in turn (as run_inference does, in one
    process, so the peak RSS is the largest part's), finish_night. Scores from the stand-in. With
    `max_parts`, only the first parts run (the night then stays failed, its other parts unscored)."""
    from storage.database.db import engine_for
    from tasks.inference import finish_night, plan_night, tag_part

    exports = str(Path(work) / f"exports-{size.percent:g}")
    with engine_for(db_url).connect() as conn:
        before = conn.exec_driver_sql("SELECT COUNT(*) FROM predictions").scalar()
    plan, planning = _timed(plan_night, db_url, NIGHT, top_k=K, model_version=2, exports_uri=exports)
    started, score_batches, rss = time.perf_counter(), _stand_in_scores(), []
    rows = 0
    run_parts = plan.parts[:max_parts] if max_parts else plan.parts
    for part in run_parts:
        rows += tag_part(db_url, plan, part, score_batches=score_batches).rows_written
        rss.append(_peak_rss_mb())
    parts = time.perf_counter() - started
    figures = {
        "rows already in the table": before,
        "plan_night (s)": planning,
        "parts planned": len(plan.parts),
        "parts run": len(run_parts),
        "parts: score stand-in, top k, COPY, fragments (s)": parts,
        "rows/s": rows / parts,
        "peak RSS after the first part (MB)": rss[0],
        "peak RSS after the last part (MB)": rss[-1],
        "run_id": plan.run_id,
    }
    if len(run_parts) == len(plan.parts):
        report, finishing = _timed(finish_night, db_url, plan)
        assert report.videos == size.total_videos and report.rows_written == rows == size.total_videos * K
        figures.update(
            {
                "finish_night: join exports, publish the rows (s)": finishing,
                "exports (GB)": sum(Path(u).stat().st_size for u in report.exports) / 1e9,
                "peak RSS after finish_night (MB)": _peak_rss_mb(),
            }
        )
        parts += finishing
    shutil.rmtree(exports)
    return {"items": rows, "seconds": planning + parts, "figures": figures}


# --- the queries users run ---------------------------------------------------------------------------------


def _query_params(conn, run_id: int) -> dict[str, list[dict]]:
    import random

    rng = random.Random(0)
    sample = [
        r[0]
        for r in conn.exec_driver_sql(
            "SELECT video_id FROM videos TABLESAMPLE SYSTEM (1) REPEATABLE (7) LIMIT 2000"
        ).all()
    ]
    videos = rng.sample(sample, min(40, len(sample)))
    labels = [0, 1, 5, 50, 500, 3000]
    return {
        "video_top_labels": [{"video_id": v, "k": 20} for v in videos],
        "label_top_videos": [{"label_id": label, "limit": 100} for label in labels for _ in range(5)],
        "run_label_counts": [{"run_id": run_id, "k": k, "limit": 100} for k in (1, 5, 20) for _ in range(3)],
        "tagged_videos": [{"limit": 12}] * 10,
        "runs": [{"limit": 10}] * 10,
        "precision_at_k": [{"model_version": 2, "k": 5}] * 2,  # the rescore's, counted as it wrote
        "top_label_changes": [{"old_version": 1, "new_version": 2}] * 2,
    }


HEAVY_QUERIES = ("precision_at_k", "top_label_changes")  # whole-version reports, not lookups


def stage_queries(db_url: str, size: Size, run_id: int) -> dict:
    from sqlalchemy import text

    from storage.database.db import engine_for
    from tasks import queries

    figures = {}
    with engine_for(db_url).connect() as conn:
        conn.exec_driver_sql("ANALYZE")
        for name, runs in _query_params(conn, run_id).items():
            sql = text(queries.available()[name].read_text())
            if name not in HEAVY_QUERIES:  # the heavy ones scan more than any cache holds: no warm-up run
                conn.execute(sql, runs[0]).fetchall()
            times, result_rows = [], 0
            for params in runs:
                started = time.perf_counter()
                result_rows = len(conn.execute(sql, params).fetchall())
                times.append(time.perf_counter() - started)
            plan = [r[0] for r in conn.execute(text("EXPLAIN " + queries.available()[name].read_text()), runs[0])]
            times.sort()
            figures[name] = {
                "runs": len(times),
                "median_ms": statistics.median(times) * 1000,
                "p95_ms": times[min(len(times) - 1, math.ceil(0.95 * len(times)) - 1)] * 1000,
                "rows": result_rows,
                "plan": _plan_summary(plan),
            }
            if name in HEAVY_QUERIES:  # the server's own part, apart from the client receiving every row
                analyzed = conn.execute(text("EXPLAIN (ANALYZE, TIMING OFF) " + sql.text), runs[0]).scalars().all()
                figures[name]["server_ms"] = float(analyzed[-1].split(":")[1].split()[0])
    return {
        "items": size.total_videos * K * 2,
        "seconds": sum(f["median_ms"] for f in figures.values()) / 1000,
        "figures": figures,
    }


def stage_pages(db_url: str, size: Size, run_id: int) -> dict:
    """Every Video tags page as a browser gets it (airflow_glue/ui/app.py: route, queries, formatting,
    template; HTTP in process, at the paths under the UI's /video-tags) against the full tables. Airflow's login is the one thing left out: its
    token check is replaced by a fixed viewer, as it costs the same on every page."""
    os.environ["AIRFLOW_CONN_YT8M_DB"] = json.dumps({"conn_type": "generic", "extra": {"sqlalchemy_url": db_url}})
    os.environ["AIRFLOW_CONN_YT8M_S3"] = json.dumps({"conn_type": "generic"})  # local exports: no S3 lookup
    os.environ["AIRFLOW_VAR_YT8M_EXPORTS_URI"] = "/nonexistent"  # found in the environment: no metadata DB asked
    from airflow.api_fastapi.app import init_auth_manager
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser
    from airflow.api_fastapi.core_api.security import get_user
    from fastapi.testclient import TestClient

    from airflow_glue.ui.app import app
    from storage.database.db import engine_for

    init_auth_manager()  # the pages ask it whether a viewer may read DAGs, as in Airflow's API server
    app.dependency_overrides[get_user] = lambda: SimpleAuthManagerUser(username="bench", role="viewer")
    client = TestClient(app)
    with engine_for(db_url).connect() as conn:
        conn.exec_driver_sql("ANALYZE")
        videos = [
            r[0]
            for r in conn.exec_driver_sql(
                "SELECT video_id FROM videos TABLESAMPLE SYSTEM (1) REPEATABLE (11) WHERE split <> 'test' LIMIT 5"
            )
        ]
        word = conn.exec_driver_sql("SELECT split_part(name, ' ', 1) FROM labels WHERE label_id = 5").scalar()
    pages = {
        "home": ["/"],
        "models": ["/models"],
        "model (production, candidate)": ["/models/1", "/models/2"],
        "nights": ["/nights"],
        "night (the 25-part rescore, the production night)": [f"/nights/{run_id}", "/nights/1"],
        "tags search (a word of a label's name)": [f"/tags?q={word[:4]}"],
        "suggestions while typing": [f"/tags/suggest?q={word[:n]}" for n in (1, 2, 3)],
        "video (5 videos)": [f"/tags/videos/{v}" for v in videos],
        "label (popular to rare)": [f"/tags/labels/{label}" for label in (0, 5, 50, 500, 3000)],
        "video labels CSV": [f"/tags/videos/{v}/labels.csv" for v in videos[:2]],
        "label videos CSV": [f"/tags/labels/{label}/videos.csv" for label in (0, 3000)],
    }
    figures = {}
    for name, paths in pages.items():
        times = []
        for path in paths:
            got = client.get(path)  # warm: a page is opened again and again
            assert got.status_code == 200, (path, got.status_code, got.text[:500])
            for _ in range(max(3, 20 // len(paths))):
                started = time.perf_counter()
                got = client.get(path)
                times.append(time.perf_counter() - started)
        times.sort()
        figures[name] = {
            "runs": len(times),
            "median_ms": statistics.median(times) * 1000,
            "p95_ms": times[min(len(times) - 1, math.ceil(0.95 * len(times)) - 1)] * 1000,
            "bytes": len(got.content),
            "plan": "an HTTP GET of the page (airflow_glue/ui/app.py)",
        }
    return {
        "items": size.total_videos,
        "seconds": sum(f["median_ms"] for f in figures.values()) / 1000,
        "figures": figures,
    }


def _plan_summary(lines: list[str]) -> str:
    """The plan's nodes, one word each, top down: enough to see index or sequential scans."""
    nodes = []
    for line in lines:
        node = line.strip().removeprefix("->").strip()
        if node and not node.startswith(
            (
                "Filter",
                "Index Cond",
                "Sort Key",
                "Group Key",
                "Hash Cond",
                "Join Filter",
                "Recheck",
                "Merge Cond",
                "Heap Blocks",
                "Workers",
                "Output",
                "Rows Removed",
                "InitPlan",
                "SubPlan",
                "Subplans Removed",
                "Presorted Key",
            )
        ):
            nodes.append(node.split("  (")[0].split(" (cost")[0])
    return " > ".join(nodes[:8]) + (" ..." if len(nodes) > 8 else "")


# --- a training epoch's plan --------------------------------------------------------------------------------


def stage_training_plan(size: Size) -> dict:
    import pickle
    import tracemalloc

    from model.data import EpochSpec, ParquetBatches, RowGroup, plan_nbytes

    files, videos = size.shards("train"), size.videos("train")
    groups = [
        RowGroup(f"{PARQUET}/train/train{i:04d}.parquet", g, videos // files // 2 + (g < (videos // files) % 2))
        for i in range(files)
        for g in range(2)
    ]
    tracemalloc.start()
    dataset, seconds = _timed(ParquetBatches, groups, "frame", NUM_CLASSES, EpochSpec(1024, workers=4))
    _, traced = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    shipped = len(pickle.dumps(dataset))  # what each DataLoader worker receives (spawn) or shares (fork)
    return {
        "items": sum(g.rows for g in groups),
        "seconds": seconds,
        "figures": {
            "videos": sum(g.rows for g in groups),
            "batches": len(dataset),
            "plan arrays (MB)": plan_nbytes(dataset.plans) / 1e6,
            "traced peak while planning (MB)": traced / 1e6,
            "dataset pickled for a worker (MB)": shipped / 1e6,
        },
    }


# --- driver ------------------------------------------------------------------------------------------------


def _scratch(admin_url: str, name: str) -> str:
    from sqlalchemy import create_engine

    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    admin.dispose()
    return admin_url.rsplit("/", 1)[0] + f"/{name}"


def _drop(admin_url: str, name: str) -> None:
    from sqlalchemy import create_engine

    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()


def _exponent(results: list[dict]) -> list[float | None]:
    out = [None]
    for a, b in zip(results, results[1:]):
        if a and b and a["seconds"] > 0 and b["seconds"] > 0 and b["items"] > a["items"]:
            out.append(math.log(b["seconds"] / a["seconds"]) / math.log(b["items"] / a["items"]))
        else:
            out.append(None)
    return out


def _print_stage(stage: str, sizes: list[Size], results: list[dict]) -> None:
    print(f"\n## {stage}")
    exponents = _exponent(results)
    for size, result, e in zip(sizes, results, exponents):
        if result is None:
            print(f"  {size.percent:g}%: not run")
            continue
        rate = result["items"] / result["seconds"] if result["seconds"] else float("inf")
        print(
            f"  {size.percent:g}%: {result['seconds']:.2f} s, {result['items']:,} items, {rate:,.0f} items/s, "
            f"peak RSS {result['rss_mb']:.0f} MB" + ("" if e is None else f", growth n^{e:.2f}")
        )
        for key, value in result["figures"].items():
            if isinstance(value, dict):
                size_of = f"{value['rows']:,} rows" if "rows" in value else f"{value['bytes']:,} bytes"
                if "server_ms" in value:
                    size_of += f" ({value['server_ms']:.1f} ms of it executing in the server)"
                print(
                    f"    {key}: median {value['median_ms']:.1f} ms, p95 {value['p95_ms']:.1f} ms over {value['runs']} "
                    f"runs, {size_of}; plan: {value['plan']}"
                )
            else:
                print(f"    {key}: {value:,.3f}" if isinstance(value, float) else f"    {key}: {value:,}")


@dataclass
class Bench:
    """What the stages of one size share: its scratch database, work folder and options, and the run the
    rescore made (the queries and pages read it)."""

    db_url: str
    work: str
    size: Size
    args: argparse.Namespace
    run_id: int | None = None


@dataclass(frozen=True)
class Stage:
    run: Callable[..., dict]  # in a fresh process: its figures
    args: Callable[[Bench], tuple]
    filled: bool = True  # needs the filled catalogue and production rows
    after_rescore: bool = False  # reads the rescore's night


def _rescore_args(b: Bench) -> tuple:
    return b.db_url, b.work, b.size, b.args.rescore_parts if b.size.percent >= 100 else None


STAGES = {
    "shards": Stage(stage_shards, lambda b: (b.db_url, b.work, b.size), filled=False),
    "catalogue": Stage(stage_catalogue, lambda b: (b.db_url, b.size)),
    "pending": Stage(stage_pending, lambda b: (b.db_url, b.size)),
    "bulk": Stage(stage_bulk_write, lambda b: (b.db_url, b.size, b.args.bulk_videos)),
    "rescore": Stage(stage_rescore, _rescore_args),
    "queries": Stage(stage_queries, lambda b: (b.db_url, b.size, b.run_id), after_rescore=True),
    "pages": Stage(stage_pages, lambda b: (b.db_url, b.size, b.run_id), after_rescore=True),
    "segments": Stage(stage_segments, lambda b: (b.db_url, b.work, b.size, b.args.segments)),
    "plan": Stage(stage_training_plan, lambda b: (b.size,), filled=False),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1,10", help="percentages of YouTube-8M, comma-separated (default 1,10)")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of {', '.join(STAGES)}")
    parser.add_argument("--pg", default="postgresql+psycopg2://postgres@127.0.0.1:5432/postgres", help="an admin URL")
    parser.add_argument("--work", default=None, help="folder for shards and exports (default: a temporary one)")
    parser.add_argument("--json", default=None, help="also write every figure to this file")
    parser.add_argument(
        "--rescore-parts", type=int, default=None, help="at 100%%, run only the first N parts of the full rescore"
    )
    parser.add_argument(
        "--segments", type=int, default=5, help="the segments stage keeps each video's best N segments (default 5)"
    )
    parser.add_argument(
        "--bulk-videos", type=int, default=None, help="the bulk stage writes this many videos x 20 rows (default: all)"
    )
    return parser


def _run_size(bench: Bench, stages: list[str]) -> dict[str, dict]:
    """Every chosen stage at one size, in the table's order, in a scratch database of its own; the fill
    first if a stage needs it, the rescore if a stage reads its night."""
    chosen = [s for s in STAGES if s in stages or (s == "rescore" and any(STAGES[t].after_rescore for t in stages))]
    results = {}
    if any(STAGES[s].filled for s in chosen):
        results["fill"] = _in_child(stage_fill, bench.db_url, bench.size)
    for name in chosen:
        stage = STAGES[name]
        results[name] = _in_child(stage.run, *stage.args(bench))
        if name == "rescore":
            bench.run_id = results[name]["figures"].pop("run_id")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    sizes = [Size(float(p)) for p in args.sizes.split(",")]
    stages = args.stages.split(",")
    unknown = set(stages) - set(STAGES)
    if unknown:
        parser.error(f"unknown stages: {', '.join(sorted(unknown))}")
    work = Path(args.work or tempfile.mkdtemp(prefix="vtag-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    print(
        f"benchmarks.scale: sizes {', '.join(f'{s.percent:g}%' for s in sizes)} of YouTube-8M "
        f"({', '.join(f'{s.total_shards:,} shards / {s.total_videos:,} videos' for s in sizes)}); "
        f"{os.cpu_count()} CPUs; work in {work}"
    )
    earlier = _earlier(args.json, sizes)
    measured: dict[float, dict] = {}
    try:
        for size in sizes:
            name = f"vtag_scale_{uuid.uuid4().hex[:8]}"
            try:
                measured[size.percent] = _run_size(Bench(_scratch(args.pg, name), str(work), size, args), stages)
            finally:
                _drop(args.pg, name)
            print(f"  {size.percent:g}% done", flush=True)
            if args.json:  # after each size, so that a later failure loses nothing measured
                _save(args.json, earlier, measured)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:  # every size measured so far, this run's and earlier runs'
        measured = _earlier(args.json, [])
    shown = [Size(p) for p in sorted(measured)]
    for stage in dict.fromkeys(k for by_stage in measured.values() for k in by_stage):
        _print_stage(stage, shown, [measured[s.percent].get(stage) for s in shown])
    return 0


def _earlier(path: str | None, replaced: list[Size]) -> dict[float, dict]:
    """Figures by size from an earlier run's --json file, less the sizes this run measures again."""
    if not path or not Path(path).is_file():
        return {}
    saved = {float(p): by_stage for p, by_stage in json.loads(Path(path).read_text()).items()}
    return {p: r for p, r in saved.items() if p not in {s.percent for s in replaced}}


def _save(path: str, earlier: dict[float, dict], new: dict[float, dict]) -> None:
    Path(path).write_text(json.dumps({str(p): r for p, r in sorted({**earlier, **new}.items())}, indent=1, default=str))


if __name__ == "__main__":
    sys.exit(main())
