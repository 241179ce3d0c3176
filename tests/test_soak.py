"""The soak: 16 nights of nightly inference on PostgreSQL, with faults injected at seeded random points.

The catalogue starts as the `raw_shards` world (Parquet on S3, reached through a proxy that can cut it)
and grows before some nights by one small new shard; once, a new model version is promoted, so that
its first night rescores everything. Each night runs as the DAG runs it: plan_night, tag_part for each
part with the task's retries (each retry a fresh connection pool, as a new worker process has), then
finish_night; a night that ends failed is run again for the same logical date. Some nights get one fault:

- `sigkill`: one part's first try runs in a worker process of its own, SIGKILLed between two chunks;
- `db_restart`: the test's own PostgreSQL restarted (`pg_ctl restart -m fast`) inside one chunk's transaction;
- `db_restart_finish`: the same inside the transaction that marks the night succeeded (the night fails, and
  is run again for its logical date);
- `s3_outage`: the S3 endpoint gone for 1-3 s from one Parquet GET on (connections reset, new ones refused);
- `two_tries_part`: two tries of one part at once (a try presumed lost and its retry, separate pools);
- `two_tries_night`: two whole runs of the night at once (`vtag infer` beside the DAG's run).

Once, after the first new shard was scored, a shard already scored is rewritten under the same name and
ids with other features and ingested again: that night must score exactly its videos again (issue 29's
lineage), besides whatever else it has to do.

After every failed try and every night the invariants are checked in SQL (`check_night`), and a broken one
fails the test naming the night, the video or run, and the counts. The size is fixed (NIGHTS, FAULTS,
ARRIVALS), not a wall clock; the schedule comes from a seed, printed first: VTAG_SOAK_SEED=<seed> replays it.
"""

import csv
import math
import os
import random
import shutil
import signal
import threading
import time
from collections import Counter
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import event, text

import tasks.inference as inference
from model import checkpoint
from storage.database import catalog, prediction_writes
from storage.database.db import engine_for
from storage.objectstore import S3Config
from tasks.ingest import ingest
from tasks.synth import SynthConfig, synth
from tasks.training import evaluate_model, promote
from tests.support.db import in_transaction, migrated
from tests.support.env import SHARED
from tests.support.faults import FlakyProxy, PrivateCluster, kill_part_worker_after, start_part_worker
from tests.support.worlds import NIGHT, VIDEOS, build_world, count, part_tables, rows

NIGHTS = 16
K = 3
CHUNK_VIDEOS = 4  # many chunks a night, so that a fault lands between or inside them
PART_VIDEOS = 12  # about one Parquet file a part: several parts a night
PART_RETRIES = 3  # the DAG's tag_part
NIGHT_RERUNS = 1  # a night that ended failed, cleared and run again for its logical date
ARRIVALS, ARRIVAL_VIDEOS = 9, 6  # new shards, one before each of 9 nights
FAULTS = {
    "sigkill": 3,
    "db_restart": 2,
    "db_restart_finish": 1,
    "s3_outage": 2,
    "two_tries_part": 1,
    "two_tries_night": 1,
}
KILL_WRITE_DELAY_S = 1.0  # the killed worker's pause after each commit: the kill lands before its part ends


# --- the checks ------------------------------------------------------------------------------------------


@dataclass
class Checked:
    facts: int = 0  # videos, runs, parts, label counts and export lines looked at
    rows: int = 0  # prediction rows read


def check_night(
    db_url: str,
    night: str,
    *,
    k: int,
    production_version: int,
    until: datetime,
    run_id: int,
    expected_videos: set[str],
    catalogue: int,
    csv_path: str | None,
    superseded: dict[int, int] | None = None,
) -> Checked:
    """Every invariant of a finished night, in SQL; raises AssertionError naming each break. `superseded`:
    {run: its rows dropped since because their videos' content changed}."""
    broken, checked = [], Checked()
    _check_predictions(db_url, k, broken, checked)
    _check_nothing_lost(db_url, production_version, until, catalogue, broken, checked)
    _check_runs(db_url, broken, checked, superseded or {})
    scored = _check_tonight(db_url, run_id, production_version, expected_videos, broken, checked)
    if csv_path is not None:
        _check_export(csv_path, run_id, scored, broken, checked)
    assert not broken, f"{night}: {len(broken)} invariant(s) broken:\n  " + "\n  ".join(broken[:20])
    return checked


