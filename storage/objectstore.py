"""One small object-store interface addressed by URI: a plain path or file:// on local disk, s3://bucket/key.

Writes are published atomically: the writer fills a local temporary file, and only a complete file
becomes visible (os.replace on local disk; a single PutObject / CompleteMultipartUpload on S3, which
S3 makes visible all at once). Reads stream, so a 400 MB shard is never held in memory.
"""

import fnmatch
import os
import re
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlparse

from storage.errors import VtagError

READ_BUFFER = 8 * 1024 * 1024


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


# What a local file operation's OSError means, in the store's words: the one mapping LocalStore raises
# through (first match wins; OSError last).
_LOCAL_ERRORS = {
    "read folder": {
        FileNotFoundError: "no such folder: {uri}",
        NotADirectoryError: "not a folder: {uri}",
        PermissionError: "cannot read folder (permission denied): {uri}",
    },
    "read file": {
        FileNotFoundError: "no such file: {uri}",
        PermissionError: "cannot read file (permission denied): {uri}",
        IsADirectoryError: "{uri} is a folder, not a file",
    },
    "write": {
        PermissionError: "cannot write to {uri} (permission denied)",
        FileExistsError: "cannot write to {uri}: a file, not a folder, is in the way",
        NotADirectoryError: "cannot write to {uri}: part of the path is a file, not a folder",
        OSError: "cannot write to {uri}: {reason}",
    },
}


@contextmanager
def _local_errors(uri: str, doing: str) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        line = next((text for kind, text in _LOCAL_ERRORS[doing].items() if isinstance(exc, kind)), None)
        if line is None:
            raise
        raise StoreError(line.format(uri=uri, reason=exc.strerror or exc)) from None


class LocalStore(ObjectStore):
    @staticmethod
    def path(uri: str) -> Path:
        return Path(urlparse(uri).path if uri.startswith("file://") else uri)

    def _info(self, path: Path, uri: str) -> ObjectInfo:
        st = path.stat()
        return ObjectInfo(uri, st.st_size, f"mtime_ns={st.st_mtime_ns}")

    def list(self, uri: str, pattern: str = "*") -> list[ObjectInfo]:
        folder = self.path(uri)
        with _local_errors(uri, "read folder"):
            names = sorted(os.listdir(folder))
        return [
            self._info(folder / name, join(uri, name))
            for name in names
            if fnmatch.fnmatchcase(name, pattern) and not name.startswith(".") and (folder / name).is_file()
        ]

    def open_read(self, uri: str, fingerprint: str | None = None) -> BinaryIO:
        with _local_errors(uri, "read file"):
            try:
                stream = open(self.path(uri), "rb", buffering=READ_BUFFER)
            except FileNotFoundError:
                if fingerprint is not None:  # pinned: the file it was is gone
                    raise ObjectChangedError(uri, fingerprint, None) from None
                raise
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
        with _local_errors(uri, "write"):
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(prefix=".vtag-write-probe-", dir=folder):
                pass


def split_s3_uri(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise StoreError(f"not an s3://bucket/key URI: {uri}")
    return parsed.netloc, parsed.path.lstrip("/")


def store_for(uri: str, s3: S3Config | None = None) -> ObjectStore:
    """The store that serves `uri`: local disk for a path or file://, S3 for s3://."""
    if not uri:
        raise StoreError("empty URI")
    scheme = urlparse(uri).scheme
    if scheme in ("", "file"):
        return LocalStore()
    if scheme == "s3":
        from storage.s3_store import S3Store

        split_s3_uri(uri)
        return S3Store(s3)
    raise StoreError(f"unsupported URI scheme {scheme!r} in {uri!r} (use a path, file:// or s3://)")
