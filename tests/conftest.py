"""Shared fixtures: real data from ../shared, a PostgreSQL database, a moto S3 server, an Airflow home."""

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from tests.support.airflow_ui import NO_ROLE_USER
from tests.support.db import migrated
from tests.support.env import BIN, PG_ADMIN_URL, REPO, SHARED, free_port

# Airflow reads its home at import time: point it at a throwaway folder before anything imports it.
_AIRFLOW_HOME = Path(tempfile.mkdtemp(prefix="vtag-airflow-home-"))
os.environ.update(
    {
        "AIRFLOW_HOME": str(_AIRFLOW_HOME),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
    }
)
os.environ.pop("VTAG_DB_URL", None)
# The embedded defaults of this session (its models store's registered/ copies among them), never the user's.
os.environ["VTAG_HOME"] = tempfile.mkdtemp(prefix="vtag-home-")
# Airflow 3.3.2's dag.test() fails at the end of a run of a DAG with deadline= (research for issue 12): the
# nightly DAG's deadline is tested by tests/test_night_deadline.py, off elsewhere.
os.environ["VTAG_NIGHT_DEADLINE"] = ""
sys.path.insert(0, str(REPO / "dags"))  # Airflow puts the DAGs folder on sys.path; DAG files import yt8m_assets


@pytest.fixture(autouse=True)
def _own_models_store(tmp_path, monkeypatch):
    """Each test its own models store: checkpoints registered as copies land in its `registered/`
    folder, so that a test that alters one never meets another test's."""
    monkeypatch.setenv("VTAG_MODELS_URI", str(tmp_path / "vtag-models"))


@pytest.fixture(scope="session")
def yt8m_dir() -> Path:
    path = SHARED / "yt8m"
    if not (path / "video_level" / "validate0000.tfrecord").is_file():
        pytest.fail(f"the real YouTube-8M data is missing: expected {path} (../shared beside the checkout)")
    return path


@pytest.fixture
def empty_sqlite_url(tmp_path) -> str:
    """A SQLite database not created yet: for the tests of migrations themselves."""
    return f"sqlite:///{tmp_path / 'vtag.db'}"


@pytest.fixture
def sqlite_url(empty_sqlite_url) -> str:
    return migrated(empty_sqlite_url)


@pytest.fixture(scope="session")
def _pg_server():
    from sqlalchemy import create_engine, text

    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:  # the PostgreSQL tests are part of the suite: never skip them silently
        pytest.fail(f"PostgreSQL is not reachable at {PG_ADMIN_URL}: {exc}")
    yield admin
    admin.dispose()


