"""The models: AttentionLSTM over frames (the seed model) and an MLP over video-level means.

Both take dequantized features (model.data.to_device) and return logits for every class.

AttentionLSTM, per modality (rgb 1024-d, audio 128-d, separate weights): Linear -> tanh (embedding),
bidirectional LSTM, dropout, attention pooling with a softmax over the video's real frames only.
Head: concat -> Linear 8192 + ReLU -> Linear 4096 + tanh -> Linear num_classes (logits).
See ../shared/reference/yt8m_reference.md section 3.

VideoEnsemble: `ensemble_size` VideoMLPs (chained or not) trained side by side, each on its own loss,
scored together.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from model.config import Config
from storage.formats.yt8m_spec import AUDIO_DIM, FRAME, RGB_DIM


class AttentionPooledBiLSTM(nn.Module):
    def __init__(self, in_dim: int, config: Config):
        super().__init__()
        self.embed = nn.Linear(in_dim, config.embedding_size)
        self.lstm = nn.LSTM(config.embedding_size, config.lstm_size, batch_first=True, bidirectional=True)
        self.dropout = nn.Dropout(config.drop_rate)
        self.attention = nn.Linear(2 * config.lstm_size, 1)
        # Not in the seed. Pooled LSTM outputs start out tiny (~0.05), and the head then needs hundreds
        # of steps to scale them up; normalising them lets a small model learn in a CPU demo's budget.
        self.norm = nn.LayerNorm(2 * config.lstm_size, elementwise_affine=False) if config.pool_norm else nn.Identity()
        # Set by the precision policy (model/precision.py): run the LSTM in fp32 even under autocast, whose
        # cuDNN wrapper would otherwise cast it to fp16 (even under bf16 autocast).
        self.lstm_fp32 = False

    def forward(self, frames: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """frames (B, T, in_dim) float, mask (B, T) bool -> (B, 2 * lstm_size)."""
        lengths = mask.sum(dim=1).clamp(min=1)
        embedded = torch.tanh(self.embed(frames))
        # Packing keeps padded frames out of both directions (cuDNN runs packed sequences natively).
        packed = pack_padded_sequence(embedded, lengths.cpu(), batch_first=True, enforce_sorted=False)
        if self.lstm_fp32:
            with torch.autocast(frames.device.type, enabled=False):
                outputs, _ = self.lstm(packed.to(torch.float32))
        else:
            outputs, _ = self.lstm(packed)
        outputs, _ = pad_packed_sequence(outputs, batch_first=True, total_length=frames.shape[1])
        outputs = self.dropout(outputs)
        scores = self.attention(outputs).squeeze(-1).float().masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores, dim=1).to(outputs.dtype)
        return self.norm(torch.bmm(weights.unsqueeze(1), outputs).squeeze(1))


class AttentionLSTM(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.rgb = AttentionPooledBiLSTM(RGB_DIM, config)
        self.audio = AttentionPooledBiLSTM(AUDIO_DIM, config)
        layers, width = [], 4 * config.lstm_size
        for i, size in enumerate(config.head_sizes):
            layers += [nn.Linear(width, size), nn.ReLU() if i == 0 else nn.Tanh()]
            width = size
        layers.append(nn.Linear(width, config.num_classes))
        self.head = nn.Sequential(*layers)

    def forward(self, rgb: torch.Tensor, audio: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """rgb (B, T, 1024) and audio (B, T, 128), dequantized; mask (B, T) bool -> logits (B, classes)."""
        pooled = torch.cat([self.rgb(rgb, mask), self.audio(audio, mask)], dim=1)
        return self.head(pooled)


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