def _check_predictions(db_url, k, broken, checked) -> None:
    """Each scored video: exactly k rows per model version, ranks 1..k, all from one run."""
    groups = rows(
        db_url,
        "SELECT video_id, model_version, COUNT(*), COUNT(DISTINCT rank), MIN(rank), MAX(rank), "
        "COUNT(DISTINCT run_id), MIN(run_id), MAX(run_id) FROM predictions "
        "GROUP BY video_id, model_version ORDER BY video_id, model_version",
    )
    for video, version, n, ranks, low, high, runs, first_run, last_run in groups:
        if (n, ranks, low, high, runs) != (k, k, 1, k, 1):
            broken.append(
                f"video {video}, model version {version}: {n} rows, ranks {low}..{high} ({ranks} distinct), "
                f"from {runs} run(s) ({first_run}..{last_run}); expected exactly {k} rows, ranks 1..{k}, one run"
            )
    checked.facts += len(groups)
    checked.rows += sum(g[2] for g in groups)


def _check_nothing_lost(db_url, version, until, catalogue, broken, checked) -> None:
    """The catalogue holds every video ingested, and production has scored each one."""
    held = count(db_url, "SELECT COUNT(*) FROM videos WHERE level = 'frame'")
    if held != catalogue:
        broken.append(f"the catalogue holds {held} videos; {catalogue} were ingested")
    missing = sorted(unscored_videos(db_url, version, until))
    broken += [f"video {v}: in the catalogue, no rows of production model version {version}" for v in missing[:10]]
    checked.facts += held


def unscored_videos(db_url: str, version: int, until: datetime) -> set[str]:
    """The catalogue's videos, ingested by `until`, that the model version has no rows for."""
    return {
        v
        for (v,) in rows(
            db_url,
            "SELECT v.video_id FROM videos v WHERE v.level = 'frame' AND v.ingested_at <= :until "
            "AND NOT EXISTS (SELECT 1 FROM predictions p WHERE p.video_id = v.video_id "
            "AND p.model_version = :version)",
            until=until,
            version=version,
        )
    }


def _check_runs(db_url, broken, checked, superseded: dict[int, int]) -> None:
    """Every run of every night so far: succeeded, rows_written = videos_done x k = the rows it has stored,
    less those of videos whose content changed since (`superseded`)."""
    runs = rows(
        db_url,
        "SELECT r.run_id, r.logical_date, r.model_version, r.status, r.top_k, r.videos_total, r.videos_done, "
        "r.rows_written, r.load_table, r.error, (SELECT COUNT(*) FROM predictions p WHERE p.run_id = r.run_id "
        "AND p.model_version = r.model_version) FROM inference_runs r ORDER BY r.run_id",
    )
    for run, date, version, status, k, total, done, written, load_table, error, stored in runs:
        kept = written - superseded.get(run, 0)
        if (status, done, written, stored, load_table) != ("succeeded", total, done * k, kept, None):
            broken.append(
                f"run {run} ({date:%Y-%m-%d}, model version {version}): {status}, {done}/{total} videos, "
                f"rows_written {written} (videos_done x k = {done * k}), {stored} rows stored ({kept} expected)"
                f"{', load table ' + load_table if load_table else ''}{': ' + error if error else ''}"
            )
    broken += [f"part table {t} left behind by a finished night" for t in part_tables(db_url)]
    checked.facts += len(runs)


def _check_tonight(db_url, run_id, version, expected, broken, checked) -> set[str]:
    """Tonight's run scored exactly the videos production had not scored, in parts that all succeeded,
    with label counts that count each of its videos once per rank."""
    scored = {
        v
        for (v,) in rows(
            db_url,
            "SELECT DISTINCT video_id FROM predictions WHERE run_id = :run AND model_version = :v",
            run=run_id,
            v=version,
        )
    }
    if scored != expected:
        missing, extra = sorted(expected - scored), sorted(scored - expected)
        broken.append(
            f"run {run_id} scored {len(scored)} videos, expected the {len(expected)} not yet scored by model "
            f"version {version}: missing {missing[:10]}, not expected {extra[:10]}"
        )
    parts = rows(
        db_url,
        "SELECT part, status, videos_done, rows_written FROM inference_parts WHERE run_id = :run ORDER BY part",
        run=run_id,
    )
    for part, status, done, written in parts:
        if status != "succeeded":
            broken.append(f"run {run_id} part {part}: {status} ({done} videos, {written} rows) in a succeeded night")
    done = sum(p[2] for p in parts)
    for rank, videos in rows(
        db_url,
        "SELECT rank, SUM(videos) FROM inference_label_counts WHERE run_id = :run GROUP BY rank ORDER BY rank",
        run=run_id,
    ):
        if videos != done:
            broken.append(f"run {run_id}: label counts at rank {rank} count {videos} videos; its parts scored {done}")
    checked.facts += len(parts) + 1
    return scored


