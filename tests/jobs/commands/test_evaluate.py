"""`groupemotion eval`: the report's JSON, table and picture exist and agree with each other, and
the scores are per video: the labels `infer` writes to `videos/` for the same data.

Plain videos in class folders (their labels), some long enough for two windows, one in a folder
that names no class (unlabelled), and one that is not a video (failed), scored by a saved tiny
model through the CLI.
"""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pandas as pd
from PIL import Image

from groupemotion_core.schema import CLASSES, label_index
from groupemotion_core.media.synthetic import SyntheticClip, render_clip
from ray_jobs.cli import main


def test_eval_scores_videos_as_infer_labels_them_and_the_report_agrees(ray_session, tiny_checkpoint, tmp_path, capsys):
    data = tmp_path / "data"
    for i in range(6):
        label = CLASSES[i % 3]
        (data / label).mkdir(parents=True, exist_ok=True)
        seconds = 8.0 if i % 2 else 1.0  # two windows of the tiny model's 5 s, or one
        spec = SyntheticClip(label=label, width=64, height=48, seconds=seconds, fps=4.0, audio=i != 4, seed=i)
        render_clip(spec, data / label / f"v{i}.mp4")
    (data / "misc").mkdir()
    render_clip(SyntheticClip(width=64, height=48, seconds=1.0, fps=4.0, seed=7), data / "misc" / "unlabelled.mp4")
    (data / "Positive" / "broken.mp4").write_bytes(b"\x00" * 2000)
    checkpoint, model_id = tiny_checkpoint
    report, labels = tmp_path / "report", tmp_path / "labels"
    options = ["--model", checkpoint, "--actors", "1", "--decode-cpus", "1", "--batch-size", "4"]

    code = main(["eval", str(data), "--report", str(report), *options])
    assert main(["infer", str(data), "--output", str(labels), *options]) == 0

    assert code == 0
    printed = capsys.readouterr().out
    assert "accuracy" in printed and all(c in printed for c in CLASSES)
    metrics = json.loads((report / "metrics.json").read_text())
    confusion = np.array(metrics["confusion"])
    assert confusion.shape == (3, 3) and confusion.sum() == metrics["count"] == 6  # videos, not windows
    assert confusion.sum(axis=1).tolist() == [2, 2, 2]
    assert (metrics["videos"], metrics["windows"], metrics["unlabelled"]) == (8, 10, 1)
    assert metrics["errors"] == {"not_media": 1} and metrics["window_errors"] == {}
    assert metrics["accuracy"] == np.trace(confusion) / confusion.sum()
    assert metrics["model_id"] == model_id and metrics["window_plan"]["mode"] == "all"
    # Each video is scored by the label infer gives it in videos/.
    videos = pd.read_parquet(labels / "videos").dropna(subset=["label"])
    videos = videos[~videos["key"].str.contains("/misc/")]
    expected = np.zeros((3, 3), int)
    for key, label in zip(videos["key"], videos["label"]):
        expected[label_index(key.split("/")[-2]), label_index(label)] += 1
    assert (confusion == expected).all()

    with open(report / "per_class.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["class"] for r in table] == list(CLASSES)
    for row, support in zip(table, confusion.sum(axis=1)):
        assert int(row["support"]) == support
        assert abs(float(row["recall"]) - metrics["per_class_recall"][row["class"]]) < 1e-4
    with Image.open(report / "confusion_matrix.png") as image:
        assert image.format == "PNG" and image.width >= 400 and image.height >= 400


def test_eval_writes_its_report_to_object_storage(ray_session, tiny_checkpoint, s3_bucket, tmp_path, capsys):
    from ray_jobs.inputs import storage

    data = tmp_path / "data"
    for i, label in enumerate(CLASSES):
        (data / label).mkdir(parents=True)
        render_clip(SyntheticClip(label=label, width=64, height=48, seconds=1.0, fps=4.0, seed=i),
                    data / label / f"v{i}.mp4")
    report = f"{s3_bucket}/reports/tiny-v1"

    assert main(["eval", str(data), "--model", tiny_checkpoint[0], "--report", report,
                 "--actors", "1", "--decode-cpus", "1", "--batch-size", "4"]) == 0

    assert capsys.readouterr().out.rstrip().splitlines()[-1] == f"report: {report}"
    assert sorted(uri for uri, _ in storage.find(report)) == [
        f"{report}/{name}" for name in ("confusion_matrix.png", "metrics.json", "per_class.csv")]
    metrics = json.loads(storage.read_bytes(f"{report}/metrics.json"))
    assert metrics["count"] == 3 and np.array(metrics["confusion"]).sum(axis=1).tolist() == [1, 1, 1]
    table = list(csv.DictReader(storage.read_bytes(f"{report}/per_class.csv").decode().splitlines()))
    assert [(r["class"], int(r["support"])) for r in table] == [(c, 1) for c in CLASSES]
    with Image.open(io.BytesIO(storage.read_bytes(f"{report}/confusion_matrix.png"))) as image:
        assert image.format == "PNG" and image.width >= 400
