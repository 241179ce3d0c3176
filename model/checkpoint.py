"""Checkpoints in the object store: written atomically, loaded as weights-only pickles (no code runs).

A model version points at content that cannot change: the run's final checkpoint (written once, never
overwritten with other weights) or, for a checkpoint registered under a name training rewrites (last.pt,
epoch-NNN.pt, any other), a content-addressed copy beside it (`registered/sha256-<16 hex>.pt`). The
registry keeps the sha256 of that content and every load of a version's checkpoint checks it.
"""

import dataclasses
import fcntl
import hashlib
import io
import logging
import os
import re
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

import torch

from model.config import Config, ConfigError
from storage.errors import VtagError
from storage.objectstore import LocalStore, S3Config, join, store_for

FORMAT = "vtag-checkpoint-1"
WEIGHTS_FORMAT = "vtag-weights-1"  # an inference artifact: config and weights, no training state
LAST = "last.pt"
LOSS_PLOT = "loss.png"
REGISTERED = "registered"
KEEP_EPOCHS = 3  # epoch checkpoints kept besides last.pt (a seed-size one is ~1 GB with its optimizer)
HASH_CHUNK = 8 * 1024 * 1024
FINAL_NAME = re.compile(r"final-step\d{7,}\.pt")
REGISTERED_NAME = re.compile(r"sha256-(?P<prefix>[0-9a-f]{16})\.pt")
# What a training run publishes into its folder (evaluation plots are not swept: an evaluation may be
# writing one), whose temporaries a killed save leaves.
RUN_FILE = re.compile(r"last\.pt|epoch-\d{3,}\.pt|final-step\d{7,}(\.pt|\.weights\.pt|-loss\.png)|loss\.png")

log = logging.getLogger(__name__)


class CheckpointError(VtagError, ValueError):
    pass


class CheckpointChangedError(CheckpointError):
    """A registered checkpoint whose bytes are no longer those recorded when it was registered."""

    def __init__(self, uri: str, expected: str, found: str):
        super().__init__(
            f"checkpoint {uri} changed since it was registered (sha256 {expected}, now {found}): "
            "refusing to use weights that are not the version's"
        )
        self.uri, self.expected, self.found = uri, expected, found


class FolderInUse(CheckpointError):
    """Another run is training into the same folder: two writers would mix their checkpoints."""


LOCK_NAME = ".vtag-train.lock"  # a dot file: listings, sweeps and registrations never see it