def _check_export(csv_path, run_id, scored, broken, checked) -> None:
    """The night's CSV lists each video the run scored, once."""
    with open(csv_path, newline="") as f:
        listed = Counter(r[0] for r in list(csv.reader(f))[1:])
    twice = sorted(v for v, n in listed.items() if n > 1)
    if twice or set(listed) != scored:
        broken.append(
            f"{csv_path}: {sum(listed.values())} lines for run {run_id}'s {len(scored)} videos; listed more "
            f"than once {twice[:10]}, missing {sorted(scored - set(listed))[:10]}, "
            f"not scored {sorted(set(listed) - scored)[:10]}"
        )
    checked.facts += sum(listed.values())


def check_between_tries(db_url: str, night: str, plan) -> Checked:
    """After a failed try (of a part, or of the night's finish): each chunk all or nothing (k rows per
    stored video), the parts' counters equal to the rows they left, and the run not shown succeeded, so
    that a retry starts from bookkeeping that tells the truth."""
    # The run's part tables, or, once the night has published them, `predictions`.
    tables = [t for t in part_tables(db_url) if t.startswith(f"predictions_v{plan.model_version}_run{plan.run_id}_")]
    of_run = {"run": plan.run_id, "v": plan.model_version}
    partial, stored = [], 0
    for table in tables or ["predictions"]:
        partial += rows(
            db_url,
            f"SELECT video_id, COUNT(*) FROM {table} WHERE run_id = :run AND model_version = :v "
            "GROUP BY video_id HAVING COUNT(*) <> :k ORDER BY video_id",
            k=plan.top_k,
            **of_run,
        )
        stored += count(db_url, f"SELECT COUNT(*) FROM {table} WHERE run_id = :run AND model_version = :v", **of_run)
    table = ", ".join(tables) or "predictions"
    counted = count(
        db_url, "SELECT COALESCE(SUM(rows_written), 0) FROM inference_parts WHERE run_id = :run", run=plan.run_id
    )
    broken = [
        f"video {v}: {n} rows of run {plan.run_id} in {table} (a chunk half written); expected {plan.top_k}"
        for v, n in partial[:10]
    ]
    if stored != counted:
        broken.append(f"run {plan.run_id}: its parts count {counted} rows written, {table} holds {stored}")
    status = count(db_url, "SELECT status FROM inference_runs WHERE run_id = :run", run=plan.run_id)
    if status == "succeeded":
        broken.append(f"run {plan.run_id}: shown succeeded after a try of it failed")
    assert not broken, f"{night}, between tries: " + "; ".join(broken)
    return Checked(facts=3 + len(partial), rows=stored)


# --- the schedule --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Night:
    number: int
    logical_date: datetime
    arrival: int | None  # the new shard ingested before this night, if any
    promotion: bool  # a new model version promoted before this night
    fault: str | None
    changed_shard: bool = False  # an earlier arrival rewritten with other content, same ids, before this night

    @property
    def label(self) -> str:
        return f"night {self.number} ({self.logical_date:%Y-%m-%d})"


