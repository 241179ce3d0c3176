"""The whole pipeline on a real Airflow: API server, scheduler and DAG processor as separate processes.

Airflow's metadata and our database each in a database of their own on this machine's PostgreSQL,
the object store on a moto S3 server on loopback. `yt8m_ingest` is triggered through the REST API
with a token; its Asset starts `yt8m_train`, which promotes a model; `yt8m_nightly_inference` then runs
for a logical date and its rows are checked in the predictions table. Once with the LocalExecutor and
once with the CeleryExecutor (Redis on 127.0.0.1:6379 as broker, a worker for the default queue and one
for the `gpu` queue), where the scheduler is also restarted in the middle of the training run.
"""

import time
import uuid
from datetime import UTC, datetime

import boto3
import pytest
from sqlalchemy import text

from storage.database.db import engine_for
from tasks.synth import SynthConfig, synth
from tests.support.airflow_stack import AirflowStack
from tests.support.env import BIN, PG_ADMIN_URL, SHARED, free_port

pytestmark = [pytest.mark.postgres, pytest.mark.stack]

TRAIN_VIDEOS, VALIDATE_VIDEOS, TOP_K = 2 * 40, 16, 5  # two loader workers need a batch of 32 each
NUM_LABELS = 12


def _database(admin, prefix: str) -> str:
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    return name


@pytest.fixture
def stack_factory(_pg_server, s3_server, tmp_path, monkeypatch):
    """Builds one configured (not yet started) stack; drops its databases and stops its processes after."""
    made: list[tuple[AirflowStack, list[str]]] = []

    def make(executor: str, extra_env: dict[str, str] | None = None) -> tuple[AirflowStack, str, str]:
        metadata_db, vtag_db = _database(_pg_server, "airflow_meta"), _database(_pg_server, "vtag_e2e")
        base = PG_ADMIN_URL.rsplit("/", 1)[0]
        bucket = f"vtag-e2e-{uuid.uuid4().hex[:8]}"
        boto3.client(
            "s3",
            endpoint_url=s3_server,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        ).create_bucket(Bucket=bucket)
        s3_conn = (
            '{"conn_type": "aws", "login": "testing", "password": "testing", '
            f'"extra": {{"endpoint_url": "{s3_server}", "region_name": "us-east-1"}}}}'
        )
        now = datetime.now(UTC).replace(microsecond=0).isoformat()
        env = {
            # Our connections and variables, the Airflow way (a deployment may keep them in a secrets backend).
            "AIRFLOW_CONN_YT8M_DB": f"{base.replace('postgresql+psycopg2', 'postgresql')}/{vtag_db}",
            "AIRFLOW_CONN_YT8M_S3": s3_conn,
            "AIRFLOW_VAR_YT8M_RAW_URI": f"s3://{bucket}/raw",
            "AIRFLOW_VAR_YT8M_PARQUET_URI": f"s3://{bucket}/parquet",
            "AIRFLOW_VAR_YT8M_MODELS_URI": f"s3://{bucket}/models",
            "AIRFLOW_VAR_YT8M_EXPORTS_URI": f"s3://{bucket}/exports",
            # No schedules: every run here is one the test triggers (a scheduled ingest would race the
            # REST-triggered one for the shards). The nightly DAG starts now: a run's logical date
            # before its DAG's start date would "succeed" without running any task.
            "VTAG_INGEST_CRON": "",
            "VTAG_NIGHTLY_CRON": "",
            "VTAG_NIGHTLY_START": now,
            **(extra_env or {}),
        }
        for key in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "VTAG_DB_URL"):
            monkeypatch.delenv(key, raising=False)  # tasks must find S3 and the database through the connections
        stack = AirflowStack.configure(
            tmp_path / f"airflow-{executor}", free_port(), f"{base}/{metadata_db}", executor, env
        )
        made.append((stack, [metadata_db, vtag_db]))
        return stack, f"{base}/{vtag_db}", bucket

    yield make
    for stack, databases in made:
        left = stack.stop_all()
        for name in databases:
            engine_for.cache_clear()
            with _pg_server.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        assert not left, f"processes of {stack.home} still alive after stop: {left}"


