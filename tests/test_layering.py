"""The rooms of the house: `tasks/` runs without Airflow (docs/architecture.md), what needs it lives in
`airflow_glue/`."""

import subprocess
import sys

from tests.support.env import REPO

WITHOUT_AIRFLOW = """
import importlib, importlib.abc, pkgutil, sys

class NoAirflow(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "airflow" or name.startswith("airflow."):
            raise ModuleNotFoundError(f"No module named {name!r} (Airflow absent)", name=name)
        return None

sys.meta_path.insert(0, NoAirflow())
package = importlib.import_module(sys.argv[1])
names = sorted(m.name for m in pkgutil.walk_packages(package.__path__, sys.argv[1] + "."))
for name in names:
    importlib.import_module(name)
print(len(names), *names)
"""


def test_every_tasks_module_imports_with_airflow_absent():
    result = subprocess.run([sys.executable, "-c", WITHOUT_AIRFLOW, "tasks"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    count, *names = result.stdout.split()
    assert int(count) == len(names) >= 8 and "tasks.cli" in names and "tasks.inference" in names


def test_the_guard_catches_a_module_that_needs_airflow(tmp_path):
    """The same script, given a package with a module that imports Airflow at module level, fails on it."""
    package = tmp_path / "vtag_probe"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "glue.py").write_text("import airflow.sdk\n")
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_AIRFLOW, "vtag_probe"], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode != 0 and "Airflow absent" in result.stderr


SCORING = """
import sys
from tasks import night_parts
from model import evaluate

model, config, device = night_parts.load_scorer(sys.argv[1])
print(" ".join(sorted(m for m in sys.modules if m.startswith("model."))))
"""


def test_scoring_does_not_import_the_training_module(tiny_checkpoint):
    """A night's part loads and scores a model without model/train.py (the optimizer, the loop, the plots)."""
    result = subprocess.run(
        [sys.executable, "-c", SCORING, str(tiny_checkpoint)], capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = result.stdout.split()
    assert "model.networks" in loaded and "model.checkpoint" in loaded and "model.train" not in loaded


def test_the_one_private_airflow_detail_we_read_is_where_it_was(monkeypatch):
    """airflow_glue.config._in_task() tells a task (connections and variables through the SDK's supervisor)
    from the scheduler, the DAG processor and the UI (through the metadata database) by the task runner's
    SUPERVISOR_COMMS, which Airflow sets only in a task's process. It is private: pinned here, so that an
    Airflow that renames it fails this test instead of tasks reading connections the scheduler's way."""
    from airflow.sdk.execution_time import task_runner

    from airflow_glue import config

    assert "SUPERVISOR_COMMS" in task_runner.__annotations__  # declared by the module, set in a task alone
    assert config._in_task() is False  # here: no task
    monkeypatch.setattr(task_runner, "SUPERVISOR_COMMS", object(), raising=False)
    assert config._in_task() is True
