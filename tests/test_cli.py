"""The `vtag` command as a user runs it: exit codes, output, one-line errors."""

import pytest
from sqlalchemy import inspect

from storage.database.db import current_revision, engine_for, head_revision
from tests.shards import flip_byte, record_offsets
from tests.support.cli import vtag


def test_synth_ingest_manifest_on_embedded_defaults(tmp_path):
    home = tmp_path / "home"
    raw = home / "store" / "raw"
    assert vtag("synth", "--out", raw, "--shards", "2", "--videos-per-shard", "3", env_home=home).returncode == 0
    flip_byte(raw / "train0001.tfrecord", record_offsets(raw / "train0001.tfrecord")[1] + 40)

    result = vtag("ingest", env_home=home)  # default source, destination and SQLite database under VTAG_HOME
    assert result.returncode == 1
    assert (
        f"FAILED {raw / 'train0001.tfrecord'}: {raw / 'train0001.tfrecord'}: record 1 at byte offset" in result.stderr
    )
    assert "1 converted, 0 already converted, 1 failed" in result.stdout
    assert (home / "store" / "parquet" / "frame" / "train" / "train0000.parquet").is_file()
    assert (home / "vtag.db").is_file()

    listing = vtag("manifest", env_home=home).stdout.splitlines()
    assert listing[0].split()[:3] == ["source_uri", "status", "level"]
    assert any("train0000.tfrecord" in line and "succeeded" in line for line in listing)
    assert any("train0001.tfrecord" in line and "failed" in line and "data CRC mismatch" in line for line in listing)


@pytest.mark.parametrize(
    "args, message",
    [
        (["ingest", "--src", "/nonexistent/shards", "--dest", "{tmp}/pq"], "no such folder: /nonexistent/shards"),
        (["ingest", "--src", "gs://bucket/shards", "--dest", "{tmp}/pq"], "unsupported URI scheme 'gs'"),
        (["ingest", "--src", "{tmp}", "--dest", "{tmp}/pq", "--db", "nonsense"], "not a database URL"),
        (
            ["ingest", "--src", "{tmp}", "--dest", "{tmp}/pq", "--db", "postgresql://127.0.0.1:1/x"],
            "Connection refused",
        ),
        (["synth", "--out", "{tmp}", "--shards", "0"], "--shards must be at least 1"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, args, message):
    result = vtag(*[a.replace("{tmp}", str(tmp_path)) for a in args], env_home=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_db_migrations_up_and_down(empty_db_url):
    db_url = empty_db_url
    assert current_revision(db_url) is None
    assert vtag("db", "upgrade", "--db", db_url).stdout.strip() == head_revision()
    assert current_revision(db_url) == head_revision()
    tables = {
        "ingested_shards",
        "model_versions",
        "evaluations",
        "labels",
        "videos",
        "video_labels",
        "inference_runs",
        "predictions",
    }
    assert tables <= set(inspect(engine_for(db_url)).get_table_names())
    assert "production_labels" in inspect(engine_for(db_url)).get_view_names()
    assert vtag("db", "downgrade", "base", "--db", db_url).stdout.strip() == "base"
    engine_for(db_url).dispose()
    assert not tables & set(inspect(engine_for(db_url)).get_table_names())
    assert vtag("db", "upgrade", "--db", db_url).returncode == 0
    assert vtag("db", "current", "--db", db_url).stdout.strip() == head_revision()
