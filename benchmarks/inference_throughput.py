"""Inference videos/s, and prediction rows/s into PostgreSQL: our bulk path against plain ORM inserts.

    python -m benchmarks.inference_throughput [--pg postgresql://postgres@127.0.0.1:5432/postgres]
    python -m benchmarks.inference_throughput --device cuda --batch-size 4096   # on a GPU, its default precision

Inference: forward passes under torch.inference_mode on batches already on the device, 300-frame
videos, for the seed config and the small preset. Database: a scratch database is created in the
given server and dropped afterwards; the bulk path is storage.database.prediction_writes.ChunkWriter, as
inference uses it (COPY on two connections into a part's table, run progress, one transaction a chunk;
publishing the night is apart: benchmarks/scale.py's bulk-write stage measures it); the baseline adds one ORM object per row and flushes it (one
INSERT a row), committing at the end.
Targets (issue 4): bulk >= 10x the ORM path and >= 200,000 rows/s; on one H100 >= 10,000 videos/s.
"""

import argparse
import time
import uuid
from datetime import UTC, datetime

import numpy as np
import torch
from sqlalchemy import Connection, create_engine, insert, text
from sqlalchemy.orm import Session
from sqlalchemy.orm import registry as orm_registry

from benchmarks.common import random_videos, seconds_per_steps
from model.config import load_config
from model.networks import build_model
from model.precision import precision_for
from storage.database import db, prediction_writes, runs
from storage.database.db import engine_for
from storage.database.schema import inference_runs, model_versions, videos
from storage.database.schema import predictions as predictions_table
from storage.formats.yt8m_spec import MAX_FRAMES, TOP_K, dequantize
from tasks.inference import CHUNK_VIDEOS


def inference_rate(preset: str, device: torch.device, batch_size: int, steps: int, precision_name: str = "") -> float:
    precision = precision_for(precision_name, device)
    model = precision.apply(build_model(load_config(preset)).to(device).eval(), device)
    rgb, audio, mask = random_videos(batch_size, device)
    autocast = precision.autocast(device)

    def forward():
        with torch.inference_mode(), autocast:
            scores = torch.sigmoid(model(dequantize(rgb.float()), dequantize(audio.float()), mask).float())
            return torch.topk(scores, 20, dim=1)

    return batch_size * steps / seconds_per_steps(device, forward, 1, steps)


class _Prediction:
    pass


def _scratch_database(admin_url: str) -> tuple[str, object]:
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    name = f"vtag_bench_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    return admin_url.rsplit("/", 1)[0] + f"/{name}", (admin, name)


def _version_and_run(conn: Connection, checkpoint_uri: str, videos_total: int, now: datetime) -> tuple[int, int]:
    """A trained model version and a running inference run over `videos_total` videos: (version, run_id)."""
    version = conn.execute(
        insert(model_versions)
        .values(
            level="frame",
            preset="seed",
            checkpoint_uri=checkpoint_uri,
            config={},
            data_uri="",
            train_split="train",
            epochs=0,
            steps=0,
            status="trained",
            created_at=now,
        )
        .returning(model_versions.c.version)
    ).scalar_one()
    run = conn.execute(
        insert(inference_runs)
        .values(
            logical_date=now,
            model_version=version,
            top_k=TOP_K,
            status="running",
            videos_total=videos_total,
            videos_done=0,
            rows_written=0,
            started_at=now,
        )
        .returning(inference_runs.c.run_id)
    ).scalar_one()
    return version, run


def _seed_rows(url: str, count: int) -> tuple[list[str], int, int]:
    ids = [f"v{i:07d}" for i in range(count)]
    now = datetime.now(UTC)
    with engine_for(url).begin() as conn:
        conn.execute(
            insert(videos),
            [
                {
                    "video_id": v,
                    "split": "test",
                    "level": "frame",
                    "source_uri": "s",
                    "parquet_uri": "p",
                    "ingested_at": now,
                }
                for v in ids
            ],
        )
        version, run = _version_and_run(conn, "bench", count, now)
    return ids, version, run


