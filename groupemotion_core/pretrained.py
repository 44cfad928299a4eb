"""Pretrained encoder weights: a separate step from building the model, online or offline.

Online, a source is a hub id (timm: "hf-hub:timm/resnet101d.gluon_in1k" or a timm name such as
"resnet101d.ra2_in1k"; audio: "facebook/hubert-base-ls960"). Offline, it is a local path: for
vision a .safetensors file or a directory holding model.safetensors (timm's own hub layout),
for audio a directory written by `HubertModel.save_pretrained`. Each library's own loader does
the work (timm drops the ImageNet classifier, transformers maps legacy key names), and the
result is copied strictly into the model, so weights of another architecture or size are refused.

Pickle files (.bin, .pt, .pth, .ckpt, .pkl) are refused, never loaded: unpickling runs code.
"""

from __future__ import annotations

from pathlib import Path

import timm
from safetensors import SafetensorError
from torch import nn
from transformers import HubertModel, Wav2Vec2FeatureExtractor

from groupemotion_core.errors import GroupEmotionError
from groupemotion_core.model import GroupEmotionModel

_PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"}
_LOAD_ERRORS = (OSError, RuntimeError, ValueError, KeyError, SafetensorError)


def load_pretrained(model: GroupEmotionModel, vision: str | None = None, audio: str | None = None) -> None:
    """Load pretrained weights into the vision backbone and/or HuBERT, in place."""
    if vision is not None:
        _load_vision(model, vision)
    if audio is not None:
        _load_audio(model, audio)


def _load_vision(model: GroupEmotionModel, source: str) -> None:
    cfg = model.config.vision
    path = Path(source)
    try:
        if path.exists():
            file = _local_safetensors(path)
            pretrained = timm.create_model(
                cfg.backbone, pretrained=True, num_classes=0, global_pool="",
                pretrained_cfg_overlay={"file": str(file)}, **cfg.model_kwargs,
            )
        else:
            pretrained = timm.create_model(source, pretrained=True, num_classes=0, global_pool="", **cfg.model_kwargs)
        _copy_strict(pretrained, model.vision.backbone, source)
        # The pixel statistics these weights were trained with (a hub tag's own; for a local
        # file, the backbone's defaults).
        model.vision.set_normalization(pretrained.pretrained_cfg["mean"], pretrained.pretrained_cfg["std"])
    except _LOAD_ERRORS as e:
        raise GroupEmotionError("bad_weights", f"vision weights {source}: {e}") from None


def _load_audio(model: GroupEmotionModel, source: str) -> None:
    path = Path(source)
    try:
        if path.exists() and not path.is_dir():
            raise GroupEmotionError("bad_weights", f"{source}: audio weights are a save_pretrained directory")
        # use_safetensors=True: transformers refuses a directory or repo holding only pickles.
        pretrained = HubertModel.from_pretrained(source, use_safetensors=True)
        _copy_strict(pretrained, model.audio.hubert, source)
        _adopt_feature_extractor_settings(model, source)
    except _LOAD_ERRORS as e:
        raise GroupEmotionError("bad_weights", f"audio weights {source}: {e}") from None


def _adopt_feature_extractor_settings(model: GroupEmotionModel, source: str) -> None:
    """Feed HuBERT the waveform the way its checkpoint was trained on, per its own preprocessor config.

    A checkpoint's preprocessor_config.json says whether its waveforms were normalised to zero
    mean and unit variance and whether it takes an attention mask; the settings are written into
    the model config too, so every fine-tuned checkpoint carries them. A source without that file
    keeps the config's settings.
    """
    try:
        extractor = Wav2Vec2FeatureExtractor.from_pretrained(source)
    except OSError:
        return
    audio_cfg = model.config.audio
    audio_cfg.do_normalize = model.audio.do_normalize = bool(extractor.do_normalize)
    audio_cfg.use_attention_mask = model.audio.use_attention_mask = bool(extractor.return_attention_mask)


def _local_safetensors(path: Path) -> Path:
    """The safetensors file at `path` (or `path`/model.safetensors); anything else is refused."""
    file = path / "model.safetensors" if path.is_dir() else path
    if file.suffix in _PICKLE_SUFFIXES:
        raise GroupEmotionError("bad_weights", f"{file} is a pickle file; only .safetensors weights are loaded")
    if file.suffix != ".safetensors" or not file.is_file():
        raise GroupEmotionError("bad_weights", f"{file}: no .safetensors weights there")
    return file


def _copy_strict(source: nn.Module, target: nn.Module, name: str) -> None:
    try:
        target.load_state_dict(source.state_dict(), strict=True)
    except RuntimeError as e:
        raise GroupEmotionError("bad_weights", f"{name} does not fit this model's config: {e}") from None