@contextmanager
def one_writer(out_uri: str, s3: S3Config | None = None) -> Iterator[None]:
    """Hold a local training folder for one run: a second run into it is refused in one line naming the
    holder. The lock is the kernel's (flock), so a run that dies, however, releases it; the file keeps who
    held it last. An S3 folder is not locked (the DAG gives each run a folder of its own)."""
    if not isinstance(store_for(out_uri, s3), LocalStore):
        yield
        return
    folder = LocalStore.path(out_uri)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise CheckpointError(f"cannot write the training folder {out_uri}: {exc.strerror or exc}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
            raise FolderInUse(
                f"{out_uri} is being trained into by {holder}: one run writes a training folder at a time "
                "(wait for it to end, or train into another folder)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC".encode(), 0)  # fmt: skip
        yield
    finally:
        os.close(fd)


def epoch_uri(out_uri: str, epoch: int) -> str:
    return join(out_uri, f"epoch-{epoch:03d}.pt")


def final_uri(out_uri: str, step: int) -> str:
    """The immutable checkpoint of a run's end: model versions point at it, never at last.pt."""
    return join(out_uri, f"final-step{step:07d}.pt")


def loss_plot_uri(checkpoint_uri: str) -> str:
    """The loss curve of exactly this checkpoint's training, under the checkpoint's own key (a model
    version's checkpoint never changes, so neither does its curve): `final-step0000120-loss.png`."""
    return checkpoint_uri.removesuffix(".pt") + "-loss.png"


def save(uri: str, state: dict, s3: S3Config | None = None) -> str:
    save_hashed(uri, state, s3)
    return uri


def save_hashed(uri: str, state: dict, s3: S3Config | None = None, kind: str = FORMAT) -> str:
    """Publish the checkpoint (or, with `kind` WEIGHTS_FORMAT, an inference artifact); returns the sha256
    of the bytes published (hashed from the local file before it becomes visible, so no second read of a
    1 GB object)."""
    with store_for(uri, s3).publish(uri) as path:
        # Into a file object, not a path: given a path, torch names the archive inside after the file
        # (here publish's random temporary), and equal states would hash differently.
        with open(path, "wb") as f:
            torch.save({**state, "format": kind}, f)
        with open(path, "rb") as f:
            return _sha256_stream(f)


def weights_uri(checkpoint_uri: str) -> str:
    """The inference artifact of exactly this (immutable) checkpoint, under its key: `final-step0000120.weights.pt`."""
    return checkpoint_uri.removesuffix(".pt") + ".weights.pt"


def publish_weights(checkpoint_uri: str, state: dict, s3: S3Config | None = None) -> tuple[str, str]:
    """Write a version's inference artifact beside its checkpoint: the config and weights of `state` (the
    checkpoint's, already checked by `model_of`), without the optimizer state and history that make a
    checkpoint several times larger. Returns (URI, sha256). One already there is kept if it holds these
    weights (a version registered again), refused if it holds others."""
    uri = weights_uri(checkpoint_uri)
    if store_for(uri, s3).exists(uri):
        sha256 = sha256_of(uri, s3)
        existing = load_weights(uri, s3, sha256)
        if not same_weights(existing.get("model", {}), state["model"]):
            raise CheckpointError(
                f"{uri} exists with other weights than {checkpoint_uri}'s: move it away to register it"
            )
        return uri, sha256
    artifact = {k: state[k] for k in ("config", "architecture", "model") if k in state}
    return uri, save_hashed(uri, artifact, s3, kind=WEIGHTS_FORMAT)


def same_weights(theirs: dict, mine: dict) -> bool:
    return theirs.keys() == mine.keys() and all(torch.equal(theirs[k], mine[k].cpu()) for k in mine)


def load_weights(uri: str, s3: S3Config | None = None, sha256: str | None = None) -> dict:
    """An inference artifact's state, read once: hashed while it is read (checked against `sha256`, the
    registry's, before anything is unpickled) and memory-mapped, so that its tensors are the file's pages
    instead of a copy. A local file is hashed and mapped through the one open descriptor (a file renamed
    over it meanwhile changes neither); an object in S3 is streamed into a local temporary first."""
    import tempfile

    store = store_for(uri, s3)
    if isinstance(store, LocalStore):
        try:
            f = open(LocalStore.path(uri), "rb")
        except FileNotFoundError:
            raise CheckpointError(f"no inference artifact at {uri}") from None
        with f:
            _check_sha256(uri, _sha256_stream(f), sha256)
            return _parse_file(f"/proc/self/fd/{f.fileno()}", uri, WEIGHTS_FORMAT)
    if not store.exists(uri):
        raise CheckpointError(f"no inference artifact at {uri}")
    with tempfile.NamedTemporaryFile(prefix="vtag-weights-", suffix=".pt") as local:
        digest = hashlib.sha256()
        with store.open_read(uri) as source:
            while chunk := source.read(HASH_CHUNK):
                digest.update(chunk)
                local.write(chunk)
        local.flush()
        _check_sha256(uri, digest.hexdigest(), sha256)
        return _parse_file(local.name, uri, WEIGHTS_FORMAT)


def _check_sha256(uri: str, found: str, expected: str | None) -> None:
    if expected is not None and found != expected:
        raise CheckpointChangedError(uri, expected, found)


def _sha256_stream(stream) -> str:
    digest = hashlib.sha256()
    while chunk := stream.read(HASH_CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


def sha256_of(uri: str, s3: S3Config | None = None, fingerprint: str | None = None) -> str:
    """The checkpoint's sha256, streamed (a seed-size checkpoint is ~1 GB)."""
    store = store_for(uri, s3)
    if fingerprint is None and not store.exists(uri):
        raise CheckpointError(f"no checkpoint at {uri}")
    with store.open_read(uri, fingerprint=fingerprint) as f:
        return _sha256_stream(f)


def is_immutable(uri: str) -> bool:
    """Whether nothing of ours ever rewrites the file at `uri`: a run's final checkpoint or a registered copy."""
    folder, _, name = uri.rstrip("/").rpartition("/")
    return bool(FINAL_NAME.fullmatch(name) or (REGISTERED_NAME.fullmatch(name) and folder.endswith(f"/{REGISTERED}")))


def registered_uri(registry_uri: str, sha256: str) -> str:
    """A registered copy's place: the models store's own registry folder, never beside the file given."""
    return join(registry_uri, f"sha256-{sha256[:16]}.pt")


def content(uri: str, s3: S3Config | None = None) -> tuple[str, str]:
    """(sha256, fingerprint) of the checkpoint at `uri` now; the fingerprint pins that version of it."""
    info = store_for(uri, s3).info(uri)
    if info is None:
        raise CheckpointError(f"no checkpoint at {uri}")
    sha256 = sha256_of(uri, s3, fingerprint=info.fingerprint)
    _check_registered_name(uri, sha256)
    return sha256, info.fingerprint


def freeze(uri: str, sha256: str, fingerprint: str, registry_uri: str, s3: S3Config | None = None) -> str:
    """A URI whose content cannot change holding the bytes hashed by `content`: `uri` itself if it is
    immutable, else a content-addressed copy in `registry_uri` (the models store's `registered/` folder),
    made unless it is already there. Call it only once the checkpoint has been validated."""
    if is_immutable(uri):
        return uri
    frozen = registered_uri(registry_uri, sha256)
    store = store_for(frozen, s3)
    if store.exists(frozen):
        found = sha256_of(frozen, s3)
        if found != sha256:
            raise CheckpointError(
                f"{frozen} exists with other content (sha256 {found}, expected {sha256}): "
                f"it was altered; move it away to register {uri}"
            )
        return frozen
    with store.publish(frozen) as path:
        # The pinned fingerprint: a training run that rewrote `uri` since it was hashed fails the copy
        # (ObjectChangedError) instead of copying other bytes under this hash.
        with store_for(uri, s3).open_read(uri, fingerprint=fingerprint) as source, open(path, "wb") as target:
            shutil.copyfileobj(source, target, HASH_CHUNK)
        with open(path, "rb") as copied:
            if (found := _sha256_stream(copied)) != sha256:
                raise CheckpointError(f"{uri} changed while being copied to {frozen} (sha256 {sha256}, then {found})")
    log.info("registered checkpoint %s as its immutable copy %s", uri, frozen)
    return frozen


def _check_registered_name(uri: str, sha256: str) -> None:
    match = REGISTERED_NAME.fullmatch(uri.rsplit("/", 1)[-1])
    if match and not sha256.startswith(match["prefix"]):
        raise CheckpointError(f"{uri} does not hold the content its name says (sha256 {sha256}): it was altered")


def load(uri: str, s3: S3Config | None = None, sha256: str | None = None) -> dict:
    """The checkpoint's state. With `sha256` (a model version's, from the registry), the very bytes
    loaded are checked against it before they are unpickled: CheckpointChangedError if they are not
    the registered ones."""
    data = _read(uri, s3)
    if sha256 is not None and (found := hashlib.sha256(data).hexdigest()) != sha256:
        raise CheckpointChangedError(uri, sha256, found)
    return _parse(data, uri)


def load_hashed(uri: str, s3: S3Config | None = None) -> tuple[dict, str]:
    """The checkpoint's state and the sha256 of the bytes it was read from."""
    data = _read(uri, s3)
    return _parse(data, uri), hashlib.sha256(data).hexdigest()


def _read(uri: str, s3: S3Config | None) -> bytes:
    store = store_for(uri, s3)
    if not store.exists(uri):
        raise CheckpointError(f"no checkpoint at {uri}")
    with store.open_read(uri) as f:
        return f.read()


def _parse(data: bytes, uri: str) -> dict:
    return _parse_file(io.BytesIO(data), uri, FORMAT)


def _parse_file(source, uri: str, kind: str) -> dict:
    """torch.load, weights only (no code from the file runs), memory-mapped when `source` is a path; every
    failure one line of ours, never torch's advice to load it unrestricted."""
    what = "vtag checkpoint" if kind == FORMAT else "vtag inference artifact"
    try:
        state = torch.load(source, map_location="cpu", weights_only=True, mmap=isinstance(source, str))
    except Exception as exc:
        if "Weights only load failed" in str(exc):
            reason = "it holds Python objects besides tensors and plain data, refused: loading them would run code from the file"
        else:
            reason = f"not a PyTorch file ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
        raise CheckpointError(f"{uri} is not a {what}: {reason}") from None
    if not isinstance(state, dict) or state.get("format") != kind:
        found = state.get("format") if isinstance(state, dict) else None
        raise CheckpointError(f"{uri} is not a {what} (format {found!r}, expected {kind!r})")
    return state


def config_of(state: dict, uri: str) -> Config:
    try:
        return Config.from_dict(state["config"])
    except (ConfigError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{uri}: unreadable config: {exc}") from None


def check_architecture(state: dict, config: Config, uri: str) -> None:
    theirs = state.get("architecture")
    if isinstance(theirs, dict):
        # A field added to the architecture since the checkpoint was written held its default then.
        defaults = {f.name: f.default for f in dataclasses.fields(Config)}
        theirs = {**{k: defaults[k] for k in config.architecture() if k not in theirs}, **theirs}
    if theirs != config.architecture():
        raise CheckpointError(f"{uri} holds another architecture: {theirs} (this run: {config.architecture()})")


def model_of(state: dict, config: Config, uri: str, assign: bool = False) -> torch.nn.Module:
    """The checkpoint's model, built and loaded once its checks pass: the architecture its config names,
    every tensor of the shape that architecture has, every weight finite. Each failure is one line naming
    the file, before anything is registered or scored. `assign`: the model's parameters become the
    state's tensors (built without memory of its own first: a memory-mapped artifact is not copied)."""
    from model.networks import build_model

    check_architecture(state, config, uri)
    weights = state.get("model")
    if not isinstance(weights, dict):
        raise CheckpointError(f"{uri}: no model weights in it")
    if assign:
        with torch.device("meta"):
            model = build_model(config)
    else:
        model = build_model(config)
    try:
        model.load_state_dict(weights, assign=assign)
    except (RuntimeError, TypeError, KeyError) as exc:
        detail = " ".join(line.strip() for line in str(exc).splitlines()[1:3]) or str(exc)
        raise CheckpointError(f"{uri}: its weights do not fit its architecture: {detail}") from None
    bad = [n for n, t in weights.items() if torch.is_tensor(t) and t.is_floating_point() and not t.isfinite().all()]
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise CheckpointError(f"{uri}: non-finite (NaN or infinite) weights in {', '.join(bad[:3])}{more}")
    return model


def latest(out_uri: str, s3: S3Config | None = None) -> str | None:
    uri = join(out_uri, LAST)
    return uri if store_for(uri, s3).exists(uri) else None


def prune(out_uri: str, newest_epoch: int, s3: S3Config | None = None) -> None:
    """Delete the epoch checkpoint that fell out of the KEEP_EPOCHS most recent."""
    if newest_epoch > KEEP_EPOCHS:
        old = epoch_uri(out_uri, newest_epoch - KEEP_EPOCHS)
        store_for(old, s3).delete(old)


def sweep_temporaries(out_uri: str, s3: S3Config | None = None) -> list[str]:
    """Remove what saves killed mid-write left in a run's folder (the store's temporaries of any of the
    run's files, whatever epoch or step it was saving). Only while no other writer of the folder is
    alive: at the start of a run, by rank 0."""
    removed = store_for(out_uri, s3).remove_stale_temporaries_in(out_uri, RUN_FILE)
    if removed:
        log.warning(
            "removed %d leftover(s) of killed checkpoint saves in %s: %s", len(removed), out_uri, ", ".join(removed)
        )
    return removed
