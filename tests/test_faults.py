"""Faults injected into real processes and servers; each test asserts nothing is lost or duplicated.

A worker SIGKILLed mid-write, the S3 endpoint gone for seconds, PostgreSQL restarted under the nightly
write, two runs of one night at once. Every test says (`report`) what it injected and what it checked.
"""

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sqlalchemy import create_engine, text

from storage.database import manifest, partitions, prediction_writes
from storage.database.db import engine_for
from storage.objectstore import S3Config
from tasks.ingest import ingest
from tasks.synth import SynthConfig, synth
from tests.support.db import in_transaction, migrated
from tests.support.env import BIN
from tests.support.faults import FlakyProxy, PrivateCluster, kill_part_worker_after, start_part_worker
from tests.support.shards import record_offsets
from tests.support.worlds import NIGHT, VIDEOS, build_world, count, part_tables, row, rows, stored_rows


def _source_videos(raw: Path) -> dict[str, int]:
    """Videos in each source shard, by shard name (one record per video)."""
    return {p.name: len(record_offsets(p)) for p in sorted(raw.glob("*.tfrecord"))}


def _catalogue(db_url: str) -> tuple[int, int, dict[str, int]]:
    """(rows, distinct video ids, rows by Parquet file name) of the videos table."""
    with engine_for(db_url).connect() as conn:
        total, distinct = conn.execute(text("SELECT COUNT(*), COUNT(DISTINCT video_id) FROM videos")).one()
        by_file = dict(conn.execute(text("SELECT parquet_uri, COUNT(*) FROM videos GROUP BY parquet_uri")).all())
    return total, distinct, {uri.rsplit("/", 1)[-1]: n for uri, n in by_file.items()}


# --- 1. a worker SIGKILLed in the middle of writing a Parquet file, then retried ---------------------


def test_worker_sigkilled_mid_parquet_write_then_retried(tmp_path, report):
    raw, dest, db_url = tmp_path / "raw", tmp_path / "parquet", migrated(f"sqlite:///{tmp_path / 'vtag.db'}")
    # ~45 MB a shard: its Parquet reaches the temporary in pieces over some 100 ms, time enough to catch it.
    synth(str(raw), SynthConfig("frame", "train", shards=3, videos_per_shard=200, seed=11))
    source = _source_videos(raw)
    out_dir = dest / "frame" / "train"
    command = [str(BIN / "vtag"), "ingest", "--src", str(raw), "--dest", str(dest), "--db", db_url]
    env = {**os.environ, "VTAG_HOME": str(tmp_path / "home")}

    worker = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    temporary, deadline = None, time.monotonic() + 60
    while temporary is None and worker.poll() is None and time.monotonic() < deadline:
        try:
            with os.scandir(out_dir) as entries:
                for entry in entries:
                    if entry.name.startswith(".") and entry.name.endswith(".tmp") and entry.stat().st_size > 1 << 20:
                        worker.send_signal(signal.SIGKILL)  # a row group of it on disk, the rest to come
                        temporary = Path(entry.path)
                        break
        except FileNotFoundError:  # the layout's folder is not there yet
            pass
    worker.wait(timeout=30)
    assert temporary is not None, (
        f"never saw a temporary being written (exit {worker.returncode}): {worker.stderr.read()!r}"
    )
    assert worker.returncode == -signal.SIGKILL
    assert temporary.exists(), "the kill came after the publish: no write was interrupted"
    report.injected(
        f"SIGKILL to `vtag ingest` (pid {worker.pid}) while {temporary.name} held "
        f"{temporary.stat().st_size:,} bytes of a Parquet file being written"
    )

    # Nothing partial is visible: every visible file is a whole shard, read back completely, and in step
    # with the manifest and the catalogue; the killed shard is neither published nor catalogued.
    visible = sorted(p.name for p in out_dir.iterdir() if not p.name.startswith("."))
    killed_shard = temporary.name[1:].split(".parquet.")[0] + ".tfrecord"
    assert killed_shard.replace(".tfrecord", ".parquet") not in visible
    for name in visible:
        assert pq.read_table(out_dir / name).num_rows == source[name.replace(".parquet", ".tfrecord")]
    rows = {r["source_uri"].rsplit("/", 1)[-1]: r for r in in_transaction(db_url, manifest.rows, str(dest))}
    assert rows[killed_shard]["status"] == "running"  # what a dead worker leaves: the retry redoes it
    assert sorted(n for n, r in rows.items() if r["status"] == "succeeded") == [
        v.replace(".parquet", ".tfrecord") for v in visible
    ]
    total, distinct, by_file = _catalogue(db_url)
    assert by_file == {name: source[name.replace(".parquet", ".tfrecord")] for name in visible} and total == distinct
    report.checked(
        f"after the kill: {len(visible)} visible file(s) {visible}, each complete; the killed shard "
        f"{killed_shard} has no Parquet, no catalogue rows, a 'running' manifest row"
    )

    retry = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)  # what an Airflow retry does
    assert retry.returncode == 0, retry.stderr
    assert f"removed {temporary}" in retry.stderr  # the retry swept the killed write's temporary
    report.injected("reran the same `vtag ingest`, as a retry of the task would")

    assert sorted(os.listdir(out_dir)) == sorted(
        name.replace(".tfrecord", ".parquet") for name in source
    )  # no .tmp left
    for name, videos in source.items():
        table = pq.read_table(out_dir / name.replace(".tfrecord", ".parquet"))
        assert table.num_rows == videos and len(set(table.column("id").to_pylist())) == videos
    rows = in_transaction(db_url, manifest.rows, str(dest))
    assert len(rows) == len(source) and all(r["status"] == "succeeded" for r in rows)
    assert {r["source_uri"].rsplit("/", 1)[-1]: r["rows"] for r in rows} == source
    total, distinct, by_file = _catalogue(db_url)
    assert total == distinct == sum(source.values())
    assert by_file == {name.replace(".tfrecord", ".parquet"): n for name, n in source.items()}
    report.checked(
        f"after the retry: {len(source)} shards converted, {sum(source.values())} rows = source videos, "
        f"manifest {len(rows)} rows all succeeded, catalogue {total} rows / {distinct} distinct ids, "
        f"the stale temporary removed, no .tmp left"
    )


