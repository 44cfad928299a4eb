"""Training clips per second of `groupemotion train`: tiny preset on CPU with 1 and 2 workers, and
the paper preset on a GPU when this machine has one.

Usage: python bench/train.py [--clips-per-class N] [--epochs N] [--batch-size N]

Prints one JSON object. Each figure is the real job (pack -> Ray Data decode -> Ray Train DDP),
run in-process on one local Ray, so it includes waiting on the decode stage: it is what a run
of that size costs end to end, per clip trained. The first epoch (actor start-up, decoder
processes) is left out; the figure is the median of the later epochs' `train_clips_per_s`, the
number every run writes to its metrics.jsonl.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from groupemotion_core.synthetic import make_dataset  # noqa: E402
from ray_jobs import cli  # noqa: E402
from ray_jobs.pack import pack  # noqa: E402
from ray_jobs.runtime import ensure_ray  # noqa: E402

# Short clips: decoding stays cheap next to the model, which is what is being timed.
TINY_CLIP = dict(width=96, height=64, fps=8.0, seconds=2.0)
PAPER_CLIP = dict(width=320, height=240, fps=10.0, seconds=5.0)


def packed(root: Path, clips_per_class: int, clip: dict) -> dict[str, str]:
    for split, n, seed in (("train", clips_per_class, 0), ("val", max(1, clips_per_class // 4), 1)):
        make_dataset(root / "videos" / split, n, seed=seed, **clip)
        pack(str(root / "videos" / split), str(root / "shards" / split), shard_size=8)
    return {split: str(root / "shards" / split) for split in ("train", "val")}


def clips_per_s(data: dict[str, str], output: Path, *flags: str) -> dict:
    argv = ["train", "--train", data["train"], "--val", data["val"], "--output", str(output), *flags]
    status = cli.main(argv)
    if status != 0:
        raise SystemExit(f"`groupemotion {' '.join(argv)}` exited with {status}")
    epochs = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    timed = epochs[1:] or epochs
    return {
        "clips_per_s": round(statistics.median(m["train_clips_per_s"] for m in timed), 2),
        "clips_per_epoch": epochs[-1]["train_clips"],
        "epochs_timed": [m["epoch"] for m in timed],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips-per-class", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()

    import torch

    result: dict = {"cpu_count": os.cpu_count(), "batch_size_per_worker": args.batch_size}
    # The job's own output (and the workers' logs Ray forwards) goes to stderr: stdout is the JSON.
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp, contextlib.redirect_stdout(sys.stderr):
        # Room for two train workers plus the decode actors of both datasets.
        ensure_ray(min_cpus=4)
        tmp = Path(tmp)
        data = packed(tmp / "tiny-data", args.clips_per_class, TINY_CLIP)
        common = ["--preset", "tiny", "--epochs", str(args.epochs), "--batch-size", str(args.batch_size)]
        result["tiny_cpu"] = {
            f"{n}_worker{'s' if n > 1 else ''}": clips_per_s(data, tmp / f"tiny-{n}", *common, "--workers", str(n))
            for n in (1, 2)
        }
        if torch.cuda.is_available():
            data = packed(tmp / "paper-data", args.clips_per_class, PAPER_CLIP)
            result["paper_gpu"] = {
                "device": torch.cuda.get_device_name(0),
                "1_worker": clips_per_s(data, tmp / "paper", "--preset", "paper", "--gpu", "--workers", "1",
                                        "--epochs", str(args.epochs), "--batch-size", "8"),
            }
        else:
            result["paper_gpu"] = None
            result["paper_gpu_reason"] = "no CUDA device on this machine"
    print(json.dumps(result))


if __name__ == "__main__":
    main()
