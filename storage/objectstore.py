"""One small object-store interface addressed by URI: a plain path or file:// on local disk, s3://bucket/key.

Writes are published atomically: the writer fills a local temporary file, and only a complete file
becomes visible (os.replace on local disk; a single PutObject / CompleteMultipartUpload on S3, which
S3 makes visible all at once). Reads stream, so a 400 MB shard is never held in memory.
"""

import fnmatch
import io
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlparse

from storage.errors import VtagError

READ_BUFFER = 8 * 1024 * 1024

log = logging.getLogger(__name__)


class StoreError(VtagError):
    """A URI that cannot be used: bad scheme, missing location, missing credentials. One clear line."""


class ObjectChangedError(StoreError):
    """An object whose content changed since its fingerprint was taken (replaced while being read)."""

    def __init__(self, uri: str, expected: str, found: str | None):
        super().__init__(
            f"{uri} changed while in use (fingerprint {expected} when planned, "
            f"{found or 'gone'} now): rerun to use its new content"
        )
        self.uri, self.expected, self.found = uri, expected, found


@dataclass(frozen=True)
class ObjectInfo:
    uri: str
    size: int
    fingerprint: str  # changes whenever the object's content may have changed (mtime on disk, ETag on S3)

    @property
    def name(self) -> str:
        return self.uri.rstrip("/").rsplit("/", 1)[-1]


@dataclass(frozen=True)
class S3Config:
    """How to reach S3. Empty fields fall back to boto3's own chain (AWS_* environment, profiles, roles)."""

    endpoint_url: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None
    region_name: str | None = None


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def canonical_uri(uri: str) -> str:
    """The one spelling of a location, so that the manifest, catalogue and registry hold one key per object:
    a local path absolute and normalised (`file://`, relative, `..`, doubled and trailing slashes all
    removed), an S3 URI as s3://bucket/key without doubled or trailing slashes. Call it where a URI enters
    (command line, DAG params, task arguments); URIs built from a canonical one by `join` stay canonical.
    Symbolic links are kept as spelled: a link is a location the user chose."""
    if not uri or not uri.strip():
        raise StoreError("empty URI")
    uri = uri.strip()
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise StoreError(f"file:// URI on another host: {uri!r} (use a local path)")
        return os.path.abspath(unquote(parsed.path) or "/")
    if parsed.scheme == "":
        return os.path.abspath(os.path.expanduser(uri))
    if parsed.scheme == "s3":
        bucket, key = split_s3_uri(uri)
        key = "/".join(part for part in key.split("/") if part)
        return f"s3://{bucket}/{key}" if key else f"s3://{bucket}"
    store_for(uri)  # raises the one line naming the unsupported scheme
    return uri


class ObjectStore(ABC):
    @abstractmethod
    def list(self, uri: str, pattern: str = "*") -> list[ObjectInfo]:
        """Objects directly under the folder `uri` whose name matches the glob `pattern`, sorted by URI."""

    @abstractmethod
    def open_read(self, uri: str, fingerprint: str | None = None) -> BinaryIO:
        """A buffered binary stream over the object. With `fingerprint` (from an earlier `info` or `list`),
        raises ObjectChangedError if the object is no longer that content, at the open and (on S3, where
        every ranged GET carries If-Match) at any later read."""

    @abstractmethod
    def info(self, uri: str) -> ObjectInfo | None:
        """The object's size and fingerprint, or None if it does not exist."""

    @abstractmethod
    def publish(self, uri: str) -> AbstractContextManager[Path]:
        """Context manager yielding a local path to write; the object appears at `uri` only on clean exit."""

    @abstractmethod
    def delete(self, uri: str) -> None: ...

    @abstractmethod
    def check_writable(self, uri: str) -> None:
        """Raise StoreError, naming `uri`, unless objects can be written under the folder `uri` (credentials,
        permissions): checked before any work whose results would have nowhere to go."""

    def remove_stale_temporaries(self, uri: str) -> "list[str]":
        """Remove what killed writers of `uri` left behind; returns what was removed. Call it only while
        no other writer of `uri` is alive (a retry of the same task, which runs after its try died)."""
        return []

    def remove_stale_temporaries_in(self, folder_uri: str, name: "re.Pattern[str]") -> "list[str]":
        """As remove_stale_temporaries, for every object directly under `folder_uri` whose name matches
        `name`, whatever it is called (a run's epoch checkpoints, however many there were)."""
        return []

    def exists(self, uri: str) -> bool:
        return self.info(uri) is not None


# LocalStore.publish's hidden temporary of an object `name`: mkstemp's names, exactly.
_PUBLISH_TEMPORARY = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp")