# --- 2. the S3 endpoint gone for a while during ingest ---------------------------------------------


def _parquet_objects(client, bucket: str) -> dict[str, int]:
    """Every object under parquet/, read back whole: {key: rows}."""
    found = {}
    for obj in client.list_objects_v2(Bucket=bucket, Prefix="parquet/").get("Contents", []):
        body = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
        assert len(body) == obj["Size"]
        found[obj["Key"]] = pq.read_table(pa.BufferReader(body)).num_rows
    return found


def test_s3_endpoint_gone_for_seconds_during_ingest(s3, s3_server, tmp_path, report):
    config, bucket = s3
    direct = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")  # behind the proxy's back
    raw, db_url = tmp_path / "raw", migrated(f"sqlite:///{tmp_path / 'vtag.db'}")
    synth(str(raw), SynthConfig("frame", "train", shards=3, videos_per_shard=30, seed=21))  # ~7 MB a shard
    source = _source_videos(raw)
    expected = {f"parquet/frame/train/{n.replace('.tfrecord', '.parquet')}": v for n, v in source.items()}
    dest = f"s3://{bucket}/parquet"

    proxy = FlakyProxy(int(s3_server.rsplit(":", 1)[1]))
    outage, seen_while_down = 3.0, {}
    proxy.cut_on_put(2, outage)
    proxy.while_down = lambda: seen_while_down.update(_parquet_objects(direct, bucket))
    via_proxy = S3Config(
        endpoint_url=proxy.url, access_key_id="testing", secret_access_key="testing", region_name="us-east-1"
    )
    try:
        started = time.monotonic()
        first = ingest(str(raw), dest, db_url, s3=via_proxy)
        finished = time.monotonic()
        assert proxy.cut_time is not None, "the outage never happened"
        report.injected(
            f"S3 endpoint down for {outage:.0f} s from the 2nd Parquet PUT on "
            f"({proxy.cut_time - started:.2f} s into the ingest): {proxy.cut_sockets // 2} connection(s) reset mid-request, "
            "new connections refused (listening socket closed), then the same port listened again"
        )
        assert proxy.restore_time is not None and finished > proxy.restore_time
        assert proxy.accepted_after_restore > 0  # the ingest was still going and came back through the proxy

        # While the endpoint was down, only whole objects were visible (read straight from moto).
        assert all(expected[key] == rows for key, rows in seen_while_down.items())
        assert len(seen_while_down) < len(expected)
        if first.failed:  # the affected shards fail, each with one clear line naming its file
            for uri, error in first.failed.items():
                assert uri in error and "\n" not in error, error
            rows = {r["source_uri"]: r for r in in_transaction(db_url, manifest.rows, dest)}
            assert all(rows[uri]["status"] == "failed" and uri in rows[uri]["error"] for uri in first.failed)
            rerun = ingest(str(raw), dest, db_url, s3=via_proxy)
            assert not rerun.failed and sorted(c["source_uri"] for c in rerun.converted) == sorted(first.failed)
            report.observed(
                f"{len(first.failed)} shard(s) failed with a clear error, e.g. {next(iter(first.failed.values()))!r}; "
                "a rerun converted them"
            )
        else:
            report.observed(
                f"botocore's retries rode the outage out: all {len(first.converted)} shards converted in "
                f"{finished - started:.1f} s, no shard failed"
            )
    finally:
        proxy.close()

    assert _parquet_objects(direct, bucket) == expected  # exactly one whole object per shard
    assert direct.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    rows = in_transaction(db_url, manifest.rows, dest)
    assert len(rows) == len(source) and {r["status"] for r in rows} == {"succeeded"}
    assert sorted(r["rows"] for r in rows) == sorted(source.values())
    total, distinct, by_file = _catalogue(db_url)
    assert total == distinct == sum(source.values()) and by_file == {
        k.rsplit("/", 1)[-1]: v for k, v in expected.items()
    }
    report.checked(
        f"while down: {len(seen_while_down)} object(s) visible, each whole; after: {len(expected)} objects, "
        f"each read back with its shard's {sorted(source.values())} rows, no multipart upload left, "
        f"manifest {len(rows)} rows succeeded, catalogue {total} rows / {distinct} distinct ids"
    )


