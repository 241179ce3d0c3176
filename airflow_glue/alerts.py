"""The nightly DAG's deadline callback: log the miss as an ERROR and record it in the database.

Airflow's triggerer imports it by dotted path (`AsyncCallback("airflow_glue.alerts.night_deadline_missed")`)
and awaits it with a small context: {"dag_run": <the run as the REST API shows it>, "deadline": {"id",
"deadline_time"}}.
"""

import asyncio
import logging
from datetime import datetime

from storage.database import alerts, db

log = logging.getLogger(__name__)


def _when(value) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromisoformat(str(value).replace("Z", "+00:00"))


def record_miss(db_url: str, context: dict) -> bool:
    """Log and record the miss the context describes; True if it was not recorded yet."""
    run, deadline = context["dag_run"], context["deadline"]
    log.error(
        "%s run %s (logical date %s) missed its deadline %s: it has not finished",
        run["dag_id"],
        run["dag_run_id"],
        run.get("logical_date"),
        deadline["deadline_time"],
    )
    db.require_current(db_url)
    with db.transaction(db_url) as conn:
        return alerts.record_deadline_miss(
            conn,
            deadline_id=str(deadline["id"]),
            dag_id=run["dag_id"],
            dag_run_id=run["dag_run_id"],
            logical_date=_when(run.get("logical_date")),
            deadline_time=_when(deadline["deadline_time"]),
        )


def _db_url() -> str:
    from airflow_glue import config as airflow_config

    return airflow_config.db_url()


async def night_deadline_missed(context: dict | None = None, **_kwargs) -> bool:
    """The DeadlineAlert callback. The connection lookup and the SQL are blocking, so they run in a
    thread: off the triggerer's event loop, where the Task SDK's blocking calls would refuse to run."""
    if context is None:
        raise ValueError("night_deadline_missed needs Airflow's deadline context (dag_run, deadline)")
    return await asyncio.to_thread(lambda: record_miss(_db_url(), context))
