"""What a night is asked (`NightRequest`), and its plan (`NightPlan`): the run started and what it must
score cut into parts, contiguous ranges of Parquet files of about `part_videos` videos each (a small
night is one part, a full rescore of 6.1 M videos about 25, never more than MAX_PARTS)."""

import fnmatch
import logging
import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime

from storage.database import db, partitions, pending, registry, run_locks, runs
from storage.errors import VtagError
from storage.formats import exports
from storage.formats.yt8m_spec import FRAME, NUL_REFUSED, NUM_CLASSES, SEGMENT_CLASSES, TOP_K
from storage.formats.yt8m_spec import SEGMENT_METHODS as METHODS
from storage.objectstore import S3Config, StoreError, canonical_uri, join, store_for
from tasks import settings

log = logging.getLogger(__name__)

MAX_K = NUM_CLASSES
PART_VIDEOS = 250_000  # about 25 s of a GPU at the 10,000 videos/s target: worth a task's start-up
MAX_PARTS = 512  # well under Airflow's [core] max_map_length (1,024)
MAX_SEGMENTS = len(SEGMENT_CLASSES)  # a video's best segments: at most one per rated class's worth


class InferenceError(VtagError, ValueError):
    pass


class NoProductionModel(InferenceError):
    pass


@dataclass(frozen=True)
class NightRequest:
    """What a night is asked to do. A whole night scores what the model has not scored up to
    `logical_date`; a targeted one (`video_ids`, or files matching `shard_pattern`) rescores those, its rows
    replacing the version's earlier ones when it publishes. `model_version` or `checkpoint_uri` (registered
    if it is not yet) names the model, else the level's production one."""

    logical_date: datetime
    top_k: int = TOP_K
    level: str = "frame"
    model_version: int | None = None
    checkpoint_uri: str | None = None
    video_ids: tuple[str, ...] | None = None
    shard_pattern: str | None = None
    exports_uri: str | None = None  # default: the night's folder under settings.default_exports_uri()
    airflow_run_id: str | None = None
    part_videos: int = PART_VIDEOS
    segments: int = 0  # each video's best segments to store (frame level; 0: none), scored by segment_method
    segment_method: str = "attention"

    @property
    def whole(self) -> bool:
        return not (self.video_ids or self.shard_pattern)

    def checked(self) -> "NightRequest":
        """The request in canonical form (its date in UTC, its ids sorted once each), or InferenceError
        naming what is wrong: checked before the database is, so that a bad request fails the same
        everywhere and leaves no run row."""
        if not 1 <= self.top_k <= MAX_K:
            raise InferenceError(f"top_k must be in 1..{MAX_K}, not {self.top_k}")
        if self.logical_date.tzinfo is None:
            raise InferenceError(f"logical date {self.logical_date} has no time zone")
        if not (isinstance(self.part_videos, int) and self.part_videos >= 1):
            raise InferenceError(f"part_videos must be a whole number of videos, at least 1, not {self.part_videos!r}")
        if not (isinstance(self.segments, int) and 0 <= self.segments <= MAX_SEGMENTS):
            raise InferenceError(f"segments must be a whole number in 0..{MAX_SEGMENTS}, not {self.segments!r}")
        if self.segment_method not in METHODS:
            raise InferenceError(f"segment_method must be one of {', '.join(METHODS)}, not {self.segment_method!r}")
        if nul := [v for v in self.video_ids or () if "\x00" in v]:
            raise InferenceError(f"video id {nul[0]!r} holds a NUL byte ({NUL_REFUSED})")
        return replace(
            self,
            logical_date=self.logical_date.astimezone(UTC),  # SQLite keeps no offset: compare in UTC everywhere
            video_ids=tuple(sorted(set(self.video_ids))) if self.video_ids else None,
        )