@pytest.fixture
def empty_pg_url(_pg_server) -> str:
    """A fresh, empty PostgreSQL database for one test (no schema: for the tests of migrations), dropped
    afterwards."""
    from sqlalchemy import text

    from storage.database.db import engine_for

    name = f"vtag_test_{uuid.uuid4().hex[:12]}"
    with _pg_server.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    yield url
    engine_for(url).dispose()
    engine_for.cache_clear()
    with _pg_server.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def pg_url(empty_pg_url) -> str:
    return migrated(empty_pg_url)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request) -> str:
    """Each test that takes it runs twice: on SQLite and on the local PostgreSQL, both migrated."""
    return request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_db_url(request) -> str:
    """db_url before any migration: for the tests of the migrations themselves."""
    return request.getfixturevalue("empty_sqlite_url" if request.param == "sqlite" else "empty_pg_url")


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible HTTP endpoint on loopback (moto's server); yields its URL."""
    port = free_port()
    proc = subprocess.Popen(
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail("moto_server did not start")
    yield url
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def s3(s3_server, monkeypatch):
    """S3 settings for a fresh bucket on the moto server, also exported the way boto3 reads them."""
    import boto3

    from storage.objectstore import S3Config

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    bucket = f"vtag-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=bucket)
    return S3Config(
        endpoint_url=s3_server, access_key_id="testing", secret_access_key="testing", region_name="us-east-1"
    ), bucket


@pytest.fixture(scope="session")
def airflow_db():
    """A migrated Airflow metadata database (SQLite) under the tests' AIRFLOW_HOME."""
    result = subprocess.run([str(BIN / "airflow"), "db", "migrate"], capture_output=True, text=True, env=os.environ)
    if result.returncode != 0:
        pytest.fail(f"airflow db migrate failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    yield _AIRFLOW_HOME
    shutil.rmtree(_AIRFLOW_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def airflow_api(airflow_db, tmp_path_factory):
    """Airflow's real API app (plugins, the Video tags pages, the REST API) in process, and the headers of an
    admin's token. One per session: Airflow caches the app and its plugins per process, so the plugins
    folder, passwords and JWT secret are set before its first import."""
    passwords = tmp_path_factory.mktemp("auth") / "passwords.json"
    login = {"username": "admin", "password": secrets.token_urlsafe(16)}
    passwords.write_text(json.dumps({login["username"]: login["password"], **NO_ROLE_USER}))
    env = {
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"admin:admin,{next(iter(NO_ROLE_USER))}:",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(40),
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    from airflow import plugins_manager, settings
    from airflow.api_fastapi.app import create_app
    from fastapi.testclient import TestClient

    settings.PLUGINS_FOLDER = env["AIRFLOW__CORE__PLUGINS_FOLDER"]
    # Earlier tests in this process (a DagBag, dag.test) loaded the plugins without ours: load them again.
    for cached in (plugins_manager._get_plugins, plugins_manager._get_ui_plugins, plugins_manager.get_fastapi_plugins):
        cached.cache_clear()
    test_client = TestClient(create_app())
    token = test_client.post("/auth/token", json=login)
    assert token.status_code == 201, token.text
    yield test_client, {"Authorization": f"Bearer {token.json()['access_token']}"}
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def dagbag(airflow_db):
    """The DAGs folder parsed as Airflow parses it; no import errors allowed."""
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO / "dags"))
    assert not bag.import_errors, bag.import_errors
    return bag


@pytest.fixture
def dag_db_url(db_url, monkeypatch) -> str:
    """`db_url`, made the database of DAG tasks the Airflow way: PostgreSQL as the `yt8m_db` connection
    (from the environment, as a deployment may define it), SQLite through VTAG_DB_URL."""
    if db_url.startswith("postgresql"):
        monkeypatch.setenv("AIRFLOW_CONN_YT8M_DB", db_url.replace("postgresql+psycopg2://", "postgresql://"))
    else:
        monkeypatch.setenv("VTAG_DB_URL", db_url)
    return db_url


class _Report:
    """What a fault or security test injected and what it checked, printed even under `pytest -q`."""

    def __init__(self, request):
        self._request = request
        self._capture = request.config.pluginmanager.getplugin("capturemanager")
        self._terminal = request.config.pluginmanager.getplugin("terminalreporter")
        self._first = True

    def _say(self, kind: str, message: str) -> None:
        self._request.node.user_properties.append((kind, message))
        if self._terminal is None:  # -p no:terminal
            return
        lines = [f"  {kind}: {message}"]
        if self._first:
            lines.insert(0, f"{self._request.node.nodeid}")
            self._first = False
        if self._capture is not None:
            with self._capture.global_and_fixture_disabled():
                self._write(lines)
        else:
            self._write(lines)

    def _write(self, lines):
        self._terminal.ensure_newline()
        for line in lines:
            self._terminal.write_line(line)

    def injected(self, message: str) -> None:
        self._say("injected", message)

    def checked(self, message: str) -> None:
        self._say("checked", message)

    def observed(self, message: str) -> None:
        self._say("observed", message)


@pytest.fixture
def report(request) -> _Report:
    """report.injected(...), report.observed(...), report.checked(...): one line each on the terminal."""
    return _Report(request)


@pytest.fixture(scope="session")
def raw_shards(tmp_path_factory):
    """Synthetic frame-level shards for an inference world (tests/support/worlds.py): 40 train and 10 validate videos."""
    from tests.support.worlds import inference_shards

    return inference_shards(tmp_path_factory.mktemp("inference-raw"))


@pytest.fixture(scope="session")
def tiny_checkpoint(raw_shards, tmp_path_factory) -> str:
    """A TINY model trained once on `raw_shards`, for tests that need a production model but do not test
    training: tests.support.worlds.build_world(..., checkpoint=tiny_checkpoint) registers and promotes it."""
    from tasks.ingest import ingest
    from tasks.training import train_model
    from tests.support.worlds import TINY

    home = tmp_path_factory.mktemp("tiny-model")
    db_url, parquet = migrated(f"sqlite:///{home / 'train.db'}"), str(home / "parquet")
    assert not ingest(str(raw_shards), parquet, db_url).failed
    trained = train_model(parquet, str(home / "model"), "frame", preset="small", overrides=TINY, progress=False)
    return trained["checkpoint_uri"]
