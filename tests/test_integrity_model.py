"""Issue 10, model and training: a model version's weights never change under it, killed saves leave
nothing behind, a Parquet file replaced mid-run fails the run by name, and bad float settings are refused."""

import hashlib
import io
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import boto3
import pyarrow.parquet as pq
import pytest
import torch
from sqlalchemy import text

from model.checkpoint import CheckpointChangedError, CheckpointError
from model.config import ConfigError, load_config
from model.data import EpochSpec, ParquetBatches, find_row_groups, loader
from model.evaluate import load_model
from model.train import train
from storage.database import db, registry
from storage.database.db import engine_for
from storage.objectstore import ObjectChangedError
from tasks import settings
from tasks.ingest import ingest
from tasks.synth import SynthConfig, synth
from tasks.training import evaluate_model, promote, train_and_register
from tests.support.cli import vtag
from tests.support.db import in_transaction, migrated
from tests.support.env import REPO
from tests.support.worlds import TINY as WORLD_TINY
from tests.support.worlds import TINY_TRAIN_OPTIONS, vtag_train_args

TINY = {**WORLD_TINY, "epochs": 2}


@pytest.fixture(scope="session")
def raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("integrity-raw")
    synth(str(root), SynthConfig("frame", "train", shards=2, videos_per_shard=16, num_labels=10, seed=5))
    synth(str(root), SynthConfig("frame", "validate", shards=1, videos_per_shard=8, num_labels=10, seed=5))
    return root


