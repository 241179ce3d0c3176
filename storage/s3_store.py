"""The object store on S3 (or any S3-compatible endpoint: MinIO, moto's server): ranged streaming reads,
publishing by a hidden temporary key then a copy, one boto3 client per process and configuration."""

import fnmatch
import io
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from storage.objectstore import (
    READ_BUFFER,
    ObjectChangedError,
    ObjectInfo,
    ObjectStore,
    S3Config,
    StoreError,
    join,
    split_s3_uri,
)

log = logging.getLogger(__name__)


class _S3RangeReader(io.RawIOBase):
    """Raw stream over an S3 object that re-opens at the current offset when a read breaks off.

    Seekable through ranged GETs, so Parquet readers can jump to the footer and to row groups.
    """

    def __init__(self, client, bucket: str, key: str, size: int, attempts: int = 5, etag: str | None = None):
        self._client, self._bucket, self._key, self._size = client, bucket, key, size
        self._pos, self._body, self._attempts, self._etag = 0, None, attempts, etag

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        target = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence] + offset
        if target != self._pos:
            self._pos = max(0, target)
            if self._body is not None:
                self._body.close()
                self._body = None
        return self._pos

    def _open(self):
        from botocore.exceptions import ClientError

        # If-Match: a re-opened range must come from the same object version as the bytes before it.
        extra = {"IfMatch": f'"{self._etag}"'} if self._etag else {}
        try:
            response = self._client.get_object(Bucket=self._bucket, Key=self._key, Range=f"bytes={self._pos}-", **extra)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412"):
                uri = f"s3://{self._bucket}/{self._key}"
                raise ObjectChangedError(uri, f"etag={self._etag}", None) from None
            raise
        self._body = response["Body"]

    def readinto(self, buffer) -> int:
        if self._pos >= self._size:
            return 0
        from botocore.exceptions import BotoCoreError, ClientError

        for attempt in range(self._attempts):
            try:
                if self._body is None:
                    self._open()
                chunk = self._body.read(len(buffer))
                if not chunk and self._pos < self._size:
                    raise ConnectionError("stream ended early")
                buffer[: len(chunk)] = chunk
                self._pos += len(chunk)
                return len(chunk)
            except (BotoCoreError, ConnectionError, OSError, ClientError):
                if self._body is not None:
                    try:
                        self._body.close()
                    except Exception:  # already broken: closing is best effort
                        pass
                self._body = None
                if attempt == self._attempts - 1:
                    uri = f"s3://{self._bucket}/{self._key}"
                    raise StoreError(f"reading {uri} failed {self._attempts} times at byte {self._pos}") from None
                time.sleep(min(8.0, 0.5 * 2**attempt))  # let a flapping endpoint come back
        return 0

    def close(self):
        if self._body is not None:
            self._body.close()
        super().close()


# What boto3 reads from the environment when a field of S3Config is empty: a client made under other values
# is another client.
AWS_ENVIRONMENT = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
)
_clients: dict[tuple, object] = {}
_clients_lock = threading.Lock()


def s3_client(config: S3Config):
    """The process's boto3 client for this configuration, made on first use. A client is thread-safe and
    holds the connection pool, so every store, file switch and download of a process shares one instead
    of paying for a client and new connections each time (a session is not thread-safe: made under the
    lock). Keyed by process too: a forked child makes its own rather than share its parent's sockets."""
    key = (os.getpid(), config, tuple(os.environ.get(name) for name in AWS_ENVIRONMENT))
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            client = _clients[key] = _new_client(config)
    return client


def _new_client(c: S3Config):
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        "s3",
        endpoint_url=c.endpoint_url or None,
        aws_access_key_id=c.access_key_id or None,
        aws_secret_access_key=c.secret_access_key or None,
        region_name=c.region_name or None,
        # Retries with backoff on throttling, 5xx and dropped connections.
        # More connections than botocore's 10: find_row_groups reads 16 files' footers at once.
        config=Config(
            retries={"max_attempts": 10, "mode": "standard"},
            connect_timeout=10,
            read_timeout=60,
            max_pool_connections=32,
        ),
    )


