"""Issue 10, ingest: nothing lost, nothing duplicated, nothing silently wrong from shard to catalogue.

One spelling per location; one source per output file; a Parquet file visible only with its catalogue and
manifest rows; content rules (finite features, ids that fit and appear once per level); one line for an
unusable destination or database.
"""

import logging
import re

import boto3
import pyarrow.parquet as pq
import pytest
from sqlalchemy import text

from storage.database import manifest
from storage.database.db import engine_for
from storage.formats.tf_example import Example
from storage.formats.yt8m_records import MAX_ID_LENGTH
from storage.objectstore import LocalStore
from tasks.ingest import convert_batch, converted, ingest, list_pending, summary
from tests.support.cli import vtag
from tests.support.db import in_transaction
from tests.support.shards import frame_record, record_offsets, video_record, write_shard


def _videos(db_url) -> list[tuple]:
    with engine_for(db_url).connect() as conn:
        return [
            tuple(r)
            for r in conn.execute(
                text("SELECT video_id, level, source_uri, parquet_uri FROM videos ORDER BY video_id, level")
            )
        ]


def _truth(db_url) -> list[tuple]:
    with engine_for(db_url).connect() as conn:
        return [tuple(r) for r in conn.execute(text("SELECT video_id, label_id FROM video_labels ORDER BY 1, 2"))]


def _parquet_files(dest) -> list[str]:
    return sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())


def _ids_in(path) -> list[str]:
    return pq.read_table(path, columns=["id"]).column("id").to_pylist()


def _shard(path, *ids, labels=(1, 2)):
    return write_shard(path, [frame_record(i, labels=labels) for i in ids])


# --- 1. one spelling per location ------------------------------------------------------------------------


def test_one_folder_spelled_four_ways_converts_once(tmp_path, db_url, monkeypatch):
    raw, dest = tmp_path / "raw", tmp_path / "parquet"
    _shard(raw / "train0000.tfrecord", "aa01", "aa02")
    _shard(raw / "train0001.tfrecord", "aa03")
    monkeypatch.chdir(tmp_path)
    spellings = [
        ("raw", "parquet"),
        (f"{raw}/", f"{dest}/"),
        (f"file://{raw}", f"file://{dest}"),
        (str(raw), str(dest)),
    ]

    reports = [ingest(src, out, db_url) for src, out in spellings]

    assert [(len(r.converted), r.skipped, len(r.failed)) for r in reports] == [
        (2, 0, 0),
        (0, 2, 0),
        (0, 2, 0),
        (0, 2, 0),
    ]
    rows = in_transaction(db_url, manifest.rows)  # every destination, however spelled
    assert [(r["source_uri"], r["dest_uri"], r["status"]) for r in rows] == [
        (str(raw / "train0000.tfrecord"), str(dest), "succeeded"),
        (str(raw / "train0001.tfrecord"), str(dest), "succeeded"),
    ]
    assert rows[0]["output_uri"] == f"{dest}/frame/train/train0000.parquet"
    assert _parquet_files(dest) == ["frame/train/train0000.parquet", "frame/train/train0001.parquet"]
    assert {v[3] for v in _videos(db_url)} == {
        f"{dest}/frame/train/train0000.parquet",
        f"{dest}/frame/train/train0001.parquet",
    }

    # The relative destination was stored absolute: found from another working folder, in any spelling.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert list_pending(f"file://{raw}/", f"{dest}//", db_url) == ([], 2)
    shards = LocalStore().list(str(raw))
    assert set(converted(shards, f"file://{dest}/", db_url)) == {s.uri for s in shards}
    assert summary(shards, f"{dest}/", db_url)["dest"] == str(dest)
    assert convert_batch(shards, f"file://{dest}", db_url).skipped == 2


# --- 2. one output, one source ---------------------------------------------------------------------------


