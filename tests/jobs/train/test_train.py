"""`groupemotion train` end to end: two CPU workers of real Ray Train (DDP over gloo) fine-tune the
tiny model on generated clips whose class shows in colour and pitch, with checkpoints on a real
S3 server; a rerun resumes, the cache is decoded once, and a worker that dies mid-epoch does not
stop the run.

One packed dataset serves every test (generating and packing clips is the slow part of setup),
and one trained run on S3 serves the tests that only read it.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import pytest
import s3fs
import torch

from groupemotion_core.errors import GroupEmotionError
from groupemotion_core.weights.checkpoint import load_checkpoint
from groupemotion_core.model.config import preset
from groupemotion_core.schema import CLASSES
from groupemotion_core.media.synthetic import make_dataset
from ray_jobs import cli
from ray_jobs.commands.pack import pack
from ray_jobs.train.loop import _load_optimizer_state, _save_optimizer_state

CLIP = dict(width=64, height=48, fps=8.0, seconds=1.0)
TRAIN_PER_CLASS, VAL_PER_CLASS, BROKEN_TRAIN_CLIPS = 12, 4, 2
EPOCHS = 5  # the tiny model leaves chance after about four epochs at this lr


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    """Packed train/val shards (plus two undecodable training clips) and a 1-second tiny config."""
    root = tmp_path_factory.mktemp("train-data")
    make_dataset(root / "videos" / "train", TRAIN_PER_CLASS, seed=0, **CLIP)
    make_dataset(root / "videos" / "val", VAL_PER_CLASS, seed=1, **CLIP)
    for i in range(BROKEN_TRAIN_CLIPS):
        good = (root / "videos" / "train" / "Neutral" / "neutral_0000.mp4").read_bytes()
        (root / "videos" / "train" / "Neutral" / f"broken_{i}.mp4").write_bytes(good[: 600 + i])
    for split in ("train", "val"):
        pack(str(root / "videos" / split), str(root / "shards" / split), shard_size=8)
    # The clips are 1 s long: a 1 s model window keeps HuBERT's input (and the run) short.
    config = preset("tiny").to_dict() | {"clip_seconds": 1.0, "num_frames": 4}
    (root / "tiny-1s.json").write_text(json.dumps(config))
    return {"train": str(root / "shards" / "train"), "val": str(root / "shards" / "val"),
            "config": str(root / "tiny-1s.json")}


def train(data: dict[str, str], output: str, *extra: str) -> int:
    return cli.main(["train", "--train", data["train"], "--val", data["val"], "--output", output,
                     "--config", data["config"], "--workers", "2", "--batch-size", "4",
                     "--lr", "3e-3", "--seed", "0", *extra])


def metrics_lines(fs, path: str) -> list[dict]:
    return [json.loads(line) for line in fs.cat_file(path).decode().splitlines()]


@pytest.fixture(scope="module")
def s3_run(ray_session, s3_server, make_bucket, data, tmp_path_factory) -> dict:
    """One finished 3-epoch run whose --output is on S3, and what it printed."""
    output = f"{make_bucket()}/runs/tiny"
    bucket = output[len("s3://"):].split("/", 1)[0]
    capture = tmp_path_factory.mktemp("capture") / "stdout"
    with capture.open("w") as out, contextlib.redirect_stdout(out):
        status = train(data, output, "--epochs", str(EPOCHS))
    return {"status": status, "output": output, "bucket": bucket,
            "stdout": capture.read_text(), "fs": s3fs.S3FileSystem(endpoint_url=s3_server)}


@pytest.mark.slow
def test_training_learns_the_classes(s3_run):
    assert s3_run["status"] == 0
    history = metrics_lines(s3_run["fs"], f"{s3_run['output']}/metrics.jsonl")
    assert [m["epoch"] for m in history] == list(range(1, EPOCHS + 1))
    last = history[-1]
    # Every val clip scored once, gathered from both workers; the broken training clips skipped.
    assert last["val_count"] == VAL_PER_CLASS * len(CLASSES)
    assert sum(map(sum, last["val_confusion"])) == last["val_count"]
    assert last["train_clips"] == TRAIN_PER_CLASS * len(CLASSES)
    assert last["train_skipped_errors"] == BROKEN_TRAIN_CLIPS
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert max(m["val_accuracy"] for m in history) > 0.6  # chance is 1/3
    assert set(last["val_per_class_recall"]) == set(CLASSES)
    assert "[train] best epoch " in s3_run["stdout"] and f"{s3_run['output']}/best" in s3_run["stdout"]
    # One line per epoch, once: the workers' own output is not what carries it.
    for epoch in range(1, EPOCHS + 1):
        assert s3_run["stdout"].count(f"[train] epoch {epoch}/{EPOCHS}: ") == 1


@pytest.mark.slow
def test_checkpoints_and_config_land_on_s3(s3_run):
    fs, root = s3_run["fs"], s3_run["output"][len("s3://"):]
    names = {p[len(root) + 1:] for p in fs.find(root)}
    # The best two epochs by val accuracy plus the latest are kept (--keep-checkpoints 2).
    epochs = sorted({n.split("/")[1] for n in names if n.startswith("checkpoints/epoch_")})
    assert f"epoch_{EPOCHS:04d}" in epochs and 2 <= len(epochs) <= 3
    for name in ("model.safetensors", "config.json", "optimizer.safetensors", "optimizer.json",
                 "train_state.json"):
        assert f"checkpoints/epoch_{EPOCHS:04d}/{name}" in names
    assert not [n for n in names if n.endswith((".pt", ".pth", ".pkl", ".bin"))]
    state = json.loads(fs.cat_file(f"{root}/checkpoints/epoch_{EPOCHS:04d}/train_state.json"))
    assert state["epoch"] == EPOCHS and len(state["history"]) == EPOCHS
    run_config = json.loads(fs.cat_file(f"{root}/run_config.json"))
    assert run_config["model"]["clip_seconds"] == 1.0
    assert run_config["training"]["effective_batch_size"] == 8


@pytest.mark.slow
def test_best_epoch_is_exported_ready_for_inference(s3_run, tmp_path):
    fs, root = s3_run["fs"], s3_run["output"][len("s3://"):]
    fs.get(f"{root}/best/", str(tmp_path / "best"), recursive=True)
    model, info = load_checkpoint(tmp_path / "best")
    history = metrics_lines(fs, f"{root}/metrics.jsonl")
    assert info["val_accuracy"] == max(m["val_accuracy"] for m in history)
    assert info["epoch"] in [m["epoch"] for m in history if m["val_accuracy"] == info["val_accuracy"]]
    cfg = model.config
    frames = torch.randint(0, 256, (2, cfg.num_frames, cfg.image_size, cfg.image_size, 3), dtype=torch.uint8)
    audio = torch.zeros(2, cfg.decode_spec().audio_samples)
    with torch.no_grad():
        logits = model(frames, audio, torch.tensor([0, audio.shape[1]]))
    assert logits.shape == (2, len(CLASSES)) and torch.isfinite(logits).all()


@pytest.mark.slow
def test_the_exported_folder_carries_a_model_card_the_hub_reads(s3_run, data, tmp_path):
    from huggingface_hub import ModelCard

    fs, root = s3_run["fs"], s3_run["output"][len("s3://"):]
    fs.get(f"{root}/best/", str(tmp_path / "best"), recursive=True)
    info = json.loads((tmp_path / "best" / "config.json").read_text())
    [best] = [m for m in metrics_lines(fs, f"{root}/metrics.jsonl") if m["epoch"] == info["epoch"]]

    card = ModelCard.load(tmp_path / "best" / "README.md")  # the hub's own parser of the YAML header
    scores = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert scores == {"accuracy": round(best["val_accuracy"], 4), "f1": round(best["val_macro_f1"], 4)}
    assert {r.dataset_split for r in card.data.eval_results} == {"validation"}
    assert card.data.base_model is None  # the run started from random encoders
    text = card.text
    assert f"`{info['model_id']}`" in text and f"epoch, {info['epoch']} of {EPOCHS}," in text
    assert f"training data: `{data['train']}`" in text and f"validation data: `{data['val']}`" in text
    assert "arXiv:2111.05890" in text and json.dumps(info["model"], indent=2, sort_keys=True) in text
    confusion_rows = [f"| {name} | " + " | ".join(map(str, row)) + " |"
                      for name, row in zip(CLASSES, best["val_confusion"])]
    assert all(row in text for row in confusion_rows)


@pytest.mark.slow
def test_a_resumed_run_fills_the_cache_and_a_later_run_reads_it_through_a_worker_death(
    s3_run, data, tmp_path: Path, capsys
):
    """Run 1 continues the S3 run for one more epoch (the torchtune-style check: it starts where
    the first ended and keeps its history) and fills the cache on its way; run 2, a new run on the
    same inputs, decodes nothing again, and one of its workers dies in the middle of epoch 2
    (--fail-once-at-epoch) without stopping it. One test, because every run costs Ray Train's start."""
    fs, root = s3_run["fs"], s3_run["output"][len("s3://"):]
    copy = f"{s3_run['bucket']}/runs/resumed"
    fs.copy(f"{root}/", copy, recursive=True)  # a copy, so the other tests see the original run
    before = metrics_lines(fs, f"{root}/metrics.jsonl")
    cache = str(tmp_path / "cache")
    capsys.readouterr()
    assert train(data, f"s3://{copy}", "--epochs", str(EPOCHS + 1), "--cache", cache) == 0
    first = capsys.readouterr().out
    assert re.search(rf"resuming from s3://{copy}/checkpoints: {EPOCHS} of {EPOCHS + 1} epochs done, "
                     rf"continuing at epoch {EPOCHS + 1}", first), first
    after = metrics_lines(fs, f"{copy}/metrics.jsonl")
    assert [m["epoch"] for m in after] == list(range(1, EPOCHS + 2))
    assert after[:EPOCHS] == before  # the resumed run built on the saved epochs, not a new start
    assert fs.exists(f"{copy}/checkpoints/epoch_{EPOCHS + 1:04d}/train_state.json")
    train_clips = TRAIN_PER_CLASS * len(CLASSES) + BROKEN_TRAIN_CLIPS
    assert re.search(rf"\[train\] cache train: 0 of (\d+) units reused, \1 decoded \({train_clips} videos, "
                     rf"{BROKEN_TRAIN_CLIPS} errors", first), first
    assert re.search(r"\[train\] cache val: 0 of (\d+) units reused, \1 decoded", first), first

    # A later run on the same inputs and spec: nothing is decoded again, not even after a restart.
    # With --grad-accum 2, the 5 batches per worker and epoch end on a shorter accumulation window.
    output = tmp_path / "second"
    assert train(data, str(output), "--epochs", "2", "--cache", cache, "--grad-accum", "2",
                 "--fail-once-at-epoch", "2", "--max-failures", "1") == 0
    second = capsys.readouterr().out
    for split in ("train", "val"):
        assert re.search(rf"\[train\] cache {split}: (\d+) of \1 units reused, 0 decoded;", second), second
    # The worker died in epoch 2 once Ray Train held epoch 1's checkpoint: the group resumed from
    # it and epoch 1 never ran again (a restart from scratch would print it twice).
    assert second.count("[train] worker group resumes from the checkpoint of epoch 1: continuing at epoch 2 of 2") \
        == 1, second
    assert [second.count(f"[train] epoch {e}/2: ") for e in (1, 2)] == [1, 1], second
    marker = json.loads((output / "fault_injected.json").read_text())
    assert marker == {"epoch": 2, "rank": 1}  # the fault did fire, in epoch 2, on the last rank
    history = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in history] == [1, 2]  # epoch 2 was redone after the restart
    assert (output / "checkpoints" / "epoch_0002" / "train_state.json").exists()
    load_checkpoint(output / "best")

    # The same metrics as training from the decode stage, over the same clips.
    reference = before[0]
    for last in (after[-1], history[-1]):
        assert last.keys() == reference.keys()
        for key in ("train_clips", "train_skipped_errors", "train_skipped_unlabelled", "val_count",
                    "val_skipped_errors", "val_skipped_unlabelled"):
            assert last[key] == reference[key], key
        assert sum(map(sum, last["val_confusion"])) == reference["val_count"]


