"""`groupemotion eval`: the report's JSON, table and picture exist and agree with each other.

Plain videos in class folders (their labels), one in a folder that names no class (unlabelled),
and one that is not a video (failed), scored by a saved tiny model through the CLI.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import torch
from PIL import Image

from groupemotion_core.checkpoint import save_checkpoint
from groupemotion_core.config import preset
from groupemotion_core.model import GroupEmotionModel
from groupemotion_core.schema import CLASSES
from groupemotion_core.synthetic import SyntheticClip, render_clip
from ray_jobs.cli import main


def test_eval_report_json_table_and_png_agree(ray_session, tmp_path, capsys):
    data = tmp_path / "data"
    for i in range(6):
        label = CLASSES[i % 3]
        (data / label).mkdir(parents=True, exist_ok=True)
        spec = SyntheticClip(label=label, width=64, height=48, seconds=1.0, fps=8.0, audio=i != 4, seed=i)
        render_clip(spec, data / label / f"v{i}.mp4")
    (data / "misc").mkdir()
    render_clip(SyntheticClip(width=64, height=48, seconds=1.0, fps=8.0, seed=7), data / "misc" / "unlabelled.mp4")
    (data / "Positive" / "broken.mp4").write_bytes(b"\x00" * 2000)
    torch.manual_seed(0)
    model_id = save_checkpoint(GroupEmotionModel(preset("tiny")), tmp_path / "ckpt")
    report = tmp_path / "report"

    code = main(["eval", str(data), "--model", str(tmp_path / "ckpt"), "--report", str(report),
                 "--actors", "1", "--decode-cpus", "1", "--batch-size", "4"])

    assert code == 0
    printed = capsys.readouterr().out
    assert "accuracy" in printed and all(c in printed for c in CLASSES)
    metrics = json.loads((report / "metrics.json").read_text())
    confusion = np.array(metrics["confusion"])
    assert confusion.shape == (3, 3) and confusion.sum() == metrics["count"] == 6
    assert confusion.sum(axis=1).tolist() == [2, 2, 2]
    assert metrics["accuracy"] == np.trace(confusion) / confusion.sum()
    assert (metrics["clips"], metrics["unlabelled"], metrics["errors"]) == (8, 1, {"not_media": 1})
    assert metrics["model_id"] == model_id
    with open(report / "per_class.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["class"] for r in table] == list(CLASSES)
    for row, support in zip(table, confusion.sum(axis=1)):
        assert int(row["support"]) == support
        assert abs(float(row["recall"]) - metrics["per_class_recall"][row["class"]]) < 1e-4
    with Image.open(report / "confusion_matrix.png") as image:
        assert image.format == "PNG" and image.width >= 400 and image.height >= 400
