"""The model of the paper: config, shapes, gradients, masking, and the paper preset's size."""

from __future__ import annotations

import dataclasses
import json

import pytest
import timm
import torch
from transformers import HubertConfig, HubertModel

from groupemotion_core.model.config import PRESETS, TEMPORAL_POOLS, ModelConfig, preset
from groupemotion_core.errors import GroupEmotionError
from groupemotion_core.media.decode import DecodeSpec
from groupemotion_core.model.classifier import GroupEmotionModel
from groupemotion_core.weights.checkpoint import load_checkpoint, save_checkpoint
from groupemotion_core.schema import CLASSES


def make_inputs(cfg: ModelConfig, audio_lens: list[int], seed: int = 0):
    """Random uint8 frames and a fixed-length waveform, zero padded after each clip's audio_len."""
    g = torch.Generator().manual_seed(seed)
    b, s = len(audio_lens), cfg.decode_spec().audio_samples
    frames = torch.randint(0, 256, (b, cfg.num_frames, cfg.image_size, cfg.image_size, 3), generator=g, dtype=torch.uint8)
    audio = torch.randn(b, s, generator=g) * 0.1
    audio_len = torch.tensor(audio_lens, dtype=torch.int64)
    audio[torch.arange(s) >= audio_len[:, None]] = 0.0
    return frames, audio, audio_len


@pytest.fixture(scope="module")
def tiny() -> GroupEmotionModel:
    torch.manual_seed(0)
    return GroupEmotionModel(preset("tiny"))


def tiny_pooling(pool: str) -> ModelConfig:
    cfg = preset("tiny")
    cfg.vision = dataclasses.replace(cfg.vision, temporal_pool=pool)
    return cfg


def large_style_tiny() -> ModelConfig:
    """Tiny sizes with HuBERT large's input policy: layer-norm extractor, normalised input, masks."""
    cfg = preset("tiny")
    cfg.audio = dataclasses.replace(
        cfg.audio, feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True,
        do_normalize=True, use_attention_mask=True,
    )
    return cfg


# --- config ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PRESETS)
def test_config_round_trips_through_json(name):
    cfg = preset(name)
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_decode_spec_follows_the_config():
    cfg = preset("tiny")
    assert cfg.decode_spec() == DecodeSpec(num_frames=8, frame_size=64, clip_seconds=5.0, sample_rate=16000)
    assert cfg.labels == list(CLASSES)


def test_bad_configs_are_typed_errors():
    with pytest.raises(GroupEmotionError) as e:
        preset("huge")
    assert e.value.reason == "bad_config"
    d = preset("tiny").to_dict()
    with pytest.raises(GroupEmotionError, match="bad_config"):
        ModelConfig.from_dict({**d, "fusion": {**d["fusion"], "heads": 5}})
    with pytest.raises(GroupEmotionError, match="bad_config"):
        ModelConfig.from_dict({**d, "unknown_field": 1})
    with pytest.raises(GroupEmotionError, match="temporal_pool must be one of frames, features"):
        ModelConfig.from_dict({**d, "vision": {**d["vision"], "temporal_pool": "time"}})


def test_the_paper_preset_pools_frames_as_its_formula_and_paper_framewise_pools_feature_maps():
    assert (preset("paper").vision.temporal_pool, preset("paper-framewise").vision.temporal_pool) == ("frames", "features")
    assert preset("tiny").vision.temporal_pool == preset("paper").vision.temporal_pool
    framewise = preset("paper-framewise")
    framewise.vision.temporal_pool = "frames"
    assert framewise == preset("paper")  # nothing else differs


def test_a_config_from_before_temporal_pool_means_feature_maps():
    """Every checkpoint saved before the field existed was trained with the backbone on every frame."""
    d = preset("tiny").to_dict()
    del d["vision"]["temporal_pool"]
    assert ModelConfig.from_dict(d).vision.temporal_pool == "features"


# --- behaviour ------------------------------------------------------------------------------


def test_output_shape(tiny):
    frames, audio, audio_len = make_inputs(tiny.config, [80000, 0, 16000])
    tiny.eval()
    with torch.no_grad():
        logits = tiny(frames, audio, audio_len)
    assert logits.shape == (3, len(CLASSES))
    assert logits.dtype == torch.float32


