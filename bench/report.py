"""`groupemotion report` on a million-video labels output: time and peak memory, against pandas.

  python bench/report.py [--videos 1000000] [--small 100000] [--videos-per-unit 1000] [--keep DIR]

The output is generated in the sink's schema (`schema.VideoRow`, `schema.WindowRow`), one
`videos/` and one `windows/` file per unit of `--videos-per-unit` videos (a shard's worth): a
video in ten has three windows, the rest one; one in fifty failed as a whole (three reasons), one
window in a hundred of the long videos failed; six videos have 120 windows (the timelines). Their
probabilities are random; twelve real generated clips, four per class, are the most confident
videos, so the contact sheets decode real videos as they would after a real run.

Each figure is a fresh process, so that its peak RSS is its own:
- `report`: `ray_jobs.commands.report.report` on the output, everything the command does (both
  Parquet passes, the pictures, reading and decoding the twelve clips, the page);
- `scan`: the two streaming passes alone;
- `imports`: only importing what `report` imports: the memory floor of the process;
- `pandas`: the alternative, both datasets read whole with `pd.read_parquet`, then the label
  counts and the most confident videos of each class (what the report does, the naive way).
Each process's wall time, CPU time (user + system: what other work on a shared machine changes
least) and peak RSS. The `report` again on `--small` videos: its peak RSS must not grow with the
output (target `report_rss_1m_vs_small` <= 1.2); at a million videos, a target of 10 s of CPU.
`report_rss_vs_pandas` and `report_cpu_vs_pandas` set it beside the naive way, and
`report_rss_above_imports_mib` is what the work adds to the process's floor.

Prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from groupemotion_core.media.synthetic import SyntheticClip, render_clip  # noqa: E402
from groupemotion_core.model.config import preset  # noqa: E402
from groupemotion_core.schema import CLASSES, PROB_COLUMNS, VideoRow, WindowRow  # noqa: E402
from ray_jobs.sinks import labels  # noqa: E402

TARGETS = {"report_cpu_s_1m": 10.0, "report_rss_1m_vs_small": 1.2}
MODEL = "bench-model"
LONG_VIDEOS, LONG_WINDOWS = 6, 120
CLIP_SECONDS = 5.0

MEASURE = r"""
import json, resource, sys, time
started, cpu = time.perf_counter(), time.process_time()
mode, output, out_dir = sys.argv[1:4]
if mode == "pandas":
    import heapq
    import pandas as pd
    videos = pd.read_parquet(output + "/videos")
    windows = pd.read_parquet(output + "/windows")
    counts = videos["label"].value_counts()
    videos["confidence"] = videos[["prob_negative", "prob_neutral", "prob_positive"]].max(axis=1)
    top = videos.groupby("label")["confidence"].nlargest(4)
    errors = windows["error"].dropna().str.split(":").str[0].value_counts()
    rows = len(videos) + len(windows)
else:
    from ray_jobs.commands.report import report
    from ray_jobs.report.scan import scan
    if mode == "scan":
        s = scan(output)
        rows = s.videos + s.windows
    elif mode == "report":
        s = report(output, out_dir)
        rows = s["videos"] + s["windows"]
    else:  # everything report imports on its way, nothing run
        import matplotlib.pyplot, groupemotion_core.media.decode, ray_jobs.inputs.sources
        rows = 0
usage = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"wall_s": round(time.perf_counter() - started, 3), "cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
                  "peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "rows": rows}))
