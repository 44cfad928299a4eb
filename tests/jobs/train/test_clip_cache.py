"""The cache of decoded clips (`ray_jobs.train.clip_cache`) on real Ray, real PyAV and a real S3 server:
it gives the rows the decode stage gives, decodes each unit once, makes new entries for anything
that changes the decoded clips, keeps its size bound, and a killed fill leaves whole units only.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from groupemotion_core.model.config import preset
from groupemotion_core.schema import ClipRow
from groupemotion_core.media.spec import FIRST_WINDOW, WindowPlan
from groupemotion_core.media.synthetic import make_dataset
from ray_jobs.inputs import storage
from ray_jobs.train.clip_cache import (AUDIO_PCM16, EXIT_AFTER_UNITS_ENV, FRAMES_JPEG, MAX_FRAME_RATIO, ClipCache,
                                 encode_frames)
from ray_jobs.commands.pack import pack

CLIP = dict(width=64, height=48, fps=8.0, seconds=1.0)
PER_CLASS = 2
SHARD_SIZE = 2
VIDEOS = 3 * PER_CLASS + 1  # and one truncated clip
SPEC = dataclasses.replace(preset("tiny").decode_spec(), clip_seconds=1.0, num_frames=4)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    """Four tar shards of two clips (the last one of one), one of the clips undecodable."""
    root = tmp_path_factory.mktemp("cache-data")
    make_dataset(root / "videos", PER_CLASS, seed=3, **CLIP)
    good = (root / "videos" / "Neutral" / "neutral_0000.mp4").read_bytes()
    (root / "videos" / "Neutral" / "broken.mp4").write_bytes(good[:700])
    pack(str(root / "videos"), str(root / "shards"), shard_size=SHARD_SIZE)
    return str(root / "shards")


@pytest.fixture(scope="module")
def filled(ray_session, shards, tmp_path_factory) -> dict:
    """One cache filled from the shards, what the fill said, and its files' mtimes right after."""
    cache = ClipCache(str(tmp_path_factory.mktemp("cache")), SPEC, FIRST_WINDOW)
    units = cache.units([shards])
    stats = cache.fill(units)
    return {"cache": cache, "units": units, "stats": stats, "files": units_files(cache)}


def units_files(cache: ClipCache) -> dict[str, int]:
    """{unit file name: mtime_ns} of a local cache, hidden files included."""
    return {p.name: p.stat().st_mtime_ns for p in Path(cache.root).iterdir() if p.name != "cache.json"}