# --- 3. PostgreSQL restarted during the nightly write -------------------------------------------------


@pytest.fixture
def private_pg():
    cluster = PrivateCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        engine_for.cache_clear()
        cluster.stop_and_delete()


def test_postgresql_restarted_during_the_nightly_write(
    private_pg, raw_shards, tiny_checkpoint, tmp_path, monkeypatch, report
):
    import tasks.inference as inference

    admin = create_engine(private_pg.admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text("CREATE DATABASE vtag"))
    admin.dispose()
    db_url = migrated(private_pg.admin_url.rsplit("/", 1)[0] + "/vtag")
    world = build_world(raw_shards, tmp_path, db_url, checkpoint=tiny_checkpoint)
    k = 4

    real_insert, calls = prediction_writes.insert_bulk, {"n": 0}

    def restart_inside_third_chunk(conn, table, *target):
        written = real_insert(conn, table, *target)  # the chunk's rows are in, its transaction still open
        calls["n"] += 1
        if calls["n"] == 3:
            began = time.monotonic()
            private_pg.restart()
            calls["restart_s"] = time.monotonic() - began
        return written

    monkeypatch.setattr(prediction_writes, "insert_bulk", restart_inside_third_chunk)
    from sqlalchemy.exc import OperationalError

    try:
        first = inference.run_inference(db_url, NIGHT, top_k=k, exports_uri=world["exports"], chunk_videos=8)
        outcome = f"the run finished anyway: {first.videos} videos"
    except OperationalError as exc:  # the database's own error, not something of the test's
        outcome = f"the run failed: {type(exc).__name__}: {str(exc).splitlines()[0]}"
    assert "restart_s" in calls, "the server was not restarted"
    assert "received fast shutdown request" in (private_pg.root / "server.log").read_text()
    report.injected(
        f"`pg_ctl restart -m fast` ({calls['restart_s']:.2f} s) of the test's own PostgreSQL (port "
        f"{private_pg.port}) inside the 3rd chunk's transaction of run_inference (rows COPYed, not "
        "committed), 2 writer connections open"
    )
    report.observed(outcome)

    # Whatever the first try did, each chunk is all or nothing, and the bookkeeping says so.
    status, done, written = row(db_url, "SELECT status, videos_done, rows_written FROM inference_runs")
    stored = stored_rows(db_url)
    assert written == stored == done * k
    assert (
        count(
            db_url,
            "SELECT COUNT(*) FROM (SELECT video_id FROM predictions GROUP BY video_id HAVING COUNT(*) <> :k) x",
            k=k,
        )
        == 0
    )
    assert status == ("succeeded" if outcome.startswith("the run finished") else "failed")
    report.checked(
        f"after the first try: run {status}, {done} videos done, {written} rows counted = {stored} stored, "
        f"every stored video has exactly {k} rows"
    )

    monkeypatch.setattr(prediction_writes, "insert_bulk", real_insert)
    retry = inference.run_inference(
        db_url, NIGHT, top_k=k, exports_uri=world["exports"], chunk_videos=8
    )  # what Airflow's retry does
    report.injected("reran run_inference for the same logical date, as the task's retry would")
    assert retry.videos == VIDEOS
    assert count(db_url, "SELECT COUNT(*) FROM predictions") == VIDEOS * k
    assert (
        count(db_url, "SELECT COUNT(*) FROM (SELECT DISTINCT video_id, model_version, rank FROM predictions) x")
        == VIDEOS * k
    )
    assert (
        count(
            db_url,
            "SELECT COUNT(*) FROM (SELECT video_id FROM predictions GROUP BY video_id "
            "HAVING COUNT(*) = :k AND MIN(rank) = 1 AND MAX(rank) = :k) x",
            k=k,
        )
        == VIDEOS
    )
    assert (
        count(
            db_url,
            "SELECT COUNT(*) FROM videos v WHERE NOT EXISTS "
            "(SELECT 1 FROM predictions p WHERE p.video_id = v.video_id)",
        )
        == 0
    )
    assert row(
        db_url,
        "SELECT COUNT(*), MIN(status), MIN(videos_total), MIN(videos_done), MIN(rows_written), "
        "MIN(COALESCE(error, '')) FROM inference_runs",
    ) == (1, "succeeded", VIDEOS, VIDEOS, VIDEOS * k, "")
    report.checked(
        f"after the retry: {VIDEOS} videos x exactly {k} rows (ranks 1..{k}), no duplicates, none missing; "
        f"one inference_runs row: succeeded, {VIDEOS}/{VIDEOS} videos, {VIDEOS * k} rows, no error"
    )


