"""A database ready for nightly inference: the vocabulary, ingested videos and a production model.

Shared by the inference, fault and security tests (the shards come from the `raw_shards` fixture); its
tiny model (TINY, and `vtag_train_args` for the command) is the one the training tests train too.
"""

from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import text

from storage.database import catalog
from storage.database.db import engine_for
from tasks.ingest import ingest
from tasks.synth import SynthConfig, synth
from tasks.training import evaluate_model, promote, train_and_register
from tests.support.db import in_transaction
from tests.support.env import SHARED

# The small preset shrunk to train in seconds on a CPU: overrides for load_config("small") and
# tasks.training. Three epochs give the worlds a model that tags the synthetic labels; the training tests
# take two (`{**TINY, "epochs": 2}`).
TINY = {
    "embedding_size": 8,
    "lstm_size": 8,
    "head_sizes": [16, 16],
    "batch_size": 8,
    "max_frames": 20,
    "num_workers": 0,
    "epochs": 3,
    "learning_rate": 1e-2,
    "lr_decay_epochs": [],
}
# TINY's batch, frames and loader workers as `vtag train` options (the command has no flags for its sizes).
TINY_TRAIN_OPTIONS = (
    "--batch-size",
    str(TINY["batch_size"]),
    "--max-frames",
    str(TINY["max_frames"]),
    "--workers",
    str(TINY["num_workers"]),
)
NIGHT = datetime(2030, 1, 2, 2, 0, tzinfo=UTC)
VIDEOS = 50  # in inference_shards


def inference_shards(raw: Path) -> Path:
    synth(str(raw), SynthConfig("frame", "train", shards=2, videos_per_shard=20, num_labels=10, seed=2))
    synth(str(raw), SynthConfig("frame", "validate", shards=1, videos_per_shard=10, num_labels=10, seed=2))
    return raw


def build_world(raw_shards, tmp_path, db_url, checkpoint: str | None = None) -> dict:
    """Ingest the shards, load the vocabulary, and make a model production: trained here, or the given
    checkpoint (registered, evaluated and promoted, which is much faster)."""
    parquet = str(tmp_path / "parquet")
    assert not ingest(str(raw_shards), parquet, db_url).failed
    in_transaction(db_url, catalog.load_vocabulary, str(SHARED / "yt8m" / "vocabulary.csv"))
    if checkpoint is None:
        checkpoint = train_and_register(
            parquet, str(tmp_path / "model"), "frame", db_url, preset="small", overrides=TINY, progress=False
        )["checkpoint_uri"]
    version = evaluate_model(checkpoint, parquet, db_url)["version"]
    promote(db_url, version)
    return {
        "db": db_url,
        "parquet": parquet,
        "version": version,
        "checkpoint": checkpoint,
        "exports": str(tmp_path / "exports"),
    }


def vtag_train_args(parquet, out, db_url, *options) -> list[str]:
    """The words after `vtag` that train the small preset on `parquet`'s frame level into `out`,
    registering in `db_url`; `options` come between (argparse keeps the last of a repeated option)."""
    words = [
        "train",
        "--data",
        parquet,
        "--level",
        "frame",
        "--preset",
        "small",
        *options,
        "--out",
        out,
        "--db",
        db_url,
    ]
    return [str(word) for word in words]


def count(db_url, sql, **params):
    with engine_for(db_url).connect() as conn:
        return conn.execute(text(sql), params).scalar()


def row(db_url, sql):
    with engine_for(db_url).connect() as conn:
        return tuple(conn.execute(text(sql)).one())


def rows(db_url, sql, **params):
    with engine_for(db_url).connect() as conn:
        return conn.execute(text(sql), params).all()


def part_tables(db_url) -> list[str]:
    """The part tables nights have written and not published (storage.database.partitions.part_table_name)."""
    from storage.database.partitions import PART_TABLE

    listing = (
        "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
        if db_url.startswith("postgresql")
        else "SELECT name FROM sqlite_master WHERE type = 'table'"
    )
    return sorted(t for (t,) in rows(db_url, listing) if PART_TABLE.fullmatch(t))


def served_rows(db_url) -> int:
    """Prediction rows the views can show: those nights that succeeded have published."""
    return count(db_url, "SELECT COUNT(*) FROM predictions")


def stored_rows(db_url) -> int:
    """Prediction rows committed so far: published ones and those in nights' part tables, not yet published."""
    return served_rows(db_url) + sum(count(db_url, f"SELECT COUNT(*) FROM {t}") for t in part_tables(db_url))


def hits_in_step(db_url) -> dict:
    """version_hits as storage.database.label_counts keeps it, checked against the served rows themselves;
    returns it ({(version, rank): (judged, hits)}, less ranks at zero)."""
    kept = {(v, r): (j, h) for v, r, j, h in rows(db_url, "SELECT model_version, rank, judged, hits FROM version_hits")}
    recount = {
        (v, r): (j, h)
        for v, r, j, h in rows(
            db_url,
            "SELECT model_version, rank, COUNT(hit), SUM(CASE WHEN hit THEN 1 ELSE 0 END) FROM predictions "
            "WHERE hit IS NOT NULL GROUP BY model_version, rank",
        )
    }
    kept = {key: value for key, value in kept.items() if value != (0, 0)}  # a rank whose rows all left
    assert kept == recount
    return kept
