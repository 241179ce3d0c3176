"""Precision policies: which dtype each part of a model (embedding, LSTM, head) computes in.

Why a policy and not just "bf16 autocast on a GPU": under torch.autocast(dtype=torch.bfloat16) on CUDA,
autocast's cuDNN RNN wrapper (aten/src/ATen/cudnn/AutocastRNN.cpp) casts the LSTM's input, states and
flat weights to float16, not bfloat16, and fp16 gradients without a GradScaler can underflow to zero.
So each policy says outright what runs where:

- `fp32`: no autocast; on CUDA, TF32 tensor cores for matmuls and the cuDNN LSTM.
- `lstm-fp32`: bf16 autocast for the embedding and the head; the LSTM outside autocast, in fp32
  (TF32 on CUDA). No loss scaling needed: bf16 has fp32's exponent range.
- `fp16`: fp16 autocast everywhere, with a GradScaler (the loss scaled up so that small gradients
  survive fp16, steps whose gradients overflowed skipped).
- `bf16`: bf16 autocast everywhere; the LSTM gets whatever autocast gives it (fp16 under cuDNN).

Defaults (Config.precision empty): `lstm-fp32` on CUDA, `fp32` elsewhere. `lstm-fp32` on CUDA because it
is the fastest policy that needs nothing tuned nor checkpointed for numerics: no loss scale, bf16's range
for the wide head (8192 and 4096 units), and the recurrence over up to 300 frames summed in fp32. Its
cost is that the LSTM, most of the model's FLOPs, runs on TF32 rather than fp16 tensor cores: `fp16` is
the faster choice when that matters. On a CPU, fp32: CPUs without bf16 units gain nothing from autocast.

`describe` runs one tiny forward with hooks and reports the dtypes that actually came out of each part,
which is what training and inference log: what ran, not what the code names.
"""

import contextlib
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from model.attention_lstm import AttentionLSTM, AttentionPooledBiLSTM
from model.config import PRECISIONS, ConfigError, precision_choices
from model.video_mlp import VideoEnsemble, VideoMLP
from storage.formats.yt8m_spec import AUDIO_DIM, RGB_DIM

DEFAULTS = {"cuda": "lstm-fp32"}  # any other device type: fp32


@dataclass(frozen=True)
class Precision:
    name: str
    autocast_dtype: torch.dtype | None  # None: no autocast
    lstm_fp32: bool = False  # the LSTM outside autocast, in fp32
    needs_grad_scaler: bool = False

    def autocast(self, device: torch.device):
        """The context to run the forward in (the loss may be computed outside it)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)

    def grad_scaler(self, device: torch.device) -> torch.amp.GradScaler:
        """Disabled when the policy needs none: then scale() is the identity and step() a plain step, so the
        training step is one code path, bit for bit the unscaled one in fp32."""
        return torch.amp.GradScaler(device.type, enabled=self.needs_grad_scaler)

    def apply(self, model: nn.Module, device: torch.device) -> nn.Module:
        """Set what the policy needs on `model` (its LSTMs' precision) and on the process (TF32 on CUDA)."""
        for module in model.modules():
            if isinstance(module, AttentionPooledBiLSTM):
                module.lstm_fp32 = self.lstm_fp32
        if device.type == "cuda":
            # What the fp32 parts run on: TF32 keeps fp32's range with a 10-bit mantissa, several times faster.
            if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
                torch.backends.cuda.matmul.fp32_precision = "tf32"
                torch.backends.cudnn.rnn.fp32_precision = "tf32"
            else:  # before torch 2.9 (this path must run on a GPU image's older torch too)
                torch.backends.cuda.matmul.allow_tf32 = True
                torch.backends.cudnn.allow_tf32 = True
        return model

    def describe(self, model: nn.Module, device: torch.device) -> dict[str, str]:
        """{part: dtype it computed in} from one tiny forward of `model` (already `apply`d) on `device`:
        the output dtype of each part's modules, recorded by forward hooks. Leaves the model's mode, its
        weights and every RNG as they were."""
        seen: dict[str, set[str]] = {}
        hooks = [
            module.register_forward_hook(lambda _m, _in, out, part=part: seen.setdefault(part, set()).add(_dtype(out)))
            for part, modules in _parts(model).items()
            for module in modules
        ]
        was_training = model.training
        try:
            model.eval()
            with torch.no_grad(), self.autocast(device):
                model(*_tiny_inputs(model, device))
        finally:
            model.train(was_training)
            for hook in hooks:
                hook.remove()
        return {part: "/".join(sorted(dtypes)) for part, dtypes in seen.items()}

    def summary(self, model: nn.Module, device: torch.device) -> str:
        """One line for the log: the policy and what each part measured, e.g.
        `precision lstm-fp32 on cuda: embedding bfloat16, lstm float32, head bfloat16`."""
        parts = ", ".join(f"{part} {dtype}" for part, dtype in self.describe(model, device).items())
        scaler = " (GradScaler)" if self.needs_grad_scaler else ""
        return f"precision {self.name} on {device.type}{scaler}: {parts}"


POLICIES = {
    p.name: p
    for p in (
        Precision("fp32", autocast_dtype=None),
        Precision("lstm-fp32", autocast_dtype=torch.bfloat16, lstm_fp32=True),
        Precision("fp16", autocast_dtype=torch.float16, needs_grad_scaler=True),
        Precision("bf16", autocast_dtype=torch.bfloat16),
    )
}
assert tuple(POLICIES) == PRECISIONS, "model.config.PRECISIONS names the policies defined here"


def precision_for(name: str, device: torch.device) -> Precision:
    """The policy called `name`; an empty name is the device's default."""
    name = name or DEFAULTS.get(device.type, "fp32")
    if name not in POLICIES:
        raise ConfigError(f"unknown precision {name!r}: choose one of {precision_choices()}")
    return POLICIES[name]


def _parts(model: nn.Module) -> dict[str, list[nn.Module]]:
    if isinstance(model, AttentionLSTM):
        towers = (model.rgb, model.audio)
        return {
            "embedding": [t.embed for t in towers],
            "lstm": [t.lstm for t in towers],
            "head": [model.head],
        }
    if isinstance(model, (VideoMLP, VideoEnsemble)):
        mlps = model.members if isinstance(model, VideoEnsemble) else [model]
        return {"mlp": [stage for mlp in mlps for stage in mlp.stages()]}
    raise TypeError(f"no precision report for {type(model).__name__}")


def _tiny_inputs(model: nn.Module, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Two videos of two frames (constant: drawing them would move the RNG a resumed run replays)."""
    if isinstance(model, AttentionLSTM):
        mask = torch.ones(2, 2, dtype=torch.bool, device=device)
        return torch.ones(2, 2, RGB_DIM, device=device), torch.ones(2, 2, AUDIO_DIM, device=device), mask
    return torch.ones(2, RGB_DIM, device=device), torch.ones(2, AUDIO_DIM, device=device)


def _dtype(output) -> str:
    """The dtype of a module's output: a tensor, a PackedSequence, or the first of a tuple (an LSTM's)."""
    while isinstance(output, tuple) and not isinstance(output, PackedSequence):
        output = output[0]
    tensor = output.data if isinstance(output, PackedSequence) else output
    return str(tensor.dtype).removeprefix("torch.")
