"""Ingest on local disk: Parquet layout and content, reruns, quarantine, atomic publish, real shards."""

import os
import random

import numpy as np
import pyarrow.parquet as pq
import pytest
from tfrecord.reader import tfrecord_loader

from storage.database import manifest
from storage.formats.parquet_layout import FRAME_SCHEMA, VIDEO_SCHEMA
from storage.objectstore import LocalStore, ObjectInfo
from tasks import ingest as ingest_module
from tasks.ingest import MAX_BATCHES, convert_batch, ingest, list_pending, plan_batches
from tasks.synth import SynthConfig, synth
from tests.support.db import in_transaction
from tests.support.shards import flip_byte, frame_record, record_offsets, video_record, write_shard, write_tiny_shards


@pytest.fixture
def frame_shards(tmp_path):
    raw = tmp_path / "raw"
    synth(str(raw), SynthConfig("frame", "train", shards=2, videos_per_shard=12, seed=5))
    synth(str(raw), SynthConfig("frame", "validate", shards=1, videos_per_shard=6, seed=5))
    return raw


def test_frame_level_layout_schema_and_bytes_identical(frame_shards, tmp_path, sqlite_url):
    dest = tmp_path / "parquet"
    report = ingest(str(frame_shards), str(dest), sqlite_url)
    assert not report.failed and len(report.converted) == 3
    files = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert files == [
        "frame/train/train0000.parquet",
        "frame/train/train0001.parquet",
        "frame/validate/validate0000.parquet",
    ]

    table = pq.read_table(dest / "frame/train/train0001.parquet")
    assert table.schema.equals(FRAME_SCHEMA)
    rows = table.to_pylist()
    source = tfrecord_loader(
        str(frame_shards / "train0001.tfrecord"),
        None,
        description={"id": "byte", "labels": "int"},
        sequence_description={"rgb": "byte", "audio": "byte"},
    )
    count = 0
    for row, (context, sequence) in zip(rows, source, strict=True):
        assert row["id"] == bytes(context["id"]).decode()
        assert row["labels"] == context["labels"].tolist()
        assert row["num_frames"] == len(sequence["rgb"])
        assert row["rgb"] == b"".join(bytes(f) for f in sequence["rgb"])
        assert row["audio"] == b"".join(bytes(f) for f in sequence["audio"])
        count += 1
    assert count == 12


def test_video_level_real_shard_round_trip(yt8m_dir, tmp_path, sqlite_url):
    src = yt8m_dir / "video_level"
    report = ingest(str(src), str(tmp_path / "pq"), sqlite_url, pattern="validate0000.tfrecord")
    assert report.converted[0]["rows"] == 284
    table = pq.read_table(tmp_path / "pq/video/validate/validate0000.parquet")
    assert table.schema.equals(VIDEO_SCHEMA)
    source = tfrecord_loader(
        str(src / "validate0000.tfrecord"),
        None,
        description={"id": "byte", "labels": "int", "mean_rgb": "float", "mean_audio": "float"},
    )
    for row, ref in zip(table.to_pylist(), source, strict=True):
        assert row["id"] == bytes(ref["id"]).decode()
        assert row["labels"] == ref["labels"].tolist()
        assert np.array_equal(np.asarray(row["mean_rgb"], np.float32), ref["mean_rgb"])
        assert np.array_equal(np.asarray(row["mean_audio"], np.float32), ref["mean_audio"])


def test_all_real_video_level_shards_ingest_cleanly(yt8m_dir, tmp_path, sqlite_url):
    shards = sorted((yt8m_dir / "video_level").glob("*.tfrecord"))  # however many ../shared holds
    report = ingest(str(yt8m_dir / "video_level"), str(tmp_path / "pq"), sqlite_url)
    assert not report.failed and len(report.converted) == len(shards) > 0
    table = pq.read_table(tmp_path / "pq/video/validate")
    assert table.num_rows == sum(r["rows"] for r in report.converted) == sum(len(record_offsets(s)) for s in shards)
    labels = table.column("labels").combine_chunks().flatten().to_numpy()
    assert labels.min() >= 0 and labels.max() <= 3861
    assert len(set(table.column("id").to_pylist())) == table.num_rows


