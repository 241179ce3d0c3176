"""Read-only queries of the Video tags pages (airflow_glue/ui): each one limited and served by an index."""

from sqlalchemy import Connection, func, select

from storage.database import reviews
from storage.database.schema import (
    evaluation_classes,
    evaluations,
    inference_label_counts,
    inference_parts,
    inference_runs,
    labels,
    model_reviews,
    model_versions,
    predictions,
    video_labels,
    videos,
)

MODEL_COLUMNS = (
    "version",
    "level",
    "preset",
    "data_uri",
    "status",
    "created_at",
    "promoted_at",
    "checkpoint_uri",
    "loss_plot_uri",
)
EVAL_COLUMNS = (
    "id",
    "split",
    "gap",
    "hit_at_one",
    "perr",
    "map",
    "videos",
    "plot_uri",
    "evaluated_at",
    "set_fingerprint",
)


def latest_evaluation(conn: Connection, version: int, set_fingerprint: str | None = None) -> dict | None:
    """A version's latest evaluation (with `set_fingerprint`, on exactly those videos), or None."""
    query = select(*(evaluations.c[c] for c in EVAL_COLUMNS)).where(evaluations.c.model_version == version)
    if set_fingerprint is not None:
        query = query.where(evaluations.c.set_fingerprint == set_fingerprint)
    row = conn.execute(query.order_by(evaluations.c.evaluated_at.desc(), evaluations.c.id.desc()).limit(1)).first()
    return dict(row._mapping) if row else None


def models(conn: Connection, limit: int = 200) -> list[dict]:
    """The newest `limit` versions, each with its latest evaluation (None when never evaluated)."""
    rows = conn.execute(
        select(*(model_versions.c[c] for c in MODEL_COLUMNS)).order_by(model_versions.c.version.desc()).limit(limit)
    ).all()
    latest_reviews = reviews.latest_by_version(conn, [row.version for row in rows])
    return [
        {**row._mapping, "evaluation": latest_evaluation(conn, row.version), "review": latest_reviews.get(row.version)}
        for row in rows
    ]


def model(conn: Connection, version: int) -> dict | None:
    row = conn.execute(
        select(*(model_versions.c[c] for c in MODEL_COLUMNS)).where(model_versions.c.version == version)
    ).first()
    if row is None:
        return None
    evals = conn.execute(
        select(*(evaluations.c[c] for c in EVAL_COLUMNS))
        .where(evaluations.c.model_version == version)
        .order_by(evaluations.c.evaluated_at.desc(), evaluations.c.id.desc())
    ).all()
    asked = conn.execute(
        select(model_reviews).where(model_reviews.c.model_version == version).order_by(model_reviews.c.id.desc())
    ).all()
    return {**row._mapping, "evaluations": [dict(e._mapping) for e in evals], "reviews": [r._asdict() for r in asked]}


def version_history(conn: Connection, level: str, set_fingerprint: str, limit: int = 200) -> list[dict]:
    """The level's versions evaluated on exactly these videos (`set_fingerprint`), oldest first, each with
    its latest evaluation there: the same yardstick for every point of the Models page's chart."""
    rows = conn.execute(
        select(evaluations.c.model_version.label("version"), *(evaluations.c[c] for c in EVAL_COLUMNS))
        .join(model_versions, model_versions.c.version == evaluations.c.model_version)
        .where(model_versions.c.level == level, evaluations.c.set_fingerprint == set_fingerprint)
        .order_by(evaluations.c.model_version.desc(), evaluations.c.evaluated_at.desc(), evaluations.c.id.desc())
        .limit(limit * 4)
    ).all()
    latest = {}
    for row in rows:
        latest.setdefault(row.version, dict(row._mapping))
    return [latest[v] for v in sorted(latest)[-limit:]]


def class_deltas(conn: Connection, evaluation_id: int, baseline_id: int, n: int = 10) -> dict:
    """Class by class, an evaluation's average precision against a baseline's (on the same videos): the `n`
    classes that gained most and the `n` that lost most, with their names; `compared`: classes in both."""
    mine, theirs = evaluation_classes.alias("mine"), evaluation_classes.alias("theirs")
    delta = (mine.c.average_precision - theirs.c.average_precision).label("delta")
    base = (
        select(
            mine.c.label_id,
            labels.c.name,
            mine.c.positives,
            mine.c.average_precision.label("ap"),
            theirs.c.average_precision.label("baseline_ap"),
            delta,
        )
        .join(theirs, (theirs.c.label_id == mine.c.label_id) & (theirs.c.evaluation_id == baseline_id))
        .join(labels, labels.c.label_id == mine.c.label_id, isouter=True)
        .where(mine.c.evaluation_id == evaluation_id)
    )
    gained = [dict(r._mapping) for r in conn.execute(base.order_by(delta.desc(), mine.c.label_id).limit(n))]
    lost = [dict(r._mapping) for r in conn.execute(base.order_by(delta.asc(), mine.c.label_id).limit(n))]
    compared = conn.execute(select(func.count()).select_from(base.subquery())).scalar()
    return {
        "gained": [r for r in gained if r["delta"] > 0],
        "lost": [r for r in lost if r["delta"] < 0],
        "compared": compared,
    }


RUN_COLUMNS = (
    "run_id",
    "logical_date",
    "model_version",
    "status",
    "videos_done",
    "videos_total",
    "rows_written",
    "started_at",
    "finished_at",
    "error",
    "top_k",
    "exports_uri",
    "airflow_run_id",
)


def nights(conn: Connection, before: int | None = None, limit: int = 50) -> list[dict]:
    """Runs newest first (by run_id, the primary key: keyset paging), `limit` of them older than `before`."""
    query = select(*(inference_runs.c[c] for c in RUN_COLUMNS)).order_by(inference_runs.c.run_id.desc()).limit(limit)
    if before is not None:
        query = query.where(inference_runs.c.run_id < before)
    return [dict(r._mapping) for r in conn.execute(query)]


