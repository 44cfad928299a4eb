"""Pretrained encoder weights: local paths, and hub ids pinned to a revision, all offline.

No test reaches the network: a hub id resolves from a Hugging Face cache that the test lays out
itself, with the hub offline (tests/hub.py).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from transformers import HubertModel, Wav2Vec2FeatureExtractor

from groupemotion_core.weights.checkpoint import load_checkpoint, save_checkpoint
from groupemotion_core.model.config import preset
from groupemotion_core.model.encoders import hubert_config
from groupemotion_core.errors import GroupEmotionError
from groupemotion_core.model.classifier import GroupEmotionModel
from groupemotion_core.weights.pretrained import describe, load_pretrained, parse_hub_id
from tests.hub import COMMIT, cached_snapshot


@pytest.fixture
def model() -> GroupEmotionModel:
    torch.manual_seed(0)
    return GroupEmotionModel(preset("tiny")).eval()


def _expect_bad(reason: str, fn, *args, **kwargs) -> GroupEmotionError:
    with pytest.raises(GroupEmotionError) as e:
        fn(*args, **kwargs)
    assert e.value.reason == reason, e.value
    assert "\n" not in str(e.value), "a user error is one line"
    return e.value


def _timm_tiny(**kwargs):
    cfg = preset("tiny").vision
    return timm.create_model(cfg.backbone, pretrained=False, **cfg.model_kwargs, **kwargs)


def _tiny_hubert(seed: int = 1) -> HubertModel:
    torch.manual_seed(seed)
    return HubertModel(hubert_config(preset("tiny").audio)).eval()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- local paths ----------------------------------------------------------------------------


def test_vision_weights_load_from_a_safetensors_file_and_a_directory(tmp_path):
    source = _timm_tiny()  # with its ImageNet classifier, as published weights are
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file(state, tmp_path / "resnet.safetensors")
    (tmp_path / "hub").mkdir()
    save_file(state, tmp_path / "hub" / "model.safetensors")
    for where in (tmp_path / "resnet.safetensors", tmp_path / "hub"):
        fresh = GroupEmotionModel(preset("tiny"))
        load_pretrained(fresh, vision=str(where))
        loaded = fresh.vision.backbone.state_dict()
        assert loaded.keys() == {k for k in state if not k.startswith("fc.")}
        assert all(torch.equal(loaded[k], state[k]) for k in loaded)


def test_audio_weights_load_from_a_save_pretrained_directory(model, tmp_path):
    source = _tiny_hubert()
    source.save_pretrained(tmp_path / "hubert")
    load_pretrained(model, audio=str(tmp_path / "hubert"))
    expected = source.state_dict()
    loaded = model.audio.hubert.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in loaded)


def test_audio_input_policy_follows_the_checkpoints_feature_extractor(model, tmp_path):
    """A large-style checkpoint (normalised input, attention masks) says so in its preprocessor
    config; loading it switches the model to that policy, and a fine-tuned checkpoint keeps it."""
    _tiny_hubert().save_pretrained(tmp_path / "hubert")
    Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=True).save_pretrained(tmp_path / "hubert")
    assert not model.config.audio.do_normalize and not model.audio.use_attention_mask
    load_pretrained(model, audio=str(tmp_path / "hubert"))
    assert model.config.audio.do_normalize and model.audio.do_normalize
    assert model.config.audio.use_attention_mask and model.audio.use_attention_mask
    save_checkpoint(model, tmp_path / "finetuned")
    reloaded, _ = load_checkpoint(tmp_path / "finetuned")
    assert reloaded.audio.do_normalize and reloaded.audio.use_attention_mask


def test_pickled_pretrained_weights_are_refused_with_the_way_to_convert_them(model, tmp_path):
    torch.save(_timm_tiny().state_dict(), tmp_path / "resnet.pth")
    error = _expect_bad("bad_weights", load_pretrained, model, vision=str(tmp_path / "resnet.pth"))
    assert "groupemotion weights convert" in error.detail
    pickles_only = tmp_path / "hubert"
    pickles_only.mkdir()
    hubert_config(preset("tiny").audio).save_pretrained(pickles_only)
    torch.save(_tiny_hubert().state_dict(), pickles_only / "pytorch_model.bin")
    error = _expect_bad("bad_weights", load_pretrained, model, audio=str(pickles_only))
    assert "pytorch_model.bin" in error.detail and "groupemotion weights convert" in error.detail


def test_weights_of_another_size_are_refused_in_one_line(model, tmp_path):
    save_file(timm.create_model("resnet10t", pretrained=False).state_dict(), tmp_path / "wide.safetensors")
    error = _expect_bad("bad_weights", load_pretrained, model, vision=str(tmp_path / "wide.safetensors"))
    assert "size mismatch for" in error.detail
    wide = dict(vars(preset("tiny").audio), hidden_size=48)
    HubertModel(hubert_config(type(preset("tiny").audio)(**wide))).save_pretrained(tmp_path / "hubert")
    error = _expect_bad("bad_weights", load_pretrained, model, audio=str(tmp_path / "hubert"))
    assert "of another shape (e.g." in error.detail


def test_a_missing_local_path_is_not_taken_for_a_hub_id(model, hub_cache):
    error = _expect_bad("bad_weights", load_pretrained, model, audio="./weights/hubert-base-ls960")
    assert "no such file or directory" in error.detail


# --- hub ids, pinned or not, from the cache -------------------------------------------------


@pytest.mark.parametrize(("source", "kind", "expected"), [
    ("facebook/hubert-base-ls960", "audio", ("facebook/hubert-base-ls960", None)),
    ("facebook/hubert-base-ls960@refs/pr/2", "audio", ("facebook/hubert-base-ls960", "refs/pr/2")),
    (f"facebook/hubert-base-ls960@{COMMIT}", "audio", ("facebook/hubert-base-ls960", COMMIT)),
    ("hf-hub:timm/resnet101d.gluon_in1k", "vision", ("timm/resnet101d.gluon_in1k", None)),
    ("hf-hub:timm/resnet101d.gluon_in1k@v1.0", "vision", ("timm/resnet101d.gluon_in1k", "v1.0")),
    ("resnet101d.gluon_in1k@main", "vision", ("timm/resnet101d.gluon_in1k", "main")),  # a timm tag
])
def test_hub_ids_parse_with_an_optional_revision(source, kind, expected):
    assert parse_hub_id(source, kind) == expected


@pytest.mark.parametrize("source", ["facebook/hubert@", "no/such/path", "hf-hub:timm/x@"])
def test_malformed_hub_ids_are_refused(source):
    _expect_bad("bad_weights", parse_hub_id, source, "audio")


def test_pinned_audio_revision_loads_offline_and_is_recorded(model, hub_cache):
    source = _tiny_hubert()
    snapshot = cached_snapshot(hub_cache, "facebook/hubert-tiny", "refs/pr/2")
    source.save_pretrained(snapshot)
    Wav2Vec2FeatureExtractor(do_normalize=True).save_pretrained(snapshot)

    load_pretrained(model, audio="facebook/hubert-tiny@refs/pr/2")
    assert all(torch.equal(a, b) for a, b in zip(model.audio.hubert.state_dict().values(),
                                                  source.state_dict().values()))
    assert model.config.audio.do_normalize
    record = describe(vision=None, audio="facebook/hubert-tiny@refs/pr/2")
    assert record["vision"] is None
    assert record["audio"] == {
        "source": "facebook/hubert-tiny@refs/pr/2", "path": str(snapshot.resolve()),
        "repo": "facebook/hubert-tiny", "revision": "refs/pr/2", "commit": COMMIT,
        "sha256": _sha256(snapshot / "model.safetensors"),
    }
    json.dumps(record)  # it goes into run_config.json


def test_timm_hub_weights_at_a_commit_bring_their_pixel_statistics(model, hub_cache):
    source = _timm_tiny()
    snapshot = cached_snapshot(hub_cache, "timm/resnet10t.tiny_test", None)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    timm.models.save_for_hf(source, str(snapshot), safe_serialization=True,
                            model_config={"pretrained_cfg": {"mean": mean, "std": std}})

    load_pretrained(model, vision=f"hf-hub:timm/resnet10t.tiny_test@{COMMIT}")
    expected = source.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in model.vision.backbone.state_dict().items())
    assert torch.allclose(model.vision.mean.flatten(), torch.tensor(mean))
    assert torch.allclose(model.vision.std.flatten(), torch.tensor(std))
    assert describe(f"hf-hub:timm/resnet10t.tiny_test@{COMMIT}", None)["vision"]["commit"] == COMMIT


def test_weights_of_another_architecture_are_refused_by_name(model, hub_cache):
    snapshot = cached_snapshot(hub_cache, "timm/resnet18.test", "main")
    timm.models.save_for_hf(timm.create_model("resnet18", pretrained=False), str(snapshot), safe_serialization=True)
    error = _expect_bad("bad_weights", load_pretrained, model, vision="hf-hub:timm/resnet18.test")
    assert "resnet18 weights" in error.detail and "resnet10t" in error.detail


def test_a_revision_without_safetensors_says_how_to_get_them(model, hub_cache):
    """facebook/hubert-base-ls960's main branch: a config and pytorch_model.bin, no safetensors."""
    snapshot = cached_snapshot(hub_cache, "facebook/hubert-base-ls960", "main")
    hubert_config(preset("tiny").audio).save_pretrained(snapshot)
    error = _expect_bad("bad_weights", load_pretrained, model, audio="facebook/hubert-base-ls960")
    assert f"no model.safetensors at revision main (commit {COMMIT})" in error.detail
    assert "groupemotion weights convert" in error.detail