class S3Store(ObjectStore):
    def __init__(self, config: S3Config | None = None):
        self.config = config or S3Config()

    @property
    def client(self):
        return s3_client(self.config)

    @contextmanager
    def _errors(self, uri: str):
        from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError

        try:
            yield
        except NoCredentialsError:
            raise StoreError(
                f"no S3 credentials for {uri}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "(or the Airflow connection yt8m_s3)"
            ) from None
        except EndpointConnectionError as exc:
            raise StoreError(f"cannot reach the S3 endpoint for {uri}: {exc}") from None
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchBucket", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"):
                raise StoreError(f"S3 refused {uri}: {code}") from None
            # anything else an endpoint answers (404 for a bucket, 501 for a call it lacks: not S3, or not all of it)
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "?")
            message = exc.response.get("Error", {}).get("Message", "") or str(exc)
            raise StoreError(f"the S3 endpoint answered {status} {code} for {uri}: {message}") from None
        except BotoCoreError as exc:
            raise StoreError(f"S3 failed for {uri}: {exc}") from None

    def list(self, uri: str, pattern: str = "*") -> list[ObjectInfo]:
        bucket, prefix = split_s3_uri(uri)
        prefix = prefix.rstrip("/") + "/" if prefix else ""
        found = []
        with self._errors(uri):
            for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=prefix, Delimiter="/"
            ):
                for obj in page.get("Contents", []):
                    name = obj["Key"][len(prefix) :]
                    if fnmatch.fnmatchcase(name, pattern) and not name.startswith("."):
                        found.append(
                            ObjectInfo(f"s3://{bucket}/{obj['Key']}", obj["Size"], f"etag={obj['ETag'].strip(chr(34))}")
                        )
        return sorted(found, key=lambda o: o.uri)

    def info(self, uri: str) -> ObjectInfo | None:
        from botocore.exceptions import ClientError

        bucket, key = split_s3_uri(uri)
        with self._errors(uri):
            try:
                head = self.client.head_object(Bucket=bucket, Key=key)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                    return None
                raise
        return ObjectInfo(uri, head["ContentLength"], f"etag={head['ETag'].strip(chr(34))}")

    def open_read(self, uri: str, fingerprint: str | None = None) -> BinaryIO:
        info = self.info(uri)
        if fingerprint is not None and (info is None or info.fingerprint != fingerprint):
            raise ObjectChangedError(uri, fingerprint, info.fingerprint if info else None)
        if info is None:
            raise StoreError(f"no such object: {uri}")
        bucket, key = split_s3_uri(uri)
        etag = info.fingerprint.removeprefix("etag=")
        return io.BufferedReader(
            _S3RangeReader(self.client, bucket, key, info.size, etag=etag), buffer_size=READ_BUFFER
        )

    @contextmanager
    def publish(self, uri: str) -> Iterator[Path]:
        bucket, key = split_s3_uri(uri)
        with tempfile.TemporaryDirectory(prefix=f"{_PUBLISH_PREFIX}{os.getpid()}-") as tmp:
            path = Path(tmp) / Path(key).name
            yield path
            with self._errors(uri):
                self.client.upload_file(str(path), bucket, key)

    def remove_stale_temporaries(self, uri: str) -> "list[str]":
        """A writer SIGKILLed inside publish() leaves its local temporary folder (named after its pid) and,
        killed mid-upload, an incomplete multipart upload of `uri`, which S3 keeps (and bills) forever."""
        bucket, key = split_s3_uri(uri)
        return self._remove_temporaries(uri, bucket, key, lambda found: found == key)

    def remove_stale_temporaries_in(self, folder_uri: str, name: "re.Pattern[str]") -> "list[str]":
        bucket, prefix = split_s3_uri(folder_uri)
        prefix = prefix.rstrip("/") + "/"
        return self._remove_temporaries(
            folder_uri,
            bucket,
            prefix,
            lambda found: "/" not in found[len(prefix) :] and bool(name.fullmatch(found[len(prefix) :])),
        )

    def _remove_temporaries(self, uri: str, bucket: str, prefix: str, of) -> "list[str]":
        removed = []
        for folder in Path(tempfile.gettempdir()).glob(f"{_PUBLISH_PREFIX}*-*"):
            pid = folder.name[len(_PUBLISH_PREFIX) :].split("-", 1)[0]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(str(folder))
        try:
            with self._errors(uri):
                uploads = self.client.list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads", [])
                for upload in uploads:
                    if of(upload["Key"]):
                        self.client.abort_multipart_upload(
                            Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                        )
                        removed.append(
                            f"s3://{bucket}/{upload['Key']} (incomplete multipart upload {upload['UploadId']})"
                        )
        except (
            StoreError
        ) as exc:  # e.g. no s3:ListBucketMultipartUploads permission: a leftover costs storage, not correctness
            log.warning("could not clean up incomplete uploads of %s: %s", uri, exc)
        return removed

    def delete(self, uri: str) -> None:
        bucket, key = split_s3_uri(uri)
        with self._errors(uri):
            self.client.delete_object(Bucket=bucket, Key=key)

    def check_writable(self, uri: str) -> None:
        # A probe object (hidden from listings by its leading dot) is the only check that proves PutObject.
        probe = join(uri, f".vtag-write-probe-{os.getpid()}")
        bucket, key = split_s3_uri(probe)
        with self._errors(uri):
            self.client.put_object(Bucket=bucket, Key=key, Body=b"")
            self.client.delete_object(Bucket=bucket, Key=key)


_PUBLISH_PREFIX = "vtag-publish-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True
