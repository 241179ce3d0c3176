"""The model registry: model versions, their evaluations, and which one is in production."""

from dataclasses import dataclass

from sqlalchemy import Connection, Row, func, insert, select, update

from storage.database.db import utcnow
from storage.database.schema import evaluation_classes, evaluations, model_versions
from storage.errors import VtagError


class RegistryError(VtagError, ValueError):
    pass


def register(
    conn: Connection,
    *,
    level: str,
    preset: str,
    checkpoint_uri: str,
    config: dict,
    data_uri: str,
    train_split: str,
    epochs: int,
    steps: int,
    run_id: str | None = None,
    checkpoint_sha256: str | None = None,
    loss_plot_uri: str | None = None,
    weights: tuple[str, str] | None = None,
) -> int:
    """Record a trained model; registering the same checkpoint again returns its existing version.
    `checkpoint_sha256` is the content the version stands for: loads of its checkpoint verify it;
    `loss_plot_uri` its own loss curve (model.checkpoint.loss_plot_uri); `weights` (URI, sha256) its
    inference artifact (model.checkpoint.publish_weights), recorded on an existing version that lacks one."""
    existing = conn.execute(
        select(model_versions.c.version, model_versions.c.checkpoint_sha256).where(
            model_versions.c.checkpoint_uri == checkpoint_uri
        )
    ).first()
    if existing is not None:
        if existing.checkpoint_sha256 and checkpoint_sha256 and existing.checkpoint_sha256 != checkpoint_sha256:
            raise RegistryError(
                f"{checkpoint_uri} is model version {existing.version} with sha256 "
                f"{existing.checkpoint_sha256}, but now holds sha256 {checkpoint_sha256}: "
                "it changed since it was registered"
            )
        if weights is not None:
            conn.execute(
                update(model_versions)
                .where(model_versions.c.version == existing.version, model_versions.c.weights_uri.is_(None))
                .values(weights_uri=weights[0], weights_sha256=weights[1])
            )
        return existing.version
    return conn.execute(
        insert(model_versions)
        .values(
            level=level,
            preset=preset,
            checkpoint_uri=checkpoint_uri,
            config=config,
            data_uri=data_uri,
            train_split=train_split,
            epochs=epochs,
            steps=steps,
            status="trained",
            run_id=run_id,
            created_at=utcnow(),
            checkpoint_sha256=checkpoint_sha256,
            loss_plot_uri=loss_plot_uri,
            weights_uri=weights[0] if weights else None,
            weights_sha256=weights[1] if weights else None,
        )
        .returning(model_versions.c.version)
    ).scalar_one()


@dataclass(frozen=True)
class EvaluationRecord:
    """One evaluation of a version: what was scored (split, data, file pattern, and the exact videos as
    `set_fingerprint`), the four metrics, how many videos, how long, and its plot."""

    split: str
    data_uri: str
    pattern: str
    metrics: dict  # hit_at_one, perr, gap, map
    videos: int
    seconds: float
    plot_uri: str | None = None
    set_fingerprint: str | None = None
    class_ap: dict[int, tuple[int, float]] | None = None  # label_id -> (positives, average precision)


def record_evaluation(conn: Connection, version: int, record: EvaluationRecord) -> int:
    metrics = record.metrics
    evaluation_id = conn.execute(
        insert(evaluations)
        .values(
            model_version=version,
            split=record.split,
            data_uri=record.data_uri,
            pattern=record.pattern,
            hit_at_one=metrics["hit_at_one"],
            perr=metrics["perr"],
            gap=metrics["gap"],
            map=metrics["map"],
            videos=record.videos,
            seconds=record.seconds,
            plot_uri=record.plot_uri,
            evaluated_at=utcnow(),
            set_fingerprint=record.set_fingerprint,
        )
        .returning(evaluations.c.id)
    ).scalar_one()
    if record.class_ap:
        conn.execute(
            insert(evaluation_classes),
            [
                {"evaluation_id": evaluation_id, "label_id": label, "positives": n, "average_precision": ap}
                for label, (n, ap) in sorted(record.class_ap.items())
            ],
        )
    return evaluation_id


def version_by_checkpoint(conn: Connection, checkpoint_uri: str) -> int | None:
    return conn.execute(
        select(model_versions.c.version).where(model_versions.c.checkpoint_uri == checkpoint_uri)
    ).scalar()


def version_by_sha256(conn: Connection, checkpoint_sha256: str) -> int | None:
    """The first version registered with exactly these checkpoint bytes."""
    return conn.execute(
        select(func.min(model_versions.c.version)).where(model_versions.c.checkpoint_sha256 == checkpoint_sha256)
    ).scalar()


def get_version(conn: Connection, version: int) -> dict:
    """The version's row as a dict of its columns; `checkpoint_sha256` is None for a version registered
    before its content was recorded (unverified)."""
    row = conn.execute(select(model_versions).where(model_versions.c.version == version)).first()
    if row is None:
        raise RegistryError(f"model version {version} does not exist")
    return row._asdict()


def production(conn: Connection, level: str) -> dict | None:
    row = conn.execute(
        select(model_versions).where(model_versions.c.level == level, model_versions.c.status == "production")
    ).first()
    return row._asdict() if row else None


