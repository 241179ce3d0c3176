"""storage.formats.yt8m_spec: its constants against the reference, quantization both ways, the two levels."""

import inspect
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from model.attention_lstm import AttentionLSTM
from model.video_mlp import VideoMLP
from storage.formats.parquet_layout import SCHEMAS
from storage.formats.yt8m_spec import (
    AUDIO_DIM,
    DEQUANTIZE_OFFSET,
    DEQUANTIZE_SCALE,
    FRAME,
    LEVELS,
    MAX_FRAMES,
    NUM_CLASSES,
    QUANTIZE_LEVELS,
    QUANTIZE_MAX,
    QUANTIZE_MIN,
    RGB_DIM,
    TOP_K,
    VIDEO,
    FrameLevel,
    UnknownLevelError,
    VideoLevel,
    dequantize,
    level_spec,
    quantize,
)
from tests.support.env import REPO, SHARED


@pytest.fixture(scope="module")
def reference() -> str:
    path = SHARED / "reference" / "yt8m_reference.md"
    if not path.is_file():
        pytest.fail(f"the reference is missing: expected {path} (../shared beside the checkout)")
    return path.read_text()


def _number(pattern: str, text: str) -> int:
    match = re.search(pattern, text)
    assert match, f"the reference no longer says {pattern!r}"
    return int(match.group(1))


def test_sizes_are_the_references(reference):
    assert _number(r"feature_lists `rgb`:[^\n]*?(\d+) uint8 values", reference) == RGB_DIM == FRAME.rgb.dim
    assert _number(r"feature_lists `audio`:[^\n]*?(\d+) uint8 values", reference) == AUDIO_DIM == FRAME.audio.dim
    assert _number(r"`mean_rgb` float×(\d+)", reference) == RGB_DIM == VIDEO.rgb.dim
    assert _number(r"`mean_audio` float×(\d+)", reference) == AUDIO_DIM == VIDEO.audio.dim
    assert _number(r"(\d+) classes", reference) == NUM_CLASSES
    assert _number(r"`vocabulary.csv` \(0\.\.(\d+)\)", reference) == NUM_CLASSES - 1
    assert _number(r"max_frames = (\d+)", reference) == MAX_FRAMES
    assert _number(r"GAP[^\n]*top_k = (\d+)", reference) == TOP_K
    assert _number(r"top (\d+) by descending score", reference) == TOP_K


def test_quantization_is_the_references(reference):
    quantize_formula = re.search(r"q = round\(\(clip\(x, (-?\d+), (-?\d+)\) \+ (\d+)\) \* (\d+) / (\d+)\)", reference)
    assert quantize_formula, "the reference no longer states the quantization"
    low, high, shift, levels, span = (int(g) for g in quantize_formula.groups())
    assert (low, high, shift, levels, span) == (QUANTIZE_MIN, QUANTIZE_MAX, -QUANTIZE_MIN, QUANTIZE_LEVELS, high - low)
    dequantize_formula = re.search(r"x = q \* (\d+)/(\d+) \+ (\d+)/(\d+) - (\d+)", reference)
    assert dequantize_formula, "the reference no longer states the dequantization"
    numerator, denominator, offset, offset_denominator, minus = (int(g) for g in dequantize_formula.groups())
    assert DEQUANTIZE_SCALE == numerator / denominator
    assert DEQUANTIZE_OFFSET == offset / offset_denominator - minus


def test_quantize_known_values():
    x = np.array([-3.0, -2.0, 0.0, 1.0, 2.0, 5.0], dtype=np.float32)
    assert quantize(x).tolist() == [0, 0, 128, 191, 255, 255]
    frames = np.linspace(-2.5, 2.5, 24, dtype=np.float32).reshape(2, 3, 4)
    assert quantize(frames).dtype == np.uint8 and quantize(frames).shape == (2, 3, 4)


def test_quantize_is_bit_identical_to_the_numpy_formula():
    # The expression synth used before the spec existed: shards written since must not change by a byte.
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1.5, 200_000), np.linspace(-2.1, 2.1, 200_000)]).astype(np.float32)
    assert np.array_equal(quantize(x), np.round((np.clip(x, -2.0, 2.0) + 2.0) * 255.0 / 4.0).astype(np.uint8))


def test_dequantize_known_values():
    assert dequantize(0) == -2 + 4 / 512 == -1.9921875
    assert dequantize(255) == pytest.approx(2 + 4 / 512, abs=1e-12)
    assert dequantize(128) == pytest.approx(128 * 4 / 255 + 4 / 512 - 2, abs=1e-12)
    levels = np.array([0, 128, 255], np.uint8).astype(np.float32)
    assert dequantize(levels).dtype == np.float32
    assert dequantize(torch.from_numpy(levels)).dtype == torch.float32


def test_dequantize_is_the_same_on_numpy_and_torch():
    # synth's video-level means are computed with numpy, the model's inputs with torch: bit for bit the same.
    levels = np.arange(256, dtype=np.uint8)
    with_numpy = dequantize(levels.astype(np.float32))
    with_torch = dequantize(torch.from_numpy(levels).float()).numpy()
    assert np.array_equal(with_numpy.view(np.uint32), with_torch.view(np.uint32))
    assert np.array_equal(with_numpy, levels.astype(np.float32) * (4.0 / 255.0) + (4.0 / 512.0) - 2.0)


def test_every_level_quantizes_back_to_itself():
    levels = np.arange(256, dtype=np.uint8)
    assert np.array_equal(quantize(dequantize(levels.astype(np.float32))), levels)


def test_features_round_trip_within_one_step():
    x = np.random.default_rng(1).uniform(QUANTIZE_MIN, QUANTIZE_MAX, 100_000).astype(np.float32)
    error = dequantize(quantize(x).astype(np.float32)) - x
    assert np.abs(error).max() <= DEQUANTIZE_SCALE


def test_levels():
    assert LEVELS == ("frame", "video")
    assert level_spec("frame") is FRAME and isinstance(FRAME, FrameLevel)
    assert level_spec("video") is VIDEO and isinstance(VIDEO, VideoLevel)
    assert [level_spec(name).name for name in LEVELS] == list(LEVELS)
    assert FRAME.feature_names == ("rgb", "audio") and VIDEO.feature_names == ("mean_rgb", "mean_audio")
    assert FRAME.per_frame and not VIDEO.per_frame


@pytest.mark.parametrize("name", LEVELS)
def test_a_levels_columns_are_the_parquet_layouts(name):
    spec = level_spec(name)
    assert SCHEMAS[name].names == list(spec.columns)
    assert set(spec.feature_names) <= set(spec.columns)


@pytest.mark.parametrize("name, model", [("frame", AttentionLSTM), ("video", VideoMLP)])
def test_a_levels_model_inputs_are_its_models_arguments(name, model):
    assert tuple(inspect.signature(model.forward).parameters)[1:] == level_spec(name).model_inputs


@pytest.mark.parametrize("name", ["clip", "", "Frame", None, ["frame"]])
def test_an_unknown_level_is_named(name):
    with pytest.raises(UnknownLevelError) as raised:
        level_spec(name)
    message = str(raised.value)
    assert repr(name) in message and "\n" not in message
    assert isinstance(raised.value, ValueError)


@pytest.mark.parametrize("module", ["storage.formats.yt8m_spec", "model.config"])
def test_what_dag_files_import_imports_no_array_library(module):
    # DAG files import these while the scheduler parses them: they must stay that cheap.
    code = f"import sys, {module}; print(sorted(m for m in ('numpy', 'torch', 'pyarrow') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
