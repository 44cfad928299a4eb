"""The read stage's blocks, on real Ray: the size of a decode task."""

from __future__ import annotations

import io
from pathlib import Path

from groupemotion_core.media.synthetic import SyntheticClip, render_clip
from ray_jobs.commands.pack import pack
from ray_jobs.predict.pipeline import (
    VIDEOS_PER_DECODE_TASK,
    PredictOptions,
    read_stage,
    video_count,
)
from ray_jobs.inputs.sources import list_inputs


def test_the_decode_pool_gets_a_few_videos_a_task(ray_session, tmp_path: Path):
    # Two shards of 10 clips. Left to itself, Ray Data splits each shard toward 200 blocks: blocks
    # of one video, each a decode task that costs about as much to schedule as to decode.
    src = tmp_path / "videos" / "Neutral"
    src.mkdir(parents=True)
    for i in range(20):
        render_clip(SyntheticClip(label="Neutral", width=32, height=24, seconds=0.5, fps=4.0, seed=i, audio=False),
                    src / f"v{i:02d}.mp4")
    pack(str(tmp_path / "videos"), str(tmp_path / "shards"), shard_size=10, progress=io.StringIO())
    uris = list_inputs([str(tmp_path / "shards" / "manifest.json")])

    blocks = read_stage(uris, PredictOptions(decode_cpus=2), video_count(uris), shard_ends=True).iter_batches(
        batch_size=None, batch_format="pyarrow")
    sizes = [block.num_rows for block in blocks]
    assert sum(sizes) == 22  # 20 videos and the 2 shard-end markers
    assert all(VIDEOS_PER_DECODE_TASK - 1 <= n <= VIDEOS_PER_DECODE_TASK + 1 for n in sizes), sizes
