"""Which network a config builds, how a batch goes into it and the loss it learns from: what training
and scoring share of the models (model/attention_lstm.py at frame level, model/video_mlp.py at video level).
"""

import torch
import torch.nn.functional as F
from torch import nn

from model.attention_lstm import AttentionLSTM
from model.config import Config
from model.video_mlp import VideoEnsemble, VideoMLP
from storage.formats.yt8m_spec import FRAME, level_spec

# A video has about 3 of 3862 labels: starting every logit at that prior (log(3/3862) ~ -7) spares
# the first steps of training from doing nothing but pushing thousands of logits down.
PRIOR_LOGIT = -7.0


def build_model(config: Config) -> nn.Module:
    if config.level == FRAME.name:
        model = AttentionLSTM(config)
    else:
        model = VideoMLP(config) if config.ensemble_size == 1 else VideoEnsemble(config)
    for output in _output_layers(model):
        nn.init.constant_(output.bias, PRIOR_LOGIT)
    return model


def _output_layers(model: nn.Module) -> list[nn.Linear]:
    """The last Linear of each stage of the model, or of each ensemble member's."""
    networks = list(model.members) if isinstance(model, VideoEnsemble) else [model]
    stages = [stage for net in networks for stage in (net.stages() if isinstance(net, VideoMLP) else [net])]
    return [[m for m in stage.modules() if isinstance(m, nn.Linear)][-1] for stage in stages]


def loss_fn(logits: torch.Tensor, labels: torch.Tensor, stages: int = 1) -> torch.Tensor:
    """Sigmoid cross-entropy summed over classes and batch, as the seed trains. An ensemble's stacked
    logits (members, B, C): the members' mean of it, so the loss per video reads as one model's. Chained
    stages (config.stages, the dimension before B) are summed: each stage learns from the labels in full."""
    logits = logits.float()
    members = logits[..., 0, 0].numel() // stages
    return F.binary_cross_entropy_with_logits(logits, labels.expand_as(logits), reduction="sum") / members


def forward(model: nn.Module, batch: dict, level: str) -> torch.Tensor:
    return model(*(batch[name] for name in level_spec(level).model_inputs))