def soak_schedule(rng: random.Random) -> list[Night]:
    """NIGHTS consecutive logical dates; ARRIVALS of them get a new shard first, one a promotion, and each
    fault of FAULTS lands on a night that has videos to score (a fault needs a write to interrupt)."""
    arrivals = sorted(rng.sample(range(1, NIGHTS), ARRIVALS))
    promotion = rng.randrange(NIGHTS // 3, NIGHTS)
    working = sorted({0, promotion, *arrivals})
    kinds = [kind for kind, n in FAULTS.items() for _ in range(n)]
    faulted = dict(zip(rng.sample(working, len(kinds)), kinds))
    arrival_of = {n: i for i, n in enumerate(arrivals)}
    changed = rng.randrange(arrivals[0] + 1, NIGHTS)  # an arrival scored before it can change
    return [
        Night(n, NIGHT + timedelta(days=n), arrival_of.get(n), n == promotion, faulted.get(n), n == changed)
        for n in range(NIGHTS)
    ]


# --- the world -----------------------------------------------------------------------------------------


@dataclass
class Soak:
    seed: int
    rng: random.Random
    db_url: str
    s3: S3Config
    parquet: str
    raw: Path
    arrivals: Path
    home: Path
    cluster: PrivateCluster
    proxy: FlakyProxy
    report: object
    version: int
    checkpoint: str
    catalogue: int = VIDEOS
    faults: Counter = field(default_factory=Counter)
    superseded: Counter = field(default_factory=Counter)  # run -> its rows of videos whose content changed
    checked: Checked = field(default_factory=Checked)
    failed_tries: int = 0
    reruns: int = 0

    def other_spelling(self) -> str:
        """The same database by another URL: its own engine and pool, as a second worker process has."""
        return self.db_url.replace("postgresql+psycopg2://", "postgresql://")

    def add(self, checked: Checked) -> None:
        self.checked.facts += checked.facts
        self.checked.rows += checked.rows


@pytest.fixture
def soak(s3, s3_server, raw_shards, tiny_checkpoint, tmp_path, report, monkeypatch):
    seed = int(os.environ.get("VTAG_SOAK_SEED") or random.SystemRandom().randrange(2**32))
    report.injected(f"seed {seed} (VTAG_SOAK_SEED={seed} replays this schedule)")
    _, bucket = s3
    cluster, proxy = PrivateCluster(), FlakyProxy(int(s3_server.rsplit(":", 1)[1]))
    try:
        cluster.start()
        db_url = migrated(cluster.create_database("vtag"))
        via_proxy = S3Config(
            endpoint_url=proxy.url, access_key_id="testing", secret_access_key="testing", region_name="us-east-1"
        )
        raw, arrivals, parquet = tmp_path / "raw", tmp_path / "arrivals", f"s3://{bucket}/parquet"
        shutil.copytree(raw_shards, raw)
        synth(
            str(arrivals),
            SynthConfig("frame", "test", shards=ARRIVALS, videos_per_shard=ARRIVAL_VIDEOS, num_labels=10, seed=5),
        )
        assert not ingest(str(raw), parquet, db_url, s3=via_proxy).failed
        in_transaction(db_url, catalog.load_vocabulary, str(SHARED / "yt8m" / "vocabulary.csv"))
        version = evaluate_model(tiny_checkpoint, parquet, db_url, s3=via_proxy)["version"]
        assert promote(db_url, version, s3=via_proxy)["promoted"]
        yield Soak(
            seed,
            random.Random(seed),
            db_url,
            via_proxy,
            parquet,
            raw,
            arrivals,
            tmp_path,
            cluster,
            proxy,
            report,
            version,
            tiny_checkpoint,
        )
    finally:
        proxy.close()
        engine_for.cache_clear()
        cluster.stop_and_delete()


def arrive(soak: Soak, night: Night) -> None:
    """A new shard lands in the raw folder and the ingest converts it (and only it)."""
    shard = f"test{night.arrival:04d}.tfrecord"
    shutil.move(soak.arrivals / shard, soak.raw / shard)
    converted = ingest(str(soak.raw), soak.parquet, soak.db_url, s3=soak.s3)
    assert not converted.failed and [c["source_uri"].rsplit("/", 1)[-1] for c in converted.converted] == [shard], (
        converted
    )
    soak.catalogue += ARRIVAL_VIDEOS


def change_a_shard(soak: Soak) -> set[str]:
    """An arrival already scored, rewritten under its name and ids with other features (each video's first
    frame shifted), ingested again; returns its videos, which must lose their predictions and be pending."""
    from storage.formats.tf_example import SequenceExample
    from storage.formats.tfrecord import read_records, write_records

    path = sorted(soak.raw.glob("test*.tfrecord"))[0]
    with open(path, "rb") as f:
        records = [r.data for r in read_records(f, str(path))]
    changed = []
    for data in records:
        record = SequenceExample.FromString(data)
        first = record.feature_lists.feature_list["rgb"].feature[0].bytes_list
        first.value[0] = bytes((b + 37) % 256 for b in first.value[0])
        changed.append(record.SerializeToString())
    with open(path, "wb") as f:
        write_records(f, changed)
    ids = {v for (v,) in rows(soak.db_url, "SELECT video_id FROM videos WHERE source_uri = :s", s=str(path))}
    # Scored already: by the production model, or (a promotion earlier tonight) by the one it replaced.
    scored = "SELECT DISTINCT video_id FROM predictions WHERE video_id IN :ids"
    assert len(ids) == ARRIVAL_VIDEOS and {v for (v,) in rows(soak.db_url, scored, ids=tuple(ids))} == ids
    dropped = "SELECT run_id, COUNT(*) FROM predictions WHERE video_id IN :ids GROUP BY run_id"
    for run, n in rows(soak.db_url, dropped, ids=tuple(ids)):  # the rows this ingest must drop
        soak.superseded[run] += n
    converted = ingest(str(soak.raw), soak.parquet, soak.db_url, s3=soak.s3)
    assert not converted.failed and [c["source_uri"] for c in converted.converted] == [str(path)], converted
    return ids


def promote_new_version(soak: Soak) -> None:
    """A new model version (the same weights, one step further in name: new content, so a new version)."""
    state = checkpoint.load(soak.checkpoint)
    state["step"] = int(state.get("step", 0)) + 1
    uri = checkpoint.save(checkpoint.final_uri(str(soak.home / f"model-after-v{soak.version}"), state["step"]), state)
    version = evaluate_model(uri, soak.parquet, soak.db_url, s3=soak.s3)["version"]
    promoted = promote(soak.db_url, version, s3=soak.s3)
    assert promoted["promoted"] and version != soak.version, promoted
    soak.version = version


# --- the faults --------------------------------------------------------------------------------------


class TryDied(RuntimeError):
    """A try of a part that the test killed: Airflow sees the task fail and retries it."""


def _chunks(part: dict) -> int:
    return math.ceil(part["videos"] / CHUNK_VIDEOS)


def _sigkill_first_try(soak: Soak, night: Night, plan):
    victim = soak.rng.choice(plan.parts)
    after = soak.rng.randint(
        1, _chunks(victim)
    )  # chunks committed before the kill; the last one too (before the part ends)

    def first_try(part):
        worker = start_part_worker(
            soak.db_url, plan, part, chunk_videos=CHUNK_VIDEOS, write_delay_s=KILL_WRITE_DELAY_S, s3=soak.s3
        )
        committed = kill_part_worker_after(
            soak.db_url, worker, plan.run_id, part["part"], rows=min(after * CHUNK_VIDEOS, part["videos"]) * plan.top_k
        )
        assert worker.returncode == -signal.SIGKILL, (
            f"{night.label}: part {part['part']}'s worker exited {worker.returncode}"
        )
        soak.faults["sigkill"] += 1
        soak.report.injected(
            f"{night.label}: SIGKILL to part {part['part']}'s worker (pid {worker.pid}) after "
            f"{committed} of its {part['videos'] * plan.top_k} rows were committed"
        )
        raise TryDied(f"SIGKILL after {committed} rows")

    return {victim["part"]: first_try}


def _two_tries_at_once(soak: Soak, night: Night, plan):
    victim = soak.rng.choice(plan.parts)

    def first_try(part):
        urls, errors = [soak.db_url, soak.other_spelling()], {}

        def one_try(url):
            try:
                inference.tag_part(url, plan, part, s3=soak.s3, chunk_videos=CHUNK_VIDEOS)
            except Exception as exc:  # noqa: BLE001 - raised below, as the task's failure
                errors[url] = exc

        threads = [threading.Thread(target=one_try, args=(u,)) for u in urls]
        [t.start() for t in threads]
        [t.join(timeout=300) for t in threads]
        engine_for(urls[1]).dispose()
        assert not any(t.is_alive() for t in threads), (
            f"{night.label}: two tries of part {part['part']} still running after 300 s"
        )
        attempts = count(
            soak.db_url,
            "SELECT attempts FROM inference_parts WHERE run_id = :r AND part = :p",
            r=plan.run_id,
            p=part["part"],
        )
        soak.faults["two_tries_part"] += 1
        soak.report.injected(
            f"{night.label}: two tries of part {part['part']} at once, separate connection pools "
            f"(the part records {attempts} tries)"
        )
        if errors:
            raise next(iter(errors.values()))

    return {victim["part"]: first_try}


@contextmanager
def _restart_inside_a_chunk(soak: Soak, night: Night, plan):
    """PostgreSQL restarted inside the n-th chunk's transaction of the night (rows COPYed, not committed)."""
    nth, calls, lock = soak.rng.randint(1, sum(_chunks(p) for p in plan.parts)), [0], threading.Lock()
    real_insert = prediction_writes.insert_bulk

    def insert_then_restart(conn, table, *target):
        written = real_insert(conn, table, *target)
        with lock:
            calls[0] += 1
            restart = calls[0] == nth
        if restart:
            soak.cluster.restart()
            soak.faults["db_restart"] += 1
            soak.report.injected(f"{night.label}: PostgreSQL restarted inside chunk {nth}'s transaction")
        return written

    prediction_writes.insert_bulk = insert_then_restart
    try:
        yield {}
    finally:
        prediction_writes.insert_bulk = real_insert
    assert calls[0] >= nth, f"{night.label}: only {calls[0]} chunks written, the restart was set for chunk {nth}"


@contextmanager
def restart_when_the_night_is_marked_succeeded(soak: Soak, night: Night):
    """PostgreSQL restarted inside the transaction of finish_night's last write: the UPDATE of
    inference_runs to 'succeeded' (found by its statement, whichever function sends it)."""
    engine, fired = engine_for(soak.db_url), []

    def before_execute(conn, cursor, statement, parameters, context, executemany):
        values = parameters.values() if isinstance(parameters, dict) else (parameters or ())
        if not fired and statement.lstrip().upper().startswith("UPDATE INFERENCE_RUNS") and "succeeded" in values:
            fired.append(True)
            soak.cluster.restart()
            soak.faults["db_restart_finish"] += 1
            soak.report.injected(
                f"{night.label}: PostgreSQL restarted inside the transaction marking the run succeeded"
            )

    event.listen(engine, "before_cursor_execute", before_execute)
    try:
        yield
    finally:
        event.remove(engine, "before_cursor_execute", before_execute)
    assert fired, f"{night.label}: the run was never marked succeeded, the restart never happened"


@contextmanager
def _s3_outage(soak: Soak, night: Night):
    nth, seconds = soak.rng.randint(1, 2), soak.rng.uniform(1.0, 3.0)  # every file costs at least 2 GETs
    sockets_before = soak.proxy.cut_sockets
    soak.proxy.cut_on("GET", nth, seconds)
    try:
        yield {}
    finally:
        soak.proxy.disarm()
        soak.proxy.wait_restored()
    assert soak.proxy.cut_time is not None, f"{night.label}: fewer than {nth} Parquet GETs, the outage never happened"
    soak.faults["s3_outage"] += 1
    soak.report.injected(
        f"{night.label}: S3 endpoint gone for {seconds:.1f} s from Parquet GET {nth} on "
        f"({(soak.proxy.cut_sockets - sockets_before) // 2} connection(s) reset, new ones refused)"
    )


@contextmanager
def fault_during(soak: Soak, night: Night, plan, fault: str | None):
    """Arms the night's fault; yields {part number: what its first try does instead of tag_part}."""
    if fault == "db_restart":
        with _restart_inside_a_chunk(soak, night, plan) as first_tries:
            yield first_tries
    elif fault == "s3_outage":
        with _s3_outage(soak, night) as first_tries:
            yield first_tries
    elif fault == "sigkill":
        yield _sigkill_first_try(soak, night, plan)
    elif fault == "two_tries_part":
        yield _two_tries_at_once(soak, night, plan)
    else:
        yield {}


# --- a night, as the DAG runs it -----------------------------------------------------------------------


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:160]}"


