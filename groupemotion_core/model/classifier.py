"""GroupEmotionModel: Evtodienko's end-to-end audio-visual group emotion classifier.

    frames uint8 [B,T,H,W,3] -> VisionEncoder -> video tokens --+
                                                                 +-> CrossModalFusion -> logits [B, C]
    audio [B,S], audio_len [B] -> AudioEncoder -> audio tokens --+

Every layer is trained (nothing frozen); the pretrained encoders get a smaller learning rate,
which is why the parameters split into `encoder_parameters()` and `head_parameters()`.
Construction is random init and offline; see `groupemotion_core.weights.pretrained` for weights.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from groupemotion_core.model.config import ModelConfig
from groupemotion_core.model.encoders import AudioEncoder, VisionEncoder
from groupemotion_core.model.fusion import CrossModalFusion


class GroupEmotionModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.audio_samples = cfg.decode_spec().audio_samples
        self.vision = VisionEncoder(cfg.vision, cfg.fusion.dim)
        self.audio = AudioEncoder(cfg.audio, cfg.fusion.dim)
        self.fusion = CrossModalFusion(cfg.fusion, num_labels=len(cfg.labels))

    def forward(self, frames: torch.Tensor, audio: torch.Tensor, audio_len: torch.Tensor) -> torch.Tensor:
        """frames uint8 [B,T,H,W,3], audio float32 [B,S] zero padded, audio_len int64 [B] -> logits.

        S must be the config's fixed clip length (`decode_spec().audio_samples`): HuBERT base's
        feature extractor normalises over the whole waveform, so another S would change results.
        """
        if audio.shape[-1] != self.audio_samples:
            raise ValueError(
                f"audio must be {self.audio_samples} samples (clip_seconds x sample_rate, zero padded), "
                f"got {audio.shape[-1]}"
            )
        video_tokens = self.vision(frames)
        audio_tokens, audio_mask = self.audio(audio, audio_len)
        return self.fusion(audio_tokens, audio_mask, video_tokens)

    @torch.inference_mode()
    def probabilities(self, frames: np.ndarray, audio: np.ndarray, audio_len: np.ndarray) -> np.ndarray:
        """Decoded windows (numpy, as `forward` takes them) -> softmax probabilities float32 [B, C].

        What `groupemotion infer` writes for a window and `Labeller` returns, from this one place:
        on the model's device, under bf16 autocast on a GPU (as training ran there). Call it on
        a model in eval mode.
        """
        device = next(self.parameters()).device
        frames_t = torch.from_numpy(np.ascontiguousarray(frames)).to(device)
        audio_t = torch.from_numpy(np.ascontiguousarray(audio)).to(device)
        audio_len_t = torch.from_numpy(np.asarray(audio_len, dtype=np.int64)).to(device)
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            logits = self(frames_t, audio_t, audio_len_t)
        return torch.softmax(logits.float(), dim=-1).cpu().numpy()

    def encoder_parameters(self) -> list[nn.Parameter]:
        """The pretrained towers (timm backbone, HuBERT): fine-tuned at a reduced learning rate."""
        return [*self.vision.backbone.parameters(), *self.audio.hubert.parameters()]

    def head_parameters(self) -> list[nn.Parameter]:
        """Everything trained from scratch: the projections and the fusion block."""
        encoder = {id(p) for p in self.encoder_parameters()}
        return [p for p in self.parameters() if id(p) not in encoder]