def test_rerun_skips_unchanged_and_redoes_changed(frame_shards, tmp_path, db_url):
    dest = str(tmp_path / "parquet")
    first = ingest(str(frame_shards), dest, db_url)
    assert len(first.converted) == 3
    again = ingest(str(frame_shards), dest, db_url)
    assert (again.converted, again.skipped) == ([], 3)
    assert len(in_transaction(db_url, manifest.rows, dest)) == 3  # never duplicated

    synth(str(frame_shards), SynthConfig("frame", "train", shards=1, videos_per_shard=4, seed=99))  # rewrites train0000
    changed = ingest(str(frame_shards), dest, db_url)
    assert [c["source_uri"] for c in changed.converted] == [str(frame_shards / "train0000.tfrecord")]
    assert pq.read_metadata(tmp_path / "parquet/frame/train/train0000.parquet").num_rows == 4

    os.remove(tmp_path / "parquet/frame/train/train0001.parquet")  # an output deleted behind our back
    assert [c["output_uri"] for c in ingest(str(frame_shards), dest, db_url).converted] == [
        f"{dest}/frame/train/train0001.parquet"
    ]
    assert len(ingest(str(frame_shards), dest, db_url, force=True).converted) == 3
    rows = in_transaction(db_url, manifest.rows, dest)
    assert len(rows) == 3 and {r["status"] for r in rows} == {"succeeded"}
    assert all(r["checksum"].startswith("crc32c:") and r["finished_at"] >= r["started_at"] for r in rows)


def _bad_shards(raw):
    """Four shards, each broken in one of the ways the manifest must name; record 1 is the bad one."""
    good = [frame_record("aa01"), frame_record("aa02"), frame_record("aa03")]
    crc = write_shard(raw / "train0001.tfrecord", good)
    flip_byte(crc, record_offsets(crc)[1] + 200)
    truncated = write_shard(raw / "train0002.tfrecord", good[:2])
    truncated.write_bytes(truncated.read_bytes()[:-10])
    write_shard(raw / "train0003.tfrecord", [good[0], b"\x08\x96\x01 not youtube-8m at all"])
    write_shard(raw / "train0004.tfrecord", [good[0], frame_record("aa09", drop=("audio",))])
    return {
        "train0001": "data CRC mismatch",
        "train0002": "truncated",
        "train0003": "not a tf.train|neither",
        "train0004": "missing feature list 'audio'",
    }


def test_bad_shards_are_quarantined_and_good_ones_convert(tmp_path, db_url):
    raw, dest = tmp_path / "raw", tmp_path / "parquet"
    write_shard(raw / "train0000.tfrecord", [frame_record("ok01"), frame_record("ok02")])
    write_shard(raw / "validate0000.tfrecord", [video_record("ok03")])
    expected = _bad_shards(raw)
    report = ingest(str(raw), str(dest), db_url)

    assert sorted(c["source_uri"].rsplit("/", 1)[-1] for c in report.converted) == [
        "train0000.tfrecord",
        "validate0000.tfrecord",
    ]
    assert sorted(report.failed) == sorted(str(raw / f"{stem}.tfrecord") for stem in expected)
    outputs = sorted(p.name for p in dest.rglob("*") if p.is_file())
    assert outputs == ["train0000.parquet", "validate0000.parquet"]  # nothing for the bad shards, no temp files

    rows = {r["source_uri"].rsplit("/", 1)[-1][:-9]: r for r in in_transaction(db_url, manifest.rows, str(dest))}
    offsets = record_offsets(raw / "train0001.tfrecord")
    for stem, reason in expected.items():
        row = rows[stem]
        assert row["status"] == "failed" and row["output_uri"] is None
        assert row["error_record"] == 1 and row["error_offset"] == offsets[1]
        assert str(raw / f"{stem}.tfrecord") in row["error"] and "record 1 at byte offset" in row["error"]
        assert __import__("re").search(reason, row["error"]), row["error"]
    assert rows["train0000"]["status"] == "succeeded" and rows["train0000"]["rows"] == 2
    from sqlalchemy import text

    from storage.database.db import engine_for

    with engine_for(db_url).connect() as conn:  # the catalogue holds the good shards' videos only
        catalogued = conn.execute(text("SELECT video_id, level FROM videos ORDER BY video_id")).all()
    assert [tuple(r) for r in catalogued] == [("ok01", "frame"), ("ok02", "frame"), ("ok03", "video")]

    # Bad shards stay pending: a rerun tries them again, and converts them once repaired.
    write_shard(raw / "train0001.tfrecord", [frame_record("fx01")])
    rerun = ingest(str(raw), str(dest), db_url)
    assert [c["source_uri"] for c in rerun.converted] == [str(raw / "train0001.tfrecord")]
    assert len(rerun.failed) == 3 and rerun.skipped == 2


