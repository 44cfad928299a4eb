"""Fine-tuned checkpoints: `model.safetensors` plus a JSON `config.json`, never pickle.

config.json holds the resolved ModelConfig (so the model can be rebuilt without guessing), the
labels in logit order, a `model_id` and whatever metadata the trainer adds (epoch, metrics...).
The model_id is a prefix of the sha256 of the weights file: it names exactly these weights,
goes into every output row, and lets loading check that the config belongs to the weights.

Loading reads only safetensors (a renamed torch.save pickle is refused, never unpickled) and a
bounded config.json; any mismatch between the two is a `bad_checkpoint` error.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from groupemotion_core.model.config import ModelConfig
from groupemotion_core.errors import GroupEmotionError
from groupemotion_core.weights.convert import sha256_file

if TYPE_CHECKING:
    from groupemotion_core.model.classifier import GroupEmotionModel

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
MAX_CONFIG_BYTES = 1 << 20
_RESERVED = ("model", "labels", "model_id")


def save_checkpoint(model: GroupEmotionModel, directory: str | os.PathLike, **metadata: Any) -> str:
    """Write the checkpoint into `directory` (created if needed) and return its model_id.

    Each file is written beside its final name and renamed into place, so a crash mid-save
    never leaves a truncated file under the real name; the config is written last.
    """
    _check_metadata(metadata)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / WEIGHTS_NAME
    tmp = directory / (WEIGHTS_NAME + ".tmp")
    save_model(model, str(tmp), metadata={"format": "pt"})  # dedups shared tensors
    os.replace(tmp, weights)
    model_id = _file_id(weights)
    _write_config(directory, {"model": model.config.to_dict(), "labels": list(model.config.labels),
                              "model_id": model_id, **metadata})
    return model_id


def load_checkpoint(
    directory: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> tuple[GroupEmotionModel, dict[str, Any]]:
    """Rebuild the model from config.json, load its weights, and return (model in eval mode, config)."""
    directory = Path(directory)
    config = _read_config(directory / CONFIG_NAME)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise GroupEmotionError("bad_checkpoint", f"{weights} is missing")
    if _file_id(weights) != config["model_id"]:
        raise GroupEmotionError("bad_checkpoint", f"{weights} is not the weights that {CONFIG_NAME} describes")
    try:
        cfg = ModelConfig.from_dict(config["model"])
    except GroupEmotionError as e:
        raise GroupEmotionError("bad_checkpoint", f"{CONFIG_NAME}: {e.detail}") from None
    if list(config["labels"]) != list(cfg.labels):
        raise GroupEmotionError("bad_checkpoint", f"labels {config['labels']} differ from the model's {cfg.labels}")
    from groupemotion_core.model.classifier import GroupEmotionModel  # timm and transformers: only where a model is built

    model = GroupEmotionModel(cfg).to(map_location)  # load_model copies into existing tensors
    try:
        load_model(model, str(weights), strict=True, device=str(map_location))
    except SafetensorError as e:
        raise GroupEmotionError("bad_checkpoint", f"{weights} is not a safetensors file ({e}); pickles are never loaded") from None
    except RuntimeError as e:
        raise GroupEmotionError("bad_checkpoint", f"{weights} does not fit {CONFIG_NAME}: {e}") from None
    return model.eval(), config


def export_checkpoint(source: str | os.PathLike, directory: str | os.PathLike, **metadata: Any) -> str:
    """Copy the checkpoint in `source` into `directory` with `metadata` in place of its own, and
    return its model_id: what save_checkpoint(load_checkpoint(source)[0], directory, **metadata)
    writes, without building the model (the weights are checked against the model_id that
    source's config.json records, byte for byte, not loaded)."""
    _check_metadata(metadata)
    source, directory = Path(source), Path(directory)
    config = _read_config(source / CONFIG_NAME)
    weights = source / WEIGHTS_NAME
    if not weights.is_file() or _file_id(weights) != config["model_id"]:
        raise GroupEmotionError("bad_checkpoint", f"{weights} is missing or not the weights that {CONFIG_NAME} describes")
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / (WEIGHTS_NAME + ".tmp")
    shutil.copyfile(weights, tmp)
    os.replace(tmp, directory / WEIGHTS_NAME)
    _write_config(directory, {**{k: config[k] for k in _RESERVED}, **metadata})
    return config["model_id"]


def _check_metadata(metadata: dict[str, Any]) -> None:
    clash = [k for k in _RESERVED if k in metadata]
    if clash:
        raise ValueError(f"metadata keys {clash} are reserved in config.json")


def _write_config(directory: Path, config: dict[str, Any]) -> None:
    """config.json, written last and renamed into place (see save_checkpoint)."""
    text = json.dumps(config, indent=2)
    if len(text.encode()) > MAX_CONFIG_BYTES:
        raise ValueError(f"config.json would exceed {MAX_CONFIG_BYTES} bytes; keep metadata small")
    tmp = directory / (CONFIG_NAME + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, directory / CONFIG_NAME)


def _read_config(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise GroupEmotionError("bad_checkpoint", f"cannot read {path}: {e}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise GroupEmotionError("bad_checkpoint", f"{path} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        config = json.loads(raw)
    except ValueError as e:
        raise GroupEmotionError("bad_checkpoint", f"{path} is not JSON: {e}") from None
    if not isinstance(config, dict) or any(k not in config for k in _RESERVED):
        raise GroupEmotionError("bad_checkpoint", f"{path} must be an object with keys {', '.join(_RESERVED)}")
    return config


def _file_id(path: Path) -> str:
    return sha256_file(path)[:12]
