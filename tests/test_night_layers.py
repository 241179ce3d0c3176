"""Later nights published as layers of their own (storage/database/partitions.py, migration 0017), and their
merge into the version's base: every video's rows served once, whichever layer holds them."""

from datetime import UTC, datetime, timedelta

import pytest

from storage.database import partitions
from tasks.cli import main as vtag
from tasks.inference import merge_night_layers, run_inference
from tests.support.worlds import NIGHT, VIDEOS, build_world, count, rows

K = 3


@pytest.fixture
def world(raw_shards, tiny_checkpoint, tmp_path, db_url):
    return build_world(raw_shards, tmp_path, db_url, checkpoint=tiny_checkpoint)


@pytest.fixture
def pg_world(raw_shards, tiny_checkpoint, tmp_path, pg_url):
    return build_world(raw_shards, tmp_path, pg_url, checkpoint=tiny_checkpoint)


def _per_video(db_url: str, version: int) -> dict[str, int]:
    return dict(
        rows(db_url, "SELECT video_id, COUNT(*) FROM predictions WHERE model_version = :v GROUP BY video_id", v=version)
    )


def _three_nights(world) -> tuple[int, int, list[str]]:
    """A first night (the validate videos, ingested two days ago), a later whole night in two parts (the train
    videos: its parts' rows inserted into its layer) and a targeted rescoring across both (its one part's
    table renamed to its layer); returns the later two runs and the rescored videos."""
    db_url, version = world["db"], world["version"]
    from sqlalchemy import text

    from storage.database.db import engine_for

    ago = datetime.now(UTC) - timedelta(days=2)
    with engine_for(db_url).begin() as conn:
        conn.execute(text("UPDATE videos SET ingested_at = :t WHERE parquet_uri LIKE '%/validate/%'"), {"t": ago})
    first = run_inference(db_url, ago + timedelta(hours=1), top_k=K, exports_uri=world["exports"] + "/1")
    later = run_inference(db_url, NIGHT, top_k=K, part_videos=1, exports_uri=world["exports"] + "/2")
    assert (first.videos, later.videos) == (10, VIDEOS - 10)  # 10 validate videos, then 40 train ones
    assert count(db_url, "SELECT COUNT(*) FROM inference_parts WHERE run_id = :r", r=later.run_id) == 2
    validate = [v for (v,) in rows(db_url, "SELECT video_id FROM videos WHERE parquet_uri LIKE '%/validate/%'")]
    train = [v for (v,) in rows(db_url, "SELECT video_id FROM videos WHERE parquet_uri LIKE '%/train/%'")]
    some = sorted(train[:3] + validate[:2])
    rescored = run_inference(
        db_url, NIGHT + timedelta(hours=1), top_k=K, video_ids=some, exports_uri=world["exports"] + "/3"
    )
    assert rescored.videos == 5
    assert _per_video(db_url, version) == dict.fromkeys(train + validate, K)  # each video's rows once
    return later.run_id, rescored.run_id, some


