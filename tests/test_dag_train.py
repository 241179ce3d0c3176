"""The yt8m_train DAG end to end with dag.test(): train -> register -> evaluate -> route -> promote, and with
`require_approval` the human gate (prepare_review -> review -> decide), answered through Airflow's REST API."""

import threading
from datetime import UTC, datetime
from types import SimpleNamespace

import pytest
from sqlalchemy import select, text

from storage.database import registry, reviews
from storage.database.db import engine_for
from tasks.ingest import ingest
from tasks.synth import SynthConfig, synth
from tests.support.airflow_stack import wait_for
from tests.support.db import in_transaction

pytestmark = pytest.mark.airflow


@pytest.fixture
def train_conf(tmp_path, monkeypatch, dag_db_url) -> dict:
    """Ingested synthetic shards and the run conf of a small model trained on them in seconds."""
    monkeypatch.setenv("VTAG_MODELS_URI", str(tmp_path / "models"))
    synth(str(tmp_path / "raw"), SynthConfig("frame", "train", shards=2, videos_per_shard=16, num_labels=10))
    synth(str(tmp_path / "raw"), SynthConfig("frame", "validate", shards=1, videos_per_shard=12, num_labels=10))
    parquet = str(tmp_path / "parquet")
    assert not ingest(str(tmp_path / "raw"), parquet, dag_db_url).failed
    return {"data": parquet, "preset": "small", "epochs": 2, "batch_size": 8, "max_frames": 30}


def test_train_dag_writes_model_versions_and_evaluations(dagbag, tmp_path, dag_db_url, train_conf):
    db_url, conf = dag_db_url, train_conf
    dag = dagbag.get_dag("yt8m_train")
    run = dag.test(run_conf=conf)
    assert run.state == "success", {ti.task_id: ti.state for ti in run.get_task_instances()}

    with engine_for(db_url).connect() as conn:
        versions = conn.execute(
            text("SELECT version, status, checkpoint_uri, epochs, run_id FROM model_versions")
        ).all()
        evaluations = conn.execute(text("SELECT model_version, split, gap, videos FROM evaluations")).all()
    assert len(versions) == 1 and versions[0].status == "production" and versions[0].epochs == 2
    assert versions[0].checkpoint_uri.startswith(str(tmp_path / "models")) and versions[0].run_id == run.run_id
    assert [(e.model_version, e.split, e.videos) for e in evaluations] == [(versions[0].version, "validate", 12)]

    # A worse model from a later run is registered but does not replace production.
    second = dag.test(run_conf={**conf, "learning_rate": 1e-7, "epochs": 1})
    assert second.state == "success"
    assert (
        in_transaction(db_url, registry.production, "frame")["version"] == versions[0].version
    )  # not better: not promoted


def test_train_dag_is_train_register_evaluate_route_then_promote_or_review(dagbag):
    dag = dagbag.get_dag("yt8m_train")
    upstream = {task.task_id: sorted(task.upstream_task_ids) for task in dag.tasks}
    assert upstream == {
        "train": [],
        "register": ["train"],
        "evaluate": ["register"],
        "route": ["evaluate"],
        "promote": ["evaluate", "route"],
        "prepare_review": ["evaluate", "route"],
        "review": ["prepare_review"],
        "decide": ["prepare_review", "review"],
    }
    assert dag.params["require_approval"] is False  # without the param: today's automatic rule


class _Reviewer(threading.Thread):
    """A person answering yt8m_train's review once it waits: `answer` ("Approve" or "Reject") through the
    REST API the Required actions page uses, or, with None, nobody: once the review's timeout has passed,
    the scheduler's own timeout sweep resolves it. On any error it fails the waiting task, so that
    dag.test() (which waits for input forever) returns and the test reports the error."""

    def __init__(self, api, answer: str | None):
        super().__init__(daemon=True)
        self.api, self.answer, self.error, self.detail = api, answer, None, None

    @staticmethod
    def _waiting():
        from airflow.models.taskinstance import TaskInstance as TI
        from airflow.utils.session import create_session
        from airflow.utils.state import TaskInstanceState

        with create_session() as session:
            ti = session.scalars(
                select(TI).where(
                    TI.dag_id == "yt8m_train", TI.task_id == "review", TI.state == TaskInstanceState.AWAITING_INPUT
                )
            ).first()
            return (ti.run_id, ti.trigger_timeout) if ti is not None else None

    def run(self):
        try:
            self._answer()
        except BaseException as exc:  # reported by the test, after the run it unblocks
            self.error = exc
            self._fail_waiting_task()

    def _answer(self):
        run_id, timeout_at = wait_for(self._waiting, 300, "the review to wait for input")
        client, auth = self.api
        url = f"/api/v2/dags/yt8m_train/dagRuns/{run_id}/taskInstances/review/-1/hitlDetails"
        detail = client.get(url, headers=auth)
        assert detail.status_code == 200, detail.text
        self.detail = detail.json()
        if self.answer is not None:
            answered = client.patch(url, json={"chosen_options": [self.answer], "params_input": {}}, headers=auth)
            assert answered.status_code == 200, answered.text
            return
        from airflow.jobs.job import Job
        from airflow.jobs.scheduler_job_runner import SchedulerJobRunner

        assert timeout_at is not None, "the review waits without a timeout"
        wait_for(lambda: datetime.now(UTC) > timeout_at, 60, "the review's timeout to pass")
        SchedulerJobRunner(job=Job()).check_awaiting_input_timeouts()

    @staticmethod
    def _fail_waiting_task():
        from airflow.models.taskinstance import TaskInstance as TI
        from airflow.utils.session import create_session
        from airflow.utils.state import TaskInstanceState

        with create_session() as session:
            for ti in session.scalars(select(TI).where(TI.task_id == "review", TI.state == "awaiting_input")):
                ti.state = TaskInstanceState.FAILED