def run_part(soak: Soak, night: Night, plan, part: dict, first_tries: dict) -> None:
    """tag_part with the task's retries; each retry on a fresh pool (a new worker process)."""
    for attempt in range(1, PART_RETRIES + 2):
        try:
            if attempt == 1 and part["part"] in first_tries:
                first_tries[part["part"]](part)
            else:
                inference.tag_part(soak.db_url, plan, part, s3=soak.s3, chunk_videos=CHUNK_VIDEOS)
            return
        except AssertionError:  # the test's own harness or checks: never taken for a failed try
            raise
        except Exception as exc:  # noqa: BLE001 - a failed try: the task fails and Airflow retries it
            soak.failed_tries += 1
            soak.report.observed(f"{night.label}: part {part['part']} try {attempt} failed: {_first_line(exc)}")
            engine_for(soak.db_url).dispose()
            soak.add(check_between_tries(soak.db_url, night.label, plan))


def dag_night(soak: Soak, night: Night, exports: str, fault: str | None):
    for dag_run in range(1 + NIGHT_RERUNS):
        plan = inference.plan_night(
            soak.db_url,
            night.logical_date,
            top_k=K,
            s3=soak.s3,
            exports_uri=exports,
            airflow_run_id=f"scheduled__{night.logical_date.isoformat()}",
            part_videos=PART_VIDEOS,
        )
        if not plan.parts:  # a quiet night: plan_night closes the run itself
            return inference.finish_night(soak.db_url, plan, soak.s3)
        with fault_during(soak, night, plan, fault if dag_run == 0 else None) as first_tries:
            for part in plan.parts:
                run_part(soak, night, plan, part, first_tries)
        at_finish = fault == "db_restart_finish" and dag_run == 0
        try:
            with restart_when_the_night_is_marked_succeeded(soak, night) if at_finish else nullcontext():
                return inference.finish_night(soak.db_url, plan, soak.s3)
        except AssertionError:
            raise
        except Exception as exc:  # noqa: BLE001 - the night failed: Airflow's DAG run fails, and is run again
            soak.reruns += 1
            soak.report.observed(
                f"{night.label}: finish_night failed: {_first_line(exc)}; run again for its logical date"
            )
            engine_for(soak.db_url).dispose()
            soak.add(check_between_tries(soak.db_url, night.label, plan))
    raise AssertionError(f"{night.label} (seed {soak.seed}): still failed after {NIGHT_RERUNS} rerun(s)")