def test_a_second_source_of_the_same_name_is_quarantined_unless_it_replaces(tmp_path, db_url):
    first, second, dest = tmp_path / "first", tmp_path / "second", tmp_path / "parquet"
    a = _shard(first / "train0000.tfrecord", "aa01", "aa02", labels=(1,))
    b = _shard(second / "train0000.tfrecord", "bb01", "aa02", labels=(7,))  # aa02: the same video, relabelled
    out = dest / "frame/train/train0000.parquet"
    assert len(ingest(str(first), str(dest), db_url).converted) == 1

    refused = ingest(str(second), str(dest), db_url)
    error = refused.failed[str(b)]
    assert not refused.converted and str(a) in error and str(b) in error and str(out) in error and "replace" in error
    assert _ids_in(out) == ["aa01", "aa02"]  # the first source's file, untouched
    assert _videos(db_url) == [("aa01", "frame", str(a), str(out)), ("aa02", "frame", str(a), str(out))]
    rows = {r["source_uri"]: r for r in in_transaction(db_url, manifest.rows, str(dest))}
    assert (rows[str(a)]["status"], rows[str(b)]["status"]) == ("succeeded", "failed")
    assert str(a) in rows[str(b)]["error"]

    replaced = ingest(str(second), str(dest), db_url, replace=True)
    assert [c["source_uri"] for c in replaced.converted] == [str(b)] and not replaced.failed
    assert _parquet_files(dest) == ["frame/train/train0000.parquet"] and _ids_in(out) == ["bb01", "aa02"]
    assert _videos(db_url) == [("aa02", "frame", str(b), str(out)), ("bb01", "frame", str(b), str(out))]
    assert _truth(db_url) == [("aa02", 7), ("bb01", 7)]  # aa01 left with its ground truth
    rows = {r["source_uri"]: r for r in in_transaction(db_url, manifest.rows, str(dest))}
    assert rows[str(b)]["status"] == "succeeded"
    assert rows[str(a)]["status"] == "replaced" and str(b) in rows[str(a)]["error"]

    # The first folder again: not "already converted", and it does not take the file back on its own.
    rerun = ingest(str(first), str(dest), db_url)
    assert (rerun.converted, rerun.skipped) == ([], 0) and str(b) in rerun.failed[str(a)]
    assert _ids_in(out) == ["bb01", "aa02"] and len(_videos(db_url)) == 2
    assert ingest(str(second), str(dest), db_url).skipped == 1


# --- 3. all or nothing per shard -------------------------------------------------------------------------


def _fail_commits_of(db_url: str, video_id: str) -> None:
    """A deferred foreign key that inserting `video_id` into videos violates: the database refuses the
    transaction at COMMIT, after every statement in it succeeded (and so after the file was published)."""
    statements = [
        "CREATE TABLE commit_gate (id VARCHAR(32) PRIMARY KEY)",
        "CREATE TABLE commit_blocker (video_id VARCHAR(32) REFERENCES commit_gate (id) DEFERRABLE INITIALLY DEFERRED)",
    ]
    if db_url.startswith("sqlite"):
        statements.append(
            f"CREATE TRIGGER block_commit AFTER INSERT ON videos WHEN NEW.video_id = '{video_id}' "
            "BEGIN INSERT INTO commit_blocker VALUES (NEW.video_id); END"
        )
    else:
        statements += [
            "CREATE FUNCTION block_commit() RETURNS trigger AS $$ BEGIN "
            f"IF NEW.video_id = '{video_id}' THEN INSERT INTO commit_blocker VALUES (NEW.video_id); END IF; "
            "RETURN NEW; END $$ LANGUAGE plpgsql",
            "CREATE TRIGGER block_commit AFTER INSERT ON videos FOR EACH ROW EXECUTE FUNCTION block_commit()",
        ]
    with engine_for(db_url).begin() as conn:
        for statement in statements:
            conn.execute(text(statement))