@pytest.mark.parametrize("pool", TEMPORAL_POOLS)
def test_every_parameter_receives_a_gradient(pool):
    torch.manual_seed(0)
    model = GroupEmotionModel(tiny_pooling(pool)).train()
    frames, audio, audio_len = make_inputs(model.config, [80000, 0, 16000, 40000])
    model(frames, audio, audio_len).logsumexp(dim=1).sum().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_clip_without_audio_gives_finite_logits_that_ignore_the_waveform(tiny):
    frames, audio, audio_len = make_inputs(tiny.config, [0])
    noise = torch.randn_like(audio)
    tiny.eval()
    with torch.no_grad():
        silent = tiny(frames, audio, audio_len)
        noisy = tiny(frames, noise, audio_len)
    assert torch.isfinite(silent).all()
    # With no valid audio token, nothing of the waveform may reach the logits.
    torch.testing.assert_close(noisy, silent, rtol=0, atol=1e-6)
    tiny.train()
    assert torch.isfinite(tiny(frames, audio, audio_len)).all()


@pytest.mark.parametrize(
    "cfg_fn", [lambda: tiny_pooling("frames"), lambda: tiny_pooling("features"), large_style_tiny],
    ids=["base_policy_pool_frames", "base_policy_pool_features", "large_policy"],
)
def test_mixed_batch_equals_each_clip_alone(cfg_fn):
    torch.manual_seed(0)
    model = GroupEmotionModel(cfg_fn()).eval()
    # full audio, no audio track, 1 s, 0.5 s, and 100 samples (shorter than one HuBERT frame)
    lens = [80000, 0, 16000, 8000, 100]
    frames, audio, audio_len = make_inputs(model.config, lens)
    with torch.no_grad():
        batch = model(frames, audio, audio_len)
        for i in range(len(lens)):
            alone = model(frames[i : i + 1], audio[i : i + 1], audio_len[i : i + 1])
            torch.testing.assert_close(alone[0], batch[i], rtol=0, atol=1e-5)
    assert torch.isfinite(batch).all()


def test_fusion_never_reads_invalid_audio_tokens(tiny):
    fusion = tiny.fusion.eval()
    g = torch.Generator().manual_seed(0)
    audio, video = torch.randn(3, 10, 32, generator=g), torch.randn(3, 4, 32, generator=g)
    mask = torch.arange(10) < torch.tensor([10, 6, 0])[:, None]
    scrambled = torch.where(mask[..., None], audio, torch.randn(audio.shape, generator=g) * 100)
    with torch.no_grad():
        torch.testing.assert_close(fusion(scrambled, mask, video), fusion(audio, mask, video), rtol=0, atol=1e-5)


def test_audio_tokens_follow_hubert_frame_arithmetic(tiny):
    # tiny's conv stack: kernels 10,4,4,4 and strides 5,4,4,4. 16000 samples -> 3199 -> 799 ->
    # 199 -> 49 frames; 80000 -> 249; 100 samples cannot fill one frame; 0 has none.
    _, audio, audio_len = make_inputs(tiny.config, [80000, 16000, 100, 0])
    with torch.no_grad():
        tokens, mask = tiny.audio.eval()(audio, audio_len)
    assert tokens.shape == (4, 249, tiny.config.fusion.dim)
    assert mask.sum(dim=1).tolist() == [249, 49, 0, 0]
    assert mask[1, :49].all()