def test_optimizer_state_round_trips_through_safetensors_and_json(tmp_path: Path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam([{"params": [model.weight], "lr": 0.1, "name": "a"},
                                  {"params": [model.bias], "lr": 0.2, "name": "b"}])
    model(torch.ones(4, 3)).sum().backward()
    optimizer.step()
    _save_optimizer_state(optimizer, str(tmp_path))
    restored = torch.optim.Adam([{"params": [model.weight]}, {"params": [model.bias]}])
    restored.load_state_dict(_load_optimizer_state(str(tmp_path)))
    want, got = optimizer.state_dict(), restored.state_dict()
    assert [g["lr"] for g in got["param_groups"]] == [0.1, 0.2]
    assert want["state"].keys() == got["state"].keys()
    for index, state in want["state"].items():
        for name, value in state.items():
            assert torch.equal(value, got["state"][index][name]), (index, name)


def test_user_mistakes_are_errors_not_tracebacks(data, tmp_path: Path, capsys):
    assert cli.main(["train", "--train", data["train"], "--val", data["val"],
                     "--output", str(tmp_path), "--epochs", "0", "--preset", "tiny"]) == 2
    assert "error: bad_argument: --epochs" in capsys.readouterr().err


def test_a_rerun_with_another_model_is_refused(ray_session, data, tmp_path: Path, capsys):
    other = preset("tiny").to_dict() | {"num_frames": 2}
    (tmp_path / "run_config.json").write_text(json.dumps({"model": other}))
    assert train(data, str(tmp_path), "--epochs", "1") == 2
    assert "error: config_mismatch" in capsys.readouterr().err


def test_a_run_saved_before_temporal_pool_existed_resumes_with_feature_map_pooling_only(tmp_path: Path):
    from ray_jobs.commands.train import RUN_CONFIG, _check_same_model

    old = preset("paper-framewise").to_dict()
    del old["vision"]["temporal_pool"]  # as every run_config.json written before the field
    (tmp_path / RUN_CONFIG).write_text(json.dumps({"model": old}))
    _check_same_model(str(tmp_path), {"model": preset("paper-framewise").to_dict()})
    with pytest.raises(GroupEmotionError, match="config_mismatch"):
        _check_same_model(str(tmp_path), {"model": preset("paper").to_dict()})


def test_run_config_records_the_pretrained_weights_it_starts_from(tmp_path: Path):
    """Resolved by the driver before any worker starts: the source, its hub commit (none for a
    local path) and the sha256 of the weights."""
    import hashlib

    from transformers import HubertModel

    from groupemotion_core.model.encoders import hubert_config
    from ray_jobs.commands.train import _resolved_config

    HubertModel(hubert_config(preset("tiny").audio)).save_pretrained(tmp_path / "hubert")
    argv = ["train", "--train", "t", "--val", "v", "--output", str(tmp_path / "run"), "--preset", "tiny",
            "--pretrained-audio", str(tmp_path / "hubert")]
    run_config = _resolved_config(cli.build_parser(argv).parse_args(argv), preset("tiny"))
    audio = run_config["pretrained"]["audio"]
    assert run_config["pretrained"]["vision"] is None
    assert audio["source"] == str(tmp_path / "hubert") and audio["commit"] is None
    assert audio["sha256"] == hashlib.sha256((tmp_path / "hubert" / "model.safetensors").read_bytes()).hexdigest()
    json.dumps(run_config)