def _prepare(stack: AirflowStack, vtag_url: str, bucket: str, s3_server: str) -> None:
    """What a deployment's init does: both migrations, the gpu pool, the vocabulary; then the raw shards."""
    import subprocess

    stack.cli("db", "migrate")
    stack.cli("pools", "set", "gpu", "1", "GPU tasks")
    for args in (["db", "upgrade"], ["vocabulary", str(SHARED / "yt8m" / "vocabulary.csv")]):
        subprocess.run([str(BIN / "vtag"), *args, "--db", vtag_url], check=True, capture_output=True)
    from storage.objectstore import S3Config

    s3 = S3Config(endpoint_url=s3_server, access_key_id="testing", secret_access_key="testing", region_name="us-east-1")
    synth(
        f"s3://{bucket}/raw",
        SynthConfig("frame", "train", shards=2, videos_per_shard=TRAIN_VIDEOS // 2, num_labels=NUM_LABELS),
        s3,
    )
    synth(
        f"s3://{bucket}/raw",
        SynthConfig("frame", "validate", shards=1, videos_per_shard=VALIDATE_VIDEOS, num_labels=NUM_LABELS),
        s3,
    )


def _check_auth(stack: AirflowStack) -> None:
    """No token: 401. A malformed token, or one signed with another key for the same user: refused."""
    import jwt

    claims = jwt.decode(stack.rest.token(), options={"verify_signature": False})
    forged = jwt.encode(claims, uuid.uuid4().hex * 2, algorithm="HS512")  # right claims, wrong key
    assert stack.rest.api("GET", "/dags", token=None).status_code == 401, "the API answered without a token"
    for token in ("not-a-token", forged):
        status = stack.rest.api("GET", "/dags", token=token).status_code
        assert status in (401, 403), f"the API answered {status} to a forged token"
    assert stack.rest.api("GET", "/dags").status_code == 200


def _trigger(stack: AirflowStack, dag_id: str, conf: dict, logical_date: datetime | None = None) -> str:
    body = {"conf": conf, "logical_date": logical_date.isoformat() if logical_date else None}
    return stack.rest.ok("POST", f"/dags/{dag_id}/dagRuns", body)["dag_run_id"]


def _asset_triggered_train_run(stack: AirflowStack) -> dict:
    runs = stack.rest.ok("GET", "/dags/yt8m_train/dagRuns")["dag_runs"]
    return next((r for r in runs if r["run_type"] == "asset_triggered"), None)


def _run_pipeline(stack: AirflowStack, vtag_url: str, bucket: str, during_training=None) -> dict:
    """Trigger ingest over REST, follow the Asset into training, run a night; return what was checked."""
    stack.wait_healthy()
    _check_auth(stack)
    dags = ("yt8m_ingest", "yt8m_train", "yt8m_nightly_inference")
    stack.wait_for(
        lambda: all(stack.rest.api("GET", f"/dags/{d}").status_code == 200 for d in dags), 240, "the DAGs to be parsed"
    )
    for dag_id in dags:
        stack.rest.ok("PATCH", f"/dags/{dag_id}", {"is_paused": False})

    bad = stack.rest.api("POST", "/dags/yt8m_nightly_inference/dagRuns", {"logical_date": None, "conf": {"top_k": 0}})
    assert bad.status_code == 400 and "top_k" in bad.text, f"an invalid k was accepted: {bad.status_code} {bad.text}"

    ingest_run = _trigger(stack, "yt8m_ingest", {})
    stack.wait_for_run("yt8m_ingest", ingest_run, 300)
    train = stack.wait_for(lambda: _asset_triggered_train_run(stack), 120, "the yt8m_parquet Asset to start yt8m_train")
    events = stack.rest.ok("GET", f"/dags/yt8m_train/dagRuns/{train['dag_run_id']}/upstreamAssetEvents")["asset_events"]
    assert [(e["source_dag_id"], e["source_run_id"]) for e in events] == [("yt8m_ingest", ingest_run)], events
    if during_training:
        during_training(train["dag_run_id"])
    stack.wait_for_run("yt8m_train", train["dag_run_id"], 600)

    night = datetime.now(UTC).replace(microsecond=0)
    night_run = _trigger(stack, "yt8m_nightly_inference", {"top_k": TOP_K}, logical_date=night)
    stack.wait_for_run("yt8m_nightly_inference", night_run, 300)
    tis = stack.rest.ok("GET", f"/dags/yt8m_nightly_inference/dagRuns/{night_run}/taskInstances")["task_instances"]

    with engine_for(vtag_url).connect() as conn:
        per_video = conn.execute(
            text("SELECT video_id, COUNT(*), COUNT(DISTINCT label_id) FROM predictions GROUP BY video_id")
        ).all()
        runs = conn.execute(text("SELECT status, videos_done, rows_written, airflow_run_id FROM inference_runs")).all()
        models = conn.execute(text("SELECT version, status, run_id FROM model_versions")).all()
        shards = conn.execute(text("SELECT COUNT(*) FROM ingested_shards WHERE status = 'succeeded'")).scalar()
    videos = TRAIN_VIDEOS + VALIDATE_VIDEOS
    assert shards == 3
    assert len(per_video) == videos and {(n, d) for _, n, d in per_video} == {(TOP_K, TOP_K)}
    assert runs == [("succeeded", videos, videos * TOP_K, night_run)]
    assert [tuple(m) for m in models] == [(1, "production", train["dag_run_id"])]
    s3 = boto3.client(
        "s3",
        endpoint_url=stack.env["AIRFLOW_CONN_YT8M_S3"].split('"endpoint_url": "')[1].split('"')[0],
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    exported = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="exports/").get("Contents", [])]
    assert any(k.endswith("predictions.csv") for k in exported), exported
    train_ti = stack.rest.ok("GET", f"/dags/yt8m_train/dagRuns/{train['dag_run_id']}/taskInstances/train")
    return {
        "train_run": train["dag_run_id"],
        "night_run": night_run,
        "tag_part_queue": next(t["queue"] for t in tis if t["task_id"] == "tag_part"),
        "train_tries": train_ti["try_number"],
    }


