"""The README's main command, end to end on small sizes: every step's output is there and agrees
with the others, and what it prints is meant for a person."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from groupemotion_core.weights.checkpoint import load_checkpoint
from groupemotion_core.schema import CLASSES, VideoRow, WindowRow
from ray_jobs import cli


# What Ray, Ray Data and Ray Train print on their own; it belongs in their log files.
CHATTER = [
    r"\((raylet|pid=\d+|\w+ pid=\d+)\)",  # forwarded worker output and cluster messages
    r"Token authentication",
    r"Failed to query Ray Train Controller",
    r"constructor arguments in the object store",
    r"\.(cc|py):\d+",  # a log record's or warning's source location
    r"Running Dataset|Dataset .* execution finished|Total Progress",
    r"Warning|Traceback",
]


@pytest.mark.slow
def test_quickstart_runs_end_to_end(ray_session, tmp_path, capsys):
    work = tmp_path / "qs"
    argv = ["quickstart", "--workdir", str(work), "--clips-per-class", "4", "--epochs", "2"]
    # As a user runs it: its own process and its own Ray, so the console is what a person sees.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    run = subprocess.run([sys.executable, "-m", "ray_jobs.cli", *argv], env=env, capture_output=True,
                         text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-5000:]
    printed = run.stdout
    lines = (run.stdout + run.stderr).splitlines()
    assert len(lines) <= 150, "\n".join(lines)
    for pattern in CHATTER:
        assert not [line for line in lines if re.search(pattern, line)], pattern
    assert [sum(line.startswith(f"[train] epoch {e}/2: ") for line in lines) for e in (1, 2)] == [1, 1]
    for name in ("labels/videos", "labels/windows", "run/best", "report"):
        assert str(work / name) in printed
    assert f'pd.read_parquet("{work / "labels" / "videos"}")' in printed

    heldout = sorted((work / "videos" / "heldout").rglob("*.mp4"))
    assert len(heldout) == 2 * len(CLASSES)
    table = pq.read_table(work / "labels" / "videos")
    assert table.schema.equals(VideoRow.SCHEMA, check_metadata=False)
    rows = table.to_pylist()
    assert sorted(Path(r["key"]).name for r in rows) == sorted(p.name for p in heldout)
    assert all(r["error"] is None and r["label"] in CLASSES and r["windows"] == 1 for r in rows)
    windows = pq.read_table(work / "labels" / "windows")
    assert windows.schema.equals(WindowRow.SCHEMA, check_metadata=False)
    assert sorted(windows["key"].to_pylist()) == sorted(r["key"] for r in rows)  # 2 s clips: one window each

    model, info = load_checkpoint(work / "run" / "best")
    assert {r["model"] for r in rows} == {info["model_id"]}

    metrics = json.loads((work / "report" / "metrics.json").read_text())
    assert sum(map(sum, metrics["confusion"])) == len(heldout)
    with Image.open(work / "report" / "confusion_matrix.png") as png:
        assert min(png.size) >= 200

    # A second run reuses everything: data, shards, the finished training run, committed labels.
    assert cli.main(argv) == 0
    assert pq.read_table(work / "labels" / "videos").num_rows == len(heldout)
