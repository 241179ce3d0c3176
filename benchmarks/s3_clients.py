"""Reading from S3 with one boto3 client a process against one a store (issue 28): the training loader's
epoch and a night's part reading its files, from a real S3-compatible endpoint on loopback (moto's server).

    python -m benchmarks.s3_clients [--shards 8] [--videos-per-shard 32] [--rounds 3]

Synthetic frame-level shards are ingested into s3://<bucket>/parquet (the product's ingest, SQLite
catalogue), then each contender runs in turn, `--rounds` times: "a client a store", as before issue 28
(each storage.s3_store.S3Store building its own client, with its own connection pool, on first
use), and "a client a process" (the code as it is). Measured: one epoch of the training loader
(model.data.ParquetBatches, one process, batches of 64, every row group of every file: each file switch
opens the file again through the store), and a part's reads (storage.objectstore: `info` then a read of
each file's footer, as tasks.inference does before scoring). The figures are median seconds and how many
clients were built. moto on loopback has no network between: against a real S3 endpoint
every extra client also pays DNS, TCP and TLS set-up, so the gap here is a floor.
"""

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path


def _moto(port: int) -> subprocess.Popen:
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return server
        except OSError:
            time.sleep(0.1)
    server.kill()
    raise SystemExit("moto_server did not start")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--videos-per-shard", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    port = _free_port()
    # moto accepts any credentials: the tests' placeholder
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    server = _moto(port)
    try:
        import boto3
        import pyarrow.parquet as pq

        from model.data import EpochSpec, ParquetBatches, find_row_groups
        from storage import objectstore, s3_store
        from storage.database.db import upgrade
        from storage.formats.yt8m_spec import MAX_FRAMES, NUM_CLASSES
        from tasks.ingest import ingest
        from tasks.synth import SynthConfig, synth

        config = objectstore.S3Config(endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1")
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        boto3.client("s3", endpoint_url=config.endpoint_url, region_name="us-east-1").create_bucket(Bucket=bucket)
        work = Path(tempfile.mkdtemp(prefix="vtag-s3-clients-"))
        synth(str(work / "raw"), SynthConfig("frame", "train", shards=args.shards, videos_per_shard=args.videos_per_shard, seed=5))  # fmt: skip
        parquet = f"s3://{bucket}/parquet"
        db_url = f"sqlite:///{work / 'vtag.db'}"
        upgrade(db_url)
        report = ingest(str(work / "raw"), parquet, db_url, s3=config)
        assert not report.failed, report.failed
        groups = find_row_groups(parquet, "frame", "train", s3=config)
        files = sorted({g.uri for g in groups})
        print(
            f"benchmarks.s3_clients: {len(files)} Parquet files, {len(groups)} row groups, "
            f"{sum(g.rows for g in groups)} videos on moto's server at {config.endpoint_url}"
        )

        made = {"clients": 0}
        real_new = s3_store._new_client

        def counted(c):
            made["clients"] += 1
            return real_new(c)

        s3_store._new_client = counted
        shared = s3_store.S3Store.client

        def per_store(self):  # as before issue 28: each S3Store built its own on first use
            if getattr(self, "_own_client", None) is None:
                self._own_client = counted(self.config)
            return self._own_client

        def epoch():
            dataset = ParquetBatches(
                groups, "frame", NUM_CLASSES, EpochSpec(64, drop_last=False, max_frames=MAX_FRAMES), s3=config
            )
            return sum(len(batch["ids"]) for batch in dataset)

        def part_reads():
            row_groups = 0
            for uri in files:
                store = objectstore.store_for(uri, config)
                info = store.info(uri)
                with store.open_read(uri, fingerprint=info.fingerprint) as f:
                    row_groups += pq.ParquetFile(f).metadata.num_row_groups
            return row_groups

        figures: dict[tuple[str, str], list] = {}
        for _ in range(args.rounds):
            for contender, client_of in (("a client a store", property(per_store)), ("a client a process", shared)):
                s3_store.S3Store.client = client_of
                s3_store._clients.clear()
                for name, work_of in (("loader epoch", epoch), ("part's file reads", part_reads)):
                    made["clients"] = 0
                    started = time.perf_counter()
                    work_of()
                    figures.setdefault((name, contender), []).append((time.perf_counter() - started, made["clients"]))
        s3_store.S3Store.client = shared
        for (name, contender), runs in figures.items():
            seconds = statistics.median(s for s, _ in runs)
            print(f"  {name}, {contender}: {seconds:.3f} s median of {len(runs)}, {runs[-1][1]} clients built")
    finally:
        server.terminate()
        server.wait(timeout=10)


if __name__ == "__main__":
    main()