def test_pipeline_on_airflow_with_the_local_executor(stack_factory, s3_server, report):
    started = time.monotonic()
    stack, vtag_url, bucket = stack_factory("LocalExecutor")
    _prepare(stack, vtag_url, bucket, s3_server)
    for name, args in (
        ("dag-processor", ["dag-processor"]),
        ("scheduler", ["scheduler"]),
        ("api-server", ["api-server"]),
    ):
        stack.start(name, *args)
    checked = _run_pipeline(stack, vtag_url, bucket)
    left = stack.stop_all()
    assert not left, f"processes still alive after stop: {left}"
    report.checked(
        f"LocalExecutor: ingest triggered over REST with a token -> Asset -> train {checked['train_run']} -> "
        f"night {checked['night_run']}: {TRAIN_VIDEOS + VALIDATE_VIDEOS} videos x {TOP_K} labels in PostgreSQL, "
        "one model version, the CSV export on S3; no token/forged token refused; k=0 refused (400)"
    )
    report.observed(f"all processes stopped; took {time.monotonic() - started:.0f} s")


@pytest.fixture
def redis_broker():
    """An empty database of the local Redis for Celery's queues; emptied again afterwards."""
    import redis

    for db in range(1, 16):
        client = redis.Redis(host="127.0.0.1", port=6379, db=db)
        try:
            if client.dbsize() == 0:
                break
        except redis.ConnectionError as exc:
            pytest.fail(f"Redis is not reachable on 127.0.0.1:6379 (the Celery broker; .ci/run starts it): {exc}")
    else:
        pytest.fail("no empty database in the local Redis for the Celery broker")
    yield f"redis://127.0.0.1:6379/{db}"
    client.flushdb()
    client.close()


def test_pipeline_on_airflow_with_celery_and_a_scheduler_restart(redis_broker, stack_factory, s3_server, report):
    # redis_broker first: its teardown (emptying the queues) runs after the stack has stopped.
    """Celery: the GPU tasks go to the worker on the `gpu` queue; the scheduler is restarted mid-training."""
    started = time.monotonic()
    stack, vtag_url, bucket = stack_factory(
        "CeleryExecutor",
        {
            "AIRFLOW__CELERY__BROKER_URL": redis_broker,
            "AIRFLOW__CELERY__WORKER_CONCURRENCY": "2",
        },
    )
    # Celery keeps task results in Airflow's metadata database.
    stack.env["AIRFLOW__CELERY__RESULT_BACKEND"] = "db+" + stack.env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    _prepare(stack, vtag_url, bucket, s3_server)
    for name, args in (
        ("dag-processor", ["dag-processor"]),
        ("scheduler", ["scheduler"]),
        ("api-server", ["api-server"]),
        ("worker-cpu", ["celery", "worker", "--queues", "default", "--concurrency", "2"]),
        ("worker-gpu", ["celery", "worker", "--queues", "gpu", "--concurrency", "1"]),
    ):
        if name.startswith("worker"):  # two workers on one host: each its own name and log server port
            args = [*args, "--celery-hostname", f"{name}@%h"]
            stack.start(name, *args, env={"AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port())})
        else:
            stack.start(name, *args)
    restarts = []

    def restart_scheduler(train_run_id: str) -> None:
        stack.wait_for(
            lambda: stack.task_states("yt8m_train", train_run_id).get("train[-1]") == "running",
            180,
            "the training task to run",
            every=0.5,
        )
        stack.stop("scheduler")  # SIGTERM, as a deployment's rolling restart does
        time.sleep(3)
        stack.start("scheduler", "scheduler")
        restarts.append(train_run_id)

    checked = _run_pipeline(stack, vtag_url, bucket, during_training=restart_scheduler)
    gpu_log = (stack.home / "worker-gpu.log").read_text(errors="replace")
    cpu_log = (stack.home / "worker-cpu.log").read_text(errors="replace")
    assert checked["tag_part_queue"] == "gpu"
    for task_id in ("train", "tag_part"):
        assert f"task_id='{task_id}'" in gpu_log and f"task_id='{task_id}'" not in cpu_log, gpu_log[-3000:]
    assert "task_id='convert_batch'" in cpu_log, cpu_log[-3000:]
    left = stack.stop_all()
    assert not left, f"processes still alive after stop: {left}"
    report.injected(
        f"scheduler SIGTERMed while {restarts[0]} trained, a new scheduler started 3 s later "
        f"(the training task finished in try {checked['train_tries']})"
    )
    report.checked(
        f"CeleryExecutor (broker {redis_broker}): train and tag_part ran on the gpu-queue worker, ingest on "
        f"the default one; the run finished with exactly one model version and {TOP_K} labels for each of "
        f"{TRAIN_VIDEOS + VALIDATE_VIDEOS} videos, no duplicates"
    )
    report.observed(f"all processes stopped; took {time.monotonic() - started:.0f} s")
