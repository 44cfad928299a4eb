"""Inference throughput and memory: the Ray job against a naive sequential loop, for N and 4N clips.

  python bench/infer.py [--clips N] [--model preset:tiny] [--width 160] [--height 120]
                        [--seconds 2] [--cpus 4] [--actors 1] [--batch-size 8] [--shard-size 8]

Generates N and 4N clips once, packs each set into tar shards, then labels each set two ways,
each in a fresh process so their memory can be told apart:

- job: `ray_jobs.infer.infer` on a local Ray of --cpus logical CPUs (started before the job, as
  a cluster would be): read, decode actors, model actors, Parquet committed per shard.
  `clips_per_s` is the job's own figure (listing, actor start and model loads included, Ray's own
  start excluded); `process_wall_s` is the whole process, Ray's start included.
- naive: one clip after another in one process: read it from the shard, decode it, run the
  model on it alone, append its row to a Parquet file.

Memory, sampled every 0.1 s while a run lasts:
- `peak_driver_rss_mib`: resident memory of the process that runs the job (the Ray driver);
- `peak_tree_rss_mib`: summed resident memory of that process and all its descendants, which for
  a local Ray are the raylet, GCS and every worker and actor. Pages of the shared object store are
  counted once per process that maps them, so this is an upper bound;
- `peak_system_used_mib`: rise of the machine's used memory (MemTotal - MemAvailable) over the
  level before the run; other work on the machine shows up here too.
Flat streaming shows as driver and tree peaks that do not grow with 4x the clips.

Prints one JSON object on stdout; the runs' logs go to stderr.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

JOB = """
import json, sys, ray
ray.init(address="local", num_cpus={cpus}, include_dashboard=False, _node_ip_address="127.0.0.1",
         configure_logging=False)
from ray_jobs.infer import PredictOptions, infer
summary = infer([{shards!r}], {model!r}, {output!r}, PredictOptions(batch_size={batch_size}, actors={actors}))
print(json.dumps(summary.to_dict()))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=24, help="N; the second run has 4N clips")
    parser.add_argument("--model", default="preset:tiny")
    parser.add_argument("--width", type=int, default=160)
    parser.add_argument("--height", type=int, default=120)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--cpus", type=int, default=max(4, os.cpu_count() or 1), help="logical CPUs of the local Ray")
    parser.add_argument("--actors", type=int, default=1, help="model actors")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--shard-size", type=int, default=8)
    parser.add_argument("--naive", nargs=3, metavar=("SHARDS", "OUTPUT", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.naive:
        return _naive(*args.naive)

    from groupemotion_core.synthetic import make_dataset
    from ray_jobs.pack import pack

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for clips in (args.clips, 4 * args.clips):
            root = Path(tmp) / str(clips)
            make_dataset(root / "videos", max(1, clips // 3), width=args.width, height=args.height, seconds=args.seconds)
            pack(str(root / "videos"), str(root / "shards"), shard_size=args.shard_size, progress=io.StringIO())
            job_code = JOB.format(cpus=args.cpus, shards=str(root / "shards"), model=args.model,
                                  output=str(root / "labels"), batch_size=args.batch_size, actors=args.actors)
            out, job = _measured([sys.executable, "-c", job_code])
            summary = json.loads(out.strip().splitlines()[-1])
            job.update(clips_per_s=round(summary["clips_per_second"], 3), labelled=summary["labelled"])
            naive_cmd = [sys.executable, __file__, "--naive", str(root / "shards"), str(root / "naive.parquet"), args.model]
            out, naive = _measured(naive_cmd)
            naive.update(json.loads(out.strip().splitlines()[-1]))
            runs.append({
                "clips": summary["clips"],
                "job": job,
                "naive": naive,
                "speedup": round(job["clips_per_s"] / naive["clips_per_s"], 2),
            })
    print(json.dumps({
        "bench": "infer",
        "config": {k: getattr(args, k) for k in ("model", "width", "height", "seconds", "cpus", "actors",
                                                 "batch_size", "shard_size")},
        "machine_cores": os.cpu_count(),
        "runs": runs,
    }, indent=2))


def _naive(shards: str, output: str, model_ref: str) -> None:
    """Decode, model, write: one clip after another (the baseline), then print its rate as JSON."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from groupemotion_core.errors import GroupEmotionError
    from groupemotion_core.media import decode_clip
    from groupemotion_core.schema import CLASSES, LabelRow
    from ray_jobs.model_ref import load_model_ref

    started = time.perf_counter()
    model, info = load_model_ref(model_ref, warn=False)
    spec = model.config.decode_spec()
    clips = 0
    with pq.ParquetWriter(output, LabelRow.SCHEMA) as writer:
        for shard in sorted(Path(shards).glob("*.tar")):
            with tarfile.open(shard) as tar:
                for member in tar:
                    if not member.name.endswith(".mp4"):
                        continue
                    row = {"key": f"{shard}/{member.name[:-4]}", "model": info["model_id"], "label": None, "error": None}
                    row.update(dict.fromkeys(LabelRow.PROB_COLUMNS))
                    try:
                        clip = decode_clip(tar.extractfile(member).read(), spec)
                        with torch.inference_mode():
                            logits = model(torch.from_numpy(clip.frames[None]), torch.from_numpy(clip.audio[None]),
                                           torch.tensor([clip.audio_len]))
                        probs = torch.softmax(logits.float(), -1)[0].numpy()
                        row.update(zip(LabelRow.PROB_COLUMNS, probs.tolist()), label=CLASSES[int(np.argmax(probs))])
                    except GroupEmotionError as e:
                        row["error"] = f"{e.reason}: {e.detail}"
                    writer.write_table(pa.Table.from_pylist([row], schema=LabelRow.SCHEMA))
                    clips += 1
    seconds = time.perf_counter() - started
    print(json.dumps({"clips_per_s": round(clips / seconds, 3), "seconds": round(seconds, 2)}))


def _measured(cmd: list[str]) -> tuple[str, dict]:
    """Run `cmd`, sampling its memory; return (stdout, figures). Its stderr goes to ours."""
    baseline = _system_used()
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    peaks = {"peak_driver_rss_mib": 0.0, "peak_tree_rss_mib": 0.0, "peak_system_used_mib": 0.0}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            tree = _descendants(proc.pid)
            rss = {pid: _rss_mib(pid) for pid in [proc.pid, *tree]}
            peaks["peak_driver_rss_mib"] = max(peaks["peak_driver_rss_mib"], rss[proc.pid])
            peaks["peak_tree_rss_mib"] = max(peaks["peak_tree_rss_mib"], sum(rss.values()))
            peaks["peak_system_used_mib"] = max(peaks["peak_system_used_mib"], _system_used() - baseline)
            stop.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = proc.communicate()
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:3]} failed with exit status {proc.returncode}")
    return out, {"process_wall_s": round(time.perf_counter() - started, 2), **{k: round(v, 1) for k, v in peaks.items()}}


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
            except (OSError, ValueError, IndexError):
                pass
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _rss_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _system_used() -> float:
    info = {}
    with open("/proc/meminfo") as f:
        for line in f:
            name, value = line.split(":", 1)
            info[name] = int(value.split()[0])
    return (info["MemTotal"] - info["MemAvailable"]) / 1024


if __name__ == "__main__":
    main()
