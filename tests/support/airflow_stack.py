"""A real Airflow on this machine, without Docker, for the full-stack tests.

Each component (API server, scheduler, DAG processor, Celery workers) runs as its own process, in its own
process group, on the local PostgreSQL (Airflow's metadata in a database of its own), with our DAGs
folder. `stop_all` stops every group it started and checks that no process of this AIRFLOW_HOME is left.
"""

import json
import os
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from airflow_glue.local_airflow import stop_group
from tests.support.env import BIN, REPO


@dataclass
class AirflowStack:
    home: Path
    env: dict[str, str]
    port: int
    user: str = "admin"
    password: str = field(default_factory=lambda: uuid.uuid4().hex)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    rest: "AirflowRest | None" = None

    @classmethod
    def configure(
        cls, home: Path, port: int, metadata_url: str, executor: str, extra_env: dict[str, str]
    ) -> "AirflowStack":
        home.mkdir(parents=True, exist_ok=True)
        stack = cls(home=home, env={}, port=port)
        stack.rest = AirflowRest(stack.url, stack.user, stack.password)
        (home / "passwords.json").write_text(json.dumps({stack.user: stack.password}))
        stack.env = {
            **os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONPATH": str(REPO),
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
            "AIRFLOW__CORE__EXECUTOR": executor,
            "AIRFLOW__CORE__PARALLELISM": "4",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": metadata_url,
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
            "AIRFLOW__API__PORT": str(port),
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__API__SECRET_KEY": uuid.uuid4().hex,
            "AIRFLOW__API_AUTH__JWT_SECRET": uuid.uuid4().hex,
            # Auth on: one admin with a password of our own; nobody gets in without it.
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{stack.user}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(home / "passwords.json"),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
            # A test waits on the scheduler: parse and schedule promptly.
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "10",
            "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
            "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "0.5",
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "60",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
            **extra_env,
        }
        return stack

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # Processes -------------------------------------------------------------------------------------

    def cli(self, *args: str, timeout: float = 300) -> str:
        result = subprocess.run(
            [str(BIN / "airflow"), *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if result.returncode != 0:
            raise RuntimeError(f"airflow {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        return result.stdout

    def start(self, name: str, *args: str, env: dict[str, str] | None = None) -> None:
        log = open(self.home / f"{name}.log", "ab")
        self.procs[name] = subprocess.Popen(
            [str(BIN / "airflow"), *args],
            env={**self.env, **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=self.home,
        )
        log.close()

    def stop(self, name: str, sig: int = signal.SIGTERM, wait: float = 60) -> None:
        """Stop a component's whole process group: `sig` first, SIGKILL if it is still there after `wait`."""
        stop_group(self.procs.pop(name), sig, wait)

    def stop_all(self) -> dict[int, str]:
        """Stop everything; return the processes of this AIRFLOW_HOME still alive afterwards."""
        for name in list(self.procs):
            self.stop(name, wait=30)
        deadline = time.monotonic() + 15
        while (left := processes_with_env("AIRFLOW_HOME", str(self.home))) and time.monotonic() < deadline:
            time.sleep(0.5)
        return left

    def assert_running(self) -> None:
        dead = {name: p.returncode for name, p in self.procs.items() if p.poll() is not None}
        if dead:
            raise AssertionError(f"Airflow components exited: {dead}\n{self.log_tails()}")

    def log_tails(self, chars: int = 3000) -> str:
        return "\n".join(
            f"--- {log.name} ---\n{log.read_text(errors='replace')[-chars:]}" for log in sorted(self.home.glob("*.log"))
        )

    # Waiting on the API ----------------------------------------------------------------------------

    def wait_healthy(self, seconds: float = 240) -> None:
        self.wait_for(
            lambda: _get_status(f"{self.url}/api/v2/monitor/health") == 200, seconds, "the API server to answer"
        )

    def wait_for(self, predicate, seconds: float, what: str, every: float = 2.0):
        """`wait_for`, failing at once if a component died, with the components' logs on a timeout."""

        def ready():
            self.assert_running()
            return predicate()

        try:
            return wait_for(ready, seconds, what, every)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n{self.log_tails()}") from None

    def wait_for_run(self, dag_id: str, run_id: str, seconds: float) -> dict:
        def finished():
            run = self.rest.ok("GET", f"/dags/{dag_id}/dagRuns/{run_id}")
            return run if run["state"] in ("success", "failed") else None

        run = self.wait_for(finished, seconds, f"{dag_id} run {run_id} to finish")
        if run["state"] != "success":
            raise AssertionError(
                f"{dag_id} run {run_id} {run['state']}: {self.task_states(dag_id, run_id)}\n{self.log_tails()}\n"
                f"{task_logs(self.home, dag_id, run_id)}"
            )
        return run

    def task_states(self, dag_id: str, run_id: str) -> dict[str, str]:
        tis = self.rest.ok("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances")["task_instances"]
        return {f"{ti['task_id']}[{ti['map_index']}]": ti["state"] for ti in tis}


def task_logs(airflow_home: Path, dag_id: str, run_id: str, chars: int = 4000) -> str:
    """The tail of each task log of one DAG run, as Airflow's file task handler wrote them."""
    folder = airflow_home / "logs" / f"dag_id={dag_id}" / f"run_id={run_id}"
    return "\n".join(f"--- {p} ---\n{p.read_text(errors='replace')[-chars:]}" for p in sorted(folder.rglob("*.log")))


@dataclass
class AirflowRest:
    """Airflow's REST API (/api/v2) as one user: a JWT from /auth/token, then Bearer requests."""

    url: str
    user: str
    password: str
    _token: str | None = None

    def token(self) -> str:
        if self._token is None:
            response = httpx.post(
                f"{self.url}/auth/token", json={"username": self.user, "password": self.password}, timeout=30
            )
            assert response.status_code == 201, f"POST /auth/token: {response.status_code} {response.text}"
            self._token = response.json()["access_token"]
        return self._token

    def api(self, method: str, path: str, body: dict | None = None, token: str | None = "") -> httpx.Response:
        """A REST call; token "" means this user's own token, None means none at all."""
        token = self.token() if token == "" else token
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        return httpx.request(method, f"{self.url}/api/v2{path}", json=body, headers=headers, timeout=60)

    def ok(self, method: str, path: str, body: dict | None = None) -> dict:
        response = self.api(method, path, body)
        assert response.status_code < 300, f"{method} {path}: {response.status_code} {response.text}"
        return response.json()


def wait_for(condition, seconds: float, what: str, every: float = 0.5):
    """Poll `condition` until it returns something true (returned), or raise TimeoutError."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if result := condition():
            return result
        time.sleep(every)
    raise TimeoutError(f"timed out after {seconds:.0f} s waiting for {what}")


def _get_status(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=5).status_code
    except httpx.HTTPError:
        return None


def processes_with_env(name: str, value: str) -> dict[int, str]:
    """Live processes whose environment has name=value, pid -> command line (a leak check that needs no
    pid bookkeeping: every process an Airflow component starts inherits its AIRFLOW_HOME)."""
    needle = f"{name}={value}".encode()
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
                if cmdline:  # zombies have none
                    found[int(entry.name)] = cmdline[:200]
        except OSError:  # gone meanwhile, or not ours
            continue
    return found
