"""Read-only queries of the Video tags pages (airflow_glue/ui): each one limited and served by an index."""

from sqlalchemy import Connection, func, select

from storage.database import reviews
from storage.database.schema import (
    evaluations,
    inference_label_counts,
    inference_parts,
    inference_runs,
    labels,
    model_reviews,
    model_versions,
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
EVAL_COLUMNS = ("split", "gap", "hit_at_one", "perr", "map", "videos", "plot_uri", "evaluated_at")


def _latest_evaluation(conn: Connection, version: int) -> dict | None:
    row = conn.execute(
        select(*(evaluations.c[c] for c in EVAL_COLUMNS))
        .where(evaluations.c.model_version == version)
        .order_by(evaluations.c.evaluated_at.desc(), evaluations.c.id.desc())
        .limit(1)
    ).first()
    return dict(row._mapping) if row else None


def models(conn: Connection, limit: int = 200) -> list[dict]:
    """The newest `limit` versions, each with its latest evaluation (None when never evaluated)."""
    rows = conn.execute(
        select(*(model_versions.c[c] for c in MODEL_COLUMNS)).order_by(model_versions.c.version.desc()).limit(limit)
    ).all()
    latest_reviews = reviews.latest_by_version(conn, [row.version for row in rows])
    return [
        {**row._mapping, "evaluation": _latest_evaluation(conn, row.version), "review": latest_reviews.get(row.version)}
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