def test_shard_name_without_split_is_quarantined(tmp_path, sqlite_url):
    write_shard(tmp_path / "raw" / "holdout0000.tfrecord", [frame_record()])
    report = ingest(str(tmp_path / "raw"), str(tmp_path / "pq"), sqlite_url)
    assert "must start with train, validate or test" in report.failed[str(tmp_path / "raw" / "holdout0000.tfrecord")]


def test_failure_mid_write_leaves_nothing_visible(tmp_path, sqlite_url, monkeypatch):
    raw, dest = tmp_path / "raw", tmp_path / "parquet"
    synth(str(raw), SynthConfig("frame", "train", shards=1, videos_per_shard=30))
    seen_partial = []

    class CrashingWriter(ingest_module.ShardParquetWriter):
        """Flushes a row group per video, then dies on the 25th with 24 row groups already on disk."""

        def __init__(self, path, level):
            super().__init__(path, level, row_group_bytes=1)
            self.path = path

        def add(self, video):
            if self.rows_written == 24:
                seen_partial.append(self.path.stat().st_size)
                raise OSError("disk went away")
            super().add(video)

    monkeypatch.setattr(ingest_module, "ShardParquetWriter", CrashingWriter)
    report = ingest(str(raw), str(dest), sqlite_url)
    assert report.failed == {str(raw / "train0000.tfrecord"): f"{raw / 'train0000.tfrecord'}: OSError: disk went away"}
    assert seen_partial and seen_partial[0] > 1_000_000  # the crash really came mid-write
    assert [p for p in dest.rglob("*") if p.is_file()] == []  # neither the output nor a temporary file
    (row,) = in_transaction(sqlite_url, manifest.rows, str(dest))
    assert row["status"] == "failed" and "disk went away" in row["error"]

    monkeypatch.undo()
    assert ingest(str(raw), str(dest), sqlite_url).converted[0]["rows"] == 30


def test_empty_source_folder_and_missing_folder(tmp_path, sqlite_url):
    (tmp_path / "empty").mkdir()
    assert ingest(str(tmp_path / "empty"), str(tmp_path / "pq"), sqlite_url).converted == []
    from storage.objectstore import StoreError

    with pytest.raises(StoreError, match="no such folder"):
        ingest(str(tmp_path / "missing"), str(tmp_path / "pq"), sqlite_url)


def _infos(names: list[str]) -> list[ObjectInfo]:
    return [ObjectInfo(f"/raw/{name}", 1, "mtime_ns=1") for name in names]


def test_plan_batches_one_shard_each_while_few():
    shards = _infos(["train0002.tfrecord", "train0000.tfrecord", "validate0000.tfrecord", "train0001.tfrecord"])
    assert [[s.name for s in batch] for batch in plan_batches(shards, max_batches=4)] == [
        ["train0000.tfrecord"],
        ["train0001.tfrecord"],
        ["train0002.tfrecord"],
        ["validate0000.tfrecord"],
    ]
    assert plan_batches([]) == []


