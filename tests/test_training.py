"""Training, checkpoints, evaluation and the registry on real Parquet written by ingest."""

import json
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from model import checkpoint
from model.checkpoint import CheckpointError
from model.config import load_config
from model.data import DataError, EpochSpec, ParquetBatches, find_row_groups
from model.train import train
from storage.database import registry
from tasks.ingest import ingest
from tasks.synth import SynthConfig, synth
from tasks.training import evaluate_model, promote, register_model, train_and_register, train_model
from tests.support.db import in_transaction, migrated
from tests.support.env import BIN
from tests.support.worlds import TINY as WORLD_TINY
from tests.support.worlds import TINY_TRAIN_OPTIONS, vtag_train_args

TINY = {**WORLD_TINY, "epochs": 2}


@pytest.fixture(scope="session")
def parquet(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("training-data")
    synth(str(root / "raw"), SynthConfig("frame", "train", shards=2, videos_per_shard=24, num_labels=10, seed=1))
    synth(str(root / "raw"), SynthConfig("frame", "validate", shards=1, videos_per_shard=16, num_labels=10, seed=1))
    synth(str(root / "raw-video"), SynthConfig("video", "train", shards=1, videos_per_shard=64, num_labels=10, seed=1))
    synth(
        str(root / "raw-video"), SynthConfig("video", "validate", shards=1, videos_per_shard=32, num_labels=10, seed=1)
    )
    for raw in ("raw", "raw-video"):
        assert not ingest(str(root / raw), str(root / "parquet"), migrated(f"sqlite:///{root / 'ingest.db'}")).failed
    return str(root / "parquet")


def _tiny(**overrides):
    return load_config("small", overrides={**TINY, **overrides})


def test_batches_are_padded_masked_and_deterministic(parquet):
    groups = find_row_groups(parquet, "frame", "train")
    batches = list(ParquetBatches(groups, "frame", 3862, EpochSpec(8, seed=3, epoch=1, workers=2, max_frames=20)))
    again = list(ParquetBatches(groups, "frame", 3862, EpochSpec(8, seed=3, epoch=1, workers=2, max_frames=20)))
    assert [b["ids"] for b in batches] == [b["ids"] for b in again]
    assert len({i for b in batches for i in b["ids"]}) == 48  # every video once an epoch
    other_epoch = list(ParquetBatches(groups, "frame", 3862, EpochSpec(8, seed=3, epoch=2, workers=2, max_frames=20)))
    assert [b["ids"] for b in other_epoch] != [b["ids"] for b in batches]
    batch = batches[0]
    assert batch["rgb"].dtype == torch.uint8 and batch["rgb"].shape[2] == 1024 and batch["rgb"].shape[1] <= 20
    assert batch["audio"].shape[:2] == batch["mask"].shape and batch["labels"].shape == (8, 3862)
    assert (batch["rgb"][~batch["mask"]] == 0).all() and batch["labels"].sum(1).min() >= 1
    skipped = list(
        ParquetBatches(groups, "frame", 3862, EpochSpec(8, seed=3, epoch=1, workers=2, max_frames=20, skip_batches=3))
    )
    assert [b["ids"] for b in skipped] == [b["ids"] for b in batches[3:]]


def test_a_few_steps_reduce_the_loss(parquet, tmp_path):
    result = train(_tiny(epochs=6), parquet, str(tmp_path / "run"), progress=False)
    losses = result.history["epoch_loss"]
    assert len(losses) == 6 and losses[-1] < 0.7 * losses[0]
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    assert sorted(p.name for p in (tmp_path / "run").glob("*.pt")) == (
        [f"epoch-{e:03d}.pt" for e in range(4, 7)] + [f"final-step{result.steps:07d}.pt", "last.pt"]
    )


def test_resumed_run_takes_the_same_next_step(parquet, tmp_path):
    config = _tiny(epochs=3)
    train(config, parquet, str(tmp_path / "interrupted"), progress=False, max_steps=4)  # stops mid-epoch 1
    state = checkpoint.load(str(tmp_path / "interrupted" / "last.pt"))
    assert (state["epoch"], state["batches_done"], state["step"]) == (0, 4, 4)
    train(config, parquet, str(tmp_path / "interrupted"), progress=False, max_steps=9)  # continues from step 4
    train(config, parquet, str(tmp_path / "straight"), progress=False, max_steps=9)
    resumed = checkpoint.load(str(tmp_path / "interrupted" / "last.pt"))["model"]
    straight = checkpoint.load(str(tmp_path / "straight" / "last.pt"))["model"]
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
    assert checkpoint.load(str(tmp_path / "interrupted" / "last.pt"))["step"] == 9


def test_a_run_stopped_mid_epoch_resumes_only_into_the_same_plan(parquet, tmp_path):
    """A checkpoint taken mid-epoch before length bucketing (its plan had no windows) would continue into
    another epoch order, repeating some videos and skipping others: refused, naming the way out."""
    config = _tiny(epochs=3)
    out = str(tmp_path / "run")
    train(config, parquet, out, progress=False, max_steps=4)
    state = checkpoint.load(f"{out}/last.pt")
    assert state["data"]["bucket_window"] == 8 and state["batches_done"] == 4
    state["data"].pop("bucket_window")  # as written before bucketing
    checkpoint.save(f"{out}/last.pt", state)
    with pytest.raises(DataError, match=r"stopped 4 batches into epoch 0 of a plan with length-bucket window 1, "):
        train(config, parquet, out, progress=False, max_steps=9)


def test_video_recipe_schedule_input_dropout_and_ensemble_resume_exactly(parquet, tmp_path):
    """The video preset's recipe: the cosine schedule's state, input dropout's draws and every ensemble
    member's weights and batch norm statistics survive a restart."""
    overrides = {
        "hidden_size": 16,
        "epochs": 3,
        "batch_size": 16,
        "num_workers": 0,
        "input_drop_rate": 0.3,
        "ensemble_size": 2,
        "chain_size": 4,
    }
    config = load_config("video", "video", {**overrides, "lr_schedule": "cosine"})
    interrupted, straight = str(tmp_path / "interrupted"), str(tmp_path / "straight")
    train(config, parquet, interrupted, progress=False, max_steps=5)  # 4 batches an epoch: stops in epoch 2
    train(config, parquet, interrupted, progress=False)
    train(config, parquet, straight, progress=False)
    resumed, uninterrupted = checkpoint.load(f"{interrupted}/last.pt"), checkpoint.load(f"{straight}/last.pt")
    assert all(torch.equal(resumed["model"][k], uninterrupted["model"][k]) for k in uninterrupted["model"])
    assert {"members.1.net.1.running_mean", "members.1.chained.1.running_mean"} <= set(uninterrupted["model"])
    lr = lambda epoch: checkpoint.load(f"{straight}/epoch-{epoch:03d}.pt")["scheduler"]["_last_lr"][0]  # noqa: E731
    assert lr(1) == pytest.approx(1e-3 * 0.75) and lr(2) == pytest.approx(1e-3 * 0.25) and lr(3) == pytest.approx(0)

    # A checkpoint written before batch_norm was an architecture field held the default (on) and still loads.
    state = checkpoint.load(f"{straight}/last.pt")
    assert state["architecture"].pop("batch_norm") is True
    checkpoint.check_architecture(state, load_config("video", "video", overrides), "old.pt")
    # One written before ensembles held a single MLP: it loads as ensemble_size 1, and only so; before
    # chaining, as chain_size 0.
    assert state["architecture"].pop("ensemble_size") == 2 and state["architecture"].pop("chain_size") == 4
    with pytest.raises(CheckpointError, match="old.pt holds another architecture"):
        checkpoint.check_architecture(state, load_config("video", "video", overrides), "old.pt")
    overrides.update(ensemble_size=1, chain_size=0)
    checkpoint.check_architecture(state, load_config("video", "video", overrides), "old.pt")
    with pytest.raises(CheckpointError, match="old.pt holds another architecture"):
        checkpoint.check_architecture(
            state, load_config("video", "video", {**overrides, "batch_norm": False}), "old.pt"
        )


def test_fine_tuning_starts_from_the_weights(parquet, tmp_path):
    first = train(_tiny(epochs=1), parquet, str(tmp_path / "a"), progress=False)
    tuned = train(_tiny(epochs=1), parquet, str(tmp_path / "b"), progress=False, resume=first.checkpoint_uri)
    assert tuned.history["step_loss"][0] < first.history["step_loss"][0]


def test_bad_inputs_fail_before_training(parquet, tmp_path):
    run = train(_tiny(epochs=1), parquet, str(tmp_path / "a"), progress=False)
    with pytest.raises(CheckpointError, match="another architecture"):
        train(_tiny(lstm_size=12), parquet, str(tmp_path / "b"), resume=run.checkpoint_uri, progress=False)
    with pytest.raises(DataError, match="cannot read split 'test': no such folder"):
        train(_tiny(), parquet, str(tmp_path / "c"), split="test", progress=False)
    with pytest.raises(DataError, match="the split is empty"):
        train(_tiny(), parquet, str(tmp_path / "c"), pattern="nothing-matches*", progress=False)
    bad = tmp_path / "bad" / "frame" / "train"
    bad.mkdir(parents=True)
    pq.write_table(pa.table({"id": ["x"], "rgb": [b"\x00"]}), bad / "train0000.parquet")
    with pytest.raises(DataError, match="not the frame-level layout"):
        train(_tiny(), str(tmp_path / "bad"), str(tmp_path / "d"), progress=False)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a vtag checkpoint"):
        checkpoint.load(str(tmp_path / "junk.pt"))


def test_train_evaluate_register_promote(parquet, tmp_path, db_url):
    trained = register_model(
        db_url, train_model(parquet, str(tmp_path / "v1"), "frame", preset="small", overrides=TINY, progress=False)
    )
    evaluation = evaluate_model(trained["checkpoint_uri"], parquet, db_url)
    assert evaluation["videos"] == 16 and set(evaluation) >= {"hit_at_one", "perr", "gap", "map", "plot_uri"}
    assert 0.0 <= evaluation["gap"] <= 1.0 and Path(evaluation["plot_uri"]).is_file()
    assert promote(db_url, trained["version"])["promoted"]
    assert in_transaction(db_url, registry.production, "frame")["version"] == trained["version"]

    worse = train_and_register(
        parquet,
        str(tmp_path / "v2"),
        "frame",
        db_url,
        preset="small",
        overrides={**TINY, "epochs": 1, "learning_rate": 1e-6},
        progress=False,
    )
    worse_eval = evaluate_model(worse["checkpoint_uri"], parquet, db_url)
    assert worse_eval["gap"] < evaluation["gap"]
    outcome = promote(db_url, worse["version"])
    assert not outcome["promoted"] and "<" in outcome["reason"]
    assert in_transaction(db_url, registry.production, "frame")["version"] == trained["version"]
    assert in_transaction(db_url, registry.get_version, worse["version"])["status"] == "rejected"

    # Another pattern that selects the same file is the same set: production's evaluation on it serves,
    # no second scoring (test_integrity_results.py: a grown set has production scored again).
    third = train_and_register(
        parquet, str(tmp_path / "v3"), "frame", db_url, preset="small", overrides=TINY, progress=False
    )
    evaluate_model(third["checkpoint_uri"], parquet, db_url, pattern="validate0000.parquet")
    outcome = promote(db_url, third["version"])
    from sqlalchemy import text

    from storage.database.db import engine_for

    with engine_for(db_url).connect() as conn:
        sets = conn.execute(
            text("SELECT model_version, pattern, set_fingerprint FROM evaluations WHERE model_version IN (:a, :b)"),
            {"a": trained["version"], "b": third["version"]},
        ).all()
    assert sorted((v, p) for v, p, _ in sets) == [
        (trained["version"], "*.parquet"),
        (third["version"], "validate0000.parquet"),
    ]
    assert len({f for _, _, f in sets}) == 1 and f"production version {trained['version']} GAP" in outcome["reason"]
    assert trained["checkpoint_uri"].endswith(f"final-step{trained['steps']:07d}.pt")


def test_video_level_model_learns(parquet, tmp_path, sqlite_url):
    trained = train_and_register(
        parquet,
        str(tmp_path / "video"),
        "video",
        sqlite_url,
        overrides={"hidden_size": 64, "epochs": 15, "batch_size": 16, "num_workers": 0},
        progress=False,
    )
    assert evaluate_model(trained["checkpoint_uri"], parquet, sqlite_url)["gap"] > 0.5


def test_cli_train_and_evaluate_json(parquet, tmp_path, sqlite_url):
    vtag = str(BIN / "vtag")
    train_cmd = [vtag, *vtag_train_args(parquet, tmp_path / "m", sqlite_url, "--epochs", "1", *TINY_TRAIN_OPTIONS)]
    result = subprocess.run(train_cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "model version 1" in result.stdout
    result = subprocess.run(
        [
            vtag,
            "evaluate",
            "--checkpoint",
            str(tmp_path / "m" / "last.pt"),
            "--data",
            parquet,
            "--db",
            sqlite_url,
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert set(json.loads(result.stdout.strip().splitlines()[-1])) == {"hit_at_one", "perr", "gap", "map"}
    bad = subprocess.run(
        train_cmd[:-4] + ["--epochs", "-2", "--out", str(tmp_path / "n"), "--db", sqlite_url],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "epochs must be a positive integer" in bad.stderr and "Traceback" not in bad.stderr


def test_torchrun_ddp_on_cpu(parquet, tmp_path, sqlite_url):
    """Two DDP ranks (gloo on the CPU): each trains on its share, rank 0 alone writes and registers."""
    cmd = [
        str(BIN / "torchrun"),
        "--nproc-per-node",
        "2",
        "-m",
        "tasks.cli",
        *vtag_train_args(parquet, tmp_path / "ddp", sqlite_url, "--epochs", "1", *TINY_TRAIN_OPTIONS),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("model version 1:") == 1
    state = checkpoint.load(str(tmp_path / "ddp" / "last.pt"))
    assert state["data"]["world"] == 2 and state["step"] == 48 // 8  # global batch 8 = 4 a rank, 6 steps
    assert [v["version"] for v in in_transaction(sqlite_url, registry.versions_with_latest_evaluation)] == [1]


def test_the_loss_is_read_back_in_batches_and_a_diverged_run_names_its_step(parquet, tmp_path, monkeypatch):
    """Losses are read to the host every LOSS_SYNC_STEPS steps and before each checkpoint, and still one per
    step in the history; a loss that is not finite stops the run naming the step it happened at, before a
    checkpoint holds it."""
    from model import train as training

    monkeypatch.setattr(training, "LOSS_SYNC_STEPS", 2)
    reads, to_host = [], training._to_host
    monkeypatch.setattr(training, "_to_host", lambda losses: reads.append(len(losses)) or to_host(losses))
    result = train(_tiny(epochs=1), parquet, str(tmp_path / "ok"), progress=False, checkpoint_every=3)
    steps = result.steps
    assert len(result.history["step_loss"]) == steps >= 5 and max(reads) <= 2 and sum(reads) == steps
    assert 1 in reads  # the read before the checkpoint at step 3, one step after the last

    def poisoned(logits, labels, stages=1):  # finite until step 4
        poisoned.calls += 1
        loss = (logits.float() * 0).sum() + 1.0
        return loss * float("nan") if poisoned.calls == 4 else loss

    poisoned.calls = 0
    monkeypatch.setattr(training, "loss_fn", poisoned)
    out = tmp_path / "diverged"
    with pytest.raises(training.TrainingDiverged, match="loss became nan at step 4: lower the learning rate"):
        train(_tiny(epochs=1), parquet, str(out), progress=False, checkpoint_every=5)
    assert not (out / checkpoint.LAST).exists()  # step 5's checkpoint never came: the run stopped at the read
