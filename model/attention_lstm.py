"""AttentionLSTM, the frame-level model (the seed's): dequantized frames (model.data.to_device) in,
logits for every class out.

Per modality (rgb 1024-d, audio 128-d, separate weights): Linear -> tanh (embedding),
bidirectional LSTM, dropout, attention pooling with a softmax over the video's real frames only.
Head: concat -> Linear 8192 + ReLU -> Linear 4096 + tanh -> Linear num_classes (logits).
See ../shared/reference/yt8m_reference.md section 3.
"""

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from model.config import Config
from storage.formats.yt8m_spec import AUDIO_DIM, RGB_DIM


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
        return self.pool(frames, mask)[0]

    def pool(self, frames: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the pooled outputs, the attention weights (B, T): which frames the pooling looked at)."""
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
        return self.norm(torch.bmm(weights.unsqueeze(1), outputs).squeeze(1)), weights


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

    def localise(self, rgb: torch.Tensor, audio: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (B, classes), attention (B, T): each frame's weight, the mean of the two modalities')."""
        (rgb_pooled, rgb_weights), (audio_pooled, audio_weights) = (
            self.rgb.pool(rgb, mask),
            self.audio.pool(audio, mask),
        )
        return self.head(torch.cat([rgb_pooled, audio_pooled], dim=1)), (rgb_weights + audio_weights) / 2