def test_a_failed_commit_takes_the_published_file_back(tmp_path, db_url):
    raw, dest = tmp_path / "raw", tmp_path / "parquet"
    good = _shard(raw / "train0000.tfrecord", "ok01")
    shard = _shard(raw / "train0001.tfrecord", "xx01", "xx02")
    assert len(ingest(str(raw), str(dest), db_url).converted) == 2
    _fail_commits_of(db_url, "boom")
    write_shard(shard, [frame_record("xx01"), frame_record("boom")])  # new content whose commit will fail

    report = ingest(str(raw), str(dest), db_url)

    assert list(report.retryable) == [str(shard)] and str(shard) in report.failed[str(shard)]
    assert "FOREIGN KEY" in report.failed[str(shard)].upper() and "\n" not in report.failed[str(shard)]
    # No file without its rows: the new file was taken back, and the old content's file and rows are gone too.
    assert _parquet_files(dest) == ["frame/train/train0000.parquet"]
    assert _videos(db_url) == [("ok01", "frame", str(good), f"{dest}/frame/train/train0000.parquet")]
    assert {video_id for video_id, _ in _truth(db_url)} == {"ok01"}
    rows = {r["source_uri"]: r["status"] for r in in_transaction(db_url, manifest.rows, str(dest))}
    assert rows == {str(good): "succeeded", str(shard): "failed"}

    with engine_for(db_url).begin() as conn:
        conn.execute(text("DROP TRIGGER block_commit" + ("" if db_url.startswith("sqlite") else " ON videos")))
    retried = ingest(str(raw), str(dest), db_url)
    assert [c["source_uri"] for c in retried.converted] == [str(shard)]
    assert _ids_in(dest / "frame/train/train0001.parquet") == ["xx01", "boom"]


def test_a_catalogue_conflict_publishes_nothing(tmp_path, db_url):
    """The former order (file published, then the catalogue refusing a duplicate id) left the file out."""
    raw, dest = tmp_path / "raw", tmp_path / "parquet"
    _shard(raw / "train0000.tfrecord", "dd01")
    _shard(raw / "train0001.tfrecord", "dd02", "dd01")
    report = ingest(str(raw), str(dest), db_url)
    assert list(report.quarantined) == [str(raw / "train0001.tfrecord")]
    assert _parquet_files(dest) == ["frame/train/train0000.parquet"]
    assert [v[0] for v in _videos(db_url)] == ["dd01"]


# --- 4. content rules at decode --------------------------------------------------------------------------


def _video_record(video_id: str, rgb: float = 0.25) -> bytes:
    record = Example()
    features = record.features.feature
    features["id"].bytes_list.value.append(video_id.encode())
    features["labels"].int64_list.value.append(3)
    features["mean_rgb"].float_list.value.extend([0.25] * 1000 + [rgb] * 24)
    features["mean_audio"].float_list.value.extend([-0.5] * 128)
    return record.SerializeToString()


BAD_RECORDS = {
    "nan": (_video_record("vv09", float("nan")), r"'mean_rgb' holds nan at index 1000 \(24 non-finite values\)"),
    "inf": (_video_record("vv09", float("-inf")), r"'mean_rgb' holds -inf at index 1000"),
    "empty id": (frame_record(""), r"field 'id' is empty"),
    "id too long": (
        frame_record("x" * (MAX_ID_LENGTH + 1)),
        rf"is {MAX_ID_LENGTH + 1} characters, longer than the catalogue's 32",
    ),
}


@pytest.mark.parametrize("case", BAD_RECORDS)
def test_bad_content_is_quarantined_naming_file_and_record(case, tmp_path, db_url):
    record, reason = BAD_RECORDS[case]
    good = _video_record("vv01") if case in ("nan", "inf") else frame_record("vv01")
    raw, dest = tmp_path / "raw", tmp_path / "parquet"
    shard = write_shard(raw / "train0000.tfrecord", [good, good.replace(b"vv01", b"vv02"), record])

    report = ingest(str(raw), str(dest), db_url)

    error = report.quarantined[str(shard)]
    assert error.startswith(f"{shard}: record 2 at byte offset {record_offsets(shard)[2]}: ")
    assert re.search(reason, error), error
    assert _parquet_files(dest) == [] and _videos(db_url) == []
    (row,) = in_transaction(db_url, manifest.rows, str(dest))
    assert (row["status"], row["error_record"], row["error_offset"]) == ("failed", 2, record_offsets(shard)[2])