class NeedsEvaluation(RegistryError):
    """The production model has no evaluation on the candidate's evaluation set (the same videos, the same
    content: the evaluation's set_fingerprint): GAPs would not compare."""

    def __init__(self, version: int, checkpoint_uri: str, data_uri: str, split: str, pattern: str):
        super().__init__(
            f"production version {version} has no evaluation on the candidate's set ({data_uri} {split} {pattern} "
            "as it is now: the data changed while they were scored?)"
        )
        self.version, self.checkpoint_uri, self.data_uri, self.split, self.pattern = (
            version,
            checkpoint_uri,
            data_uri,
            split,
            pattern,
        )


def _latest_evaluation(conn, version: int, split: str, set_fingerprint: str | None = None):
    """The version's newest evaluation on `split`; with `set_fingerprint`, its newest on exactly that set."""
    query = select(evaluations).where(evaluations.c.model_version == version, evaluations.c.split == split)
    if set_fingerprint is not None:
        query = query.where(evaluations.c.set_fingerprint == set_fingerprint)
    return conn.execute(query.order_by(evaluations.c.id.desc()).limit(1)).first()


@dataclass(frozen=True)
class Standing:
    """A candidate next to production on the candidate's evaluation set: the rows a promotion compares."""

    candidate: Row
    evaluation: Row  # the candidate's latest evaluation on the split
    production: Row | None  # None: no production model at the candidate's level
    production_evaluation: Row | None  # production's latest on the very same videos and content

    def is_production(self) -> bool:
        return self.production is not None and self.production.version == self.candidate.version


def standing(conn: Connection, version: int, split: str = "validate", *, lock: bool = False) -> Standing:
    """Where `version` stands against production on its latest evaluation of `split`. Raises
    NeedsEvaluation when production was never scored on that set: the same videos with the same content
    (set_fingerprint; an evaluation from before it was recorded matches none). `lock` holds both rows (FOR UPDATE on
    PostgreSQL) until the caller's transaction ends, for a promotion decided on them."""

    def rows(query):
        return conn.execute(query.with_for_update() if lock else query)

    candidate = rows(select(model_versions).where(model_versions.c.version == version)).first()
    if candidate is None:
        raise RegistryError(f"model version {version} does not exist")
    mine = _latest_evaluation(conn, version, split)
    if mine is None:
        raise RegistryError(f"model version {version} has no evaluation on split {split!r}")
    current = rows(
        select(model_versions).where(model_versions.c.level == candidate.level, model_versions.c.status == "production")
    ).first()
    theirs = None
    if current is not None and current.version != version:
        theirs = _latest_evaluation(conn, current.version, split, mine.set_fingerprint or "")
        if theirs is None:
            raise NeedsEvaluation(current.version, current.checkpoint_uri, mine.data_uri, split, mine.pattern)
    return Standing(candidate, mine, current, theirs)


def make_production(conn: Connection, version: int, current: int | None) -> None:
    """`version` becomes its level's production model; `current` (the production it replaces) is archived."""
    if current is not None and current != version:
        conn.execute(update(model_versions).where(model_versions.c.version == current).values(status="archived"))
    conn.execute(
        update(model_versions)
        .where(model_versions.c.version == version)
        .values(status="production", promoted_at=utcnow())
    )


def reject(conn: Connection, version: int) -> None:
    conn.execute(update(model_versions).where(model_versions.c.version == version).values(status="rejected"))


def promote_if_better(conn: Connection, version: int, split: str = "validate") -> tuple[bool, str]:
    """Promote `version` to production if its GAP on `split` is at least the production model's GAP on
    the very same evaluation set (the same videos with the same content). Raises NeedsEvaluation when
    production was never scored on that set."""
    now = standing(conn, version, split, lock=True)
    if now.is_production():
        return True, f"version {version} is already in production"
    mine, theirs = now.evaluation, now.production_evaluation
    on = f"on the same {mine.videos:,} {split} videos"
    if theirs is not None and mine.gap < theirs.gap:
        reject(conn, version)
        return (
            False,
            f"version {version} GAP {mine.gap:.4f} < production version {now.production.version} "
            f"GAP {theirs.gap:.4f} {on}",
        )
    make_production(conn, version, now.production.version if now.production is not None else None)
    if theirs is None:
        return True, f"version {version} GAP {mine.gap:.4f} on {mine.videos:,} {split} videos promoted (no production model)"  # fmt: skip
    return True, (
        f"version {version} GAP {mine.gap:.4f} promoted (production version {now.production.version} "
        f"GAP {theirs.gap:.4f} {on})"
    )


def versions_with_latest_evaluation(conn: Connection) -> list[dict]:
    """Every model version with its most recent evaluation (if any), newest version first."""
    latest = (
        select(evaluations.c.model_version, func.max(evaluations.c.id).label("id"))
        .group_by(evaluations.c.model_version)
        .subquery()
    )
    query = (
        select(
            model_versions.c.version,
            model_versions.c.level,
            model_versions.c.preset,
            model_versions.c.status,
            model_versions.c.epochs,
            evaluations.c.split,
            evaluations.c.videos,
            evaluations.c.gap,
            evaluations.c.hit_at_one,
            evaluations.c.perr,
            evaluations.c.map,
            model_versions.c.checkpoint_uri,
        )
        .select_from(
            model_versions.outerjoin(latest, latest.c.model_version == model_versions.c.version).outerjoin(
                evaluations, evaluations.c.id == latest.c.id
            )
        )
        .order_by(model_versions.c.version.desc())
    )
    return [row._asdict() for row in conn.execute(query)]
