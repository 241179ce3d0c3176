"""Resolve the database, S3 and locations the Airflow way: connections and variables, then the defaults.

Imported inside task bodies (Task SDK) and by the UI pages in the API server (airflow_glue/ui), where the Task SDK's
lookups see only environment variables: outside a task (no supervisor comms) the SDK's fallback chain skips
the metadata database, so there we ask Airflow core's models, which read it as the API server itself does.
"""

from storage.database.db import normalize_url
from storage.objectstore import S3Config
from tasks import settings

DB_CONN_ID = "yt8m_db"
S3_CONN_ID = "yt8m_s3"


def _in_task() -> bool:
    import sys

    runner = sys.modules.get("airflow.sdk.execution_time.task_runner")
    return getattr(runner, "SUPERVISOR_COMMS", None) is not None


def _connection(conn_id: str):
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        if _in_task():
            from airflow.sdk import Connection

            return Connection.get(conn_id)
        from airflow.models.connection import Connection as CoreConnection

        return CoreConnection.get_connection_from_secrets(conn_id)
    except AirflowNotFoundException:
        return None


def db_url(conn_id: str = DB_CONN_ID) -> str:
    """The `yt8m_db` connection (postgres or sqlite type, or a `sqlalchemy_url` extra), else VTAG_DB_URL / SQLite."""
    conn = _connection(conn_id)
    if conn is None:
        return settings.default_db_url()
    if url := conn.extra_dejson.get("sqlalchemy_url"):
        return url
    if conn.conn_type == "sqlite":
        return f"sqlite:///{conn.host}"
    return normalize_url(conn.get_uri())


def s3_config(conn_id: str = S3_CONN_ID) -> S3Config | None:
    """The `yt8m_s3` connection (aws type: login = access key, password = secret, extra endpoint_url)."""
    conn = _connection(conn_id)
    if conn is None:
        return None
    extra = conn.extra_dejson
    endpoint = extra.get("endpoint_url") or extra.get("service_config", {}).get("s3", {}).get("endpoint_url")
    return S3Config(endpoint, conn.login or None, conn.password or None, extra.get("region_name"))


def ui_url() -> str:
    """The Airflow UI's base URL (`[api] base_url`), for links in what tasks write for people to read;
    empty when unset: links then start at the UI's root."""
    from airflow.configuration import conf

    return (conf.get("api", "base_url", fallback="") or "").rstrip("/")


def variable(name: str, default: str) -> str:
    if _in_task():
        from airflow.sdk import Variable

        return Variable.get(name, default=default)
    from airflow.models.variable import Variable as CoreVariable

    return CoreVariable.get(name, default_var=default)


def raw_uri(param: str | None) -> str:
    """A DAG param if given, else the `yt8m_raw_uri` variable, else the embedded default."""
    return param or variable("yt8m_raw_uri", settings.default_raw_uri())


def parquet_uri(param: str | None) -> str:
    return param or variable("yt8m_parquet_uri", settings.default_parquet_uri())


def models_uri() -> str:
    return variable("yt8m_models_uri", settings.default_models_uri())


def exports_uri() -> str:
    return variable("yt8m_exports_uri", settings.default_exports_uri())