def bulk_rate(url: str, ids: list[str], version: int, run: int, k: int, chunk: int) -> float:
    rng = np.random.default_rng(0)
    labels = np.argsort(rng.random((len(ids), 64)), axis=1)[:, :k].astype(np.int64)
    scores = np.sort(rng.random((len(ids), k)), axis=1)[:, ::-1]
    with engine_for(url).begin() as conn:
        runs.record_parts(conn, run, [{"part": 0, "first_uri": "", "last_uri": "~", "files": 0, "videos": len(ids)}])
        attempt = runs.start_part(conn, run, 0)["attempt"]
        target = prediction_writes.create_part_table(conn, version, run, 0)  # where a night's part writes
    started = time.perf_counter()
    writer = prediction_writes.ChunkWriter(
        engine_for(url), prediction_writes.PartTable(run, version, 0, target, attempt)
    )
    for start in range(0, len(ids), chunk):
        writer.submit(ids[start : start + chunk], labels[start : start + chunk], scores[start : start + chunk])
    writer.close()
    return len(ids) * k / (time.perf_counter() - started)


def orm_rate(url: str, ids: list[str], version: int, run: int, k: int) -> float:
    mapper = orm_registry()
    mapper.map_imperatively(_Prediction, predictions_table)
    rows = prediction_writes.tuples(
        prediction_writes.prediction_table(
            run, version, ids, np.tile(np.arange(k), (len(ids), 1)), np.ones((len(ids), k))
        )
    )
    started = time.perf_counter()
    with Session(engine_for(url)) as session:
        for video, model_version, rank, label, score, run_id in rows:
            p = _Prediction()
            p.video_id, p.model_version, p.rank, p.label_id, p.score, p.run_id = (
                video,
                model_version,
                rank,
                label,
                score,
                run_id,
            )
            session.add(p)
            session.flush()
        session.commit()
    mapper.dispose()
    return len(rows) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument(
        "--pg", default="postgresql+psycopg2://postgres@127.0.0.1:5432/postgres", help="admin URL of the server"
    )
    parser.add_argument("--videos", type=int, default=20000, help="videos written by the bulk path (x 20 rows)")
    parser.add_argument("--orm-videos", type=int, default=500, help="videos written by the ORM baseline (x 20 rows)")
    args = parser.parse_args()

    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    for preset in ("small", "seed"):
        rate = inference_rate(preset, device, args.batch_size, args.steps)
        print(
            f"inference, {preset} preset, {MAX_FRAMES}-frame videos, batch {args.batch_size} on {where}: {rate:,.1f} videos/s"
        )

    url, (admin, name) = _scratch_database(args.pg)
    try:
        db.upgrade(url)
        ids, version, run = _seed_rows(url, args.videos)
        bulk = bulk_rate(url, ids, version, run, 20, CHUNK_VIDEOS)
        _, version2, run2 = _seed_rows_for_orm(url, ids[: args.orm_videos])
        orm = orm_rate(url, ids[: args.orm_videos], version2, run2, 20)
    finally:
        engine_for(url).dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    print(
        f"PostgreSQL writes, bulk path (COPY on 2 connections, chunks of {CHUNK_VIDEOS} videos x 20, a transaction each): {bulk:,.0f} rows/s"
    )
    print(f"PostgreSQL writes, ORM row by row (add + flush per row):                      {orm:,.0f} rows/s")
    print(f"bulk / ORM: {bulk / orm:.1f}x (target >= 10x); bulk {bulk:,.0f} rows/s (target >= 200,000)")


def _seed_rows_for_orm(url: str, ids: list[str]) -> tuple[list[str], int, int]:
    """Another model version and run for the ORM path, over videos that already exist."""
    now = datetime.now(UTC)
    with engine_for(url).begin() as conn:
        version, run = _version_and_run(conn, "bench-orm", len(ids), now)
    return ids, version, run


if __name__ == "__main__":
    main()