# --- 4. two runs of the same logical date at once ------------------------------------------------------


def test_two_runs_of_the_same_night_at_once(pg_url, raw_shards, tiny_checkpoint, tmp_path, monkeypatch, caplog, report):
    import model.evaluate
    import tasks.inference as inference

    world = build_world(raw_shards, tmp_path, pg_url, checkpoint=tiny_checkpoint)
    k = 3
    # Each run its own engine, as two worker processes would have: the same database, spelled two ways.
    urls = [pg_url, pg_url.replace("postgresql+psycopg2://", "postgresql://")]
    assert len({id(engine_for(u)) for u in urls}) == 2

    both_loaded = threading.Barrier(2, timeout=60)
    real_load = model.evaluate.load_model

    def load_then_wait_for_the_other(*args, **kwargs):
        loaded = real_load(*args, **kwargs)
        both_loaded.wait()  # both runs start scoring and writing the same night at the same moment
        return loaded

    monkeypatch.setattr(model.evaluate, "load_model", load_then_wait_for_the_other)
    results, errors = {}, {}

    def night(i):
        try:
            results[i] = inference.run_inference(
                urls[i],
                NIGHT,
                top_k=k,
                exports_uri=f"{world['exports']}/{i}",
                airflow_run_id=f"scheduled__try{i}",
                chunk_videos=8,
            )
        except Exception as exc:  # noqa: BLE001 - asserted below
            errors[i] = exc

    caplog.set_level("WARNING", logger="storage.database.run_locks")
    threads = [threading.Thread(target=night, args=(i,)) for i in (0, 1)]
    [t.start() for t in threads]
    [t.join(timeout=120) for t in threads]
    report.injected(
        "two run_inference calls for the same logical date and model, in two threads with separate "
        "engines (connection pools), released together after loading the model"
    )
    try:
        assert not errors, errors
        assert sorted(results) == [0, 1] and {r.videos for r in results.values()} == {VIDEOS}
        assert results[0].run_id == results[1].run_id
        assert count(pg_url, "SELECT COUNT(*) FROM predictions") == VIDEOS * k
        assert (
            count(pg_url, "SELECT COUNT(*) FROM (SELECT DISTINCT video_id, model_version, rank FROM predictions) x")
            == VIDEOS * k
        )
        assert (
            count(
                pg_url,
                "SELECT COUNT(*) FROM (SELECT video_id FROM predictions GROUP BY video_id "
                "HAVING COUNT(*) = :k AND MIN(rank) = 1 AND MAX(rank) = :k) x",
                k=k,
            )
            == VIDEOS
        )
        status = row(
            pg_url,
            "SELECT COUNT(*), MIN(status), MIN(videos_total), MIN(videos_done), MIN(rows_written), "
            "MIN(COALESCE(error, '')) FROM inference_runs",
        )
        assert status == (1, "succeeded", VIDEOS, VIDEOS, VIDEOS * k, "")
        waits = [r.getMessage() for r in caplog.records if "in progress: waiting" in r.getMessage()]
        assert len(waits) == 1, waits  # they did overlap, and the later one waited for the earlier
        report.observed(f"both succeeded; one waited: {waits[0]!r}")
        report.checked(
            f"{VIDEOS} videos x exactly {k} rows, no duplicates, none missing; one inference_runs row: "
            f"succeeded, videos {VIDEOS}/{VIDEOS}, rows_written {VIDEOS * k} = rows stored"
        )
    finally:
        for u in urls:
            engine_for(u).dispose()


