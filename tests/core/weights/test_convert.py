"""`groupemotion weights convert`: pickles in, safetensors out that load into the model unchanged."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file
from transformers import HubertModel, Wav2Vec2FeatureExtractor

from groupemotion_core.weights import convert as convert_module
from groupemotion_core.model.config import preset
from groupemotion_core.weights.convert import convert, require_safe_torch
from groupemotion_core.model.encoders import hubert_config
from groupemotion_core.errors import GroupEmotionError
from groupemotion_core.model.classifier import GroupEmotionModel
from groupemotion_core.weights.pretrained import load_pretrained
from ray_jobs import cli


class _Touch:
    """Unpickling this creates a file: the proof that a loader ran the pickle's code."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def _expect_bad(reason: str, fn, *args) -> GroupEmotionError:
    with pytest.raises(GroupEmotionError) as e:
        fn(*args)
    assert e.value.reason == reason, e.value
    assert "\n" not in str(e.value)
    return e.value


@pytest.fixture
def hubert_pickle(tmp_path) -> tuple[Path, HubertModel]:
    """A tiny HubertModel in the hub layout of facebook/hubert-base-ls960's main branch, whose
    pickle predates torch's weight-norm parametrisation (weight_g, weight_v)."""
    torch.manual_seed(1)
    hubert = HubertModel(hubert_config(preset("tiny").audio)).eval()
    src = tmp_path / "hubert-pickle"
    src.mkdir()
    legacy = {k.replace("parametrizations.weight.original0", "weight_g")
               .replace("parametrizations.weight.original1", "weight_v"): v for k, v in hubert.state_dict().items()}
    assert legacy.keys() != hubert.state_dict().keys()
    torch.save(legacy, src / "pytorch_model.bin")
    hubert.config.to_json_file(src / "config.json")
    # Not the model's default input policy, so that carrying it over is visible.
    Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=True).save_pretrained(src)
    return src, hubert


def test_a_hubert_pickle_directory_converts_to_weights_that_give_the_same_outputs(hubert_pickle, tmp_path):
    src, original = hubert_pickle
    done = convert(src, tmp_path / "hubert")
    assert done.weights == tmp_path / "hubert" / "model.safetensors"
    assert set(done.copied) == {"config.json", "preprocessor_config.json"}
    assert done.sha256 == hashlib.sha256(done.weights.read_bytes()).hexdigest()
    assert sorted(p.name for p in (tmp_path / "hubert").iterdir()) == [
        "config.json", "model.safetensors", "preprocessor_config.json"]

    model = GroupEmotionModel(preset("tiny")).eval()
    load_pretrained(model, audio=str(tmp_path / "hubert"))
    assert model.audio.do_normalize and model.audio.use_attention_mask  # preprocessor config carried over
    audio = torch.randn(2, model.audio_samples, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = original(audio).last_hidden_state
        got = model.audio.hubert(audio).last_hidden_state
    assert torch.equal(got, expected)


@pytest.mark.parametrize("dest_name", ["resnet.safetensors", "resnet-dir"])
def test_a_timm_checkpoint_file_converts_to_weights_that_give_the_same_outputs(tmp_path, dest_name):
    cfg = preset("tiny").vision
    torch.manual_seed(2)
    original = timm.create_model(cfg.backbone, pretrained=False, **cfg.model_kwargs).eval()
    # As timm's train.py saves it: the weights nested in a training checkpoint, DDP's prefix on.
    state = {f"module.{k}": v for k, v in original.state_dict().items()}
    torch.save({"epoch": 3, "arch": cfg.backbone, "state_dict": state}, tmp_path / "resnet.pth")
    dest = tmp_path / dest_name
    done = convert(tmp_path / "resnet.pth", dest)
    assert done.weights == (dest if dest.suffix == ".safetensors" else dest / "model.safetensors")
    assert done.tensors == len(state) and done.copied == ()

    model = GroupEmotionModel(preset("tiny")).eval()
    load_pretrained(model, vision=str(dest))
    frames = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model.vision.backbone.forward_features(frames), original.forward_features(frames))


