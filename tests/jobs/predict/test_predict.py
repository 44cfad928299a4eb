"""The read stage's blocks, on real Ray: the size of a decode task."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from groupemotion_core.media.synthetic import SyntheticClip, render_clip
from ray_jobs.commands.pack import pack
from ray_jobs.inputs.sources import list_inputs
from ray_jobs.predict.pipeline import (
    DECODE_TASKS_PER_DECODER,
    MAX_VIDEOS_PER_DECODE_TASK,
    MIN_VIDEOS_PER_DECODE_TASK,
    PredictOptions,
    decode_task_videos,
    read_stage,
    video_count,
)


@pytest.mark.parametrize("videos, decoders, per_task", [
    # Two shards of 10 for a pool of 2. Left to itself, Ray Data splits each shard toward 200
    # blocks: blocks of one video, each a decode task that costs about as much to schedule as to decode.
    (20, 2, MIN_VIDEOS_PER_DECODE_TASK),
    # Two shards of 80 for one decoder: 160 videos give it 16 tasks of 10.
    (160, 1, 10),
])
def test_the_decode_pool_gets_tasks_of_a_few_videos_more_as_the_job_grows(ray_session, tmp_path: Path, videos,
                                                                           decoders, per_task):
    assert decode_task_videos(videos, decoders) == per_task
    one = tmp_path / "one.mp4"
    render_clip(SyntheticClip(label="Neutral", width=32, height=24, seconds=0.5, fps=4.0, seed=0, audio=False), one)
    src = tmp_path / "videos" / "Neutral"
    src.mkdir(parents=True)
    for i in range(videos):  # distinct names of one clip: the read stage never decodes
        os.link(one, src / f"v{i:03d}.mp4")
    pack(str(tmp_path / "videos"), str(tmp_path / "shards"), shard_size=videos // 2, progress=io.StringIO())
    uris = list_inputs([str(tmp_path / "shards" / "manifest.json")])

    blocks = read_stage(uris, PredictOptions(decode_cpus=decoders), video_count(uris), shard_ends=True).iter_batches(
        batch_size=None, batch_format="pyarrow")
    sizes = sorted(block.num_rows for block in blocks)
    assert sum(sizes) == videos + 2  # the videos and the 2 shard-end markers
    # per_task videos a block, a shard's marker with one of them; only the last of a shard may hold fewer.
    assert set(sizes[2:]) <= {per_task, per_task + 1}, sizes


def test_a_decode_task_grows_with_the_job_up_to_its_bound():
    assert decode_task_videos(None, 8) == MIN_VIDEOS_PER_DECODE_TASK  # a table: count unknown
    assert decode_task_videos(10, 8) == MIN_VIDEOS_PER_DECODE_TASK
    assert decode_task_videos(8 * DECODE_TASKS_PER_DECODER * 7, 8) == 7
    assert decode_task_videos(1_000_000, 8) == MAX_VIDEOS_PER_DECODE_TASK
