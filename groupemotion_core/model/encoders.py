"""The two towers of the paper (section 4.1): frames -> video tokens, waveform -> audio tokens.

Both end in the paper's projection layer (PL): one Linear to the common width, no activation (the
paper reports that a GELU + second projection overfits faster and loses ~3% accuracy).
Building a tower never touches the network; pretrained weights are loaded separately
(`groupemotion_core.weights.pretrained`).
"""

from __future__ import annotations

import timm
import torch
from torch import nn
from transformers import HubertConfig, HubertModel

from groupemotion_core.model.config import AudioConfig, VisionConfig


class VisionEncoder(nn.Module):
    """A timm 2D backbone, a mean over time, spatial positions as tokens.

    The mean over time is taken of the frames before the backbone (the paper's ResNet(M(v))) or
    of its feature maps after it (ClipBERT's), as `VisionConfig.temporal_pool` says; its
    docstring says why both exist. Frames travel as uint8 and are normalised here with the
    backbone's own mean and std (buffers, saved with the checkpoint, so inference uses what
    fine-tuning used); normalising is affine, so it commutes with the mean.
    """

    def __init__(self, cfg: VisionConfig, dim: int):
        super().__init__()
        self.backbone = timm.create_model(
            cfg.backbone, pretrained=False, num_classes=0, global_pool="", **cfg.model_kwargs
        )
        data_cfg = timm.data.resolve_model_data_config(self.backbone)
        self.register_buffer("mean", torch.tensor(data_cfg["mean"]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(data_cfg["std"]).view(1, 3, 1, 1))
        self.proj = nn.Linear(self.backbone.num_features, dim)
        self.pool_frames_first = cfg.temporal_pool == "frames"

    def set_normalization(self, mean, std) -> None:
        """Use the pixel statistics that a set of pretrained weights was trained with."""
        self.mean.copy_(torch.as_tensor(mean, dtype=self.mean.dtype).view(1, 3, 1, 1))
        self.std.copy_(torch.as_tensor(std, dtype=self.std.dtype).view(1, 3, 1, 1))

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 [B, T, H, W, 3] -> video tokens [B, h*w, dim]."""
        if frames.dtype != torch.uint8:
            raise TypeError(f"frames must be uint8 [B,T,H,W,3] (normalised inside the model), got {frames.dtype}")
        b, t, h, w, c = frames.shape
        if self.pool_frames_first:  # M(v): one mean picture per clip
            x = frames.sum(dim=1, dtype=torch.float32).div_(255.0 * t)  # [B, H, W, 3]
        else:
            x = frames.reshape(b * t, h, w, c).float().div_(255.0)  # [B*T, H, W, 3]
        # NHWC -> NCHW as a view: the tensor stays channels-last in memory, which convs prefer.
        x = (x.permute(0, 3, 1, 2) - self.mean) / self.std
        maps = self.backbone.forward_features(x)  # [B or B*T, C, h', w']
        if not self.pool_frames_first:
            maps = maps.reshape(b, t, *maps.shape[1:]).mean(dim=1)  # ClipBERT: the mean of the maps
        tokens = maps.flatten(2).transpose(1, 2)  # [B, h'*w', C]
        return self.proj(tokens)


def hubert_config(cfg: AudioConfig) -> HubertConfig:
    """The transformers HubertConfig for our AudioConfig (input-policy fields are ours, not HuBERT's)."""
    sizes = {k: v for k, v in vars(cfg).items() if k not in ("do_normalize", "use_attention_mask")}
    return HubertConfig(**sizes, num_feat_extract_layers=len(cfg.conv_dim))


class AudioEncoder(nn.Module):
    """HuBERT on the raw 16 kHz waveform; returns projected tokens and which of them are real audio.

    Audio always arrives at one fixed length S, zero padded after `audio_len` valid samples. The
    base model's group-norm feature extractor normalises over the whole waveform, padding
    included, so its outputs are only reproducible at a fixed S; at fixed S, everything here is
    per clip, and a clip gives the same tokens alone or in any batch.

    `token_mask` marks the output frames computed from valid samples (HuBERT's own conv length
    arithmetic); the fusion never attends to the rest. A clip with `audio_len` 0 has no valid
    tokens at all.
    """

    def __init__(self, cfg: AudioConfig, dim: int):
        super().__init__()
        self.hubert = HubertModel(hubert_config(cfg))
        self.proj = nn.Linear(cfg.hidden_size, dim)
        self.do_normalize = cfg.do_normalize
        self.use_attention_mask = cfg.use_attention_mask

    def forward(self, audio: torch.Tensor, audio_len: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """float [B, S], int [B] -> (tokens [B, L, dim], token_mask bool [B, L])."""
        audio_len = audio_len.clamp(0, audio.shape[1])
        sample_valid = torch.arange(audio.shape[1], device=audio.device) < audio_len[:, None]
        if self.do_normalize:
            audio = _zero_mean_unit_var(audio, sample_valid)
        attention_mask = None
        if self.use_attention_mask:
            # A clip without audio attends to its whole (zero) waveform: an all-zero mask would
            # give HuBERT's attention rows with every key masked. Its tokens are masked out below.
            attention_mask = (sample_valid | (audio_len == 0)[:, None]).long()
        hidden = self.hubert(audio, attention_mask=attention_mask).last_hidden_state  # [B, L, H]
        lengths = self.hubert._get_feat_extract_output_lengths(audio_len)
        token_mask = torch.arange(hidden.shape[1], device=audio.device) < lengths[:, None]
        return self.proj(hidden), token_mask


def _zero_mean_unit_var(audio: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """transformers' Wav2Vec2FeatureExtractor normalisation, over each clip's valid samples only.

    Padding stays exactly zero, as the feature extractor's padding_value; an empty clip stays zero.
    """
    valid = valid.to(audio.dtype)
    count = valid.sum(dim=1, keepdim=True).clamp(min=1)
    mean = (audio * valid).sum(dim=1, keepdim=True) / count
    var = ((audio - mean) ** 2 * valid).sum(dim=1, keepdim=True) / count
    return (audio - mean) / torch.sqrt(var + 1e-7) * valid