def test_an_id_of_the_catalogue_column_length_fits(tmp_path, db_url):
    longest = "y" * MAX_ID_LENGTH
    write_shard(tmp_path / "raw" / "train0000.tfrecord", [frame_record(longest)])
    assert not ingest(str(tmp_path / "raw"), str(tmp_path / "parquet"), db_url).failed
    assert [v[0] for v in _videos(db_url)] == [longest]


def test_an_id_repeated_within_a_shard_names_both_records(tmp_path, db_url):
    raw, dest = tmp_path / "raw", tmp_path / "parquet"
    shard = _shard(raw / "train0000.tfrecord", "rr01", "rr02", "rr01")
    error = ingest(str(raw), str(dest), db_url).quarantined[str(shard)]
    assert error == (
        f"{shard}: record 2 at byte offset {record_offsets(shard)[2]}: "
        "video id 'rr01' repeats the id of record 0 of this shard"
    )
    assert _parquet_files(dest) == [] and _videos(db_url) == []


def test_an_id_from_another_shard_of_the_level_names_that_shard(tmp_path, db_url):
    raw, dest = tmp_path / "raw", tmp_path / "parquet"
    owner = _shard(raw / "train0000.tfrecord", "ss01", "ss02")
    late = _shard(raw / "train0001.tfrecord", "ss03", "ss02", "ss01")
    write_shard(raw / "validate0000.tfrecord", [video_record("ss02")])  # the other level: the same video, fine

    report = ingest(str(raw), str(dest), db_url)

    assert list(report.failed) == [str(late)]
    assert report.failed[str(late)] == (
        f"{late}: record 1 at byte offset {record_offsets(late)[1]}: video id 'ss02' is already ingested at frame level "
        f"from {owner} (and 1 more ids of this shard)"
    )
    assert _parquet_files(dest) == ["frame/train/train0000.parquet", "video/validate/validate0000.parquet"]
    assert [(v[0], v[1], v[2]) for v in _videos(db_url)] == [
        ("ss01", "frame", str(owner)),
        ("ss02", "frame", str(owner)),
        ("ss02", "video", str(raw / "validate0000.tfrecord")),
    ]

    # A shard converted again from its own source is no conflict with itself.
    assert len(ingest(str(raw), str(dest), db_url, pattern="train0000*", force=True).converted) == 1


# --- 5. one line, not a traceback ------------------------------------------------------------------------


def test_an_unwritable_destination_is_one_line_before_any_shard(tmp_path, sqlite_url):
    raw = tmp_path / "raw"
    for i in range(3):
        _shard(raw / f"train000{i}.tfrecord", f"uu0{i}")
    (tmp_path / "blocker").write_text("a file where the destination's parent folder should be")
    dest = tmp_path / "blocker" / "parquet"

    result = vtag("ingest", "--src", raw, "--dest", dest, "--db", sqlite_url)

    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("vtag ingest: error: cannot write to ") and str(dest) in line
    assert list(tmp_path.rglob("*.parquet")) == [] and in_transaction(sqlite_url, manifest.rows) == []


