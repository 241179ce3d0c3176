"""A local Airflow as `make airflow` runs it, and headless Chromium logged in to it, for the browser tests.

`local_airflow` starts `python -m airflow_glue.local_airflow` (airflow standalone: API server, scheduler, DAG
processor, triggerer, with our DAGs and plugins) with its own AIRFLOW_HOME and VTAG_HOME on a free port,
yields its URL and login, and afterwards checks that every process it started is gone. `logged_in` opens
a page signed in through the real login form. Chromium: $VTAG_CHROMIUM, else Debian's `chromium`.
"""

import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.support.airflow_stack import AirflowRest, processes_with_env, task_logs, wait_for
from tests.support.env import BIN, REPO, free_port

NOTEWORTHY = re.compile(r"\b(error|critical|exception|traceback|killed|zombie)\b", re.IGNORECASE)
UP_LINE = re.compile(r"Airflow is up at (?P<url>http://\S+)\s+\(login: (?P<user>\S+) / (?P<password>\S+)\)")
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
STARTUP_S = 420  # migrate + standalone + DAG parsing: 30 s on an idle 2-core VM, minutes on a busy one
UI_TIMEOUT_MS = 60_000


@dataclass
class LocalAirflow:
    url: str
    user: str
    password: str
    airflow_home: Path
    vtag_home: Path

    def rest(self) -> AirflowRest:
        rest = AirflowRest(self.url, self.user, self.password)
        rest.token()
        return rest

    def run_report(self, dag_id: str, run_id: str, lines: int = 80) -> str:
        """Why a run ended as it did: the components' log lines (standalone.log interleaves scheduler,
        triggerer, DAG processor and API server) that name the run or an error, then its task logs."""
        standalone = self.airflow_home / "standalone.log"
        text = standalone.read_text(errors="replace") if standalone.exists() else ""
        picked = [line for line in text.splitlines() if run_id in line or NOTEWORTHY.search(line)]
        return "\n".join(["--- standalone.log ---", *picked[-lines:], task_logs(self.airflow_home, dag_id, run_id)])


# A user Airflow knows but has given no role: none of the permissions its viewers have (the simple auth manager).
NO_ROLE_USER = {"nobody": secrets.token_urlsafe(16)}


def _airflow_processes(airflow_home: Path) -> list[str]:
    """Live processes whose environment carries this AIRFLOW_HOME (the API server, scheduler, task runners...)."""
    return [f"{pid}: {cmdline}" for pid, cmdline in processes_with_env("AIRFLOW_HOME", str(airflow_home)).items()]


def local_env(airflow_home: Path, vtag_home: Path, **extra: str) -> dict[str, str]:
    """The environment `make airflow` gives Airflow, under these homes, on a free port."""
    # As from a fresh shell: no Airflow settings of the test process (its in-process API app's passwords
    # file and JWT secret, connections) leak into this Airflow.
    inherited = {
        k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW__", "AIRFLOW_CONN_", "AIRFLOW_VAR_"))
    }
    env = {
        **inherited,
        "AIRFLOW_HOME": str(airflow_home),
        "VTAG_HOME": str(vtag_home),
        "AIRFLOW__API__PORT": str(free_port()),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "VTAG_NIGHTLY_START": datetime.now(UTC).strftime("%Y-%m-%d"),  # as `make airflow`: no catchup flood
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        **extra,
    }
    env.pop("VTAG_DB_URL", None)
    return env


@contextmanager
def local_airflow(root: Path, vtag_home: Path | None = None, **extra_env: str):
    """`make airflow` under `root` (its `airflow` and `vtag` folders; `vtag` may be filled beforehand), or
    over another `vtag_home` (the demo's)."""
    started = time.monotonic()
    airflow_home, vtag_home = root / "airflow", vtag_home or root / "vtag"
    vtag_home.mkdir(parents=True, exist_ok=True)
    log_path = root / "local_airflow.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "airflow_glue.local_airflow"],
            cwd=REPO,
            env=local_env(airflow_home, vtag_home, **extra_env),
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def log_tail() -> str:
        text = log_path.read_text(errors="replace")
        standalone = airflow_home / "standalone.log"
        if standalone.exists():
            text += "\n--- standalone.log ---\n" + standalone.read_text(errors="replace")[-4000:]
        return text[-6000:]

    def up():
        if proc.poll() is not None:
            raise RuntimeError(f"airflow_glue.local_airflow exited with {proc.returncode}:\n{log_tail()}")
        return UP_LINE.search(log_path.read_text(errors="replace"))

    try:
        try:
            match = wait_for(up, STARTUP_S, "local Airflow up")
        except TimeoutError as exc:
            pytest.fail(f"{exc}\n{log_tail()}")
        print(
            f"\nlocal Airflow up at {match['url']} after {time.monotonic() - started:.0f} s (AIRFLOW_HOME={airflow_home})"
        )
        yield LocalAirflow(match["url"], match["user"], match["password"], airflow_home, vtag_home)
    finally:
        _stop(proc, airflow_home, log_tail)
        print(
            f"local Airflow stopped (exit {proc.returncode}); nothing left of {airflow_home}; "
            f"took {time.monotonic() - started:.0f} s"
        )


def _stop(proc: subprocess.Popen, airflow_home: Path, log_tail) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # local_airflow stops its whole process group on SIGTERM
    try:
        proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
        pytest.fail(f"airflow_glue.local_airflow did not exit within 90 s of SIGTERM:\n{log_tail()}")
    try:
        wait_for(lambda: not _airflow_processes(airflow_home), 60, "Airflow processes gone", every=1)
    except TimeoutError:
        left = _airflow_processes(airflow_home)
        for line in left:
            try:
                os.kill(int(line.split(":", 1)[0]), signal.SIGKILL)
            except OSError:
                pass
        pytest.fail("processes left running after airflow_glue.local_airflow stopped:\n" + "\n".join(left))


def chromium() -> str:
    path = os.environ.get("VTAG_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).is_file():
        pytest.fail(f"no Chromium at {path} (Debian's `chromium` package, or set VTAG_CHROMIUM)")
    return path


def screenshot_dir(tmp_path: Path) -> Path:
    """$VTAG_TEST_OUTPUT (docs/screenshots regenerates the README's), else the test's tmp_path."""
    out = Path(os.environ.get("VTAG_TEST_OUTPUT") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    return out


def new_page(browser):
    """A page in a context of its own (cookies, so logins, not shared); closing `page.context` ends both."""
    page = browser.new_context(viewport={"width": 1280, "height": 1100}).new_page()
    page.set_default_timeout(UI_TIMEOUT_MS)
    page.set_default_navigation_timeout(UI_TIMEOUT_MS)
    return page


def log_in(page, airflow: LocalAirflow) -> None:
    """Through the real login form (simple auth manager), which the UI redirects to."""
    page.goto(airflow.url)
    page.wait_for_url(re.compile(r"/auth/login"))
    page.get_by_label("Username").fill(airflow.user)
    page.get_by_label("Password").fill(airflow.password)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(lambda u: "/auth/login" not in u)