"""


def make_output(root: Path, videos: int, per_unit: int, clips: dict[str, list[str]]) -> dict:
    """Write a labels output of `videos` videos under root/labels; return its sizes."""
    output = root / "labels"
    for folder in (labels.VIDEOS_DIR, labels.WINDOWS_DIR):
        (output / folder).mkdir(parents=True)
    rng = np.random.default_rng(0)
    total_windows = 0
    for unit, first in enumerate(range(0, videos, per_unit)):
        ids = np.arange(first, min(first + per_unit, videos))
        real = [(key, cls) for cls in CLASSES for key in clips[cls]] if unit == 0 else []
        video_table, window_table = _unit(rng, ids, real, root)
        total_windows += window_table.num_rows
        name = f"{labels.PART_PREFIX}{unit:016x}.parquet"
        pq.write_table(window_table, output / labels.WINDOWS_DIR / name)
        pq.write_table(video_table, output / labels.VIDEOS_DIR / name)
    job = {"model_id": MODEL, "model_ref": "bench", "inputs": [str(root / "videos")],
           "decode_spec": asdict(preset("tiny").decode_spec()), "window_plan": {"mode": "all"}, "options": {}}
    (output / labels.JOB_FILE).write_text(json.dumps(job))
    (output / labels.SUCCESS_FILE).write_text(json.dumps({"videos": videos, "windows": total_windows}))
    return {"videos": videos, "windows": total_windows, "files": 2 * len(range(0, videos, per_unit)),
            "mib": round(sum(f.stat().st_size for f in output.rglob("*.parquet")) / 2**20, 1)}


def _unit(rng, ids: np.ndarray, real: list[tuple[str, str]], root: Path) -> tuple[pa.Table, pa.Table]:
    n = len(ids)
    keys = [str(root / "videos" / f"v{i:07d}.mp4") for i in ids] + [key for key, _ in real]
    probs = 0.9 * rng.dirichlet([1.0, 1.0, 1.0], n) + 0.1 / 3  # at most 0.933: the real clips stay on top
    top = np.array([[0.99 if c == cls else 0.005 for c in CLASSES] for _, cls in real]).reshape(-1, len(CLASSES))
    probs = np.concatenate([probs, top])
    count = np.where(ids % 10 == 0, 3, 1)
    count[:LONG_VIDEOS] = np.where(ids[:LONG_VIDEOS] < LONG_VIDEOS, LONG_WINDOWS, count[:LONG_VIDEOS])
    count = np.concatenate([count, np.ones(len(real), np.int64)])
    failed = np.concatenate([ids % 50 == 7, np.zeros(len(real), bool)])
    count[failed] = 0
    reasons = np.array(["undecodable: invalid data found when processing input", "not_media: not a video container",
                        "timeout: decoding took longer than 120 s"])
    video_error = np.where(failed, reasons[np.arange(len(keys)) % 3], None)
    video_probs = np.where(failed[:, None], np.nan, probs).astype(np.float32)
    videos = pa.table({
        VideoRow.KEY: keys,
        VideoRow.LABEL: pa.array(np.where(failed, None, np.array(CLASSES)[probs.argmax(axis=1)]), pa.string()),
        **{c: pa.array(video_probs[:, j], mask=failed) for j, c in enumerate(PROB_COLUMNS)},
        VideoRow.WINDOWS: pa.array(count, pa.int32()),
        VideoRow.SECONDS: pa.array(count * CLIP_SECONDS, pa.float64()),
        VideoRow.MODEL: pa.array([MODEL] * len(keys)),
        VideoRow.ERROR: pa.array(video_error, pa.string()),
    }, schema=VideoRow.SCHEMA)

    owner = np.repeat(np.arange(len(keys)), count)
    index = np.arange(len(owner)) - np.repeat(np.cumsum(count) - count, count)
    window_failed = (index == 2) & (np.asarray(ids.tolist() + [1] * len(real))[owner] % 100 == 0)
    window_probs = 0.9 * rng.dirichlet([1.0, 1.0, 1.0], len(owner)) + 0.1 / 3
    window_probs = np.where(window_failed[:, None], np.nan, window_probs).astype(np.float32)
    windows = pa.table({
        WindowRow.KEY: pa.array(keys).take(pa.array(owner)),
        WindowRow.WINDOW: pa.array(index, pa.int32()),
        WindowRow.START_S: pa.array(index * CLIP_SECONDS, pa.float64()),
        WindowRow.END_S: pa.array((index + 1) * CLIP_SECONDS, pa.float64()),
        WindowRow.LABEL: pa.array(np.where(window_failed, None, np.array(CLASSES)[np.nan_to_num(window_probs).argmax(axis=1)]),
                                  pa.string()),
        **{c: pa.array(window_probs[:, j], mask=window_failed) for j, c in enumerate(PROB_COLUMNS)},
        WindowRow.MODEL: pa.array([MODEL] * len(owner)),
        WindowRow.ERROR: pa.array(np.where(window_failed, "undecodable: broken packet", None), pa.string()),
    }, schema=WindowRow.SCHEMA)
    return videos, windows


def measure(mode: str, output: Path, out_dir: Path) -> dict:
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", MEASURE, mode, str(output), str(out_dir)], env=env,
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=1_000_000)
    parser.add_argument("--small", type=int, default=100_000)
    parser.add_argument("--videos-per-unit", type=int, default=1000)
    parser.add_argument("--keep", metavar="DIR", help="build the outputs here and keep them")
    args = parser.parse_args()

    root = Path(args.keep or tempfile.mkdtemp(prefix="bench-report-"))
    try:
        clips: dict[str, list[str]] = {}
        for i, cls in enumerate(c for c in CLASSES for _ in range(4)):
            path = root / "clips" / cls / f"clip{i}.mp4"
            path.parent.mkdir(parents=True, exist_ok=True)
            render_clip(SyntheticClip(label=cls, seconds=5.0, seed=i, width=320, height=240, fps=8.0), path)
            clips.setdefault(cls, []).append(str(path))
        started = time.perf_counter()
        big = make_output(root / "big", args.videos, args.videos_per_unit, clips)
        small = make_output(root / "small", args.small, args.videos_per_unit, clips)
        made_s = time.perf_counter() - started
        runs = {mode: measure(mode, root / "big" / "labels", root / f"page-{mode}")
                for mode in ("imports", "scan", "report", "pandas")}
        runs["report_small"] = measure("report", root / "small" / "labels", root / "page-small")
        report = json.loads((root / "page-report" / "report.json").read_text())
        print(json.dumps({
            "output": big,
            "small_output": small,
            "generate_s": round(made_s, 1),
            "runs": runs,
            "report_cpu_s_1m": runs["report"]["cpu_s"],
            "report_wall_s_1m": runs["report"]["wall_s"],
            "report_rss_1m_vs_small": round(runs["report"]["peak_rss_mib"] / runs["report_small"]["peak_rss_mib"], 3),
            "report_rss_vs_pandas": round(runs["report"]["peak_rss_mib"] / runs["pandas"]["peak_rss_mib"], 3),
            "report_cpu_vs_pandas": round(runs["report"]["cpu_s"] / runs["pandas"]["cpu_s"], 3),
            "report_rss_above_imports_mib": round(runs["report"]["peak_rss_mib"] - runs["imports"]["peak_rss_mib"], 1),
            "contact_sheets_decoded": sum(e["error"] is None for v in report["contact_sheets"].values() for e in v),
            "targets": TARGETS,
            "load_1m": round(os.getloadavg()[0], 1),
        }, indent=2))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