def test_a_run_that_lost_its_lock_stops_writing(pg_url, raw_shards, tiny_checkpoint, tmp_path, monkeypatch, report):
    """The session holding the run lock is killed mid-run (pg_terminate_backend: a dropped idle connection,
    a pooler's timeout): the server frees the lock, so another run could take over. The next chunk sees it
    and stops the run instead of writing under that other run; the retry completes the night."""
    import tasks.inference as inference
    from storage.database import prediction_writes, run_locks

    world = build_world(raw_shards, tmp_path, pg_url, checkpoint=tiny_checkpoint)
    k = 3
    real_write, calls = prediction_writes.write_chunk, {"n": 0}

    def terminate_the_lock_before_the_third_chunk(*args, **kwargs):
        calls["n"] += 1
        lock = args[5]  # write_chunk(engine, into, ids, labels, scores, lock, segments)
        if calls["n"] == 3:
            with engine_for(pg_url).connect() as conn:
                conn.exec_driver_sql("SELECT pg_terminate_backend(%s, 10000)", (lock.pid,))  # waits for the exit
        return real_write(*args, **kwargs)

    monkeypatch.setattr(prediction_writes, "write_chunk", terminate_the_lock_before_the_third_chunk)
    with pytest.raises(run_locks.LostRunLock, match="holding this run's lock"):
        inference.run_inference(pg_url, NIGHT, top_k=k, exports_uri=world["exports"], chunk_videos=8)
    report.injected("pg_terminate_backend of the session holding the run's advisory lock, before the 3rd chunk")
    status, done, written = row(pg_url, "SELECT status, videos_done, rows_written FROM inference_runs")
    assert status == "failed" and written == stored_rows(pg_url) == done * k < VIDEOS * k
    report.observed(
        f"the run stopped with LostRunLock after {done} videos; marked failed, {written} rows = rows stored"
    )

    monkeypatch.setattr(prediction_writes, "write_chunk", real_write)
    inference.run_inference(pg_url, NIGHT, top_k=k, exports_uri=world["exports"], chunk_videos=8)
    assert row(pg_url, "SELECT status, videos_done, rows_written FROM inference_runs") == (
        "succeeded",
        VIDEOS,
        VIDEOS * k,
    )
    assert count(pg_url, "SELECT COUNT(*) FROM (SELECT DISTINCT video_id, rank FROM predictions) x") == VIDEOS * k
    report.checked(f"the retry: {VIDEOS} videos x exactly {k} rows, one run row, succeeded")


