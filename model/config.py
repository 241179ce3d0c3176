"""Model and training configuration: one dataclass, presets from presets.toml, checked before any work."""

import dataclasses
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path

from storage.errors import VtagError
from storage.formats.yt8m_spec import FRAME, LEVELS, MAX_FRAMES, NUM_CLASSES, VIDEO

PRESETS_FILE = Path(__file__).with_name("presets.toml")
OPTIMIZERS = ("rmsprop_centered", "adam")
LR_SCHEDULES = ("step", "cosine")
# The policies of model/precision.py (named here so that a config is checked without importing torch).
PRECISIONS = ("fp32", "lstm-fp32", "fp16", "bf16")
ARCHITECTURE_FIELDS = (
    "level",
    "embedding_size",
    "lstm_size",
    "head_sizes",
    "pool_norm",
    "hidden_size",
    "batch_norm",
    "ensemble_size",
    "chain_size",
    "num_classes",
)


class ConfigError(VtagError, ValueError):
    pass


@dataclass(frozen=True)
class Config:
    preset: str = "small"
    level: str = FRAME.name
    # AttentionLSTM (frame level)
    embedding_size: int = 512
    lstm_size: int = 1024
    head_sizes: tuple[int, ...] = (8192, 4096)
    max_frames: int = MAX_FRAMES
    pool_norm: bool = False  # LayerNorm on each modality's pooled vector (not in the seed)
    # MLP (video level); hidden_size 0: no hidden layer (logistic regression, the starter's baseline)
    hidden_size: int = 2048
    batch_norm: bool = True  # on the hidden layer (the starter's MLP has none)
    drop_rate: float = 0.5
    input_drop_rate: float = 0.0  # dropout on the video-level input features
    # MLPs trained side by side, each on its own loss, their probabilities averaged (video level only)
    ensemble_size: int = 1
    # > 0: each MLP chains a second stage on its first's probabilities, projected to this many units
    chain_size: int = 0
    num_classes: int = NUM_CLASSES
    # training
    batch_size: int = 1024
    epochs: int = 10
    learning_rate: float = 1e-3
    lr_decay_epochs: tuple[int, ...] = (5,)
    lr_decay: float = 0.1
    # step: x lr_decay after each of lr_decay_epochs; cosine: from learning_rate towards 0 over the epochs
    lr_schedule: str = "step"
    weight_decay: float = 8e-4
    optimizer: str = "rmsprop_centered"
    rmsprop_rho: float = 0.95
    rmsprop_eps: float = 1e-6
    seed: int = 0
    num_workers: int = 2
    # model/precision.py's policy for training and inference; empty: the device's default (lstm-fp32 on
    # CUDA, fp32 on a CPU). Not architecture: the same weights run under any policy.
    precision: str = ""

    def validate(self) -> "Config":
        def need(ok: bool, message: str):
            if not ok:
                raise ConfigError(f"preset {self.preset!r}: {message}")

        need(self.level in LEVELS, f"level must be frame or video, not {self.level!r}")
        need(
            self.precision == "" or self.precision in PRECISIONS,
            f"unknown precision {self.precision!r}: choose one of {precision_choices()}",
        )
        need(
            self.lr_schedule in LR_SCHEDULES,
            f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, not {self.lr_schedule!r}",
        )
        need(self.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}, not {self.optimizer!r}")
        for name in ("embedding_size", "lstm_size", "num_classes", "batch_size", "epochs", "max_frames"):
            need(
                _integer(getattr(self, name)) and getattr(self, name) >= 1,
                f"{name} must be a positive integer, not {getattr(self, name)!r}",
            )
        need(
            _integer(self.hidden_size) and self.hidden_size >= (0 if self.level == VIDEO.name else 1),
            f"hidden_size must be a positive integer (0 at video level: no hidden layer), not {self.hidden_size!r}",
        )
        need(
            _integer(self.ensemble_size) and self.ensemble_size >= 1,
            f"ensemble_size must be a positive integer, not {self.ensemble_size!r}",
        )
        need(
            _integer(self.chain_size) and self.chain_size >= 0,
            f"chain_size must be an integer >= 0 (0: no second stage), not {self.chain_size!r}",
        )
        need(
            self.chain_size == 0 or self.level == VIDEO.name,
            f"chain_size applies to video level only (a second stage on the MLP), not {self.chain_size}",
        )
        need(
            self.ensemble_size == 1 or self.level == VIDEO.name,
            f"ensemble_size applies to video level only (frame level trains one AttentionLSTM), not {self.ensemble_size}",
        )
        need(
            self.max_frames <= MAX_FRAMES,
            f"max_frames must be at most {MAX_FRAMES} (YouTube-8M's cap), not {self.max_frames}",
        )
        need(
            all(_integer(s) and s >= 1 for s in self.head_sizes),
            f"head_sizes must be positive integers, not {self.head_sizes!r}",
        )
        # Every float is checked for a number first: inf or nan pass a plain `x > 0` (or fail it with a
        # misleading message) and surface steps later as a diverged loss or a traceback in the optimizer.
        for name, ok, expected in (
            ("drop_rate", lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
            ("input_drop_rate", lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
            ("learning_rate", lambda v: v > 0, "> 0 and finite"),
            ("lr_decay", lambda v: 0.0 < v <= 1.0, "in (0, 1]"),
            ("weight_decay", lambda v: v >= 0, ">= 0 and finite"),
            ("rmsprop_rho", lambda v: 0.0 < v < 1.0, "in (0, 1)"),
            ("rmsprop_eps", lambda v: v > 0, "> 0 and finite"),
        ):
            value = getattr(self, name)
            need(_finite_number(value) and ok(value), f"{name} must be {expected}, not {value!r}")
        need(_integer(self.seed) and self.seed >= 0, f"seed must be an integer >= 0, not {self.seed!r}")
        need(
            _integer(self.num_workers) and self.num_workers >= 0,
            f"num_workers must be an integer >= 0, not {self.num_workers!r}",
        )
        need(
            all(_integer(e) and e >= 1 for e in self.lr_decay_epochs),
            f"lr_decay_epochs must be positive integers, not {self.lr_decay_epochs!r}",
        )
        return self

    @property
    def stages(self) -> int:
        """The stages each model (each ensemble member) stacks in its training output."""
        return 2 if self.chain_size else 1

    def architecture(self) -> dict:
        """What a checkpoint's weights depend on: a checkpoint only loads into an equal architecture."""
        arch = {name: getattr(self, name) for name in ARCHITECTURE_FIELDS}
        if self.level == FRAME.name:
            unused = ("hidden_size", "batch_norm", "ensemble_size", "chain_size")
        else:
            unused = ("embedding_size", "lstm_size", "head_sizes", "pool_norm") + (
                ("batch_norm",) if self.hidden_size == 0 else ()
            )
        for name in unused:
            arch.pop(name)
        return arch

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict) -> "Config":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown config keys: {', '.join(unknown)}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        return cls(**values)


def precision_choices() -> str:
    return ", ".join(PRECISIONS) + " (or empty: the device's default)"


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def presets() -> dict[str, dict]:
    with open(PRESETS_FILE, "rb") as f:
        return tomllib.load(f)


def load_config(
    preset: str | None = None, level: str = FRAME.name, overrides: dict | None = None, cuda: bool = False
) -> Config:
    """A preset with overrides (None values ignored). Without a preset: the seed config for frame level
    on a GPU, `small` for frame level on a CPU, `video` for video level."""
    available = presets()
    if preset is None:
        preset = "video" if level == VIDEO.name else ("seed" if cuda else "small")
    if preset not in available:
        raise ConfigError(f"unknown preset {preset!r} (known: {', '.join(sorted(available))})")
    values = {**available[preset], "preset": preset}
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    if values.get("level", level) != level:
        raise ConfigError(f"preset {preset!r} is for level {values['level']!r}, not {level!r}")
    return Config.from_dict(values).validate()
