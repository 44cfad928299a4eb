"""Epoch clips per second of `groupemotion train` with and without `--cache`, on web-like 720p clips.

Usage: python bench/train.py [--clips N] [--epochs N] [--workers N] [--batch-size N]

Prints one JSON object. The clips are 5 s of 720p H.264 + 44.1 kHz AAC with moving content, as
bench/decode.py makes them (decoding one costs about what a web video costs), in class folders,
packed into tar shards. The model is the tiny preset on CPU workers, so what an epoch waits on is
the data: with the paper model on GPUs the same holds, decoding is the slow part.

Both runs are the real job (`groupemotion train`, in-process on one local Ray) on the same shards.
The figure is the median `train_clips_per_s` (what every run writes to metrics.jsonl: clips over
the epoch's wall time, waiting on data included) of the epochs after the first (actor start-up).
Without the cache, every epoch decodes every clip; with it, every epoch reads the cache. The
bench fills the cache itself first, to time that one decode (`fill_s`: what a first
`--cache` run spends before its first epoch); the cached run then finds every unit there.
`cache` says what the cache holds per clip and what it did to the pixels and samples, measured on
the bench's own clips against `decode_clip`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import make_clip  # noqa: E402  (bench/decode.py: the web-like clip generator)

from groupemotion_core.schema import CLASSES  # noqa: E402
from ray_jobs import cli  # noqa: E402
from ray_jobs.commands.pack import pack  # noqa: E402
from ray_jobs.runtime.session import ensure_ray  # noqa: E402

TARGET = 3.0  # a cached epoch at least this many times an uncached one


def web_shards(root: Path, clips: int, seed: int) -> str:
    for i in range(clips):
        folder = root / "videos" / CLASSES[i % len(CLASSES)]
        folder.mkdir(parents=True, exist_ok=True)
        make_clip(folder / f"clip_{i:04d}.mp4", seed + i)
    pack(str(root / "videos"), str(root / "shards"), shard_size=8)
    return str(root / "shards")


def run_train(train: str, val: str, output: Path, flags: list[str]) -> dict:
    argv = ["train", "--train", train, "--val", val, "--output", str(output), "--preset", "tiny", *flags]
    started = time.monotonic()
    with contextlib.redirect_stdout(sys.stderr):  # stdout is the JSON
        status = cli.main(argv)
    wall = time.monotonic() - started
    if status != 0:
        raise SystemExit(f"`groupemotion {' '.join(argv)}` exited with {status}")
    epochs = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    timed = epochs[1:] or epochs
    return {
        "clips_per_s": round(statistics.median(m["train_clips_per_s"] for m in timed), 2),
        "epochs_clips_per_s": [round(m["train_clips_per_s"], 2) for m in epochs],
        "clips_per_epoch": epochs[-1]["train_clips"],
        "wall_s": round(wall, 1),
    }


def fill(cache_uri: str, splits: list[str], spec) -> float:
    """Seconds to decode the splits into the cache, as `train --cache` does before its first epoch."""
    from groupemotion_core.media.spec import FIRST_WINDOW
    from ray_jobs.train.clip_cache import ClipCache

    cache = ClipCache(cache_uri, spec, FIRST_WINDOW)
    started = time.monotonic()
    for uris in splits:
        cache.fill(cache.units([uris]))
    return time.monotonic() - started


def cache_fidelity(cache_root: Path, sources: dict[str, Path], spec) -> dict:
    """Bytes per clip in the cache, and what JPEG and 16-bit audio did, against decode_clip.

    `sources` maps each shard folder to the video folder it was packed from: a row's key is
    `<shard>/<path of the video in that folder, without extension>`."""
    import numpy as np
    import pyarrow.parquet as pq

    from groupemotion_core.media.decode import decode_clip
    from ray_jobs.train.clip_cache import AUDIO_PCM16, FRAMES_JPEG, decode_audio, decode_frames

    files = sorted(cache_root.glob("unit-*.parquet"))
    rows = sum(pq.read_metadata(f).num_rows for f in files)
    raw_frames = math.prod(spec.frame_shape)
    raw_audio = spec.audio_samples * 4
    psnr, max_abs, audio_err = [], 0, 0.0
    for f in files:
        table = pq.read_table(f)
        for key, jpeg, pcm in zip(table.column("key").to_pylist(), table.column(FRAMES_JPEG).to_pylist(),
                                  table.column(AUDIO_PCM16).to_pylist()):
            shard, member = key.split(".tar/", 1)
            path = sources[os.path.dirname(shard)] / f"{member}.mp4"
            clip = decode_clip(path.read_bytes(), spec)
            frames = decode_frames(jpeg, spec).astype(np.float64)
            mse = float(np.mean((frames - clip.frames) ** 2))
            psnr.append(10 * np.log10(255**2 / mse) if mse else float("inf"))
            max_abs = max(max_abs, int(np.abs(frames - clip.frames).max()))
            audio_err = max(audio_err, float(np.abs(decode_audio(pcm, spec) - clip.audio).max()))
    size = sum(f.stat().st_size for f in files)
    return {
        "bytes_per_clip": round(size / rows),
        "raw_bytes_per_clip": raw_frames + raw_audio,
        "raw_frame_bytes_per_clip": raw_frames,
        "file_over_raw": round(size / rows / (raw_frames + raw_audio), 3),
        "frames": "JPEG q90 4:4:4",
        "frames_psnr_db_mean": round(float(np.mean(psnr)), 1),
        "frames_psnr_db_min": round(float(np.min(psnr)), 1),
        "frames_max_abs_error": max_abs,
        "audio": "int16 PCM of the valid samples",
        "audio_max_abs_error": audio_err,
        "clips_compared": len(psnr),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=48, help="training clips (val gets a quarter)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()

    from groupemotion_core.model.config import preset

    result: dict = {"cpu_count": os.cpu_count(), "clips": args.clips, "epochs": args.epochs,
                    "workers": args.workers, "video": "720p H.264 + AAC, 5 s (bench/decode.py)"}
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        tmp = Path(tmp)
        ensure_ray(min_cpus=args.workers + 2)
        train = web_shards(tmp / "train", args.clips, seed=0)
        val = web_shards(tmp / "val", max(len(CLASSES), args.clips // 4), seed=10_000)
        flags = ["--epochs", str(args.epochs), "--workers", str(args.workers), "--batch-size", str(args.batch_size)]
        spec = preset("tiny").decode_spec()
        uncached = run_train(train, val, tmp / "uncached", flags)
        fill_s = fill(str(tmp / "cache"), [train, val], spec)
        cached = run_train(train, val, tmp / "cached", [*flags, "--cache", str(tmp / "cache")])
        result["uncached"] = uncached
        result["cached"] = {**cached, "fill_s": round(fill_s, 1)}
        result["cached_over_uncached"] = round(cached["clips_per_s"] / uncached["clips_per_s"], 2)
        result["target"] = TARGET
        result["meets_target"] = result["cached_over_uncached"] >= TARGET
        root = next(p for p in (tmp / "cache").iterdir() if p.is_dir())
        result["cache"] = cache_fidelity(root, {train: tmp / "train" / "videos", val: tmp / "val" / "videos"}, spec)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
