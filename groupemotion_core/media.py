"""Decoding untrusted video bytes into the model's inputs with PyAV.

(Contract fixed; the decoder itself is being written.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from groupemotion_core.errors import GroupEmotionError


@dataclass(frozen=True)
class DecodeSpec:
    """Every size, count and limit of decoding, in one place."""

    num_frames: int = 8
    frame_size: int = 224  # output frames are frame_size x frame_size (letterboxed)
    clip_seconds: float = 5.0
    sample_rate: int = 16000
    max_input_bytes: int = 1 << 30
    max_pixels: int = 4096 * 2304
    max_duration_s: float = 4 * 3600.0
    threads: int = 0  # decoder threads; 0 lets FFmpeg choose

    @property
    def audio_samples(self) -> int:
        return int(round(self.clip_seconds * self.sample_rate))


@dataclass
class DecodedClip:
    frames: np.ndarray  # uint8 [T, frame_size, frame_size, 3]
    audio: np.ndarray  # float32 [spec.audio_samples], zero padded
    audio_len: int  # valid samples in audio; 0 = no audio track
    frame_times: list[float]  # seconds from the start of the video


class DecodeError(GroupEmotionError):
    """Reasons: empty, not_media, no_video, undecodable, too_large, too_long."""