@pytest.fixture(scope="session")
def parquet(raw, tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("integrity-parquet")
    assert not ingest(str(raw), str(root / "parquet"), migrated(f"sqlite:///{root / 'ingest.db'}")).failed
    return str(root / "parquet")


@pytest.fixture
def own_parquet(parquet, tmp_path) -> str:
    """A copy of the Parquet layout that a test may replace files in."""
    return str(shutil.copytree(parquet, tmp_path / "parquet"))


def _sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _replace_with_other_content(path) -> None:
    """Publish new content at `path` the way a re-ingest does: a whole new file renamed over it."""
    before = os.stat(path).st_mtime_ns
    table = pq.read_table(path)
    new = f"{path}.new"
    pq.write_table(table.slice(0, table.num_rows - 1), new, row_group_size=4)
    os.replace(new, path)
    assert os.stat(path).st_mtime_ns != before  # the fingerprint must see it (coarse timestamps would not)


# 1. Registered weights are immutable.


def test_a_version_of_a_mutable_checkpoint_keeps_its_weights(parquet, tmp_path, db_url):
    out = tmp_path / "run"
    first = train_and_register(parquet, str(out), "frame", db_url, preset="small", overrides=TINY, progress=False)
    final = out / f"final-step{first['steps']:07d}.pt"
    assert in_transaction(db_url, registry.get_version, first["version"])["checkpoint_sha256"] == _sha256(final)

    # last.pt holds the run's final weights: the same version, not a duplicate.
    assert evaluate_model(str(out / "last.pt"), parquet, db_url)["version"] == first["version"]
    # epoch-001.pt is rewritten by any fresh run into the folder: registered as an immutable copy.
    scored = evaluate_model(str(out / "epoch-001.pt"), parquet, db_url)
    assert promote(db_url, scored["version"])["promoted"]
    version = in_transaction(db_url, registry.production, "frame")
    copy = Path(settings.default_models_uri()) / "registered" / f"sha256-{version['checkpoint_sha256'][:16]}.pt"
    assert version["version"] == scored["version"] != first["version"]
    assert version["checkpoint_uri"] == scored["checkpoint_uri"] == str(copy)
    assert _sha256(copy) == _sha256(out / "epoch-001.pt") == version["checkpoint_sha256"]
    final_bytes = final.read_bytes()

    # A fresh run into the same folder (its last.pt gone) with another learning rate rewrites
    # epoch-001.pt, and ends at the step of the final checkpoint already there, holding other weights.
    (out / "last.pt").unlink()
    with pytest.raises(CheckpointError, match="already holds other weights .* a final checkpoint is never overwritten"):
        train_and_register(
            parquet,
            str(out),
            "frame",
            db_url,
            preset="small",
            overrides={**TINY, "learning_rate": 3e-2},
            progress=False,
        )
    assert _sha256(out / "epoch-001.pt") != version["checkpoint_sha256"]  # the mutable name moved on
    assert final.read_bytes() == final_bytes
    assert _sha256(copy) == version["checkpoint_sha256"]
    model, config = load_model(version["checkpoint_uri"], torch.device("cpu"), sha256=version["checkpoint_sha256"])
    assert config.architecture() == load_config("small", overrides=TINY).architecture()
    evaluate_model(None, parquet, db_url, version=version["version"])  # verifies, and scores, those weights

    copy.write_bytes((out / "epoch-001.pt").read_bytes())  # someone overwrites the registered file
    now = _sha256(copy)
    message = f"checkpoint {copy} changed since it was registered (sha256 {version['checkpoint_sha256']}, now {now})"
    with pytest.raises(CheckpointChangedError) as raised:
        load_model(str(copy), torch.device("cpu"), sha256=version["checkpoint_sha256"])
    assert str(raised.value).startswith(message)
    with pytest.raises(CheckpointChangedError, match="changed since it was registered"):
        evaluate_model(None, parquet, db_url, version=version["version"])
    with pytest.raises(CheckpointError, match="does not hold the content its name says"):
        evaluate_model(str(copy), parquet, migrated(f"sqlite:///{tmp_path / 'other.db'}"))  # registering it elsewhere


def test_cli_evaluate_promote_last_pt_then_train_again(parquet, tmp_path, sqlite_url):
    """The issue's sequence: promote <out>/last.pt, then a longer run into the same folder rewrites last.pt."""
    out = tmp_path / "m"
    base = vtag_train_args(parquet, out, sqlite_url, *TINY_TRAIN_OPTIONS)
    assert (result := vtag(*base, "--epochs", "1")).returncode == 0, result.stderr
    result = vtag("evaluate", "--checkpoint", out / "last.pt", "--data", parquet, "--promote", "--db", sqlite_url)
    assert result.returncode == 0, result.stderr
    assert "promoted" in result.stdout
    production = in_transaction(sqlite_url, registry.production, "frame")
    registered_bytes = open(production["checkpoint_uri"], "rb").read()
    assert production["checkpoint_uri"] != str(out / "last.pt")

    assert (result := vtag(*base, "--epochs", "2")).returncode == 0, result.stderr  # continues, rewrites last.pt
    assert _sha256(out / "last.pt") != production["checkpoint_sha256"]
    assert open(production["checkpoint_uri"], "rb").read() == registered_bytes
    assert hashlib.sha256(registered_bytes).hexdigest() == production["checkpoint_sha256"]
    load_model(production["checkpoint_uri"], torch.device("cpu"), sha256=production["checkpoint_sha256"])

    with open(production["checkpoint_uri"], "r+b") as f:  # one byte flipped in the registered weights
        f.seek(len(registered_bytes) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    result = vtag("evaluate", "--checkpoint", production["checkpoint_uri"], "--data", parquet, "--db", sqlite_url)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert f"checkpoint {production['checkpoint_uri']} changed since it was registered" in result.stderr


def test_versions_registered_before_0006_have_no_hash(empty_db_url):
    db_url = empty_db_url
    db.upgrade(db_url, "0005")
    with engine_for(db_url).begin() as conn:
        conn.execute(
            text(
                "INSERT INTO model_versions (level, preset, checkpoint_uri, config, data_uri, train_split, "
                "epochs, steps, status, created_at) VALUES ('frame', 'small', '/old/last.pt', '{}', '/d', "
                "'train', 1, 1, 'trained', CURRENT_TIMESTAMP)"
            )
        )
    db.upgrade(db_url)
    engine_for(db_url).dispose()
    assert db.current_revision(db_url) == db.head_revision()
    assert in_transaction(db_url, registry.get_version, 1)["checkpoint_sha256"] is None  # unverified, not blessed
    db.downgrade(db_url, "0005")
    engine_for(db_url).dispose()
    with engine_for(db_url).connect() as conn:
        assert conn.execute(text("SELECT checkpoint_uri FROM model_versions")).scalar() == "/old/last.pt"


# 2. Leftovers of killed saves are swept.


def test_temporaries_of_a_save_killed_mid_write_are_removed_by_the_next_run(parquet, tmp_path, caplog, report):
    out = tmp_path / "run"
    killed_save = textwrap.dedent(f"""
        import os, signal, torch
        from model import checkpoint

        def write_half_then_die(obj, f):
            f.write(b"PK half a checkpoint")
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)

        torch.save = write_half_then_die
        checkpoint.save({str(out / "last.pt")!r}, {{"model": {{}}}})
    """)
    result = subprocess.run([sys.executable, "-c", killed_save], cwd=REPO, capture_output=True, timeout=120)
    assert result.returncode == -9
    left = sorted(p.name for p in out.iterdir())
    assert len(left) == 1 and left[0].startswith(".last.pt.") and left[0].endswith(".tmp")
    (out / ".epoch-002.pt.k1ll3d00.tmp").write_bytes(b"half")  # a killed epoch save, of a step nobody knows
    (out / ".notes.k1ll3d00.tmp").write_bytes(b"not ours")
    report.injected(f"a save SIGKILLed inside publish left {left[0]}; a killed epoch save's temporary beside it")

    with caplog.at_level(logging.INFO, logger="model.checkpoint"):
        train(load_config("small", overrides={**TINY, "epochs": 1}), parquet, str(out), progress=False)
    hidden = sorted(p.name for p in out.iterdir() if p.name.startswith("."))
    assert hidden == [".notes.k1ll3d00.tmp", ".vtag-train.lock"]  # not a name a run writes: left alone; the lock
    swept = [r.getMessage() for r in caplog.records if "leftover(s) of killed checkpoint saves" in r.getMessage()]
    assert len(swept) == 1 and left[0] in swept[0] and ".epoch-002.pt.k1ll3d00.tmp" in swept[0]
    assert swept[0].startswith(f"removed 2 leftover(s) of killed checkpoint saves in {out}")
    report.checked(swept[0])


# 3. A Parquet file replaced while a run reads it fails the run, naming the file.


def test_a_file_replaced_after_planning_is_refused_by_name(own_parquet):
    groups = find_row_groups(own_parquet, "frame", "train")
    target = os.path.join(own_parquet, "frame", "train", "train0001.parquet")
    assert {g.fingerprint for g in groups if g.uri == target} == {f"mtime_ns={os.stat(target).st_mtime_ns}"}
    dataset = ParquetBatches(groups, "frame", 3862, EpochSpec(8, shuffle=False, drop_last=False, max_frames=20))
    _replace_with_other_content(target)
    with pytest.raises(ObjectChangedError) as raised:
        list(dataset)
    assert str(raised.value).startswith(f"{target} changed while in use")


def test_training_fails_by_name_when_a_file_is_replaced_under_its_workers(own_parquet, tmp_path, monkeypatch):
    """DataLoader worker processes read: the error reaches the run as itself, not 'Caught ... in worker'."""
    import model.train

    target = os.path.join(own_parquet, "frame", "train", "train0000.parquet")
    planned = model.train.find_row_groups

    def plan_then_replace(*args, **kwargs):
        groups = planned(*args, **kwargs)
        _replace_with_other_content(target)
        return groups

    monkeypatch.setattr(model.train, "find_row_groups", plan_then_replace)
    with pytest.raises(ObjectChangedError) as raised:
        train(
            load_config("small", overrides={**TINY, "num_workers": 2}),
            own_parquet,
            str(tmp_path / "run"),
            progress=False,
        )
    first_line = str(raised.value).splitlines()[0]
    assert first_line.startswith(f"{target} changed while in use (fingerprint mtime_ns=")
    assert "DataLoader" not in str(raised.value)


def test_an_object_replaced_on_s3_after_planning_is_refused(raw, s3, tmp_path):
    config, bucket = s3
    root = f"s3://{bucket}/parquet"
    assert not ingest(str(raw), root, migrated(f"sqlite:///{tmp_path / 'ingest.db'}"), s3=config).failed
    groups = find_row_groups(root, "frame", "train", s3=config)
    assert all(g.fingerprint.startswith("etag=") for g in groups)
    key = "parquet/frame/train/train0000.parquet"
    client = boto3.client("s3", endpoint_url=config.endpoint_url, region_name="us-east-1")
    table = pq.read_table(io.BytesIO(client.get_object(Bucket=bucket, Key=key)["Body"].read()))
    replacement = tmp_path / "replacement.parquet"
    pq.write_table(table.slice(1), replacement)
    client.put_object(Bucket=bucket, Key=key, Body=replacement.read_bytes())  # a new version at the key

    dataset = ParquetBatches(
        groups, "frame", 3862, EpochSpec(8, workers=1, shuffle=False, drop_last=False, max_frames=20), s3=config
    )
    with pytest.raises(ObjectChangedError) as raised:
        list(loader(dataset, 1, pin_memory=False))
    assert str(raised.value).startswith(f"s3://{bucket}/{key} changed while in use (fingerprint etag=")


# 4. Float settings: finite and in range, or a ConfigError naming them.


@pytest.mark.parametrize(
    "name, value",
    [
        ("learning_rate", float("inf")),
        ("learning_rate", float("nan")),
        ("learning_rate", 0.0),
        ("learning_rate", -1e-3),
        ("weight_decay", float("inf")),
        ("weight_decay", float("nan")),
        ("weight_decay", -1.0),
        ("drop_rate", float("nan")),
        ("lr_decay", float("nan")),
        ("rmsprop_eps", 0.0),
        ("rmsprop_rho", float("inf")),
        ("learning_rate", "0.01"),
        ("learning_rate", True),
    ],
)
def test_non_finite_or_out_of_range_floats_are_refused(name, value):
    with pytest.raises(ConfigError, match=rf"^preset 'small': {name} must be .*, not {value!r}"):
        load_config("small", overrides={name: value})


@pytest.mark.parametrize("value", ["inf", "nan", "0", "-0.5"])
def test_cli_train_refuses_a_bad_learning_rate_in_one_line(parquet, tmp_path, value):
    result = vtag(
        *vtag_train_args(
            parquet, tmp_path / "m", migrated(f"sqlite:///{tmp_path / 'vtag.db'}"), "--learning-rate", value
        )
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"vtag train: error: preset 'small': learning_rate must be > 0 and finite, not {float(value)!r}"
    ]
    assert not (tmp_path / "m").exists()  # refused before anything was written
