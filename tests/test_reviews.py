"""The human gate's registry side (storage/database/reviews.py, tasks/review.py) on both databases: a review
is asked once per run and shows both evaluations; its answer acts and is final; the Models page shows it."""

import pytest

from storage.database import registry, reviews
from tasks.review import review_body
from tests.support.db import in_transaction

METRICS = {"production": 0.70, "candidate": 0.65}


def _version(conn, name: str, gap: float | None, *, data_uri: str = "/data") -> int:
    version = registry.register(
        conn,
        level="frame",
        preset="small",
        checkpoint_uri=f"/models/{name}/final.pt",
        config={},
        data_uri=data_uri,
        train_split="train",
        epochs=1,
        steps=1,
    )
    if gap is not None:
        metrics = {"gap": gap, "hit_at_one": gap + 0.1, "perr": gap - 0.1, "map": gap - 0.05}
        record = registry.EvaluationRecord(
            "validate", data_uri, "*.parquet", metrics, videos=1000, seconds=1.0,
            set_fingerprint=f"the videos of {data_uri}",
        )  # fmt: skip
        registry.record_evaluation(conn, version, record)
    return version


def _production_and_candidate(conn) -> tuple[int, int]:
    production = _version(conn, "production", METRICS["production"])
    registry.make_production(conn, production, None)
    return production, _version(conn, "candidate", METRICS["candidate"])


def test_a_review_is_asked_once_per_run_and_shows_both_evaluations(db_url):
    production, candidate = in_transaction(db_url, _production_and_candidate)
    first = in_transaction(db_url, reviews.request, candidate, run_id="run-1", split="validate", deadline_at=None)
    again = in_transaction(db_url, reviews.request, candidate, run_id="run-1", split="validate", deadline_at=None)
    assert first["id"] == again["id"] and first["decision"] is None
    assert (first["production_version"], first["evaluation"]["gap"], first["production_evaluation"]["gap"]) == (
        production,
        METRICS["candidate"],
        METRICS["production"],
    )
    body = review_body(first, "https://airflow.example.com/")
    assert "| GAP | 0.6500 | 0.7000 |" in body and "| videos | 1,000 | 1,000 |" in body
    assert f"(https://airflow.example.com/video-tags/models/{candidate})" in body
    assert "**The candidate's GAP is 0.0500 below production's.**" in body
    assert in_transaction(db_url, registry.get_version, candidate)["status"] == "trained"  # waiting: unchanged


def test_an_answer_acts_once_and_is_final(db_url):
    production, candidate = in_transaction(db_url, _production_and_candidate)
    asked = in_transaction(db_url, reviews.request, candidate, run_id="run-1", split="validate", deadline_at=None)
    outcome = in_transaction(db_url, reviews.decide, asked["id"], "approved", by="alice")
    assert outcome == f"version {candidate} promoted by alice (version {production} archived)"
    assert in_transaction(db_url, registry.production, "frame")["version"] == candidate  # a lower GAP: a person's call
    assert in_transaction(db_url, registry.get_version, production)["status"] == "archived"
    assert "already approved" in in_transaction(db_url, reviews.decide, asked["id"], "approved", by="alice")
    with pytest.raises(reviews.ReviewError, match=r"already answered 'approved' by alice .*cannot become 'rejected'"):
        in_transaction(db_url, reviews.decide, asked["id"], "rejected", by="bob")
    with pytest.raises(reviews.ReviewError, match=r"decision 'maybe' for model review \d+ is not one of"):
        in_transaction(db_url, reviews.decide, asked["id"], "maybe", by="bob")
    with pytest.raises(reviews.ReviewError, match=r"version \d+ is already in production: there is nothing to review"):
        in_transaction(db_url, reviews.request, candidate, run_id="run-2", split="validate", deadline_at=None)


def test_rejected_and_timed_out_reviews_leave_production_alone(db_url):
    production, candidate = in_transaction(db_url, _production_and_candidate)
    other = in_transaction(db_url, _version, "other", 0.9)
    no = in_transaction(db_url, reviews.request, candidate, run_id="run-1", split="validate", deadline_at=None)
    lapsed = in_transaction(db_url, reviews.request, other, run_id="run-2", split="validate", deadline_at=None)
    assert "rejected by bob" in in_transaction(db_url, reviews.decide, no["id"], "rejected", by="bob")
    assert "nobody answered" in in_transaction(db_url, reviews.decide, lapsed["id"], "timed_out", by=None)
    statuses = {v: in_transaction(db_url, registry.get_version, v)["status"] for v in (production, candidate, other)}
    assert statuses == {production: "production", candidate: "rejected", other: "trained"}  # 0.9 GAP, not asked: kept


def test_a_review_needs_production_scored_on_the_same_set(db_url):
    def worlds_apart(conn):
        production = _version(conn, "production", 0.7, data_uri="/old-data")
        registry.make_production(conn, production, None)
        return production, _version(conn, "candidate", 0.6, data_uri="/new-data")

    production, candidate = in_transaction(db_url, worlds_apart)
    with pytest.raises(
        registry.NeedsEvaluation,
        match=rf"production version {production} has no evaluation on the candidate's set \(/new-data validate",
    ):
        in_transaction(db_url, reviews.request, candidate, run_id="run-1", split="validate", deadline_at=None)


@pytest.mark.airflow
def test_the_models_pages_show_reviews(db_url, dag_db_url, airflow_api):
    """A waiting review links to its Required actions page; an answered one says who answered."""
    client, auth = airflow_api
    production, candidate = in_transaction(db_url, _production_and_candidate)
    run_id = "manual__2030-01-01T00:00:00+00:00"
    in_transaction(db_url, reviews.request, candidate, run_id=run_id, split="validate", deadline_at=None)
    listing = client.get("/video-tags/models", headers=auth)
    assert listing.status_code == 200, listing.text
    link = "/dags/yt8m_train/runs/manual__2030-01-01T00%3A00%3A00%2B00%3A00/tasks/review/required_actions"
    assert f'<a class="pending" href="{link}">awaiting review</a>' in listing.text
    asked = in_transaction(db_url, reviews.latest_by_version, [candidate])[candidate]
    in_transaction(db_url, reviews.decide, asked["id"], "rejected", by="carol")
    page = client.get(f"/video-tags/models/{candidate}", headers=auth)
    assert page.status_code == 200 and "rejected by carol" in page.text and run_id in page.text
    assert f'<a href="/video-tags/models/{production}">{production}</a>' in page.text
