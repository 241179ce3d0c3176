"""The nightly DAG's deadline: configured from $VTAG_NIGHT_DEADLINE, and its callback logs and records a miss."""

import asyncio
import logging
from datetime import UTC, datetime, timedelta

import pytest

from airflow_glue.alerts import night_deadline_missed
from storage.database import alerts
from storage.errors import UsageError
from tasks.settings import night_deadline
from tests.support.db import in_transaction


@pytest.mark.parametrize(
    ("raw", "interval"),
    [
        ("6h", timedelta(hours=6)),
        ("90m", timedelta(minutes=90)),
        ("1h30m", timedelta(minutes=90)),
        ("45s", timedelta(seconds=45)),
        ("", None),
    ],
)
def test_night_deadline_parses_hours_and_minutes(raw, interval):
    assert night_deadline(raw) == interval


def test_night_deadline_defaults_to_six_hours(monkeypatch):
    monkeypatch.delenv("VTAG_NIGHT_DEADLINE", raising=False)
    assert night_deadline() == timedelta(hours=6)


@pytest.mark.parametrize("raw", ["6", "six hours", "6h 2x", "0m", "-1h"])
def test_a_bad_night_deadline_is_refused_naming_the_variable(raw):
    with pytest.raises(UsageError, match="VTAG_NIGHT_DEADLINE"):
        night_deadline(raw)


@pytest.mark.airflow
def test_the_dag_alerts_when_the_night_is_not_done_in_time(monkeypatch, airflow_db):
    from airflow.dag_processing.dagbag import DagBag
    from airflow.sdk import DeadlineReference

    from tests.support.env import REPO

    monkeypatch.setenv("VTAG_NIGHT_DEADLINE", "90m")
    dag = DagBag(dag_folder=str(REPO / "dags" / "yt8m_nightly_inference.py")).get_dag("yt8m_nightly_inference")
    (alert,) = dag.deadline
    assert alert.reference is DeadlineReference.DAGRUN_QUEUED_AT
    assert alert.interval == timedelta(minutes=90)
    assert alert.callback.path == "airflow_glue.alerts.night_deadline_missed"

    monkeypatch.setenv("VTAG_NIGHT_DEADLINE", "")
    dag = DagBag(dag_folder=str(REPO / "dags" / "yt8m_nightly_inference.py")).get_dag("yt8m_nightly_inference")
    assert not dag.deadline


def test_the_callback_logs_and_records_one_miss_per_deadline(db_url, monkeypatch, caplog):
    monkeypatch.setenv("VTAG_DB_URL", db_url)  # no yt8m_db connection here: airflow_glue.config falls back to it
    if db_url.startswith("postgresql"):
        monkeypatch.setenv("AIRFLOW_CONN_YT8M_DB", db_url.replace("postgresql+psycopg2://", "postgresql://"))
    due = datetime(2030, 1, 2, 8, 0, tzinfo=UTC)
    context = {
        "dag_run": {
            "dag_id": "yt8m_nightly_inference",
            "dag_run_id": "scheduled__2030-01-02T02:00:00+00:00",
            "logical_date": "2030-01-02T02:00:00Z",
        },
        "deadline": {"id": "0199a0c4-0000-7000-8000-000000000001", "deadline_time": due.isoformat()},
    }
    with caplog.at_level(logging.ERROR, logger="airflow_glue.alerts"):
        assert asyncio.run(night_deadline_missed(context=context)) is True
    assert "scheduled__2030-01-02T02:00:00+00:00" in caplog.text and "missed its deadline" in caplog.text
    assert asyncio.run(night_deadline_missed(context=context)) is False  # the same deadline again: one row

    (miss,) = in_transaction(db_url, alerts.deadline_misses)
    assert miss["dag_run_id"] == context["dag_run"]["dag_run_id"] and miss["deadline_id"] == context["deadline"]["id"]
    assert miss["deadline_time"].replace(tzinfo=miss["deadline_time"].tzinfo or UTC) == due
    assert miss["logical_date"].replace(tzinfo=UTC) == datetime(2030, 1, 2, 2, 0, tzinfo=UTC)