def two_runs_at_once(soak: Soak, night: Night, exports: str):
    """Two whole runs of the night at once, each with its own pool; the later waits, then replaces the run."""
    results, errors = {}, {}

    def one_run(i, url):
        try:
            results[i] = inference.run_inference(
                url,
                night.logical_date,
                top_k=K,
                exports_uri=exports,
                s3=soak.s3,
                airflow_run_id=f"manual__try{i}",
                part_videos=PART_VIDEOS,
                chunk_videos=CHUNK_VIDEOS,
            )
        except Exception as exc:  # noqa: BLE001 - reported, then the night is retried
            errors[i] = exc

    threads = [
        threading.Thread(target=one_run, args=(i, u)) for i, u in enumerate([soak.db_url, soak.other_spelling()])
    ]
    [t.start() for t in threads]
    [t.join(timeout=300) for t in threads]
    engine_for(soak.other_spelling()).dispose()
    assert not any(t.is_alive() for t in threads), f"{night.label}: two runs of the night still running after 300 s"
    soak.faults["two_tries_night"] += 1
    soak.report.injected(f"{night.label}: two whole runs of the night at once, separate connection pools")
    if errors:
        soak.report.observed(
            f"{night.label}: {len(errors)} of the two runs failed: {_first_line(next(iter(errors.values())))}"
        )
        return dag_night(soak, night, exports, None)
    assert results[0].run_id == results[1].run_id, (
        f"{night.label}: two runs of one night got runs {results[0].run_id} and {results[1].run_id}"
    )
    return results[0]


