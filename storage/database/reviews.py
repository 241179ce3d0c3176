"""Human reviews of a promotion: asked for by a yt8m_train run with `require_approval`, answered in Airflow.

A review shows a person the candidate's evaluation next to production's on the same set; its answer
decides, whatever the GAPs say: approved makes the candidate production (the former one archived),
rejected marks it `rejected`, timed out leaves it `trained`, unpromoted.
"""

from datetime import datetime

from sqlalchemy import Connection, insert, select, update

from storage.database import registry
from storage.database.db import utcnow
from storage.database.schema import evaluations, model_reviews, model_versions
from storage.errors import VtagError

DECISIONS = ("approved", "rejected", "timed_out")


class ReviewError(VtagError, ValueError):
    pass


def request(conn: Connection, version: int, *, run_id: str, split: str, deadline_at: datetime | None) -> dict:
    """Ask for a review of `version` on its latest evaluation of `split`, for DAG run `run_id`; asking
    again for the same run returns the review already asked for. Raises registry.NeedsEvaluation when
    production was never scored on the candidate's evaluation set (the reviewer must see both)."""
    existing = conn.execute(
        select(model_reviews.c.id).where(model_reviews.c.model_version == version, model_reviews.c.run_id == run_id)
    ).scalar()
    if existing is not None:
        return review(conn, existing)
    now = registry.standing(conn, version, split)
    if now.is_production():
        raise ReviewError(f"model version {version} is already in production: there is nothing to review")
    review_id = conn.execute(
        insert(model_reviews)
        .values(
            model_version=version,
            run_id=run_id,
            evaluation_id=now.evaluation.id,
            production_version=now.production.version if now.production is not None else None,
            production_evaluation_id=now.production_evaluation.id if now.production_evaluation is not None else None,
            requested_at=utcnow(),
            deadline_at=deadline_at,
        )
        .returning(model_reviews.c.id)
    ).scalar_one()
    return review(conn, review_id)


def _evaluation(conn: Connection, evaluation_id: int | None) -> dict | None:
    if evaluation_id is None:
        return None
    return conn.execute(select(evaluations).where(evaluations.c.id == evaluation_id)).one()._asdict()


def review(conn: Connection, review_id: int) -> dict:
    """The review's row, with the two evaluations it showed as `evaluation` and `production_evaluation`."""
    row = conn.execute(select(model_reviews).where(model_reviews.c.id == review_id)).first()
    if row is None:
        raise ReviewError(f"model review {review_id} does not exist")
    return {
        **row._asdict(),
        "evaluation": _evaluation(conn, row.evaluation_id),
        "production_evaluation": _evaluation(conn, row.production_evaluation_id),
    }


def decide(conn: Connection, review_id: int, decision: str, *, by: str | None) -> str:
    """Record the answer and act on it; the same answer again changes nothing (a rerun of the task), a
    different one for a review already answered is refused. Returns what happened, for the log."""
    if decision not in DECISIONS:
        raise ReviewError(f"decision {decision!r} for model review {review_id} is not one of {', '.join(DECISIONS)}")
    row = conn.execute(select(model_reviews).where(model_reviews.c.id == review_id).with_for_update()).first()
    if row is None:
        raise ReviewError(f"model review {review_id} does not exist")
    version = row.model_version
    if row.decision is not None:
        if row.decision != decision:
            raise ReviewError(
                f"model review {review_id} of version {version} was already answered {row.decision!r} "
                f"by {row.decided_by or 'nobody'} at {row.decided_at}: it cannot become {decision!r}"
            )
        return f"model review {review_id} of version {version} was already {decision}"
    if decision == "approved":
        candidate = registry.get_version(conn, version)
        current = conn.execute(
            select(model_versions.c.version)
            .where(model_versions.c.level == candidate["level"], model_versions.c.status == "production")
            .with_for_update()
        ).scalar()
        registry.make_production(conn, version, current)
        outcome = f"version {version} promoted by {by}" + (f" (version {current} archived)" if current else "")
    elif decision == "rejected":
        registry.reject(conn, version)
        outcome = f"version {version} rejected by {by}"
    else:
        outcome = f"version {version} left unpromoted: nobody answered its review by {row.deadline_at}"
    conn.execute(
        update(model_reviews)
        .where(model_reviews.c.id == review_id)
        .values(decision=decision, decided_by=by, decided_at=utcnow())
    )
    return outcome


def latest_by_version(conn: Connection, versions: list[int]) -> dict[int, dict]:
    """Each listed version's most recent review (the pages show it next to the version's status)."""
    if not versions:
        return {}
    rows = conn.execute(
        select(model_reviews).where(model_reviews.c.model_version.in_(versions)).order_by(model_reviews.c.id)
    ).all()
    return {row.model_version: row._asdict() for row in rows}
