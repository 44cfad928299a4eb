"""Run the whole product on this machine, start to finish, in a few minutes.

Generates a small learnable dataset (each class has its own colour and tone), packs it into tar
shards, fine-tunes the `tiny` model with Ray Train on 2 workers (decoding the clips once into a
cache that every epoch reads), labels held-out clips with the batch inference job, and writes
the evaluation report. Each step is the same command a user would
type (`groupemotion pack`, `train`, `infer`, `eval`), run in-process on one local Ray, so what
the quickstart proves is what the README documents. Running it again with the same --workdir
reuses what is there: the data is kept, training resumes, inference skips committed files.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from groupemotion_core.errors import GroupEmotionError
from groupemotion_core.media.synthetic import make_dataset

# Small clips: the tiny preset letterboxes frames to 64 px, and 2 s of sound is enough to hear
# each class's tone. Held-out clips are a different seed from the training clips.
CLIP = dict(width=80, height=48, fps=8.0, seconds=2.0)
SPLITS = {"train": 0, "val": 1, "heldout": 2}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", default="groupemotion-quickstart",
                        help="where data, shards, checkpoints, labels and report go (default: %(default)s)")
    parser.add_argument("--clips-per-class", type=int, default=16,
                        help="training clips per class; val and held-out get half (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=10, help="training epochs (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers (default: %(default)s)")
    parser.add_argument("--verbose", action="store_true",
                        help="show Ray's own output on the console too (otherwise it goes to the Ray "
                             "session's log files)")


def _step(number: int, title: str) -> None:
    print(f"\n[{number}/5] {title}", file=sys.stderr, flush=True)


def _run(argv: list[str]) -> None:
    from ray_jobs import cli

    print("  $ groupemotion " + " ".join(argv), file=sys.stderr, flush=True)
    status = cli.main(argv)
    if status != 0:
        raise GroupEmotionError("step_failed", f"`groupemotion {argv[0]}` exited with {status}")


def run(args: argparse.Namespace) -> int:
    from ray_jobs.runtime.session import ensure_ray

    if args.clips_per_class < 2 or args.epochs < 1 or args.workers < 1:
        raise GroupEmotionError("bad_argument", "--clips-per-class >= 2, --epochs >= 1, --workers >= 1")
    work = Path(args.workdir).resolve()
    videos, shards = work / "videos", work / "shards"
    run_dir, labels, report = work / "run", work / "labels", work / "report"
    started = time.monotonic()
    ensure_ray(verbose=args.verbose)  # every step below runs on this Ray, with its console settings

    _step(1, f"generating clips under {videos}")
    for split, seed in SPLITS.items():
        n = args.clips_per_class if split == "train" else max(1, args.clips_per_class // 2)
        if not (videos / split).exists():
            make_dataset(videos / split, n, seed=seed, **CLIP)
        print(f"  {split}: {n} clips per class", file=sys.stderr)

    _step(2, "packing train and val into tar shards")
    for split in ("train", "val"):
        if not (shards / split / "manifest.json").exists():
            _run(["pack", str(videos / split), str(shards / split), "--shard-size", "16"])

    _step(3, f"fine-tuning the tiny preset with Ray Train ({args.workers} workers)")
    _run(["train", "--train", str(shards / "train"), "--val", str(shards / "val"),
          "--output", str(run_dir), "--cache", str(work / "cache"), "--preset", "tiny",
          "--workers", str(args.workers), "--epochs", str(args.epochs), "--lr", "1e-3"])

    _step(4, "labelling held-out clips with the batch inference job")
    _run(["infer", str(videos / "heldout"), "--model", str(run_dir / "best"), "--output", str(labels)])

    _step(5, "evaluating the fine-tuned model on the held-out clips")
    _run(["eval", str(videos / "heldout"), "--model", str(run_dir / "best"), "--report", str(report)])

    print(
        f"\ndone in {time.monotonic() - started:.0f} s\n"
        f"  labels (Parquet): {labels}/videos   one row per video\n"
        f"                    {labels}/windows  one row per window of a video\n"
        f"  checkpoint:       {run_dir / 'best'}\n"
        f"  report:           {report}\n"
        f"read the labels with pandas:\n"
        f"  import pandas as pd\n"
        f"  videos = pd.read_parquet(\"{labels}/videos\")\n"
        f"  windows = pd.read_parquet(\"{labels}/windows\")"
    )
    return 0


if __name__ == "__main__":
    from ray_jobs.cli import entrypoint

    entrypoint("quickstart")