@pytest.mark.parametrize("pool", TEMPORAL_POOLS)
def test_vision_pools_over_time_where_the_config_says_and_makes_positions_tokens(pool):
    """The backbone's own mean/std; then either the backbone on the mean picture of the frames
    (the paper's ResNet(M(v))) or the mean of its per-frame feature maps (ClipBERT's)."""
    torch.manual_seed(0)
    model = GroupEmotionModel(tiny_pooling(pool))
    frames, _, _ = make_inputs(model.config, [0, 0])
    vision = model.vision.eval()
    assert vision.mean.flatten().tolist() == pytest.approx(list(timm.data.IMAGENET_DEFAULT_MEAN))
    with torch.no_grad():
        expected = []
        for clip in frames:
            x = (clip.permute(0, 3, 1, 2).float() / 255 - vision.mean) / vision.std  # [T, 3, H, W]
            if pool == "frames":
                maps = vision.backbone.forward_features(x.mean(0, keepdim=True))[0]
            else:
                maps = torch.stack([vision.backbone.forward_features(f[None])[0] for f in x]).mean(0)  # [C, h, w]
            expected.append(vision.proj(maps.flatten(1).T))
        torch.testing.assert_close(vision(frames), torch.stack(expected), rtol=1e-4, atol=1e-5)
    assert vision(frames).shape == (2, 4, model.config.fusion.dim)  # 64 px / stride 32 = 2 x 2 tokens


def test_the_two_poolings_differ_on_moving_pictures():
    """Same weights, so only where the mean is taken differs: a wrong branch cannot pass as the other."""
    torch.manual_seed(0)
    frames_first = GroupEmotionModel(tiny_pooling("frames")).eval()
    maps_first = GroupEmotionModel(tiny_pooling("features")).eval()
    maps_first.load_state_dict(frames_first.state_dict())
    frames, _, _ = make_inputs(frames_first.config, [0])
    with torch.no_grad():
        assert not torch.allclose(frames_first.vision(frames), maps_first.vision(frames), atol=1e-3)
        still = frames[:, :1].expand_as(frames).contiguous()  # one picture held: its mean is itself
        torch.testing.assert_close(frames_first.vision(still), maps_first.vision(still), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("pool", TEMPORAL_POOLS)
def test_a_checkpoint_records_its_pooling_and_loads_back_to_it(pool, tmp_path):
    torch.manual_seed(0)
    model = GroupEmotionModel(tiny_pooling(pool)).eval()
    save_checkpoint(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model"]["vision"]["temporal_pool"] == pool
    loaded, _ = load_checkpoint(tmp_path)
    assert loaded.config.vision.temporal_pool == pool
    frames, audio, audio_len = make_inputs(model.config, [80000, 0])
    with torch.no_grad():
        torch.testing.assert_close(loaded(frames, audio, audio_len), model(frames, audio, audio_len), rtol=0, atol=0)


def test_a_checkpoint_saved_before_temporal_pool_existed_loads_as_it_was_trained(tmp_path):
    torch.manual_seed(0)
    model = GroupEmotionModel(tiny_pooling("features")).eval()
    save_checkpoint(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["model"]["vision"]["temporal_pool"]  # as every config.json written before the field
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded, _ = load_checkpoint(tmp_path)
    assert loaded.config.vision.temporal_pool == "features"
    frames, audio, audio_len = make_inputs(model.config, [80000])
    with torch.no_grad():
        torch.testing.assert_close(loaded(frames, audio, audio_len), model(frames, audio, audio_len), rtol=0, atol=0)


def test_inputs_are_checked(tiny):
    frames, audio, audio_len = make_inputs(tiny.config, [16000])
    with pytest.raises(ValueError, match="80000 samples"):
        tiny(frames, audio[:, :16000], audio_len)
    with pytest.raises(TypeError, match="uint8"):
        tiny(frames.float(), audio, audio_len)


def test_paper_preset_builds_offline_with_the_libraries_parameter_counts():
    cfg = preset("paper")
    model = GroupEmotionModel(cfg)
    with torch.device("meta"):
        resnet = sum(p.numel() for p in timm.create_model("resnet101d", num_classes=0).parameters())
        hubert = sum(p.numel() for p in HubertModel(HubertConfig()).parameters())  # base = the default
    d, channels, labels = 768, 2048, 3
    projections = (channels * d + d) + (768 * d + d)
    attention = 3 * (4 * d * d + 4 * d)  # in_proj (q, k, v) + out_proj, with biases
    head = 2 * d + (d * d + d) + (d * labels + labels)  # LayerNorm, penultimate, classifier
    assert sum(p.numel() for p in model.parameters()) == resnet + hubert + projections + attention + head
    assert sum(p.numel() for p in model.encoder_parameters()) == resnet + hubert
