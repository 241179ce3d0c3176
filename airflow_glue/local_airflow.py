"""A local Airflow on the embedded defaults, for the UI: `make airflow` (python -m airflow_glue.local_airflow).

Runs `airflow standalone` (API server, scheduler, DAG processor, triggerer) in its own process group
with our DAGs, migrates its metadata and our database (`vtag db upgrade`), creates the `gpu` pool, unpauses the yt8m DAGs once parsed,
prints the URL and the login, and on Ctrl-C or SIGTERM stops the whole group: a plain SIGTERM to
`airflow standalone` would leave its children running.
"""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

DAG_IDS = ("yt8m_ingest", "yt8m_train", "yt8m_nightly_inference")


def _airflow(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["airflow", *args], capture_output=True, text=True, check=check)


def _wait_healthy(url: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/api/v2/monitor/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"Airflow did not answer at {url} within {seconds:.0f} s")


def _unpause(seconds: float) -> None:
    """DAGs exist for the CLI only once the DAG processor has parsed them: retry until then."""
    pending, deadline = set(DAG_IDS), time.monotonic() + seconds
    while pending and time.monotonic() < deadline:
        for dag_id in sorted(pending):
            if _airflow("dags", "unpause", dag_id, check=False).returncode == 0:
                pending.discard(dag_id)
        time.sleep(2)
    if pending:
        raise TimeoutError(f"DAGs not parsed after {seconds:.0f} s: {', '.join(sorted(pending))}")


def stop_group(group: subprocess.Popen, first: int = signal.SIGTERM, wait: float = 30) -> None:
    """Stop a process started with start_new_session=True and every process of its group: `first`,
    then, after the leader exited or `wait` seconds passed, SIGKILL for whatever of the group is left
    (a leader that ignored `first`, children it left behind)."""
    try:
        os.killpg(group.pid, first)
    except ProcessLookupError:
        return
    try:
        group.wait(timeout=wait)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(group.pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    try:
        group.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def main() -> int:
    home = Path(os.environ.setdefault("AIRFLOW_HOME", str(Path.cwd() / ".demo" / "airflow")))
    port = os.environ.get("AIRFLOW__API__PORT", "8080")
    url = f"http://localhost:{port}"
    home.mkdir(parents=True, exist_ok=True)
    # Task runners reach the API server's execution API at this URL, which defaults to port 8080 whatever
    # AIRFLOW__API__PORT says: on another port every task would fail with "connection refused".
    os.environ.setdefault("AIRFLOW__CORE__EXECUTION_API_SERVER_URL", f"{url}/execution/")
    # our plugin (the Video tags pages) lives in the repository, not in AIRFLOW_HOME
    os.environ.setdefault("AIRFLOW__CORE__PLUGINS_FOLDER", str(Path(__file__).resolve().parent.parent / "plugins"))
    _airflow("db", "migrate")
    from tasks import cli

    if cli.main(["db", "upgrade"]) != 0:  # our schema, at deploy time: tasks only check it is current
        return 1
    _airflow("pools", "set", "gpu", "1", "GPU tasks: training and nightly inference")
    log = open(home / "standalone.log", "ab")
    group = subprocess.Popen(["airflow", "standalone"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops the group as Ctrl-C does
    try:
        _wait_healthy(url, 180)
        _unpause(180)
        passwords = json.loads((home / "simple_auth_manager_passwords.json.generated").read_text())
        user, password = next(iter(passwords.items()))
        print(f"Airflow is up at {url}  (login: {user} / {password})", flush=True)
        print(f"DAGs unpaused: {', '.join(DAG_IDS)}; log: {home / 'standalone.log'}. Ctrl-C stops it all.", flush=True)
        return group.wait()
    except KeyboardInterrupt:
        print("\nstopping Airflow...", flush=True)
        return 0
    finally:
        stop_group(group)
        log.close()


if __name__ == "__main__":
    sys.exit(main())
