"""Where the tests find the repository, its virtualenv's commands, the real data and the PostgreSQL server."""

import os
import socket
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
SHARED = Path(os.environ.get("VTAG_SHARED", REPO.parent / "shared")).resolve()
BIN = Path(sys.executable).parent
PG_ADMIN_URL = os.environ.get("VTAG_TEST_PG_ADMIN_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres")


def free_port() -> int:
    """A TCP port nothing listens on now (the OS's pick), for a server a test starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
