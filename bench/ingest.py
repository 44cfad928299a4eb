"""Ingestion throughput: the Ray Data decode stage against the plain core decoder in a loop.

  python bench/ingest.py [--clips 48] [--width 320] [--height 240] [--seconds 5] [--actors N]

Generates the clips once into a temporary folder, then decodes all of them three ways with the
default DecodeSpec: `groupemotion_core.media.decode.decode_clip` in a loop in this process (the baseline),
and the inference job's read stage (`predict.read_stage`) + `decode_dataset` on a local Ray, once
over the plain video files and once over tar shards written by `pack`, one window per clip
(`FIRST_WINDOW`, as training reads them).
The Ray figures are cold, wall clock from building the dataset to the last row, so they include
starting the actors and their decoder children: what a job pays; `after_first_batch_clips_per_s`
is the rate once the first batch is out. The decode pool is a fixed pool of --actors one-CPU
actors (default: one per core) on a local Ray of one CPU more, in which the read tasks run (a
quarter CPU each), with the job's decode tasks of a few videos and its object store bound.
Prints one JSON object on stdout; Ray's logs go to stderr.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from groupemotion_core.media.decode import DecodeSpec, decode_clip
from groupemotion_core.media.spec import FIRST_WINDOW
from groupemotion_core.media.synthetic import make_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=48, help="clips in all (split over the 3 classes)")
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--actors", type=int, default=os.cpu_count(), help="decode actors (default: one per core)")
    parser.add_argument("--shard-size", type=int, default=8)
    args = parser.parse_args()
    spec = DecodeSpec()

    with tempfile.TemporaryDirectory() as tmp:
        videos, shards = Path(tmp) / "videos", Path(tmp) / "shards"
        rows = make_dataset(videos, max(1, args.clips // 3), width=args.width, height=args.height,
                            seconds=args.seconds)
        clips = len(rows)

        started = time.perf_counter()
        for rel, _ in rows:
            decode_clip((videos / rel).read_bytes(), spec)
        loop_s = time.perf_counter() - started

        from ray_jobs.commands.pack import pack

        pack(str(videos), str(shards), shard_size=args.shard_size, progress=io.StringIO())
        ray_plain = _through_ray(str(videos), spec, args, clips)
        ray_tar = _through_ray(str(shards / "manifest.json"), spec, args, clips)

    print(json.dumps({
        "config": {
            "clips": clips, "width": args.width, "height": args.height, "seconds": args.seconds,
            "ray_cpus": args.actors + 1, "decode_actors": args.actors, "shard_size": args.shard_size,
            "host_cpus": os.cpu_count(),
            "load_avg_1m": round(os.getloadavg()[0], 2),
            "decode_spec": {"num_frames": spec.num_frames, "frame_size": spec.frame_size,
                            "clip_seconds": spec.clip_seconds},
        },
        "decode_clip_loop": {"seconds": round(loop_s, 2), "clips_per_s": round(clips / loop_s, 2)},
        "ray_plain_objects": ray_plain,
        "ray_tar_shards": ray_tar,
        "speedup_tar_vs_loop": round(loop_s / ray_tar["seconds"], 2),
    }, indent=2))


def _through_ray(uri: str, spec: DecodeSpec, args, clips: int) -> dict:
    from ray.data import DataContext

    from ray_jobs.decode.stage import decode_dataset
    from ray_jobs.runtime.session import ensure_ray
    from ray_jobs.predict.pipeline import PredictOptions, bound_object_store, read_stage, video_count
    from ray_jobs.inputs.sources import list_inputs

    ensure_ray(num_cpus=args.actors + 1)
    DataContext.get_current().enable_progress_bars = False
    started = time.perf_counter()
    uris, options = list_inputs(uri), PredictOptions(decode_cpus=args.actors)
    sources = read_stage(uris, options, video_count(uris))
    bound_object_store(sources, options, video_count(uris))
    ds = decode_dataset(sources, spec, FIRST_WINDOW, actors=args.actors)
    seen = errors = 0
    first = None  # (time, rows) of the first batch out: what comes after it is the steady state
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        seen += batch.num_rows
        errors += batch.num_rows - batch.column("error").null_count
        first = first or (time.perf_counter(), batch.num_rows)
    elapsed = time.perf_counter() - started
    if seen != clips or errors:
        sys.exit(f"expected {clips} clean rows, got {seen} rows, {errors} with errors")
    steady = (clips - first[1]) / (elapsed - (first[0] - started)) if clips > first[1] else None
    return {
        "seconds": round(elapsed, 2),
        "clips_per_s": round(clips / elapsed, 2),
        "first_batch_s": round(first[0] - started, 2),
        "after_first_batch_clips_per_s": None if steady is None else round(steady, 2),
    }


if __name__ == "__main__":
    main()