@pytest.mark.parametrize("source", ["facebook/hubert-base-ls960@refs/pr/2", f"facebook/hubert-base-ls960@{COMMIT}"])
def test_a_hub_id_not_in_the_cache_fails_offline_in_one_line(model, hub_cache, source):
    error = _expect_bad("bad_weights", load_pretrained, model, audio=source)
    assert "not in the Hugging Face cache" in error.detail
    assert not any(hub_cache.iterdir()), "nothing was downloaded"


def test_workers_load_the_commit_the_driver_resolved_not_the_moving_branch(model, hub_cache, tmp_path):
    from ray_jobs.commands.train import pinned_source

    source = _tiny_hubert()
    snapshot = cached_snapshot(hub_cache, "facebook/hubert-tiny", "main")
    source.save_pretrained(snapshot)
    Wav2Vec2FeatureExtractor(do_normalize=True).save_pretrained(snapshot)
    record = describe(vision=None, audio="facebook/hubert-tiny")["audio"]
    assert pinned_source(record) == f"facebook/hubert-tiny@{COMMIT}"
    (hub_cache / "models--facebook--hubert-tiny" / "refs" / "main").write_text("f" * 40)  # the branch moves

    load_pretrained(model, audio=pinned_source(record))
    assert all(torch.equal(a, b) for a, b in zip(model.audio.hubert.state_dict().values(),
                                                  source.state_dict().values()))
    source.save_pretrained(tmp_path / "local")
    Wav2Vec2FeatureExtractor().save_pretrained(tmp_path / "local")
    assert pinned_source(describe(vision=None, audio=str(tmp_path / "local"))["audio"]) == str(tmp_path / "local")
    assert pinned_source(None) is None
