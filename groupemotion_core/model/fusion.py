"""The fusion block of the paper (section 4.2): self-attention, two cross-modal attentions, head.

    x      = [a; v] + SelfAttention([a; v])                (Q = K = V = a_emb (+) v_emb)
    a, v   = split(x)
    v'     = v + CrossAttention(Q=v, K=V=a)                 video queries attend to audio
    a'     = a + CrossAttention(Q=a, K=V=v)                 audio queries attend to video
    logits = Linear(GELU(Linear(LayerNorm(mean of the valid tokens of [a'; v']))))

Skip connections wrap every attention (Vaswani et al., as the paper says), and LayerNorm sits
before the penultimate projection. The paper gives no more detail, so the rest is the plainest
choice: both cross-modal attentions read the same self-attended tokens, and the valid tokens of
both modalities are mean-pooled together.

Invalid audio tokens (padding, or a clip with no audio track) are never attended to. A clip with
no valid audio token has nothing for its video queries to read: its video->audio attention
contributes exactly zero and the skip connection carries the video tokens through unchanged (its
keys are unmasked before that only so that softmax never sees an all -inf row, which is NaN).
Self-attention and audio->video attention always have valid keys, the video tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from groupemotion_core.model.config import FusionConfig


class CrossModalFusion(nn.Module):
    def __init__(self, cfg: FusionConfig, num_labels: int):
        super().__init__()
        self.self_attention = _attention(cfg)
        self.video_to_audio = _attention(cfg)
        self.audio_to_video = _attention(cfg)
        self.norm = nn.LayerNorm(cfg.dim)
        self.penultimate = nn.Linear(cfg.dim, cfg.dim)
        self.activation = nn.GELU()
        self.dropout = nn.Dropout(cfg.dropout)
        self.classifier = nn.Linear(cfg.dim, num_labels)

    def forward(self, audio: torch.Tensor, audio_mask: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
        """audio [B, La, D], audio_mask bool [B, La] (True = valid), video [B, Lv, D] -> logits [B, C]."""
        video_mask = torch.ones(video.shape[:2], dtype=torch.bool, device=video.device)
        valid = torch.cat([audio_mask, video_mask], dim=1)

        tokens = torch.cat([audio, video], dim=1)
        tokens = tokens + _attend(self.self_attention, tokens, tokens, valid)
        audio, video = tokens.split([audio.shape[1], video.shape[1]], dim=1)

        has_audio = audio_mask.any(dim=1)
        audio_keys_valid = audio_mask | ~has_audio[:, None]
        from_audio = _attend(self.video_to_audio, video, audio, audio_keys_valid)
        from_video = _attend(self.audio_to_video, audio, video, video_mask)
        video = video + from_audio * has_audio[:, None, None].to(video.dtype)
        audio = audio + from_video

        tokens = torch.cat([audio, video], dim=1)
        weights = valid.to(tokens.dtype).unsqueeze(-1)
        pooled = (tokens * weights).sum(dim=1) / weights.sum(dim=1)
        hidden = self.dropout(self.activation(self.penultimate(self.norm(pooled))))
        return self.classifier(hidden)


def _attention(cfg: FusionConfig) -> nn.MultiheadAttention:
    return nn.MultiheadAttention(cfg.dim, cfg.heads, dropout=cfg.dropout, batch_first=True)


def _attend(attention: nn.MultiheadAttention, queries, keys, keys_valid) -> torch.Tensor:
    out, _ = attention(queries, keys, keys, key_padding_mask=~keys_valid, need_weights=False)
    return out