def night(conn: Connection, run_id: int) -> dict | None:
    row = conn.execute(
        select(*(inference_runs.c[c] for c in RUN_COLUMNS)).where(inference_runs.c.run_id == run_id)
    ).first()
    if row is None:
        return None
    parts = conn.execute(
        select(inference_parts).where(inference_parts.c.run_id == run_id).order_by(inference_parts.c.part)
    ).all()
    return {**row._mapping, "parts": [dict(p._mapping) for p in parts]}


def previous_night(conn: Connection, run_id: int, model_version: int, logical_date) -> int | None:
    """The same version's run of the logical date before this one (uq_inference_runs_date_model)."""
    return conn.execute(
        select(inference_runs.c.run_id)
        .where(inference_runs.c.model_version == model_version, inference_runs.c.logical_date < logical_date)
        .order_by(inference_runs.c.logical_date.desc())
        .limit(1)
    ).scalar()


def rank_one_counts(conn: Connection, run_id: int) -> dict[int, int]:
    """Videos per rank-1 label of a night, summed over its parts (at most 3,862 labels x parts rows)."""
    c = inference_label_counts.c
    rows = conn.execute(
        select(c.label_id, func.sum(c.videos)).where(c.run_id == run_id, c.rank == 1).group_by(c.label_id)
    ).all()
    return {label: int(n) for label, n in rows}


def label_names(conn: Connection, label_ids: list[int]) -> dict[int, str]:
    if not label_ids:
        return {}
    rows = conn.execute(select(labels.c.label_id, labels.c.name).where(labels.c.label_id.in_(label_ids))).all()
    return dict(rows)


def label_by_name(conn: Connection, name: str) -> int | None:
    return conn.execute(select(labels.c.label_id).where(labels.c.name == name).limit(1)).scalar()


def label(conn: Connection, label_id: int) -> dict | None:
    row = conn.execute(select(labels).where(labels.c.label_id == label_id)).first()
    return dict(row._mapping) if row else None


def label_nights(conn: Connection, label_id: int, limit: int = 30) -> list[dict]:
    """The label over the latest `limit` succeeded nights, newest first: videos that got it (any rank of
    their top k), and of those judged against ground truth, how many it was true for (hits / judged: the
    label's precision that night). From the parts' counts, by the (label, run) index."""
    c, r = inference_label_counts.c, inference_runs.c
    rows = conn.execute(
        select(
            r.run_id,
            r.logical_date,
            r.model_version,
            r.top_k,
            func.sum(c.videos).label("videos"),
            func.sum(c.judged).label("judged"),
            func.sum(c.hits).label("hits"),
        )
        .join(inference_runs, r.run_id == c.run_id)
        .where(c.label_id == label_id, r.status == "succeeded")
        .group_by(r.run_id, r.logical_date, r.model_version, r.top_k)
        .order_by(r.logical_date.desc(), r.run_id.desc())
        .limit(limit)
    ).all()
    return [dict(row._mapping) for row in rows]


def video(conn: Connection, video_id: str) -> dict | None:
    """A video's catalogue rows (a video has one at each level), its ground truth with names, and the run
    that wrote its production labels at each level."""
    found = conn.execute(
        select(videos.c.level, videos.c.split, videos.c.parquet_uri, videos.c.ingested_at).where(
            videos.c.video_id == video_id
        )
    ).all()
    if not found:
        return None
    truth = conn.execute(
        select(video_labels.c.label_id, labels.c.name)
        .join(labels, labels.c.label_id == video_labels.c.label_id, isouter=True)
        .where(video_labels.c.video_id == video_id)
        .order_by(video_labels.c.label_id)
    ).all()
    scored = conn.execute(
        select(predictions.c.model_version, predictions.c.run_id, inference_runs.c.logical_date)
        .join(model_versions, model_versions.c.version == predictions.c.model_version)
        .join(inference_runs, inference_runs.c.run_id == predictions.c.run_id, isouter=True)
        .where(predictions.c.video_id == video_id, predictions.c.rank == 1, model_versions.c.status == "production")
    ).all()
    return {
        "video_id": video_id,
        "levels": [dict(r._mapping) for r in found],
        "truth": [dict(r._mapping) for r in truth],
        "scored": [dict(r._mapping) for r in scored],
    }


def suggestions(conn: Connection, text: str, limit: int = 10) -> list[dict]:
    """Labels whose name starts with (then contains) `text`, case-insensitive, and video ids starting with
    it: what the Tags search box offers as one types."""
    text = text.strip()
    if not text:
        return []
    pattern = text.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    name = func.lower(labels.c.name)
    found = []
    for condition in (name.like(pattern + "%", escape="\\"), name.like("%" + pattern + "%", escape="\\")):
        for label_id, label_name in conn.execute(
            select(labels.c.label_id, labels.c.name)
            .where(condition, labels.c.name != "")
            .order_by(labels.c.name)
            .limit(limit)
        ):
            if not any(f["kind"] == "label" and f["id"] == label_id for f in found):
                found.append({"kind": "label", "id": label_id, "name": label_name})
    # Neither DISTINCT nor ORDER BY: either would make the database find every match before the first
    # (a video has a row per level); the prefix index (migration 0015) hands over a few, sorted here.
    ids = conn.execute(
        select(videos.c.video_id).where(videos.c.video_id.startswith(text, autoescape=True)).limit(4 * limit)
    ).scalars()
    found += [{"kind": "video", "id": v, "name": v} for v in sorted(set(ids))[:limit]]
    return found[: 2 * limit]