@pytest.mark.parametrize("kind", ["torch_save", "raw_pickle"])
def test_a_hostile_pickle_is_refused_without_running_it(tmp_path, kind):
    marker = tmp_path / "code-ran"
    src = tmp_path / "hostile"
    src.mkdir()
    payload = {"weight": torch.zeros(2), "payload": _Touch(marker)}
    if kind == "torch_save":
        torch.save(payload, src / "pytorch_model.bin")
    else:
        (src / "pytorch_model.bin").write_bytes(pickle.dumps(payload))
    error = _expect_bad("bad_weights", convert, src, tmp_path / "out")
    assert "weights-only unpickler" in error.detail and "nothing in it was run" in error.detail
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("content", "message"), [
    (b"", "not a PyTorch pickle"),
    (b"\x80\x04not really a pickle at all", "weights-only unpickler"),
])
def test_a_file_that_is_not_a_pickle_is_refused(tmp_path, content, message):
    (tmp_path / "weights.pth").write_bytes(content)
    assert message in _expect_bad("bad_weights", convert, tmp_path / "weights.pth", tmp_path / "out").detail


def test_wrong_layouts_are_refused(tmp_path):
    torch.save({"weight": torch.zeros(2), "step": 7}, tmp_path / "mixed.pth")
    assert "not a tensor" in _expect_bad("bad_weights", convert, tmp_path / "mixed.pth", tmp_path / "o1").detail
    (tmp_path / "empty-dir").mkdir()
    assert "no pytorch_model.bin" in _expect_bad("bad_weights", convert, tmp_path / "empty-dir", tmp_path / "o2").detail
    (tmp_path / "weights.safetensors").write_bytes(b"x")
    _expect_bad("bad_weights", convert, tmp_path / "weights.safetensors", tmp_path / "o3")
    _expect_bad("not_found", convert, tmp_path / "missing.pth", tmp_path / "o4")


def test_limits_and_existing_outputs(tmp_path, monkeypatch):
    torch.save({"weight": torch.zeros(1000)}, tmp_path / "w.pth")
    convert(tmp_path / "w.pth", tmp_path / "w.safetensors")
    assert "already there" in _expect_bad("exists", convert, tmp_path / "w.pth", tmp_path / "w.safetensors").detail
    monkeypatch.setattr(convert_module, "MAX_PICKLE_BYTES", 1000)
    assert "more than" in _expect_bad("bad_weights", convert, tmp_path / "w.pth", tmp_path / "x.safetensors").detail


def test_tensors_sharing_memory_are_stored_each_in_full(tmp_path):
    base = torch.arange(12, dtype=torch.float32)
    state = {"tied.a": base, "tied.b": base, "view": base[2:6], "transposed": base.view(3, 4).t()}
    torch.save(state, tmp_path / "shared.pth")
    done = convert(tmp_path / "shared.pth", tmp_path / "shared.safetensors")
    loaded = load_file(done.weights)
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


@pytest.mark.parametrize(("version", "ok"), [("2.9.1", False), ("2.10.0a0", False), ("2.10.0", True),
                                             ("2.15.0+cu132", True)])
def test_torch_older_than_2_10_is_refused(version, ok):
    if ok:
        require_safe_torch(version)
    else:
        assert "older than 2.10" in _expect_bad("old_torch", require_safe_torch, version).detail


def test_the_command_prints_the_sha256_and_errors_in_one_line(hubert_pickle, tmp_path, capsys):
    src, _ = hubert_pickle
    assert cli.main(["weights", "convert", str(src), str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    digest = hashlib.sha256((tmp_path / "out" / "model.safetensors").read_bytes()).hexdigest()
    assert f"{digest}  {tmp_path / 'out' / 'model.safetensors'}" in out.splitlines()

    assert cli.main(["weights", "convert", str(src / "nothing.bin"), str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: not_found: ") and err.count("\n") == 1