def soak_night(soak: Soak, night: Night) -> None:
    if night.arrival is not None:
        arrive(soak, night)
    if night.promotion:
        promote_new_version(soak)
    changed = change_a_shard(soak) if night.changed_shard else set()
    expected = unscored_videos(soak.db_url, soak.version, night.logical_date)  # what the night must score
    assert changed <= expected, f"{night.label}: changed videos {sorted(changed - expected)} still count as scored"
    exports = str(soak.home / "exports" / f"{night.logical_date:%Y-%m-%dT%H%M%S}")
    if night.fault == "two_tries_night":
        finished = two_runs_at_once(soak, night, exports)
    else:
        finished = dag_night(soak, night, exports, night.fault)
    csv_path = next((uri for uri in finished.exports if uri.endswith(".csv")), None)
    soak.add(
        check_night(
            soak.db_url,
            f"{night.label}, seed {soak.seed}",
            k=K,
            production_version=soak.version,
            until=night.logical_date,
            run_id=finished.run_id,
            expected_videos=expected,
            catalogue=soak.catalogue,
            csv_path=csv_path,
            superseded=soak.superseded,
        )
    )
    events = [
        e
        for e, on in (
            (f"+{ARRIVAL_VIDEOS} videos", night.arrival is not None),
            (f"model version {soak.version} promoted", night.promotion),
            (night.fault, night.fault),
            (f"a shard changed: its {len(changed)} videos scored again", changed),
        )
        if on
    ]
    soak.report.observed(
        f"{night.label}{' [' + ', '.join(events) + ']' if events else ''}: run {finished.run_id} "
        f"succeeded, {finished.videos} videos, {finished.rows_written} rows, invariants hold"
    )


