"""Precision policies (model/precision.py) on the CPU: every policy runs here, fp16 included (CPU autocast has
fp16 kernels for Linear and LSTM, and GradScaler("cpu") really scales), so each one is checked against
fp32 on the forward, on a few real training steps through model.train, and on what `describe` measures.
What only a GPU shows (bf16 autocast running the cuDNN LSTM in fp16, TF32) is not tested here."""

import json
import logging
from pathlib import Path

import pytest
import torch

from model import checkpoint
from model.config import PRECISIONS, ConfigError, load_config
from model.evaluate import evaluate
from model.networks import build_model
from model.precision import POLICIES, precision_for
from model.train import train
from tasks.cli import main
from tasks.ingest import ingest
from tasks.synth import SynthConfig, synth
from tests.support.db import migrated
from tests.support.worlds import NIGHT, TINY, TINY_TRAIN_OPTIONS, vtag_train_args

CPU = torch.device("cpu")
LOW_PRECISION = {"lstm-fp32": torch.bfloat16, "fp16": torch.float16, "bf16": torch.bfloat16}
# What `describe` must measure on a CPU. Under bf16 on CUDA the LSTM would read float16 (cuDNN's autocast).
MEASURED = {
    "fp32": {"embedding": "float32", "lstm": "float32", "head": "float32"},
    "lstm-fp32": {"embedding": "bfloat16", "lstm": "float32", "head": "bfloat16"},
    "fp16": {"embedding": "float16", "lstm": "float16", "head": "float16"},
    "bf16": {"embedding": "bfloat16", "lstm": "bfloat16", "head": "bfloat16"},
}


def _config(**overrides):
    return load_config("small", overrides={**TINY, **overrides})


def _inputs():
    g = torch.Generator().manual_seed(1)
    rgb, audio = torch.rand(4, 20, 1024, generator=g) * 4 - 2, torch.rand(4, 20, 128, generator=g) * 4 - 2
    mask = torch.ones(4, 20, dtype=torch.bool)
    mask[1, 7:], mask[3, 12:] = False, False
    return rgb, audio, mask


def _logits(name: str) -> torch.Tensor:
    torch.manual_seed(0)
    model = build_model(_config()).eval()
    policy = POLICIES[name]
    policy.apply(model, CPU)
    with torch.no_grad(), policy.autocast(CPU):
        return model(*_inputs()).float()


