"""Typed configuration of the model: every size is a field, and presets name the useful sets.

`paper` reproduces Evtodienko's model (ResNet101d + HuBERT base, cross-modal attention fusion) as
the paper's formula writes it; `paper-framewise` is the same model with the backbone run on every
frame (`VisionConfig.temporal_pool`); `tiny` keeps the paper's architecture at toy widths so a
whole test suite runs on two CPU cores.
A `ModelConfig` round-trips through JSON (`to_dict` / `from_dict`) and is saved beside every
checkpoint, so a result can always be traced back to the exact model that made it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from groupemotion_core.errors import GroupEmotionError
from groupemotion_core.media.spec import DecodeSpec
from groupemotion_core.schema import CLASSES


# Where the vision tower averages a clip's frames over time (VisionConfig.temporal_pool).
TEMPORAL_POOLS = ("frames", "features")


@dataclass
class VisionConfig:
    """The frame encoder: any timm backbone that yields a final feature map, and where it
    averages the clip's T frames over time (`temporal_pool`; docs/architecture.md, "Vision
    temporal pooling"):

    - "frames": before the backbone, as the paper's formula writes it (section 4.1,
      v_emb = PL(ResNet101d(M(v)))): the CNN runs once per clip, on the mean picture, "an
      inexpensive way to make use of temporal information"; about 1/T of the other's vision cost.
    - "features": after it, ClipBERT's way: the CNN runs on every frame and its T feature maps
      are averaged, so it sees real frames rather than a blend of them, at T times the cost.

    A config that does not name it means "features": every checkpoint saved before the field
    existed was trained that way and must load as it was trained.
    """

    backbone: str = "resnet101d"
    # Extra keyword arguments for timm.create_model (e.g. narrower `channels` for the tiny preset).
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    temporal_pool: str = "features"


@dataclass
class AudioConfig:
    """HuBERT's sizes (the fields of transformers' HubertConfig that we set) and its input policy.

    Defaults are facebook/hubert-base-ls960's config.json, except `layerdrop` (see `preset`).
    `do_normalize` and `use_attention_mask` are the checkpoint's feature-extractor settings: the
    base model was pre-trained on raw, un-normalised, unmasked waveforms (group-norm feature
    extractor); the large models (layer-norm extractor) expect zero-mean/unit-variance input and
    an attention mask.
    """

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    conv_dim: list[int] = field(default_factory=lambda: [512] * 7)
    conv_kernel: list[int] = field(default_factory=lambda: [10, 3, 3, 3, 3, 2, 2])
    conv_stride: list[int] = field(default_factory=lambda: [5, 2, 2, 2, 2, 2, 2])
    conv_bias: bool = False
    feat_extract_norm: str = "group"
    do_stable_layer_norm: bool = False
    num_conv_pos_embeddings: int = 128
    num_conv_pos_embedding_groups: int = 16
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.1
    feat_proj_dropout: float = 0.1
    layerdrop: float = 0.0
    mask_time_prob: float = 0.05  # SpecAugment during fine-tuning, as the checkpoint's config sets
    mask_time_length: int = 10
    mask_feature_prob: float = 0.0
    mask_feature_length: int = 10
    do_normalize: bool = False
    use_attention_mask: bool = False


@dataclass
class FusionConfig:
    """Width of the common token space, attention heads, and dropout of the fusion block."""

    dim: int = 768
    heads: int = 12
    dropout: float = 0.1


@dataclass
class ModelConfig:
    """The whole model, plus the input geometry it was trained on (frames, pixels, audio)."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    num_frames: int = 8
    image_size: int = 224
    sample_rate: int = 16000
    clip_seconds: float = 5.0
    labels: list[str] = field(default_factory=lambda: list(CLASSES))

    def __post_init__(self):
        problems = []
        if self.fusion.dim % self.fusion.heads:
            problems.append(f"fusion.dim {self.fusion.dim} is not divisible by heads {self.fusion.heads}")
        if (
            not isinstance(self.labels, list)
            or not all(isinstance(name, str) for name in self.labels)
            or not self.labels
            or len(set(self.labels)) != len(self.labels)
        ):
            problems.append(f"labels must be distinct and non-empty, got {self.labels}")
        a = self.audio
        if not len(a.conv_dim) == len(a.conv_kernel) == len(a.conv_stride):
            problems.append("audio.conv_dim, conv_kernel and conv_stride must have the same length")
        if self.vision.temporal_pool not in TEMPORAL_POOLS:
            problems.append(f"vision.temporal_pool must be one of {', '.join(TEMPORAL_POOLS)}, "
                            f"got {self.vision.temporal_pool!r}")
        if self.num_frames < 1 or self.image_size < 32 or self.sample_rate < 1 or self.clip_seconds <= 0:
            problems.append("num_frames >= 1, image_size >= 32, sample_rate >= 1, clip_seconds > 0")
        if problems:
            raise GroupEmotionError("bad_config", "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Inverse of `to_dict` (after a JSON round trip). Unknown or mistyped fields -> bad_config."""
        try:
            d = dict(d)
            parts = {
                "vision": VisionConfig(**d.pop("vision", {})),
                "audio": AudioConfig(**d.pop("audio", {})),
                "fusion": FusionConfig(**d.pop("fusion", {})),
            }
            return cls(**parts, **d)
        except (TypeError, ValueError, AttributeError) as e:
            raise GroupEmotionError("bad_config", f"not a model config: {e}") from None

    def decode_spec(self) -> DecodeSpec:
        """How clips must be decoded for this model: frame count, frame size, clip and audio length."""
        return DecodeSpec(
            num_frames=self.num_frames,
            frame_size=self.image_size,
            clip_seconds=self.clip_seconds,
            sample_rate=self.sample_rate,
        )


def _paper() -> ModelConfig:
    # The common width is HuBERT base's own hidden size, so the audio projection is square and
    # the fusion attention keeps HuBERT's (and BERT-base's) 64-wide heads: 768 / 12. The paper
    # gives no fusion sizes; this matches the encoder it mixes in and keeps heads as wide as the
    # ones those representations were trained with. layerdrop is 0 (the hub config has 0.1):
    # the paper does not mention LayerDrop, and under DDP a skipped layer gets no gradient.
    return ModelConfig(vision=VisionConfig("resnet101d", temporal_pool="frames"), audio=AudioConfig(),
                       fusion=FusionConfig(768, 12, 0.1))


def _paper_framewise() -> ModelConfig:
    # The paper's model with the backbone on every frame (ClipBERT's pooling): the other reading
    # of section 4.1, and how every checkpoint from before `temporal_pool` was trained.
    cfg = _paper()
    cfg.vision.temporal_pool = "features"
    return cfg


def _tiny() -> ModelConfig:
    # The paper's architecture (and pooling) at toy widths. zero_init_last=False so that every weight of the random
    # ResNet receives a non-zero gradient on the first step (timm zero-inits the last BN of each
    # block otherwise). The audio conv stack keeps HuBERT's 320-sample (20 ms) total stride.
    return ModelConfig(
        vision=VisionConfig(
            "resnet10t", {"channels": [16, 32, 64, 128], "stem_width": 8, "zero_init_last": False},
            temporal_pool="frames",
        ),
        audio=AudioConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            conv_dim=[32, 32, 32, 32],
            conv_kernel=[10, 4, 4, 4],
            conv_stride=[5, 4, 4, 4],
            num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=2,
        ),
        fusion=FusionConfig(dim=32, heads=4, dropout=0.1),
        image_size=64,
    )


_PRESETS = {"paper": _paper, "paper-framewise": _paper_framewise, "tiny": _tiny}
PRESETS = tuple(_PRESETS)


def preset(name: str) -> ModelConfig:
    """A fresh ModelConfig for a named preset (PRESETS)."""
    if name not in _PRESETS:
        raise GroupEmotionError("bad_config", f"unknown preset {name!r}; expected one of {', '.join(_PRESETS)}")
    return _PRESETS[name]()