@pytest.mark.parametrize("count", [1, MAX_BATCHES - 1, MAX_BATCHES, MAX_BATCHES + 1, 1100, 3844, 11532])
def test_plan_batches_contiguous_near_equal_and_bounded(count):
    names = [f"{split}{i:04d}.tfrecord" for split in ("train", "validate", "test") for i in range(3844)][:count]
    shards = _infos(names)
    random.Random(count).shuffle(shards)
    batches = plan_batches(shards)
    assert len(batches) == min(count, MAX_BATCHES)
    sizes = [len(batch) for batch in batches]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    assert [s for batch in batches for s in batch] == sorted(shards, key=lambda s: s.uri)  # each once, in name order


def test_plan_batches_bound():
    assert MAX_BATCHES < 1024  # Airflow's [core] max_map_length
    assert [len(b) for b in plan_batches(_infos([f"train{i:04d}.tfrecord" for i in range(10)]), max_batches=3)] == [
        4,
        3,
        3,
    ]
    with pytest.raises(ValueError, match="at least 1"):
        plan_batches(_infos(["train0000.tfrecord"]), max_batches=0)


def test_list_pending_lists_the_destination_instead_of_asking_per_shard(tmp_path, sqlite_url, monkeypatch):
    raw, dest = tmp_path / "raw", tmp_path / "parquet"
    write_tiny_shards(raw, range(30))
    assert len(ingest(str(raw), str(dest), sqlite_url).converted) == 30
    os.remove(dest / "frame/train/train0007.parquet")  # an output deleted behind our back
    listed = []
    real_list = LocalStore.list

    def list_once(self, uri, pattern="*"):
        listed.append(uri)
        return real_list(self, uri, pattern)

    def no_head(self, uri):  # on S3 one HEAD request per shard: minutes at 11,532 shards
        raise AssertionError(f"asked for {uri} alone")

    monkeypatch.setattr(LocalStore, "list", list_once)
    monkeypatch.setattr(LocalStore, "info", no_head)
    pending, skipped = list_pending(str(raw), str(dest), sqlite_url)
    assert ([s.name for s in pending], skipped) == (["train0007.tfrecord"], 29)
    assert listed == [str(raw), f"{dest}/frame/train"]


def test_convert_batch_goes_on_past_failures_and_a_retry_redoes_only_the_rest(tmp_path, sqlite_url, monkeypatch):
    raw, dest = tmp_path / "raw", str(tmp_path / "parquet")
    write_tiny_shards(raw, range(5))
    flip_byte(raw / "train0003.tfrecord", 30)  # bad content
    shards, _ = list_pending(str(raw), dest, sqlite_url)
    real_convert, tried, dropped = ingest_module.Converter._convert, [], []

    def flaky(converter, shard):  # the store drops train0001's first read
        tried.append(shard.name)
        if shard.name == "train0001.tfrecord" and not dropped:
            dropped.append(shard.name)
            raise ConnectionError("connection reset by peer")
        return real_convert(converter, shard)

    monkeypatch.setattr(ingest_module.Converter, "_convert", flaky)
    first = convert_batch(shards, dest, sqlite_url)
    uri = {s.name[:-9]: s.uri for s in shards}
    assert [r["source_uri"] for r in first.converted] == [uri["train0000"], uri["train0002"], uri["train0004"]]
    assert first.failed == {
        uri["train0001"]: f"{uri['train0001']}: ConnectionError: connection reset by peer",
        uri["train0003"]: first.quarantined[uri["train0003"]],
    }
    assert first.retryable == {uri["train0001"]} and "CRC" in first.quarantined[uri["train0003"]]
    assert {r["source_uri"]: r["status"] for r in in_transaction(sqlite_url, manifest.rows, dest)}[
        uri["train0001"]
    ] == "failed"

    tried.clear()
    retry = convert_batch(shards, dest, sqlite_url)  # as Airflow's retry of the batch does
    assert tried == ["train0001.tfrecord", "train0003.tfrecord"]  # the converted ones are not read again
    assert [r["source_uri"] for r in retry.converted] == [uri["train0001"]]
    assert (retry.skipped, list(retry.failed), retry.retryable) == (3, [uri["train0003"]], set())
    assert len(convert_batch(shards, dest, sqlite_url, force=True).converted) == 4
