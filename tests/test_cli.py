"""The `vtag` command as a user runs it: exit codes, output, one-line errors."""

import pytest
from sqlalchemy import inspect

from storage.database.db import current_revision, engine_for, head_revision, known_revisions
from tests.support.cli import vtag
from tests.support.shards import flip_byte, record_offsets


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


def test_only_the_embedded_database_is_migrated_on_entry(empty_db_url, tmp_path):
    """Issue 28: an analyst's newer `vtag` pointed at a deployed database never migrates it: a database at
    an older revision, or without our schema, gets one line and is left as it was; the embedded SQLite
    file under VTAG_HOME is the command line's own and is migrated on entry, however its URL is spelled."""
    from storage.database.db import downgrade, upgrade

    older = sorted(known_revisions())[-2]
    upgrade(empty_db_url, older)
    shown = engine_for(empty_db_url).url.render_as_string(hide_password=True)
    for args in (["models"], ["query", "runs"], ["infer", "--production", "--dry-run"]):
        result = vtag(*args, "--db", empty_db_url, env_home=tmp_path / "analyst")
        assert (result.returncode, result.stderr.strip()) == (
            2,
            f"vtag {args[0]}: error: the database {shown} is at schema revision {older}, this release needs "
            f"{head_revision()}: run `vtag db upgrade --db <url>` (the Airflow image's init step runs it)",
        )
    assert current_revision(empty_db_url) == older  # left unchanged
    assert vtag("db", "upgrade", "--db", empty_db_url).returncode == 0  # the way forward named
    assert vtag("models", "--db", empty_db_url).returncode == 0

    bare = f"sqlite:///{tmp_path / 'bare.db'}"
    result = vtag("models", "--db", bare, env_home=tmp_path / "analyst")
    assert result.returncode == 2 and "has no vtag schema, this release needs" in result.stderr
    assert current_revision(bare) is None

    home = tmp_path / "home"
    assert vtag("models", env_home=home).returncode == 0  # the embedded default
    assert current_revision(f"sqlite:///{home / 'vtag.db'}") == head_revision()
    (home / "sub").mkdir()
    downgrade(f"sqlite:///{home / 'vtag.db'}", older)
    assert (
        vtag("models", "--db", f"sqlite:///{home}/sub/../vtag.db", env_home=home).returncode == 0
    )  # spelled otherwise
    assert current_revision(f"sqlite:///{home / 'vtag.db'}") == head_revision()


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
