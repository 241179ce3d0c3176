"""`vtag` as a user runs it: the installed command in a subprocess, output captured."""

import os
import subprocess

from tests.support.env import BIN


def vtag(*args, env: dict | None = None, unset: tuple = (), env_home=None, cwd=None) -> subprocess.CompletedProcess:
    """Run `vtag ARGS...`; `env` adds to this process's environment and `unset` removes from it;
    `env_home` sets VTAG_HOME (where the embedded defaults live)."""
    environment = {**os.environ, **(env or {}), **({"VTAG_HOME": str(env_home)} if env_home is not None else {})}
    environment = {k: v for k, v in environment.items() if k not in unset}
    return subprocess.run(
        [str(BIN / "vtag"), *map(str, args)], capture_output=True, text=True, timeout=300, env=environment, cwd=cwd
    )