# --- 6. one part of a night SIGKILLed on its worker, then retried alone ------------------------------


def test_a_part_sigkilled_mid_write_is_retried_alone(pg_url, raw_shards, tiny_checkpoint, tmp_path, report):
    """The night in 3 parts as the DAG runs them; part 1's worker process gets SIGKILL once some of its
    chunks are committed (its export fragments half written). Airflow's retry of that one mapped task
    drops what the dead try wrote and scores the part again; the night ends exact."""
    import csv

    from tasks.inference import finish_night, plan_night, tag_part

    world = build_world(raw_shards, tmp_path, pg_url, checkpoint=tiny_checkpoint)
    k = 3
    plan = plan_night(pg_url, NIGHT, top_k=k, exports_uri=world["exports"], part_videos=12)
    assert len(plan.parts) == 3
    tag_part(pg_url, plan, plan.parts[0])
    worker = start_part_worker(pg_url, plan, plan.parts[1], chunk_videos=4, write_delay_s=0.3)
    kill_part_worker_after(pg_url, worker, plan.run_id, 1, rows=2 * 4 * k)
    killed_rows = count(pg_url, f"SELECT COUNT(*) FROM {plan.part_table(1)}")  # the part writes apart
    report.injected(f"SIGKILL to part 1's worker (pid {worker.pid}) after {killed_rows} of its rows were committed")
    assert worker.returncode == -signal.SIGKILL and 0 < killed_rows < 20 * k
    assert count(pg_url, "SELECT status FROM inference_parts WHERE part = 1") == "running"  # as the dead try left it

    tag_part(pg_url, plan, plan.parts[2])
    tag_part(pg_url, plan, plan.parts[1])  # the retry of that mapped task, alone
    finished = finish_night(pg_url, plan)
    per_video = dict(rows(pg_url, "SELECT video_id, COUNT(*) FROM predictions GROUP BY video_id"))
    assert len(per_video) == VIDEOS and set(per_video.values()) == {k}
    assert row(pg_url, "SELECT status, videos_done, rows_written FROM inference_runs") == (
        "succeeded",
        VIDEOS,
        VIDEOS * k,
    )
    assert [tuple(r) for r in rows(pg_url, "SELECT part, status, attempts FROM inference_parts ORDER BY part")] == [
        (0, "succeeded", 1),
        (1, "succeeded", 2),
        (2, "succeeded", 1),
    ]
    with open(finished.exports[0], newline="") as f:
        exported = [r[0] for r in csv.reader(f)][1:]
    assert sorted(exported) == sorted(per_video)  # each video once: the dead try's fragment was replaced
    partition = partitions.partition_name(world["version"])  # the part tables became the version's partition
    assert part_tables(pg_url) == []
    assert (
        count(pg_url, "SELECT COUNT(*) FROM pg_indexes WHERE tablename = :t", t=partition) == 4
    )  # key, label, run, rank-1
    assert count(pg_url, "SELECT COUNT(*) FROM pg_inherits WHERE inhrelid = to_regclass(:t)", t=partition) == 1
    fragments = sorted(p.name for p in (Path(world["exports"]) / "parts").iterdir())
    assert fragments == [f"part-0000{i}.{kind}" for i in range(3) for kind in ("csv", "pickle-items")], fragments
    report.checked(
        f"{VIDEOS} videos x exactly {k} rows, one succeeded run row; part 1 tried twice, the others once; "
        f"the CSV lists each video once; the dead try's temporaries swept"
    )
