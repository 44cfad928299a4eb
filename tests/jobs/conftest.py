"""Data shared by the tests that run jobs on a multi-node cluster (test_cluster_faults.py,
test_start_after_node_loss.py): built once per module, read only."""

from __future__ import annotations

import os

import pytest

from groupemotion_core.media.synthetic import SyntheticClip, render_clip
from groupemotion_core.schema import CLASSES
from ray_jobs.commands.pack import pack

INFER_LONG_CLIPS = {0, 5}  # of the 12 infer clips, these are 7 s long: two windows each


@pytest.fixture(scope="module")
def infer_data(tmp_path_factory, tiny_checkpoint) -> dict[str, str]:
    """12 clips in 6 shards of 2 (two of the clips 7 s long), and the session's tiny model."""
    root = tmp_path_factory.mktemp("infer-data")
    for i in range(12):
        label = CLASSES[i % 3]
        (root / "videos" / label).mkdir(parents=True, exist_ok=True)
        seconds = 7.0 if i in INFER_LONG_CLIPS else 2.0
        render_clip(SyntheticClip(label=label, width=64, height=48, fps=4.0, seconds=seconds, seed=i),
                    root / "videos" / label / f"v{i:02d}.mp4")
    pack(str(root / "videos"), str(root / "shards"), shard_size=2, progress=open(os.devnull, "w"))
    return {"shards": str(root / "shards"), "model": tiny_checkpoint[0]}
