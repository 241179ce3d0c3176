"""Fault harnesses: a TCP proxy that cuts every connection, a private PostgreSQL cluster that can be
restarted, and a worker process that scores one part of a night slowly enough to be SIGKILLed mid-write.

Used by tests/test_faults.py (one fault each) and tests/test_soak.py (many nights, faults at seeded points).
"""

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

from tests.support.env import BIN, REPO, free_port
from tests.support.worlds import count

# The server binaries of whichever PostgreSQL major Debian installed (the newest if several).
_INITDBS = Path("/usr/lib/postgresql").glob("*/bin/initdb")
PG_BIN = max(
    _INITDBS, key=lambda p: int(p.parent.parent.name), default=Path("/usr/lib/postgresql/15/bin/initdb")
).parent


class FlakyProxy:
    """A TCP proxy in front of a server (the moto S3 server) that can drop every connection and refuse new ones.

    `cut_on(method, n, seconds)`: when the n-th request of that method for a Parquet object (a path
    holding /parquet/) starts, counted from this call, forward its first bytes, then reset every
    connection (RST) and close the listening socket (new connections are refused) for `seconds`, then
    listen again on the same port. It fires once; call it again to arm it again.
    """

    def __init__(self, upstream_port: int):
        self.port, self._upstream = free_port(), ("127.0.0.1", upstream_port)
        self._lock, self._sockets, self._listener = threading.Lock(), set(), None
        self._closed = False
        self.requests = self.cut_sockets = self.accepted_after_restore = 0
        self._method, self._cut_at, self._outage = b"PUT ", None, 0.0
        self.cut_time = self.restore_time = None
        self._restored = threading.Event()
        self._restored.set()
        self.while_down = None  # called once during the outage, before restoring
        self._listen()
        threading.Thread(target=self._accept_loop, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cut_on(self, method: str, n: int, seconds: float) -> None:
        with self._lock:
            self._method, self._cut_at, self._outage = f"{method} ".encode(), n, seconds
            self.requests = self.accepted_after_restore = 0
            self.cut_time = self.restore_time = None

    def cut_on_put(self, n: int, seconds: float) -> None:
        self.cut_on("PUT", n, seconds)

    def disarm(self) -> None:
        with self._lock:
            self._cut_at = None

    def wait_restored(self, timeout: float = 60) -> None:
        """Until an outage under way is over (listening again), so that it ends where it was meant to."""
        if not self._restored.wait(timeout):
            raise TimeoutError(f"the proxy on port {self.port} did not listen again within {timeout:.0f} s")

    def _listen(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        listener.settimeout(0.05)
        self._listener = listener

    def _accept_loop(self) -> None:
        while not self._closed:
            listener = self._listener
            if listener is None:
                time.sleep(0.02)
                continue
            try:
                client, _ = listener.accept()
            except (TimeoutError, OSError):
                continue
            client.settimeout(None)
            try:
                upstream = socket.create_connection(self._upstream)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets |= {client, upstream}
                if self.restore_time is not None:
                    self.accepted_after_restore += 1
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, to_server: bool) -> None:
        try:
            while data := src.recv(256 * 1024):
                trigger = False
                if to_server and data.startswith(self._method) and b"/parquet/" in data.split(b"\r\n", 1)[0]:
                    with self._lock:
                        self.requests += 1
                        trigger = self._cut_at is not None and self.requests == self._cut_at
                        if trigger:
                            self._cut_at = None
                            self._restored.clear()
                dst.sendall(data)
                if trigger:
                    self._cut()
                    return
        except OSError:
            pass
        finally:
            for s in (src, dst):
                self._drop(s)

    def _drop(self, s: socket.socket) -> None:
        with self._lock:
            self._sockets.discard(s)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST, as a lost peer
            s.close()
        except OSError:
            pass

    def _cut(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            victims = list(self._sockets)
            self.cut_time = time.monotonic()
        listener.close()
        for s in victims:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._drop(s)
        with self._lock:
            self.cut_sockets += len(victims)
        threading.Thread(target=self._restore_later, daemon=True).start()

    def _restore_later(self) -> None:
        time.sleep(self._outage)
        if self.while_down is not None:
            self.while_down()
        self._listen()
        self.restore_time = time.monotonic()
        self._restored.set()

    def close(self) -> None:
        self._closed = True
        if self._listener is not None:
            self._listener.close()
        for s in list(self._sockets):
            self._drop(s)


def postgres_ids() -> tuple[int, int]:
    import pwd

    entry = pwd.getpwnam("postgres")
    return entry.pw_uid, entry.pw_gid


class PrivateCluster:
    """A PostgreSQL cluster of the test's own (initdb as postgres, trust auth, a free port)."""

    def __init__(self):
        self.root = Path(tempfile.mkdtemp(prefix="vtag-pg-"))
        os.chown(self.root, *postgres_ids())
        self.data, self.port = self.root / "data", free_port()
        self.admin_url = f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/postgres"
        self.restarts = 0

    def _pg(self, *args: str, timeout: float = 60) -> None:
        # Output to a file, not a pipe: the server pg_ctl starts would hold a pipe open after pg_ctl exits.
        with tempfile.TemporaryFile("w+") as output:
            result = subprocess.run(
                ["runuser", "-u", "postgres", "--", *args],
                stdout=output,
                stderr=output,
                stdin=subprocess.DEVNULL,
                timeout=timeout,
                cwd=self.root,
            )
            output.seek(0)
            if result.returncode != 0:
                log = (self.root / "server.log").read_text()[-2000:] if (self.root / "server.log").exists() else ""
                raise RuntimeError(f"{' '.join(args)} failed: {output.read()}{log}")

    def _pg_ctl(self, action: str, *options: str) -> None:
        """`pg_ctl ACTION` on this cluster, waiting until it is done (-w); the server logs to server.log."""
        self._pg(
            str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "server.log"), "-w", *options, action
        )

    def start(self) -> None:
        self._pg(str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust", "--no-sync")
        self._pg_ctl("start", "-o", f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1")

    def restart(self) -> None:
        self._pg_ctl("restart", "-m", "fast")
        self.restarts += 1

    def create_database(self, name: str) -> str:
        """A database of this cluster, by URL."""
        from sqlalchemy import create_engine, text

        admin = create_engine(self.admin_url, isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
        finally:
            admin.dispose()
        return self.admin_url.rsplit("/", 1)[0] + f"/{name}"

    def stop_and_delete(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self._pg_ctl("stop", "-m", "immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


# A part of a night scored in a process of its own, as an Airflow worker runs a mapped tag_part; each
# chunk's commit is followed by a pause (a slow database) so that the parent can kill it between chunks.
_PART_WORKER = """
import json, sys, time
from storage.database import prediction_writes
from storage.objectstore import S3Config
from tasks.inference import NightPlan, tag_part

work = json.loads(sys.argv[2])
real_write = prediction_writes.write_chunk

def slow_write(*args, **kwargs):
    written = real_write(*args, **kwargs)
    time.sleep(work["write_delay_s"])
    return written

prediction_writes.write_chunk = slow_write
s3 = S3Config(**work["s3"]) if work["s3"] else None
tag_part(sys.argv[1], NightPlan.from_dict(work["night"]), work["part"], s3=s3, chunk_videos=work["chunk_videos"])
"""


def start_part_worker(
    db_url: str, plan, part: dict, *, chunk_videos: int = 4, write_delay_s: float = 0.3, s3=None
) -> subprocess.Popen:
    """tag_part of one part of `plan` (a NightPlan) in a new Python process."""
    work = json.dumps(
        {
            "night": plan.as_dict(),
            "part": part,
            "chunk_videos": chunk_videos,
            "write_delay_s": write_delay_s,
            "s3": asdict(s3) if s3 else None,
        }
    )
    return subprocess.Popen([str(BIN / "python"), "-c", _PART_WORKER, db_url, work], cwd=REPO)


def kill_part_worker_after(
    db_url: str, worker: subprocess.Popen, run_id: int, part: int, rows: int, timeout: float = 120
) -> int:
    """SIGKILL the worker once its part has committed at least `rows` rows; returns the rows it had
    committed when it died. Fails if the worker finishes or dies first."""
    committed = "SELECT rows_written FROM inference_parts WHERE run_id = :run AND part = :part"
    try:
        deadline = time.monotonic() + timeout
        while (count(db_url, committed, run=run_id, part=part) or 0) < rows:
            if worker.poll() is not None:
                raise AssertionError(
                    f"run {run_id} part {part}: the worker exited ({worker.returncode}) before it was killed"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"run {run_id} part {part}: fewer than {rows} rows committed in {timeout:.0f} s")
            time.sleep(0.05)
        worker.send_signal(signal.SIGKILL)
        worker.wait(30)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(30)
    return count(db_url, committed, run=run_id, part=part)