@dataclass
class NightPlan:
    """What every part of a night needs to know; JSON-serialisable for XCom (`as_dict`/`from_dict`)."""

    run_id: int
    model_version: int
    checkpoint_uri: str
    level: str
    top_k: int
    logical_date: datetime
    exports_uri: str
    parts: list[dict]
    video_ids: list[str] | None = None
    shard_pattern: str | None = None
    rows_per_video: int | None = None  # top_k, or fewer when the model has fewer classes; None: top_k
    checkpoint_sha256: str | None = None  # the version's registered content, checked when a part loads it
    weights_uri: str | None = None  # its inference artifact, which parts load instead when it has one
    weights_sha256: str | None = None
    segments: int = 0  # each video's best segments the parts store (NightRequest.segments)
    segment_method: str = "attention"

    @property
    def weights(self) -> tuple[str, str] | None:
        return (self.weights_uri, self.weights_sha256) if self.weights_uri else None

    @property
    def k(self) -> int:
        return self.rows_per_video or self.top_k

    @property
    def whole(self) -> bool:
        return not (self.video_ids or self.shard_pattern)

    def as_dict(self) -> dict:
        return {**asdict(self), "logical_date": self.logical_date.isoformat()}

    @classmethod
    def from_dict(cls, values: dict) -> "NightPlan":
        known = {f.name for f in fields(cls)}  # a plan of an older release may carry what this one dropped
        values = {k: v for k, v in values.items() if k in known}
        return cls(**{**values, "logical_date": datetime.fromisoformat(values["logical_date"])})

    def part_table(self, part: int) -> str:
        return partitions.part_table_name(self.model_version, self.run_id, part)


@dataclass(frozen=True)
class Resolved:
    """A checked request, the registry row of the model version that scores it and, for a request naming
    videos, their Parquet files: looked up once."""

    request: NightRequest
    version: dict = field(repr=False)
    files_of: dict[str, str] | None = field(default=None, repr=False)  # {video id: Parquet URI}

    @property
    def number(self) -> int:
        return self.version["version"]

    @property
    def level(self) -> str:
        return self.version["level"]

    @property
    def weights(self) -> tuple[str, str] | None:
        return (self.version["weights_uri"], self.version["weights_sha256"]) if self.version["weights_uri"] else None

    @property
    def rows_per_video(self) -> int:
        """Rows each video gets: the top k, or every class of a model that has fewer."""
        config = self.version.get("config") or {}
        if isinstance(config, str):
            import json

            config = json.loads(config)
        return min(self.request.top_k, int(config.get("num_classes") or MAX_K))


def lock_timeout(seconds: float | None) -> float:
    """The caller's limit on waiting for another run's lock, else the deployment's ($VTAG_LOCK_TIMEOUT_S)."""
    return settings.lock_timeout_s(seconds, "lock_timeout_s")


def resolve(db_url: str, request: NightRequest, s3: S3Config | None = None) -> Resolved:
    """The request checked, then the model version it names (a checkpoint given by URI is registered if it
    is not yet), and the videos it names known to the catalogue."""
    request = request.checked()
    db.require_current(db_url)
    model_version = request.model_version
    if request.checkpoint_uri is not None:
        from tasks.training import ensure_registered

        model_version = ensure_registered(db_url, request.checkpoint_uri, s3)
    with db.transaction(db_url) as conn:
        if model_version is not None:
            version = registry.get_version(conn, model_version)
        elif (version := registry.production(conn, request.level)) is None:
            raise NoProductionModel(
                f"no production model for level {request.level!r} yet: train one (yt8m_train) or name a version"
            )
        files_of = known(conn, list(request.video_ids), version["level"]) if request.video_ids else None
    if request.segments and version["level"] != FRAME.name:
        raise InferenceError(
            f"segments: model version {version['version']} is a {version['level']}-level model; segments are "
            "scored from frames, by a frame-level one"
        )
    return Resolved(request, version, files_of)


def known(conn, video_ids: list[str], level: str) -> dict[str, str]:
    """{video id: its Parquet URI} for ids the catalogue holds at `level`; InferenceError naming the others."""
    found = pending.known_videos(conn, video_ids, level)
    missing = [v for v in video_ids if v not in found]
    if missing:
        raise InferenceError(
            f"never ingested at {level} level: {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}"
        )
    return found


def matches(uri: str, shard_pattern: str | None) -> bool:
    return shard_pattern is None or fnmatch.fnmatchcase(uri.rsplit("/", 1)[-1], shard_pattern)


def cut_parts(files: list[tuple[str, int]], part_videos: int = PART_VIDEOS, max_parts: int = MAX_PARTS) -> list[dict]:
    """Cut (Parquet URI, videos) in URI order into contiguous parts of at least `part_videos` videos
    (the last may hold fewer), so that no more than `max_parts` come out however large the night."""
    if part_videos < 1:
        raise InferenceError(f"part_videos must be at least 1, not {part_videos}")
    target = max(part_videos, math.ceil(sum(n for _, n in files) / max_parts))
    parts, start, videos = [], 0, 0
    for i, (_, count) in enumerate(files):
        videos += count
        if videos >= target or i == len(files) - 1:
            parts.append(
                {
                    "part": len(parts),
                    "first_uri": files[start][0],
                    "last_uri": files[i][0],
                    "files": i - start + 1,
                    "videos": videos,
                }
            )
            start, videos = i + 1, 0
    return parts