def test_an_s3_destination_without_credentials_is_one_line_before_any_shard(s3, tmp_path, sqlite_url):
    config, bucket = s3
    raw = tmp_path / "raw"
    for i in range(3):
        _shard(raw / f"train000{i}.tfrecord", f"uu0{i}")
    no_credentials = {
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
    }

    result = vtag(
        "ingest",
        "--src",
        raw,
        "--dest",
        f"s3://{bucket}/parquet/",
        "--db",
        sqlite_url,
        env=no_credentials,
        unset=("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"),
    )

    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line == (
        f"vtag ingest: error: no S3 credentials for s3://{bucket}/parquet: set AWS_ACCESS_KEY_ID and "
        "AWS_SECRET_ACCESS_KEY (or the Airflow connection yt8m_s3)"
    )
    client = boto3.client("s3", endpoint_url=config.endpoint_url, region_name="us-east-1")
    assert client.list_objects_v2(Bucket=bucket).get("KeyCount") == 0
    assert in_transaction(sqlite_url, manifest.rows) == []


@pytest.mark.parametrize("broken", ["postgresql", "sqlite"])
def test_an_unreachable_database_is_one_log_line_per_shard(broken, tmp_path, caplog):
    raw = tmp_path / "raw"
    for i in range(3):
        _shard(raw / f"train000{i}.tfrecord", f"uu0{i}")
    (tmp_path / "a-folder.db").mkdir()  # SQLite cannot open a folder as its database
    db_url = {
        "postgresql": "postgresql://postgres@127.0.0.1:1/vtag",
        "sqlite": f"sqlite:///{tmp_path / 'a-folder.db'}",
    }[broken]
    shards = LocalStore().list(str(raw))

    with caplog.at_level(logging.ERROR, logger="tasks.ingest"):  # force: no manifest query first, as if the
        report = convert_batch(shards, str(tmp_path / "parquet"), db_url, force=True)  # database left mid-batch

    assert report.retryable == {s.uri for s in shards} and not report.converted
    records = [r for r in caplog.records if r.name == "tasks.ingest"]
    assert len(records) == 3 and not any(r.exc_info for r in records)
    for shard, record in zip(shards, records):
        message = record.getMessage()
        assert shard.uri in message and "OperationalError" in message and "\n" not in message
    assert list(tmp_path.rglob("*.parquet")) == []


# --- the DAG: canonical locations and the `replace` param ---------------------------------------------


@pytest.mark.airflow
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # the functions it calls run on both above
def test_the_ingest_dag_refuses_a_second_source_unless_replace_is_set(dagbag, tmp_path, dag_db_url):
    from tests.test_dag_ingest import _asset_events

    dag, db_url = dagbag.get_dag("yt8m_ingest"), dag_db_url
    first, second, dest = tmp_path / "first", tmp_path / "second", tmp_path / "parquet"
    a = _shard(first / "train0000.tfrecord", "aa01")
    b = _shard(second / "train0000.tfrecord", "bb01", "bb02")
    out = dest / "frame/train/train0000.parquet"
    assert dag.params["replace"] is False

    assert dag.test(run_conf={"src": f"{first}/", "dest": f"file://{dest}/"}).state == "success"
    assert _asset_events()[-1]["dest"] == str(dest) and _asset_events()[-1]["outputs"] == [str(out)]

    refused = dag.test(run_conf={"src": str(second), "dest": str(dest)})
    assert refused.state == "failed" and _ids_in(out) == ["aa01"]
    rows = {r["source_uri"]: r for r in in_transaction(db_url, manifest.rows, str(dest))}
    assert rows[str(b)]["status"] == "failed" and str(a) in rows[str(b)]["error"]

    replaced = dag.test(run_conf={"src": str(second), "dest": str(dest), "replace": True})
    assert replaced.state == "success" and _ids_in(out) == ["bb01", "bb02"]
    assert [v[:3] for v in _videos(db_url)] == [("bb01", "frame", str(b)), ("bb02", "frame", str(b))]
    rows = {r["source_uri"]: r for r in in_transaction(db_url, manifest.rows, str(dest))}
    assert rows[str(a)]["status"] == "replaced" and str(b) in rows[str(a)]["error"]
    assert _asset_events()[-1]["outputs"] == [str(out)]