def _reviewed_run(dag, conf: dict, api, answer: str | None):
    reviewer = _Reviewer(api, answer)
    reviewer.start()
    run = dag.test(run_conf={**conf, "require_approval": True})
    reviewer.join(timeout=60)
    if reviewer.error is not None:
        raise reviewer.error
    states = {ti.task_id: ti.state for ti in run.get_task_instances()}
    assert run.state == "success", states
    assert states["promote"] == "skipped" and states["decide"] == "success", states
    return run, reviewer.detail


def test_a_person_approves_rejects_or_lets_a_review_time_out(dagbag, dag_db_url, train_conf, airflow_api):
    """Approve promotes even a worse model (the former production archived), Reject marks it rejected,
    no answer in time leaves it trained; each review row records what was shown and who decided."""
    db_url, conf = dag_db_url, train_conf
    dag = dagbag.get_dag("yt8m_train")
    assert dag.test(run_conf=conf).state == "success"  # the automatic rule: version 1 in production
    worse = {**conf, "learning_rate": 1e-7, "epochs": 1}

    def version_of(run) -> dict:
        """The version a run trained, with its latest GAP."""
        with engine_for(db_url).connect() as conn:
            found = conn.execute(
                text(
                    "SELECT v.version, v.status, e.gap FROM model_versions v JOIN evaluations e "
                    "ON e.model_version = v.version WHERE v.run_id = :run ORDER BY e.id DESC"
                ),
                {"run": run.run_id},
            ).first()
        return found._asdict()

    def review_of(version: int) -> dict:
        return in_transaction(db_url, reviews.latest_by_version, [version])[version]

    first = in_transaction(db_url, registry.production, "frame")
    production_gap = version_of(SimpleNamespace(run_id=first["run_id"]))["gap"]
    approved_run, detail = _reviewed_run(dag, worse, airflow_api, "Approve")
    approved = version_of(approved_run)
    assert approved["gap"] < production_gap  # worse by the GAP rule, promoted by a person
    assert in_transaction(db_url, registry.production, "frame")["version"] == approved["version"]
    assert in_transaction(db_url, registry.get_version, first["version"])["status"] == "archived"
    assert detail["subject"] == f"Promote model version {approved['version']} to production?"
    assert f"| GAP | {approved['gap']:.4f} | {production_gap:.4f} |" in detail["body"]
    assert f"/video-tags/models/{approved['version']}" in detail["body"] and "below production's" in detail["body"]
    assert detail["options"] == ["Approve", "Reject"] and detail["chosen_options"] is None  # as it waited
    review = review_of(approved["version"])
    assert (review["decision"], review["decided_by"], review["production_version"], review["run_id"]) == (
        "approved",
        "admin",
        first["version"],
        approved_run.run_id,
    )

    rejected_run, _ = _reviewed_run(dag, conf, airflow_api, "Reject")
    rejected = version_of(rejected_run)
    assert in_transaction(db_url, registry.get_version, rejected["version"])["status"] == "rejected"
    assert in_transaction(db_url, registry.production, "frame")["version"] == approved["version"]
    assert review_of(rejected["version"])["decision"] == "rejected"

    lapsed_run, _ = _reviewed_run(dag, {**conf, "approval_timeout_hours": 1 / 3600}, airflow_api, None)
    lapsed = version_of(lapsed_run)
    assert in_transaction(db_url, registry.get_version, lapsed["version"])["status"] == "trained"
    assert in_transaction(db_url, registry.production, "frame")["version"] == approved["version"]
    review = review_of(lapsed["version"])
    assert (review["decision"], review["decided_by"]) == ("timed_out", None)
    assert review["deadline_at"] is not None
