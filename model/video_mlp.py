"""The video-level models: an MLP over L2-normalised mean features (chained or not), and an ensemble
of them scored together. Dequantized means in (model.data.to_device), logits for every class out.

VideoEnsemble: `ensemble_size` VideoMLPs (chained or not) trained side by side, each on its own loss,
scored together.
"""

import torch
import torch.nn.functional as F
from torch import nn

from model.config import Config
from storage.formats.yt8m_spec import AUDIO_DIM, RGB_DIM


class VideoMLP(nn.Module):
    """Video level: L2-normalised mean_rgb and mean_audio (as Google's starter feeds its models), input
    dropout, one hidden layer with batch norm and dropout, logits for every class. hidden_size 0: the
    starter's logistic regression, a single linear layer.

    chain_size > 0 chains a second stage on (Wang et al., "The Monkeytyping Solution to the YouTube-8M
    Video Understanding Challenge", 2017): an MLP like the first that reads the features and the first
    stage's probabilities, projected to chain_size units, so it can use which labels go together. Both
    stages learn from the labels (training mode gives their logits stacked, (2, B, C)); the second scores.
    """

    def __init__(self, config: Config):
        super().__init__()
        self.input_dropout = nn.Dropout(config.input_drop_rate)  # parameter-free: not in the state dict
        self.net = _mlp(RGB_DIM + AUDIO_DIM, config)
        chain = config.chain_size
        self.chain_projection = nn.Linear(config.num_classes, chain) if chain else None
        self.chained = _mlp(RGB_DIM + AUDIO_DIM + chain, config) if chain else None

    def forward(self, mean_rgb: torch.Tensor, mean_audio: torch.Tensor) -> torch.Tensor:
        features = torch.cat([F.normalize(mean_rgb, dim=1), F.normalize(mean_audio, dim=1)], dim=1)
        features = self.input_dropout(features)
        logits = self.net(features)
        if self.chained is None:
            return logits
        projected = self.chain_projection(torch.sigmoid(logits))
        chained = self.chained(torch.cat([features, projected.to(features.dtype)], dim=1))
        return torch.stack([logits, chained]) if self.training else chained

    def stages(self) -> list[nn.Sequential]:
        """The first stage, and the chained second where there is one."""
        return [self.net] if self.chained is None else [self.net, self.chained]


def _mlp(width: int, config: Config) -> nn.Sequential:
    layers = []
    if config.hidden_size:
        layers.append(nn.Linear(width, config.hidden_size))
        layers += [nn.BatchNorm1d(config.hidden_size)] if config.batch_norm else []
        layers += [nn.ReLU(), nn.Dropout(config.drop_rate)]
        width = config.hidden_size
    layers.append(nn.Linear(width, config.num_classes))
    return nn.Sequential(*layers)


class VideoEnsemble(nn.Module):
    """Independently initialised VideoMLPs in one model and one checkpoint. In training mode the forward
    gives each member's logits, stacked (members, B, C), or (members, stages, B, C) when chained, and loss_fn
    averages the members' own losses, so the members learn as separate runs would (averaging logits before
    the loss would train one wide model).
    In eval mode it gives the logits of the members' mean probability: the ensemble's prediction."""

    def __init__(self, config: Config):
        super().__init__()
        self.members = nn.ModuleList(VideoMLP(config) for _ in range(config.ensemble_size))

    def forward(self, mean_rgb: torch.Tensor, mean_audio: torch.Tensor) -> torch.Tensor:
        logits = torch.stack([member(mean_rgb, mean_audio) for member in self.members]).float()
        if self.training:
            return logits
        # logit(mean p) = log(mean p) - log(mean (1 - p)), from log-sigmoids: exact where p rounds to 0 or 1.
        # log(1 - p) = logsigmoid(-z) = logsigmoid(z) - z: one logsigmoid, the costly part of scoring's combine.
        log_p = F.logsigmoid(logits)
        return torch.logsumexp(log_p, 0) - torch.logsumexp(log_p - logits, 0)