@pytest.fixture(scope="module")
def parquet(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("precision-data")
    synth(str(root / "raw"), SynthConfig("frame", "train", shards=1, videos_per_shard=40, num_labels=10, seed=1))
    synth(str(root / "raw"), SynthConfig("frame", "validate", shards=1, videos_per_shard=8, num_labels=10, seed=1))
    assert not ingest(str(root / "raw"), str(root / "parquet"), migrated(f"sqlite:///{root / 'ingest.db'}")).failed
    return str(root / "parquet")


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def logged_runs(parquet, tmp_path_factory) -> tuple[dict, list[str]]:
    """Four real optimizer steps of model.train under each policy, from the same weights on the same batches,
    and what training logged."""
    root = tmp_path_factory.mktemp("precision-runs")
    results, handler, logger = {}, _Lines(), logging.getLogger("model.train")
    logger.addHandler(handler)
    # setLevel, not `logger.level =`: it also clears the logger's cache of isEnabledFor answers, which an
    # earlier test run at WARNING leaves saying no to INFO.
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        for name in PRECISIONS:
            result = train(_config(precision=name), parquet, str(root / name), progress=False, max_steps=4)
            results[name] = (result, checkpoint.load(result.checkpoint_uri))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return results, handler.lines


@pytest.fixture
def runs(logged_runs) -> dict:
    return logged_runs[0]


@pytest.fixture
def training_log(logged_runs) -> list[str]:
    return logged_runs[1]


def test_the_names_are_the_policies_and_the_defaults_are_per_device():
    assert tuple(POLICIES) == PRECISIONS
    assert precision_for("", CPU).name == "fp32"
    assert precision_for("", torch.device("cuda")).name == "lstm-fp32"
    assert precision_for("fp16", CPU).name == "fp16"  # a name given is taken on any device


@pytest.mark.parametrize("name", ["lstm-fp32", "fp16", "bf16"])
def test_forward_agrees_with_fp32(name):
    # Two units in the last place of the low-precision dtype (bf16: 2 x 2^-7, fp16: 2 x 2^-10) relative to
    # the logits (about -7 here, the label prior): the logits come out of a bf16 or fp16 Linear.
    rtol = 2 * torch.finfo(LOW_PRECISION[name]).eps
    fp32 = _logits("fp32")
    torch.testing.assert_close(_logits(name), fp32, rtol=rtol, atol=1e-3)
    assert not torch.equal(_logits(name), fp32)  # it did run in another precision


def test_describe_reports_what_ran_not_what_the_policy_names():
    for name in PRECISIONS:
        model = build_model(_config())
        policy = POLICIES[name]
        policy.apply(model, CPU)
        assert policy.describe(model, CPU) == MEASURED[name], name
    # The policy alone does not make the LSTM fp32: without the flag apply() sets, autocast gives it bf16.
    model = build_model(_config())
    POLICIES["lstm-fp32"].apply(model, CPU)
    model.rgb.lstm_fp32 = False
    assert POLICIES["lstm-fp32"].describe(model, CPU)["lstm"] == "bfloat16/float32"


def test_describe_leaves_mode_weights_and_rng_alone():
    model = build_model(load_config("video", "video", {"hidden_size": 16, "num_classes": 10})).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    assert POLICIES["bf16"].describe(model, CPU) == {"mlp": "bfloat16"}
    assert model.training and torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # batch norm's stats too


@pytest.mark.parametrize("name", ["lstm-fp32", "bf16"])
def test_training_steps_are_finite_and_near_fp32(runs, name):
    losses = _finite_run(runs, name)
    fp32_losses = runs["fp32"][0].history["step_loss"]
    # Same weights, same batches: the first loss differs only by the forward's rounding, the later ones
    # also by steps taken on rounded gradients (lr 1e-2, RMSProp). Measured: at most 0.4% apart.
    torch.testing.assert_close(losses, fp32_losses, rtol=0.01, atol=0.0)
    assert losses != fp32_losses


def test_fp16_trains_through_a_grad_scaler_that_skips_overflowing_steps(runs, training_log):
    losses = _finite_run(runs, "fp16")
    fp32_losses = runs["fp32"][0].history["step_loss"]
    # Same weights at step 1: the first loss differs from fp32's only by fp16's rounding.
    torch.testing.assert_close(losses[0], fp32_losses[0], rtol=2 * torch.finfo(torch.float16).eps, atol=0.0)
    # The summed loss's gradients overflow fp16 at GradScaler's initial scale 2^16: steps are skipped (and
    # logged) while the scale halves, and the steps taken moved the weights. Measured: steps 1, 2 and 4.
    skipped = [line for line in training_log if "skipped" in line]
    assert skipped and len(skipped) < 4
    assert runs["fp16"][1]["grad_scaler"]["scale"] == 2.0 ** (16 - len(skipped))
    torch.manual_seed(0)
    initial = build_model(_config(precision="fp16")).state_dict()
    assert any(not torch.equal(initial[k], v) for k, v in runs["fp16"][1]["model"].items())
    assert all(runs[name][1]["grad_scaler"] == {} for name in ("fp32", "lstm-fp32", "bf16"))


def test_a_continued_fp16_run_takes_the_steps_an_uninterrupted_one_does(parquet, tmp_path):
    # Steps 1 and 2 overflow (see above): the interrupted run stops at scale 2^14, and only a restored
    # scaler, not a fresh one at 2^16, takes step 3 as the uninterrupted run does.
    config = _config(precision="fp16")
    train(config, parquet, str(tmp_path / "interrupted"), progress=False, max_steps=2)
    train(config, parquet, str(tmp_path / "interrupted"), progress=False, max_steps=4)
    train(config, parquet, str(tmp_path / "straight"), progress=False, max_steps=4)
    resumed, straight = (checkpoint.load(str(tmp_path / run / "last.pt")) for run in ("interrupted", "straight"))
    assert resumed["grad_scaler"] == straight["grad_scaler"]
    assert all(torch.equal(resumed["model"][k], v) for k, v in straight["model"].items())


def _finite_run(runs, name) -> list[float]:
    """Its losses, having checked that they and its final weights are finite."""
    result, state = runs[name]
    losses = result.history["step_loss"]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert all(torch.isfinite(p).all() for p in state["model"].values())
    return losses


def test_training_and_scoring_log_the_measured_precision(parquet, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="model")
    result = train(_config(), parquet, str(tmp_path / "run"), progress=False, max_steps=1)
    evaluate(result.checkpoint_uri, parquet)
    logged = [r.getMessage() for r in caplog.records if "precision" in r.getMessage()]
    line = "precision fp32 on cpu: embedding float32, lstm float32, head float32"
    assert logged == [f"training in {line}", f"scoring in {line}"]


def test_unknown_precision_is_refused_in_one_line_naming_the_choices():
    for refuse in (lambda: _config(precision="fp8"), lambda: precision_for("fp8", CPU)):
        with pytest.raises(ConfigError) as error:
            refuse()
        message = str(error.value)
        assert "'fp8'" in message and "\n" not in message
        assert all(name in message for name in PRECISIONS)


def test_vtag_train_takes_a_precision_and_refuses_an_unknown_one(parquet, tmp_path, sqlite_url, capsys):
    words = vtag_train_args(parquet, tmp_path / "run", sqlite_url, *TINY_TRAIN_OPTIONS, "--epochs", "1")
    assert main([*words, "--precision", "bf16"]) == 0
    final = next((tmp_path / "run").glob("final-step*.pt"))
    assert checkpoint.load(str(final))["config"]["precision"] == "bf16"
    with pytest.raises(SystemExit) as exit_:
        main([*words, "--precision", "fp8"])
    assert exit_.value.code == 2
    assert "invalid choice: 'fp8' (choose from 'fp32', 'lstm-fp32', 'fp16', 'bf16')" in capsys.readouterr().err


def test_vtag_evaluate_and_infer_score_in_the_precision_asked(parquet, tmp_path, capsys, caplog):
    """The weights trained in fp32 scored in bf16 by `vtag evaluate` and `vtag infer`, as logged, every video
    tagged; the checkpoint's own policy when none is asked; an unknown one refused by the parser."""
    caplog.set_level(logging.INFO, logger="model")
    url = f"sqlite:///{Path(parquet).parent / 'ingest.db'}"  # its catalogue lists the 48 videos ingest wrote
    trained = train(_config(epochs=2), parquet, str(tmp_path / "run"), progress=False).checkpoint_uri
    metrics = {}
    for precision in ("bf16", None):
        asked = ["--precision", precision] if precision else []
        capsys.readouterr()
        assert main(["evaluate", "--checkpoint", trained, "--data", parquet, "--db", url, "--json", *asked]) == 0
        metrics[precision] = json.loads(capsys.readouterr().out.splitlines()[-1])
    # How close bf16's scores are to fp32's is test_forward_agrees_with_fp32's; here, 8 videos and a model two
    # epochs old have near-tied scores that rounding reorders, so only their being metrics is checked.
    assert all(0.0 <= m[k] <= 1.0 for m in metrics.values() for k in ("gap", "hit_at_one", "perr", "map"))
    night = ["--logical-date", NIGHT.isoformat(), "--exports", str(tmp_path / "exports")]
    assert main(["infer", "--checkpoint", trained, "--db", url, *night, "--precision", "bf16"]) == 0
    assert "scored 48 videos" in capsys.readouterr().out
    scoring = [r.getMessage() for r in caplog.records if r.getMessage().startswith("scoring in")]
    assert [line.split(":")[0] for line in scoring] == [
        "scoring in precision bf16 on cpu",
        "scoring in precision fp32 on cpu",
        "scoring in precision bf16 on cpu",
    ]
    with pytest.raises(SystemExit) as exit_:
        main(["evaluate", "--checkpoint", trained, "--data", parquet, "--db", url, "--precision", "fp8"])
    assert exit_.value.code == 2
