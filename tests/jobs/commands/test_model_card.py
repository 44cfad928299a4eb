"""The model card `train` writes into best/, from the run_config.json train resolves for its
arguments, with encoders from the hub (an offline cache, tests/hub.py): what the card says about
where the weights came from. Reading a whole training run's card back is in tests/jobs/train."""

from __future__ import annotations

import torch
from huggingface_hub import ModelCard
from transformers import Wav2Vec2FeatureExtractor

from groupemotion_core.model.classifier import GroupEmotionModel
from groupemotion_core.model.config import preset
from groupemotion_core.weights.checkpoint import save_checkpoint
from groupemotion_core.weights.model_card import write_model_card
from ray_jobs.cli import build_parser
from ray_jobs.commands.train import _resolved_config
from tests.hub import COMMIT, cached_snapshot


def test_the_card_names_the_pretrained_commits_the_data_and_the_scores(hub_cache, tmp_path):
    torch.manual_seed(0)
    model = GroupEmotionModel(preset("tiny"))
    model.audio.hubert.save_pretrained(cached_snapshot(hub_cache, "facebook/hubert-tiny", "refs/pr/2"))
    Wav2Vec2FeatureExtractor().save_pretrained(hub_cache / "models--facebook--hubert-tiny" / "snapshots" / COMMIT)
    argv = ["train", "--train", "s3://bucket/vgaf/train", "--val", "s3://bucket/vgaf/val", "--output", "s3://b/run",
            "--preset", "tiny", "--epochs", "8", "--workers", "2", "--pretrained-audio",
            "facebook/hubert-tiny@refs/pr/2"]
    run_config = _resolved_config(build_parser(argv).parse_args(argv), preset("tiny"))
    metrics = {"epoch": 6, "val_accuracy": 0.8125, "val_macro_f1": 0.80123456, "val_count": 16,
               "val_per_class_recall": {"Negative": 1.0, "Neutral": 0.5, "Positive": 0.875},
               "val_confusion": [[5, 0, 0], [1, 3, 2], [0, 1, 4]]}
    model_id = save_checkpoint(model, tmp_path / "best")

    card = ModelCard.load(write_model_card(tmp_path / "best", run_config, metrics))

    assert card.data.base_model == ["facebook/hubert-tiny"]
    assert {(r.metric_type, r.metric_value, r.dataset_name) for r in card.data.eval_results} == {
        ("accuracy", 0.8125, "s3://bucket/vgaf/val"), ("f1", 0.8012, "s3://bucket/vgaf/val")}
    assert card.data.pipeline_tag == "video-classification"
    text = card.text
    assert f"audio: `facebook/hubert-tiny` at commit `{COMMIT}`" in text
    assert "vision: none (random initialisation)" in text
    assert "Adam at lr 0.0001 (encoders at lr x 1e-2)" in text  # one encoder pretrained: the paper's rate
    assert "The exported epoch, 6 of 8," in text and "effective batch 16 (2 workers x 8 x 1" in text
    assert "| recall Neutral | 0.5000 |" in text and "| Neutral | 1 | 3 | 2 |" in text
    assert f"# groupemotion model `{model_id}`" in text and "every 5 s window" in text