def test_a_fill_decodes_each_unit_once_and_reads_back_the_decode_stage_rows(filled, shards):
    from ray_jobs.decode.stage import decode_dataset
    from ray_jobs.inputs.sources import read_sources

    cache, units, stats, committed = filled["cache"], filled["units"], filled["stats"], filled["files"]
    assert len(units) == -(-VIDEOS // SHARD_SIZE)
    assert (stats.committed, stats.reused, stats.videos, stats.errors) == (len(units), 0, VIDEOS, 1)
    assert sorted(committed) == sorted(u.name for u in units)  # and no temporary file is left

    cached = {r[ClipRow.KEY]: r for r in cache.dataset(units).take_all()}
    direct = {r[ClipRow.KEY]: r for r in decode_dataset(read_sources([shards]), SPEC, FIRST_WINDOW).take_all()}
    assert len(cached) == VIDEOS and cached.keys() == {os.path.abspath(k) for k in direct}
    for key, want in direct.items():
        got = cached[os.path.abspath(key)]
        assert got.keys() == want.keys()
        for column in (ClipRow.WINDOW, ClipRow.WINDOWS, ClipRow.START_S, ClipRow.END_S, ClipRow.AUDIO_LEN,
                       ClipRow.LABEL, ClipRow.ERROR):
            assert got[column] == want[column], (key, column)
        assert got[ClipRow.FRAMES].dtype == np.uint8 and got[ClipRow.FRAMES].shape == want[ClipRow.FRAMES].shape
        assert got[ClipRow.AUDIO].dtype == np.float32 and got[ClipRow.AUDIO].shape == want[ClipRow.AUDIO].shape
        # 16-bit audio: within one quantisation step; JPEG frames: close (the docstring's figures).
        assert np.abs(got[ClipRow.AUDIO] - want[ClipRow.AUDIO]).max() <= 1 / 32767
        error = got[ClipRow.FRAMES].astype(np.float64) - want[ClipRow.FRAMES]
        mse = np.mean(error**2)
        assert mse == 0 or 10 * np.log10(255**2 / mse) > 30, key
        if want[ClipRow.ERROR] is not None:
            assert not got[ClipRow.FRAMES].any() and not got[ClipRow.AUDIO].any()

    # A second fill, as a later epoch or run does: nothing decoded, no file written again.
    again = cache.fill(cache.units([shards]))
    assert (again.committed, again.reused, again.videos) == (0, len(units), 0)
    assert units_files(cache) == committed


def test_every_cached_clip_keeps_within_a_quarter_of_its_raw_frames(filled):
    cache, units = filled["cache"], filled["units"]
    raw = SPEC.num_frames * SPEC.frame_size * SPEC.frame_size * 3
    rows = 0
    for unit in units:
        table = pq.read_table(os.path.join(cache.root, unit.name))
        meta = json.loads(table.schema.metadata[b"groupemotion.clip_cache"])
        assert [tuple(i) for i in meta["inputs"]] == list(unit.inputs)
        for jpeg, pcm, n in zip(table.column(FRAMES_JPEG).to_pylist(), table.column(AUDIO_PCM16).to_pylist(),
                                table.column(ClipRow.AUDIO_LEN).to_pylist()):
            rows += 1
            assert jpeg is None or len(jpeg) <= raw * MAX_FRAME_RATIO
            assert pcm is None or len(pcm) == 2 * n  # only the valid samples, 16 bits each
    assert rows == VIDEOS
    # Noise, the worst case for JPEG, still fits: the quality steps down until it does.
    noise = np.random.default_rng(0).integers(0, 256, (SPEC.num_frames, SPEC.frame_size, SPEC.frame_size, 3),
                                              dtype=np.uint8)
    assert len(encode_frames(noise)) <= noise.nbytes * MAX_FRAME_RATIO


def test_a_changed_input_spec_plan_or_decoder_never_reads_an_old_entry(filled, shards):
    """Runs last of the tests on `filled`: it rewrites a shard."""
    cache, units = filled["cache"], filled["units"]
    uri = str(Path(cache.root).parent)
    assert cache.missing(units) == []
    # Another decode spec, window plan or decoder: another folder, in which nothing is found.
    others = [ClipCache(uri, dataclasses.replace(SPEC, num_frames=2), FIRST_WINDOW),
              ClipCache(uri, dataclasses.replace(SPEC, frame_size=32), FIRST_WINDOW),
              ClipCache(uri, SPEC, WindowPlan(mode="all"))]
    for other in others:
        assert other.root != cache.root and other.missing(other.units([shards])) == other.units([shards])
    assert set(cache.info["decoder"]) == {"pyav", "ffmpeg", "source_sha256"}
    # Threads do not change what is decoded: the same entry.
    assert ClipCache(uri, dataclasses.replace(SPEC, threads=3), FIRST_WINDOW).root == cache.root

    # One shard rewritten in place (same name and size, new mtime): that unit alone is new.
    first = units[0].inputs[0][0]
    stat = os.stat(first)
    os.utime(first, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    changed = cache.units([shards])
    assert [u.name for u in changed][1:] == [u.name for u in units][1:] and changed[0].name != units[0].name
    assert cache.missing(changed) == [changed[0]]
    stats = cache.fill(changed)
    assert (stats.committed, stats.reused) == (1, len(units) - 1)


def test_a_killed_fill_leaves_whole_units_and_the_rerun_decodes_only_the_rest(ray_session, shards, tmp_path):
    import ray

    uri = str(tmp_path / "cache")
    script = textwrap.dedent(f"""
        import dataclasses
        from groupemotion_core.model.config import preset
        from groupemotion_core.media.spec import FIRST_WINDOW
        from ray_jobs.train.clip_cache import ClipCache
        from ray_jobs.runtime.session import ensure_ray
        ensure_ray()
        spec = dataclasses.replace(preset("tiny").decode_spec(), clip_seconds=1.0, num_frames=4)
        cache = ClipCache({uri!r}, spec, FIRST_WINDOW)
        cache.fill(cache.units([{shards!r}]))
    """)
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, EXIT_AFTER_UNITS_ENV: "1"}
    killed = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-3000:]

    cache = ClipCache(uri, SPEC, FIRST_WINDOW)
    units = cache.units([shards])
    survivors = units_files(cache)
    assert len(survivors) == 1 and set(survivors) <= {u.name for u in units}  # one whole file, no temporaries
    table = pq.read_table(os.path.join(cache.root, next(iter(survivors))))
    inputs = json.loads(table.schema.metadata[b"groupemotion.clip_cache"])["inputs"]
    assert all(key.startswith(inputs[0][0] + "/") for key in table.column(ClipRow.KEY).to_pylist())

    stats = cache.fill(units)
    assert (stats.reused, stats.committed) == (1, len(units) - 1)
    assert units_files(cache)[next(iter(survivors))] == survivors[next(iter(survivors))]
    assert cache.dataset(units).count() == VIDEOS


def test_inputs_and_cache_on_s3(ray_session, shards, s3_bucket):
    for name in ("shard-000000.tar", "shard-000001.tar"):
        storage.write_bytes_atomic(f"{s3_bucket}/shards/{name}", Path(shards, name).read_bytes())
    cache = ClipCache(f"{s3_bucket}/cache", SPEC, FIRST_WINDOW)
    units = cache.units([f"{s3_bucket}/shards"])
    assert len(units) == 2 and all(len(tag) == 32 for u in units for _, _, tag in u.inputs)  # ETags
    stats = cache.fill(units)
    assert (stats.committed, stats.videos) == (2, 2 * SHARD_SIZE)
    assert cache.missing(cache.units([f"{s3_bucket}/shards"])) == []
    rows = cache.dataset(units).take_all()
    assert len(rows) == 2 * SHARD_SIZE and all(r[ClipRow.KEY].startswith(f"{s3_bucket}/shards/") for r in rows)