def test_later_nights_are_layers_until_merged_and_every_video_keeps_its_rows_once(world, db_url, capsys):
    version = world["version"]
    later, rescored, some = _three_nights(world)
    postgresql = db_url.startswith("postgresql")
    by_run = dict(
        rows(db_url, "SELECT run_id, COUNT(*) FROM predictions WHERE model_version = :v GROUP BY run_id", v=version)
    )
    assert by_run[later] == (VIDEOS - 10 - 3) * K and by_run[rescored] == 5 * K  # the rescoring replaced theirs
    if postgresql:
        assert in_layers(db_url, version) == [later, rescored]
        layer = partitions.layer_name(version, later)
        assert count(db_url, f"SELECT COUNT(*) FROM {layer}") == (VIDEOS - 10 - 3) * K
        assert count(db_url, f"SELECT COUNT(*) FROM {partitions.base_name(version)}") == (10 - 2) * K
        assert count(db_url, "SELECT COUNT(*) FROM pg_indexes WHERE tablename = :t", t=layer) == 4  # attached whole
        assert count(db_url, "SELECT relallvisible FROM pg_class WHERE relname = :t", t=layer) > 0  # vacuumed
    # Served from whichever layer: the view people query finds a rescored video's rows, K of them.
    assert count(db_url, "SELECT COUNT(*) FROM production_labels WHERE video_id = :v", v=some[0]) == K

    assert merge_night_layers(db_url, at_most=2) == {}  # two layers: not due
    merged = merge_night_layers(db_url, at_most=1)
    assert merged == ({version: (VIDEOS - 10 - 3 + 5) * K} if postgresql else {})
    if postgresql:
        assert in_layers(db_url, version) == []
        assert count(db_url, f"SELECT COUNT(*) FROM {partitions.base_name(version)}") == VIDEOS * K
        assert count(db_url, "SELECT to_regclass(:t)::text", t=partitions.layer_name(version, later)) is None
    first = rows(db_url, "SELECT MIN(run_id) FROM predictions")[0][0]  # the first night's rows keep its run
    assert rows(db_url, "SELECT DISTINCT layer FROM predictions ORDER BY layer") == (
        [(0,), (first,)] if postgresql else [(0,)]
    )
    assert set(_per_video(db_url, version).values()) == {K} and len(_per_video(db_url, version)) == VIDEOS
    after = dict(
        rows(db_url, "SELECT run_id, COUNT(*) FROM predictions WHERE model_version = :v GROUP BY run_id", v=version)
    )
    assert after == by_run  # the rows moved, their runs and counts with them

    # The next night after the merge is a layer again; `vtag merge-nights --at-most 0` merges it at once.
    rerun = run_inference(db_url, NIGHT + timedelta(hours=2), top_k=K, video_ids=some[:1], exports_uri=world["exports"])
    assert in_layers(db_url, version) == ([rerun.run_id] if postgresql else [])
    assert vtag(["merge-nights", "--at-most", "0", "--db", db_url]) == 0
    said = capsys.readouterr().out
    assert (f"model version {version}: {K} rows" in said) if postgresql else ("no model version" in said)
    assert in_layers(db_url, version) == [] and count(db_url, "SELECT COUNT(*) FROM predictions") == VIDEOS * K


def in_layers(db_url: str, version: int) -> list[int]:
    from storage.database.db import engine_for

    with engine_for(db_url).connect() as conn:
        return partitions.layers(conn, version)


def test_a_lookup_reads_the_base_and_each_layer_by_index(pg_world, pg_url):
    """A video's rows, with a night's layer not merged yet: one primary-key probe per layer, no scan."""
    world = pg_world
    later, rescored, some = _three_nights(world)
    from sqlalchemy import text

    from storage.database.db import engine_for

    with engine_for(pg_url).begin() as conn:
        conn.exec_driver_sql("SET LOCAL enable_seqscan = off")  # 50 videos: a scan would cost the planner less
        plan = conn.execute(
            text(
                "EXPLAIN (FORMAT JSON) SELECT rank, label_id, score FROM predictions "
                "WHERE model_version = :v AND video_id = :id ORDER BY rank"
            ),
            {"v": world["version"], "id": some[0]},
        ).scalar()[0]["Plan"]
    scans = []

    def walk(node):
        if "Relation Name" in node:
            scans.append((node["Node Type"], node["Relation Name"]))
        for child in node.get("Plans", []):
            walk(child)

    walk(plan)
    version = world["version"]
    tables = {
        partitions.base_name(version),
        partitions.layer_name(version, later),
        partitions.layer_name(version, rescored),
    }
    assert {table for _, table in scans} == tables
    assert {kind for kind, _ in scans} <= {"Index Scan", "Index Only Scan", "Bitmap Heap Scan"}