class LocalStore(ObjectStore):
    @staticmethod
    def path(uri: str) -> Path:
        return Path(urlparse(uri).path if uri.startswith("file://") else uri)

    def _info(self, path: Path, uri: str) -> ObjectInfo:
        st = path.stat()
        return ObjectInfo(uri, st.st_size, f"mtime_ns={st.st_mtime_ns}")

    def list(self, uri: str, pattern: str = "*") -> list[ObjectInfo]:
        folder = self.path(uri)
        try:
            names = sorted(os.listdir(folder))
        except FileNotFoundError:
            raise StoreError(f"no such folder: {uri}") from None
        except NotADirectoryError:
            raise StoreError(f"not a folder: {uri}") from None
        except PermissionError:
            raise StoreError(f"cannot read folder (permission denied): {uri}") from None
        return [
            self._info(folder / name, join(uri, name))
            for name in names
            if fnmatch.fnmatchcase(name, pattern) and not name.startswith(".") and (folder / name).is_file()
        ]

    def open_read(self, uri: str, fingerprint: str | None = None) -> BinaryIO:
        try:
            stream = open(self.path(uri), "rb", buffering=READ_BUFFER)
        except FileNotFoundError:
            if fingerprint is not None:
                raise ObjectChangedError(uri, fingerprint, None) from None
            raise StoreError(f"no such file: {uri}") from None
        except PermissionError:
            raise StoreError(f"cannot read file (permission denied): {uri}") from None
        except IsADirectoryError:
            raise StoreError(f"{uri} is a folder, not a file") from None
        if fingerprint is not None:
            # Writers publish by rename, so the open file keeps the content it had at this check.
            found = f"mtime_ns={os.fstat(stream.fileno()).st_mtime_ns}"
            if found != fingerprint:
                stream.close()
                raise ObjectChangedError(uri, fingerprint, found)
        return stream

    def info(self, uri: str) -> ObjectInfo | None:
        path = self.path(uri)
        return self._info(path, uri) if path.is_file() else None

    @contextmanager
    def publish(self, uri: str) -> Iterator[Path]:
        final = self.path(uri)
        final.parent.mkdir(parents=True, exist_ok=True)
        # Hidden and in the same folder, so the rename is atomic and listings never show it.
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        try:
            yield tmp_path
            with open(tmp_path, "rb+") as f:
                os.fsync(f.fileno())
            os.chmod(tmp_path, 0o644)  # mkstemp's 0600 would hide the object from other users
            os.replace(tmp_path, final)
        finally:
            tmp_path.unlink(missing_ok=True)

    def remove_stale_temporaries(self, uri: str) -> "list[str]":
        final = self.path(uri)
        return self._remove_temporaries(final.parent, lambda name: name == final.name)

    def remove_stale_temporaries_in(self, folder_uri: str, name: "re.Pattern[str]") -> "list[str]":
        return self._remove_temporaries(self.path(folder_uri), name.fullmatch)

    @staticmethod
    def _remove_temporaries(folder: Path, of) -> "list[str]":
        # A writer SIGKILLed inside publish() never reaches its `finally`: its hidden temporary stays.
        try:
            entries = os.listdir(folder)
        except (FileNotFoundError, NotADirectoryError):
            return []
        removed = []
        for entry in entries:
            if (match := _PUBLISH_TEMPORARY.fullmatch(entry)) and of(match["name"]):
                (folder / entry).unlink(missing_ok=True)
                removed.append(str(folder / entry))
        return removed

    def delete(self, uri: str) -> None:
        self.path(uri).unlink(missing_ok=True)

    def check_writable(self, uri: str) -> None:
        folder = self.path(uri)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(prefix=".vtag-write-probe-", dir=folder):
                pass
        except PermissionError:
            raise StoreError(f"cannot write to {uri} (permission denied)") from None
        except FileExistsError:
            raise StoreError(f"cannot write to {uri}: a file, not a folder, is in the way") from None
        except NotADirectoryError:
            raise StoreError(f"cannot write to {uri}: part of the path is a file, not a folder") from None
        except OSError as exc:
            raise StoreError(f"cannot write to {uri}: {exc.strerror or exc}") from None


def split_s3_uri(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise StoreError(f"not an s3://bucket/key URI: {uri}")
    return parsed.netloc, parsed.path.lstrip("/")


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


def store_for(uri: str, s3: S3Config | None = None) -> ObjectStore:
    """The store that serves `uri`: local disk for a path or file://, S3 for s3://."""
    if not uri:
        raise StoreError("empty URI")
    scheme = urlparse(uri).scheme
    if scheme in ("", "file"):
        return LocalStore()
    if scheme == "s3":
        split_s3_uri(uri)
        return S3Store(s3)
    raise StoreError(f"unsupported URI scheme {scheme!r} in {uri!r} (use a path, file:// or s3://)")