def _pending_files(conn, night: Resolved, run_id: int | None) -> list[tuple[str, int]]:
    request = night.request
    if night.files_of is not None:
        counts: dict[str, int] = {}
        for uri in night.files_of.values():
            counts[uri] = counts.get(uri, 0) + 1
        return sorted(counts.items())
    files = pending.pending_files(conn, night.number, request.logical_date, night.level, exclude_run=run_id)
    return [(uri, n) for uri, n in files if matches(uri, request.shard_pattern)]


def request_of(night: "NightRequest | Resolved | datetime", asked: dict) -> "NightRequest | Resolved":
    """A request as given, or built from a logical date and NightRequest's other fields as keywords (the
    form the command line and tests use)."""
    if isinstance(night, (NightRequest, Resolved)):
        if asked:
            raise TypeError(f"a request given whole takes no fields beside it: {', '.join(sorted(asked))}")
        return night
    return NightRequest(night, **asked)


def count_pending(
    db_url: str, night: "NightRequest | datetime", s3: S3Config | None = None, **asked
) -> tuple[int, int]:
    """A dry run: (model version, how many videos a run would score), writing nothing."""
    night = resolve(db_url, request_of(night, asked), s3)
    with db.transaction(db_url) as conn:
        files = _pending_files(conn, night, None)
    return night.number, sum(n for _, n in files)


def plan_night(
    db_url: str,
    night: "NightRequest | Resolved | datetime",
    s3: S3Config | None = None,
    *,
    locked: bool = False,
    lock_timeout_s: float | None = None,
    **asked,
) -> NightPlan:
    """Start the night's run and cut what it must score into parts. A whole night's rows, once published,
    replace the run's earlier ones; a targeted one adds to them (the given videos' earlier scores by the
    version replaced, when it publishes). `night`: a request, the Resolved one of a caller that looked its
    model up already, or a logical date with the request's other fields as keywords (`asked`). `locked`: the caller holds the night's run_lock; otherwise this waits for it at most
    `lock_timeout_s` (default: settings). Everything a caller gave is checked before the run's row exists:
    a refused request leaves no row."""
    night = request_of(night, asked)
    if not isinstance(night, Resolved):
        night = resolve(db_url, night, s3)
    request = night.request
    try:  # a URI no store serves fails now, not after the night has scored
        exports_uri = canonical_uri(
            request.exports_uri
            or exports.night_folder(settings.default_exports_uri(), request.logical_date, night.number)
        )
        store_for(exports_uri, s3)
    except StoreError as exc:
        raise InferenceError(f"exports: {exc}") from None
    engine = db.engine_for(db_url)
    with (
        nullcontext()
        if locked
        else run_locks.run_lock(engine, request.logical_date, night.number, timeout_s=lock_timeout(lock_timeout_s))
    ):
        with db.transaction(db_url) as conn:
            run_id = runs.start_run(
                conn, request.logical_date, night.number, request.top_k, request.airflow_run_id, clear=request.whole
            )
        try:
            with db.transaction(db_url) as conn:
                files = _pending_files(conn, night, run_id)
                parts = runs.record_parts(conn, run_id, cut_parts(files, request.part_videos))
        except BaseException as exc:  # never leave the night looking as if it were running
            fail_run(db_url, run_id, f"planning: {type(exc).__name__}: {exc}")
            raise
    if not request.whole and parts:  # a targeted rescoring's exports, beside the night's, not over them
        exports_uri = join(exports_uri, f"rescored-part{parts[0]['part']:05d}")
    log.info("run %d: %d videos in %d files, %d parts", run_id, sum(p["videos"] for p in parts), len(files), len(parts))
    version = night.version
    return NightPlan(
        run_id,
        night.number,
        version["checkpoint_uri"],
        night.level,
        request.top_k,
        request.logical_date,
        exports_uri,
        parts,
        list(request.video_ids) if request.video_ids else None,
        request.shard_pattern,
        night.rows_per_video,
        version["checkpoint_sha256"],
        version["weights_uri"],
        version["weights_sha256"],
        request.segments,
        request.segment_method,
    )


def fail_run(db_url: str, run_id: int, error: str) -> None:
    """Mark the night failed, in a transaction of its own: the work that failed rolled its own back."""
    with db.transaction(db_url) as conn:
        runs.finish_run(conn, run_id, error=error)