def test_a_night_whose_videos_all_left_leaves_no_empty_layer(pg_world, pg_url):
    """A later night with nothing left to publish (its part's rows all left out): no empty layer attached."""
    from storage.database import db, prediction_writes, runs

    world, db_url = pg_world, pg_url
    version = world["version"]
    first = run_inference(db_url, NIGHT, top_k=K, exports_uri=world["exports"])
    assert first.videos == VIDEOS
    with db.transaction(db_url) as conn:
        run = runs.start_run(conn, NIGHT + timedelta(days=1), version, K, None)
        runs.record_parts(conn, run, [{"part": 0, "first_uri": "", "last_uri": "~", "files": 0, "videos": 0}])
        runs.start_part(conn, run, 0)
        prediction_writes.create_part_table(conn, version, run, 0)
        published = prediction_writes.publish(conn, run, version, "frame", [0], K, replace_any=False)
    assert published.filled is None and in_layers(db_url, version) == []


def test_migration_0017_makes_each_versions_rows_its_base_and_back(empty_pg_url):
    """A database of before: a version's plain partition becomes a partition by layer whose base holds its
    rows, a night's part table in flight gets the column; the downgrade merges any layer back first."""
    from sqlalchemy import text

    from storage.database import db
    from storage.database.db import engine_for

    url = empty_pg_url
    db.upgrade(url, "0016")
    with engine_for(url).begin() as conn:
        conn.execute(text("CREATE TABLE predictions_v1 PARTITION OF predictions FOR VALUES IN (1)"))
        conn.execute(
            text(
                "INSERT INTO predictions (video_id, model_version, rank, label_id, score, run_id) "
                "SELECT 'v' || g, 1, r, r, 1.0 / r, 1 FROM generate_series(1, 30) g, generate_series(1, 3) r"
            )
        )
        conn.execute(text("CREATE TABLE predictions_v1_run2_part0 (LIKE predictions INCLUDING DEFAULTS)"))
    engine_for(url).dispose()
    db.upgrade(url)
    engine_for(url).dispose()
    kind = "SELECT relkind::text FROM pg_class WHERE relname = :t"
    assert count(url, kind, t="predictions_v1") == "p" and count(url, kind, t="predictions_v1_base") == "r"
    assert count(url, "SELECT COUNT(*) FROM predictions_v1_base WHERE layer = 0") == 90
    assert count(url, "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = 'predictions_pkey'") == (
        "PRIMARY KEY (video_id, model_version, rank, layer)"
    )
    assert (
        count(
            url,
            "SELECT COUNT(*) FROM information_schema.columns WHERE table_name = :t AND column_name = 'layer'",
            t="predictions_v1_run2_part0",
        )
        == 1
    )

    with engine_for(url).begin() as conn:  # a later night's layer, not merged when the downgrade comes
        table = partitions.create_layer(conn, 1, 3)
        conn.exec_driver_sql(
            f"INSERT INTO {table} (video_id, model_version, rank, label_id, score, run_id, layer) "
            "SELECT 'w' || g, 1, 1, 7, 0.5, 3, 3 FROM generate_series(1, 5) g"
        )
        partitions.attach_layer(conn, 1, 3)
        assert partitions.layers(conn, 1) == [3]
    engine_for(url).dispose()
    db.downgrade(url, "0016")
    engine_for(url).dispose()
    assert count(url, kind, t="predictions_v1") == "r" and count(url, kind, t="predictions_v1_base") is None
    assert count(url, "SELECT COUNT(*) FROM predictions WHERE model_version = 1") == 95


@pytest.mark.parametrize("raw", ["-1", "seven", "2.5"])
def test_a_bad_night_layers_setting_is_refused_naming_it(monkeypatch, raw):
    from tasks.settings import night_layers

    monkeypatch.setenv("VTAG_NIGHT_LAYERS", raw)
    with pytest.raises(
        ValueError, match=f"VTAG_NIGHT_LAYERS must be a whole number of nights \\(0 or more\\), not '{raw}'"
    ):
        night_layers()
    monkeypatch.setenv("VTAG_NIGHT_LAYERS", "")
    assert night_layers() == 7 and night_layers(0, "at_most") == 0
    with pytest.raises(ValueError, match="at_most must be"):
        night_layers(-2, "at_most")
