"""The human gate on promotion (yt8m_train with `require_approval`): ask for a review, act on the answer.

`request_review` records a pending review of the candidate next to production, scored on the same set
(production is scored there first if it never was), and returns the subject and Markdown body Airflow's
human-in-the-loop task shows (dags/yt8m_review.py); `record_answer` acts on its decision (approved,
rejected, or timed out without an answer) through the registry (storage/database/reviews.py).
"""

import logging
from datetime import timedelta

from storage.database import db, reviews
from storage.database.db import utcnow
from storage.objectstore import S3Config
from tasks.training import with_production_scored

log = logging.getLogger(__name__)

_METRICS = (("GAP", "gap"), ("Hit@1", "hit_at_one"), ("PERR", "perr"), ("mAP", "map"), ("videos", "videos"))


def request_review(
    db_url: str,
    version: int,
    split: str = "validate",
    *,
    run_id: str,
    timeout: timedelta | None,
    s3: S3Config | None = None,
    pages_url: str = "",
) -> dict:
    """Record the pending review of `version` for DAG run `run_id` (asking again returns the same one);
    returns its id, subject and body. `pages_url` is where the Video tags pages are served (the Airflow
    UI's base URL; empty: a link relative to the UI's root)."""
    db.require_current(db_url)
    deadline_at = utcnow() + timeout if timeout else None
    review = with_production_scored(
        db_url, s3, reviews.request, version, run_id=run_id, split=split, deadline_at=deadline_at
    )
    return {
        "review_id": review["id"],
        "version": version,
        "subject": f"Promote model version {version} to production?",
        "body": review_body(review, pages_url),
    }


def _figure(evaluation: dict | None, key: str) -> str:
    if evaluation is None:
        return "-"
    value = evaluation[key]
    return f"{value:,}" if isinstance(value, int) else f"{value:.4f}"


def review_body(review: dict, pages_url: str = "") -> str:
    """Markdown: the candidate's metrics next to production's on the same evaluation set, what each answer
    does, and links to both versions on the Models page."""
    version, theirs = review["model_version"], review["production_version"]
    mine, production = review["evaluation"], review["production_evaluation"]
    models = f"{pages_url.rstrip('/')}/video-tags/models"
    head = f"| | candidate [version {version}]({models}/{version}) |"
    head += f" production [version {theirs}]({models}/{theirs}) |" if theirs else " production: none |"
    lines = [head, "|---|---:|---:|"]
    lines += [f"| {name} | {_figure(mine, key)} | {_figure(production, key)} |" for name, key in _METRICS]
    where = f"Evaluated on `{mine['data_uri']}`, split `{mine['split']}`, files `{mine['pattern']}`."
    if production is not None and mine["gap"] < production["gap"]:
        where += f" **The candidate's GAP is {production['gap'] - mine['gap']:.4f} below production's.**"
    deadline = f"by {review['deadline_at']:%Y-%m-%d %H:%M} UTC " if review["deadline_at"] else ""
    answers = (
        f"**Approve** makes version {version} production now"
        + (f" and archives version {theirs}" if theirs else "")
        + ", whatever the GAPs say. **Reject** records it as rejected. "
        + f"Without an answer {deadline}it stays unpromoted."
    )
    return "\n".join([*lines, "", where, "", answers, "", f"All versions: [Models page]({models})"])


def record_answer(db_url: str, review_id: int, decision: str, by: str | None = None) -> dict:
    """Act on the answer: `approved` or `rejected` by user `by`, or `timed_out` when nobody answered in time."""
    db.require_current(db_url)
    with db.transaction(db_url) as conn:
        outcome = reviews.decide(conn, review_id, decision, by=by)
        version = reviews.review(conn, review_id)["model_version"]
    (log.warning if decision == "timed_out" else log.info)(outcome)
    return {"review_id": review_id, "version": version, "decision": decision, "outcome": outcome}
