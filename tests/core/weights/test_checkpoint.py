"""Fine-tuned checkpoints (safetensors + JSON); pretrained encoder weights are in test_pretrained.py."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import pytest
import torch

from groupemotion_core.weights.checkpoint import MAX_CONFIG_BYTES, export_checkpoint, load_checkpoint, save_checkpoint
from groupemotion_core.model.config import preset
from groupemotion_core.errors import GroupEmotionError
from groupemotion_core.model.classifier import GroupEmotionModel
from groupemotion_core.schema import CLASSES


@pytest.fixture
def model() -> GroupEmotionModel:
    torch.manual_seed(0)
    return GroupEmotionModel(preset("tiny")).eval()


@pytest.fixture
def saved(model, tmp_path) -> Path:
    save_checkpoint(model, tmp_path / "ckpt", epoch=3, val_accuracy=0.5)
    return tmp_path / "ckpt"


def _inputs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    frames = torch.randint(0, 256, (2, cfg.num_frames, cfg.image_size, cfg.image_size, 3), generator=g, dtype=torch.uint8)
    audio = torch.randn(2, cfg.decode_spec().audio_samples, generator=g) * 0.1
    audio[1] = 0.0
    return frames, audio, torch.tensor([audio.shape[1], 0])


def _expect_bad(reason: str, fn, *args):
    with pytest.raises(GroupEmotionError) as e:
        fn(*args)
    assert e.value.reason == reason, e.value
    return e.value


def _rewrite_config(directory: Path, **changes):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


# --- fine-tuned checkpoints -----------------------------------------------------------------


def test_round_trip_gives_identical_logits(model, tmp_path):
    with torch.no_grad():
        model.vision.set_normalization([0.5, 0.5, 0.5], [0.25, 0.25, 0.25])  # buffers travel too
        before = model(*_inputs(model))
    model_id = save_checkpoint(model, tmp_path / "ckpt", epoch=3)
    loaded, config = load_checkpoint(tmp_path / "ckpt")
    assert not loaded.training
    with torch.no_grad():
        after = loaded(*_inputs(model))
    assert torch.equal(before, after)
    assert loaded.config == model.config
    weights = (tmp_path / "ckpt" / "model.safetensors").read_bytes()
    assert model_id == config["model_id"] == hashlib.sha256(weights).hexdigest()[:12]
    assert config["labels"] == list(CLASSES)
    assert config["epoch"] == 3
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]


def test_metadata_cannot_overwrite_reserved_keys(model, tmp_path):
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(model, tmp_path, labels=["a"])


def test_export_writes_what_saving_the_loaded_model_writes_and_refuses_other_weights(saved, tmp_path):
    loaded, _ = load_checkpoint(saved)
    resaved = save_checkpoint(loaded, tmp_path / "resaved", epoch=5, val_macro_f1=0.25)
    assert export_checkpoint(saved, tmp_path / "exported", epoch=5, val_macro_f1=0.25) == resaved
    assert sorted(p.name for p in (tmp_path / "exported").iterdir()) == ["config.json", "model.safetensors"]
    for name in ("config.json", "model.safetensors"):
        assert (tmp_path / "exported" / name).read_bytes() == (tmp_path / "resaved" / name).read_bytes(), name
    with pytest.raises(ValueError, match="reserved"):
        export_checkpoint(saved, tmp_path / "clash", model_id="abc")

    torch.manual_seed(1)
    save_checkpoint(GroupEmotionModel(preset("tiny")), tmp_path / "other")
    (saved / "model.safetensors").write_bytes((tmp_path / "other" / "model.safetensors").read_bytes())
    _expect_bad("bad_checkpoint", export_checkpoint, saved, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


@pytest.mark.parametrize("kind", ["torch_save", "raw_pickle"])
def test_pickle_renamed_to_safetensors_is_refused_without_unpickling(saved, tmp_path, kind):
    marker = tmp_path / "unpickled"
    weights = saved / "model.safetensors"
    if kind == "torch_save":
        torch.save(GroupEmotionModel(preset("tiny")).state_dict(), weights)
    else:  # unpickling this would create the marker file
        weights.write_bytes(pickle.dumps(_Touch(marker)))
    # A consistent but hostile checkpoint: its config names the pickle's own hash.
    _rewrite_config(saved, model_id=hashlib.sha256(weights.read_bytes()).hexdigest()[:12])
    error = _expect_bad("bad_checkpoint", load_checkpoint, saved)
    assert "not a safetensors file" in error.detail
    assert not marker.exists()


class _Touch:
    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_missing_files_are_refused(saved):
    (saved / "model.safetensors").unlink()
    _expect_bad("bad_checkpoint", load_checkpoint, saved)
    (saved / "config.json").unlink()
    _expect_bad("bad_checkpoint", load_checkpoint, saved)


def test_config_of_other_weights_is_refused(model, saved, tmp_path):
    other = GroupEmotionModel(preset("tiny"))  # different random weights, same shapes
    save_checkpoint(other, tmp_path / "other")
    (saved / "config.json").write_bytes((tmp_path / "other" / "config.json").read_bytes())
    error = _expect_bad("bad_checkpoint", load_checkpoint, saved)
    assert "not the weights" in error.detail


def test_config_whose_sizes_do_not_fit_the_weights_is_refused(saved):
    config = json.loads((saved / "config.json").read_text())
    config["model"]["fusion"]["dim"] = 16
    _rewrite_config(saved, model=config["model"])
    error = _expect_bad("bad_checkpoint", load_checkpoint, saved)
    assert "does not fit" in error.detail


def test_malformed_or_oversized_config_is_refused(saved):
    _rewrite_config(saved, labels=["Sad", "Happy"])
    _expect_bad("bad_checkpoint", load_checkpoint, saved)
    _rewrite_config(saved, labels=list(CLASSES), model={"fusion": {"width": 3}})
    _expect_bad("bad_checkpoint", load_checkpoint, saved)
    (saved / "config.json").write_text("[not json")
    _expect_bad("bad_checkpoint", load_checkpoint, saved)
    (saved / "config.json").write_text(json.dumps({"pad": "x" * MAX_CONFIG_BYTES}))
    error = _expect_bad("bad_checkpoint", load_checkpoint, saved)
    assert "larger than" in error.detail
