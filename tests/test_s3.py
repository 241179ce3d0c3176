"""The object store and ingest over a real S3 endpoint (moto's server on loopback)."""

import io

import boto3
import pyarrow.parquet as pq
import pytest

from storage.database import manifest
from storage.objectstore import S3Config, StoreError, store_for
from storage.s3_store import S3Store, _S3RangeReader
from tasks.ingest import ingest
from tasks.synth import SynthConfig, synth
from tests.support.db import in_transaction
from tests.support.shards import flip_byte, record_offsets


def _client(config: S3Config):
    return boto3.client("s3", endpoint_url=config.endpoint_url, region_name="us-east-1")


def test_publish_is_atomic_on_s3(s3):
    config, bucket = s3
    store = S3Store(config)
    uri = f"s3://{bucket}/x/obj.bin"
    with pytest.raises(RuntimeError):
        with store.publish(uri) as path:
            path.write_bytes(b"half")
            raise RuntimeError("crash before the upload")
    assert store.info(uri) is None and store.list(f"s3://{bucket}/x") == []
    with store.publish(uri) as path:
        path.write_bytes(b"whole object")
    assert store.open_read(uri).read() == b"whole object"
    (info,) = store.list(f"s3://{bucket}/x", "*.bin")
    assert (info.uri, info.size) == (uri, 12) and info.fingerprint.startswith("etag=")


def test_streaming_read_resumes_after_a_dropped_connection(s3):
    config, bucket = s3
    payload = bytes(range(256)) * 4096  # 1 MiB
    _client(config).put_object(Bucket=bucket, Key="big", Body=payload)
    store = S3Store(config)

    class DroppingBody:
        """The first body breaks off after 100 KiB, as a reset connection does."""

        def __init__(self, body):
            self.body, self.sent = body, 0

        def read(self, n):
            if self.sent >= 100 * 1024:
                raise ConnectionError("connection reset by peer")
            chunk = self.body.read(min(n, 100 * 1024 - self.sent))
            self.sent += len(chunk)
            return chunk

        def close(self):
            self.body.close()

    reader = _S3RangeReader(store.client, bucket, "big", len(payload))
    reader._open()
    reader._body = DroppingBody(reader._body)
    assert io.BufferedReader(reader, buffer_size=64 * 1024).read() == payload


def test_ingest_s3_to_s3(s3, tmp_path, db_url):
    config, bucket = s3
    raw, dest = f"s3://{bucket}/raw", f"s3://{bucket}/parquet"
    synth(raw, SynthConfig("frame", "train", shards=2, videos_per_shard=8, seed=2), config)
    local = tmp_path / "train0001.tfrecord"
    synth(str(tmp_path), SynthConfig("frame", "train", shards=2, videos_per_shard=8, seed=2))
    flip_byte(local, record_offsets(local)[3] + 100)
    _client(config).upload_file(str(local), bucket, "raw/train0001.tfrecord")  # a corrupt shard on S3

    report = ingest(raw, dest, db_url, s3=config)
    assert [c["output_uri"] for c in report.converted] == [f"{dest}/frame/train/train0000.parquet"]
    assert "record 3" in report.failed[f"{raw}/train0001.tfrecord"]
    keys = sorted(o["Key"] for o in _client(config).list_objects_v2(Bucket=bucket, Prefix="parquet/")["Contents"])
    assert keys == ["parquet/frame/train/train0000.parquet"]

    with store_for(f"{dest}/frame/train/train0000.parquet", config).open_read(
        f"{dest}/frame/train/train0000.parquet"
    ) as f:
        table = pq.read_table(f)
    assert table.num_rows == 8 and set(table.column_names) == {"id", "labels", "num_frames", "rgb", "audio"}
    assert ingest(raw, dest, db_url, s3=config).skipped == 1
    rows = {r["source_uri"]: r for r in in_transaction(db_url, manifest.rows, dest)}
    assert rows[f"{raw}/train0000.tfrecord"]["fingerprint"].startswith("etag=")
    assert rows[f"{raw}/train0001.tfrecord"]["status"] == "failed"


def test_credentials_from_the_environment(s3, tmp_path, sqlite_url):
    """Outside Airflow, boto3's own chain (AWS_* variables, AWS_ENDPOINT_URL) configures S3."""
    _, bucket = s3
    synth(f"s3://{bucket}/raw", SynthConfig("video", "validate", shards=1, videos_per_shard=3))
    assert ingest(f"s3://{bucket}/raw", str(tmp_path / "pq"), sqlite_url).converted[0]["rows"] == 3


def test_missing_credentials_and_bad_bucket_are_one_clear_line(s3, monkeypatch, tmp_path):
    config, bucket = s3
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(StoreError, match="no S3 credentials for s3://"):
        S3Store(S3Config(endpoint_url=config.endpoint_url)).list(f"s3://{bucket}/raw")
    with pytest.raises(StoreError, match="NoSuchBucket"):
        S3Store(config).list("s3://no-such-bucket-here/raw")
    with pytest.raises(StoreError, match="not an s3://bucket/key URI"):
        store_for("s3:///nobucket")


def test_a_killed_writers_leftovers_are_removed_by_the_retry(s3, tmp_path):
    """What a SIGKILL inside publish() leaves: the local temporary folder (named after the dead pid) and
    an incomplete multipart upload of the key. The retry's sweep removes both, and nothing of the living."""
    import os
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    config, bucket = s3
    store, uri = S3Store(config), f"s3://{bucket}/parquet/frame/train/train0000.parquet"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = Path(tempfile.mkdtemp(prefix=f"vtag-publish-{int(dead.stdout)}-"))
    (stale / "train0000.parquet").write_bytes(b"half")
    alive = Path(tempfile.mkdtemp(prefix=f"vtag-publish-{os.getpid()}-"))
    client = _client(config)
    upload = client.create_multipart_upload(Bucket=bucket, Key="parquet/frame/train/train0000.parquet")["UploadId"]
    other = client.create_multipart_upload(Bucket=bucket, Key="parquet/frame/train/train0001.parquet")["UploadId"]
    try:
        removed = store.remove_stale_temporaries(uri)
        assert str(stale) in removed and not stale.exists() and alive.is_dir()
        assert f"{uri} (incomplete multipart upload {upload})" in removed
        left = client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
        assert [u["UploadId"] for u in left] == [other]
        assert store.remove_stale_temporaries(uri) == []
    finally:
        alive.rmdir()
        client.abort_multipart_upload(Bucket=bucket, Key="parquet/frame/train/train0001.parquet", UploadId=other)


def test_one_client_per_process_and_configuration(s3, monkeypatch):
    """Issue 28: every store of a process shares its configuration's boto3 client (and connection pool);
    another configuration, another AWS_* environment or a forked child get a client of their own."""
    import os

    config, bucket = s3
    uri = f"s3://{bucket}/x/obj.bin"
    first = store_for(uri, config).client
    assert store_for(uri, config).client is first and S3Store(config).client is first
    with store_for(uri, config).publish(uri) as path:
        path.write_bytes(b"shared")
    assert store_for(uri, config).open_read(uri).read() == b"shared"
    assert store_for(uri, S3Config(endpoint_url=config.endpoint_url)).client is not first
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")  # what boto3 reads where the config is empty
    assert store_for(uri, config).client is not first
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    assert store_for(uri, config).client is first

    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # the child: its own client, which works
        try:
            same = store_for(uri, config).client is first
            body = store_for(uri, config).open_read(uri).read()
            os.write(write, b"same" if same else body)
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(child, 0)
    assert os.read(read, 100) == b"shared"