def test_soak_nights_with_faults_at_seeded_points(soak, report):
    started = time.monotonic()
    schedule = soak_schedule(soak.rng)
    first_version = soak.version
    for night in schedule:
        soak_night(soak, night)
    seconds = time.monotonic() - started

    assert dict(soak.faults) == FAULTS, f"seed {soak.seed}: faults injected {dict(soak.faults)}, planned {FAULTS}"
    assert soak.catalogue == VIDEOS + ARRIVALS * ARRIVAL_VIDEOS and soak.version != first_version
    faults = ", ".join(f"{kind} {n}" for kind, n in sorted(soak.faults.items()))
    report.checked(
        f"{len(schedule)} nights ({schedule[0].logical_date:%Y-%m-%d} .. {schedule[-1].logical_date:%Y-%m-%d}), "
        f"catalogue {VIDEOS} -> {soak.catalogue} videos, model versions {first_version} -> {soak.version}; "
        f"faults injected: {faults}; {soak.failed_tries} failed tries retried, {soak.reruns} nights rerun; "
        f"{soak.checked.facts} checks made over {soak.checked.rows} prediction rows read; {seconds:.0f} s "
        f"(seed {soak.seed})"
    )


# --- the checks can fail ---------------------------------------------------------------------------------


def test_soak_checks_name_the_night_video_and_counts(pg_url, raw_shards, tiny_checkpoint, tmp_path, report):
    """Each way a night can be silently wrong, made by hand in the tables of a good night, fails check_night
    with a message naming the night, the video or run, and the counts; undone, the night checks clean."""
    world = build_world(raw_shards, tmp_path, pg_url, checkpoint=tiny_checkpoint)
    finished = inference.run_inference(pg_url, NIGHT, top_k=K, exports_uri=world["exports"])
    everything = {v for (v,) in rows(pg_url, "SELECT video_id FROM videos")}
    csv_path = next(uri for uri in finished.exports if uri.endswith(".csv"))

    def check():
        return check_night(
            pg_url,
            "night 0 (2030-01-02)",
            k=K,
            production_version=world["version"],
            until=NIGHT,
            run_id=finished.run_id,
            expected_videos=everything,
            catalogue=VIDEOS,
            csv_path=csv_path,
        )

    clean = check()
    video = min(everything)
    lost = rows(
        pg_url,
        "SELECT video_id, model_version, rank, label_id, score, run_id FROM predictions "
        "WHERE video_id = :v ORDER BY rank",
        v=video,
    )

    def restore(selected) -> str:
        return "INSERT INTO predictions (video_id, model_version, rank, label_id, score, run_id) VALUES " + ", ".join(
            f"('{v}', {m}, {r}, {label}, {score!r}, {run})" for v, m, r, label, score, run in selected
        )

    run, k = finished.run_id, K
    breaks = [
        (
            f"DELETE FROM predictions WHERE video_id = '{video}' AND rank = {k}",
            restore(lost[-1:]),
            rf"(?s)night 0 \(2030-01-02\): .*video {video}, model version 1: {k - 1} rows, ranks 1\.\.{k - 1}",
        ),
        (
            f"UPDATE predictions SET run_id = {run + 1} WHERE video_id = '{video}' AND rank = 1",
            f"UPDATE predictions SET run_id = {run} WHERE video_id = '{video}'",
            rf"video {video}, model version 1: {k} rows, ranks 1\.\.{k} \({k} distinct\), from 2 run\(s\)",
        ),
        (
            "UPDATE inference_runs SET rows_written = rows_written + 1",
            "UPDATE inference_runs SET rows_written = rows_written - 1",
            rf"run {run} \(2030-01-02, model version 1\): succeeded, {VIDEOS}/{VIDEOS} videos, rows_written {VIDEOS * k + 1} "
            rf"\(videos_done x k = {VIDEOS * k}\), {VIDEOS * k} rows stored",
        ),
        (
            f"DELETE FROM predictions WHERE video_id = '{video}'",
            restore(lost),
            rf"video {video}: in the catalogue, no rows of production model version 1(.|\n)*run {run} scored {VIDEOS - 1} videos, "
            rf"expected the {VIDEOS}(.|\n)*missing \['{video}'\]",
        ),
    ]
    for corrupt, undo, expected_message in breaks:
        with engine_for(pg_url).begin() as conn:
            conn.execute(text(corrupt))
        with pytest.raises(AssertionError, match=expected_message) as caught:
            check()
        with engine_for(pg_url).begin() as conn:
            conn.execute(text(undo))
        report.checked(f"{corrupt!r} -> {str(caught.value).splitlines()[1].strip()}")
    assert check() == clean
    report.checked(f"undone, the night checks clean again: {clean.facts} facts, {clean.rows} rows")
