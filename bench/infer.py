"""Inference throughput and memory on web-like videos: `groupemotion infer` against the decode
ceiling and a naive loop, side by side in one run, and the job again on 4x the videos.

  python bench/infer.py [--videos 1000] [--distinct 8] [--model preset:tiny] [--shard-size 20]
                        [--no-memory-run] [--originals DIR]

Videos: web-like H.264 + AAC clips, 720p and 360p alternately, 5 to 30 s long, 25 fps, moving
content (a scrolling textured background and drifting shapes, so the encoder works as on a real
video, unlike flat test colours) and speech-like stereo audio at 44.1 kHz (a voiced pitch with
harmonics in syllables and pauses, resampled to 16 kHz by the decoder). Encoding 720p is slow,
so `--distinct` videos are generated and copied under new names up to --videos; decoding a copy
costs what decoding the original does. The videos are packed into tar shards with `pack`.
Every path decodes the first 5 s window of each video (`--windows first`).

Side by side, each a fresh process, all three reading the same shards and decoding the same
first 5 s of each video with the same DecodeSpec:
- ceiling: `decode_clip` alone, one process per core (one FFmpeg thread each, as the job's decode
  actors), fed the videos as the parent reads them from the shards; its rate is timed once the
  pool's processes are up: what the machine can decode at most.
- naive: one process, one video after another: read it from its shard, decode it (FFmpeg's own
  threads), run the model on it alone, append its row to a Parquet file.
- job: the `groupemotion infer` command with its default sizing, on a local Ray it starts itself;
  wall time of the whole command, Ray's start included.
- job on a running Ray: the same command with RAY_ADDRESS set to a Ray head that the bench
  started beforehand on loopback (`ray start --head`, token auth, as many logical CPUs as the
  embedded Ray gets), as a job reaches a cluster that is up: its wall time leaves out Ray's own
  start (the daemons, the workers Ray prestarts), not the job's (its actors, the model's import).
  Its CPU and memory figures count the head's processes too.
Then the job once more on 4x the videos, for memory, and for the rate once Ray's fixed costs
(its start, its workers', the model's import) are spread over more videos.

Figures: `videos_per_s` of each; `job_vs_ceiling` and `job_vs_naive` (targets >= 0.85 and >= 1.3
at 1,000 videos and more), and the same two for the job on a running Ray;
`cpu_busy_cores`, the CPU time of the process and all its descendants over its wall time (how
many cores it kept busy) and `cpu_s_per_video`, the same CPU time per video, which other work on
a shared machine does not change the way it changes wall times; `peak_driver_rss_mib` (the
process itself) and `peak_tree_rss_mib` (summed over its descendants: for the job the raylet,
GCS, workers, actors and decoder children; shared object-store pages count once per process
mapping them, so it is an upper bound), sampled
every 0.1 s, and their ratio at 4x the videos (target <= 1.2: flat); `job_4x_vs_ceiling`, the
rate at 4x the videos against the ceiling's. Where the CPU goes: `cpu_s_by_part`, each run's CPU
seconds by what its processes were doing (the driver, Ray's daemons, Ray workers starting, Ray
Data's own actors, read tasks, decode actors around their decoder children, the children, the
model actors' start and batches), and `ray_data_stats`, the per-operator lines of Ray Data's
statistics for the job (from the job's `ray-data.log`). `beside_decoding_cpu_s_per_video`: the
job's CPU seconds per video spent on anything but its decoder children, by part, which is what
stands between a job and its decode ceiling on a machine whose cores the job fills.
`load_1m_before`/`load_1m_after`: the machine's load average around each run, other work included; `sampler_cpu_s`: the CPU the
bench's own sampling (4 times a second) took beside the run, on the same cores.

Prints one JSON object on stdout; the runs' own output goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import io
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from fractions import Fraction
from pathlib import Path

FPS = 25
AUDIO_RATE = 44100
SIZES = ((1280, 720), (640, 360))
LENGTHS_S = (5, 12, 20, 30, 8, 16, 25, 10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=1000, help="videos in the main run; the memory run has 4x")
    parser.add_argument("--distinct", type=int, default=8, help="distinct generated videos, copied up to --videos")
    parser.add_argument("--model", default="preset:tiny")
    parser.add_argument("--shard-size", type=int, default=20)
    parser.add_argument("--no-memory-run", action="store_true", help="skip the 4x run")
    parser.add_argument("--originals", type=Path, metavar="DIR",
                        help="keep the generated videos in DIR and reuse those already there (default: a temp dir)")
    parser.add_argument("--ceiling", nargs=2, metavar=("SHARDS", "SPEC"), help=argparse.SUPPRESS)
    parser.add_argument("--naive", nargs=3, metavar=("SHARDS", "OUTPUT", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ceiling:
        return _ceiling(*args.ceiling)
    if args.naive:
        return _naive(*args.naive)

    from ray_jobs.predict.model_ref import describe_model_ref

    spec = describe_model_ref(args.model)[0].decode_spec()
    load_at_start = round(os.getloadavg()[0], 2)
    with tempfile.TemporaryDirectory(prefix="bench-infer-") as tmp:
        tmp = Path(tmp)
        originals = _generate(args.originals or tmp / "originals", args.distinct)
        ceiling, naive, on_cluster = {}, {}, {}
        runs = []
        for n in (args.videos, 4 * args.videos)[: 1 if args.no_memory_run else 2]:
            shards = _shards(originals, tmp / f"{n}", n, args.shard_size)
            if not ceiling:
                out, ceiling = _measured([sys.executable, __file__, "--ceiling", str(shards), json.dumps(dataclasses.asdict(spec))])
                ceiling.update(json.loads(out.strip().splitlines()[-1]))
                out, naive = _measured([sys.executable, __file__, "--naive", str(shards), str(tmp / "naive.parquet"),
                                        args.model])
                naive.update(json.loads(out.strip().splitlines()[-1]))
            runs.append(_job(shards, tmp / f"labels-{n}", tmp / f"ray-{n}", args.model, n))
            if not on_cluster:
                with _running_ray() as (env, head):
                    on_cluster = _job(shards, tmp / f"labels-{n}-cluster", Path(env["RAY_TMPDIR"]), args.model, n,
                                      env=env, head=head)
        for figures, n in ((ceiling, args.videos), (naive, args.videos), (on_cluster, args.videos),
                           *zip(runs, (args.videos, 4 * args.videos))):
            figures["cpu_s_per_video"] = round(figures["cpu_busy_cores"] * figures["process_wall_s"] / n, 3)
            if figures is not ceiling and figures is not naive:
                figures["beside_decoding_cpu_s_per_video"] = {
                    part: round(seconds / n, 4) for part, seconds in figures["cpu_s_by_part"].items()
                    if part != "decoder children"}
        job = runs[0]
        report = {
            "bench": "infer",
            "config": {"videos": args.videos, "distinct": args.distinct, "model": args.model,
                       "shard_size": args.shard_size, "windows": "first", "fps": FPS,
                       "sizes": [f"{w}x{h}" for w, h in SIZES], "lengths_s": list(LENGTHS_S),
                       "decode_spec": {k: getattr(spec, k) for k in ("num_frames", "frame_size", "clip_seconds")}},
            "machine_cores": os.cpu_count(),
            "load_avg_1m_at_start": load_at_start,
            "ceiling": ceiling,
            "naive": naive,
            "job": job,
            "job_vs_ceiling": round(job["videos_per_s"] / ceiling["videos_per_s"], 3),
            "job_vs_naive": round(job["videos_per_s"] / naive["videos_per_s"], 3),
            "job_on_running_ray": on_cluster,
            "job_on_running_ray_vs_ceiling": round(on_cluster["videos_per_s"] / ceiling["videos_per_s"], 3),
            "job_on_running_ray_vs_naive": round(on_cluster["videos_per_s"] / naive["videos_per_s"], 3),
        }
        if len(runs) == 2:
            report["job_4x"] = runs[1]
            report["job_4x_vs_ceiling"] = round(runs[1]["videos_per_s"] / ceiling["videos_per_s"], 3)
            report["memory_4x_over_1x"] = {
                k: round(runs[1][k] / runs[0][k], 3) for k in ("peak_driver_rss_mib", "peak_tree_rss_mib")
            }
    print(json.dumps(report, indent=2))


# --- the videos -------------------------------------------------------------------------------------


def _generate(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        width, height = SIZES[i % len(SIZES)]
        path = folder / f"web_{i:03d}_{height}p.mp4"
        if not path.exists():
            partial = path.with_suffix(".partial.mp4")
            make_web_clip(partial, width, height, LENGTHS_S[i % len(LENGTHS_S)], seed=i)
            partial.rename(path)
            print(f"generated {path.name}", file=sys.stderr, flush=True)
        paths.append(path)
    return paths


def make_web_clip(path: Path, width: int, height: int, seconds: float, seed: int) -> None:
    """A web-like clip: a textured background scrolling under drifting shapes, and a voice."""
    import av
    import numpy as np

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0 : 2 * width].astype(np.float32)
    texture = 128 + 50 * np.sin(x / 37.0 + rng.uniform(0, 6))[..., None] * np.cos(y / 23.0)[..., None]
    texture = texture + rng.uniform(-40, 40, size=3) + rng.normal(0, 6, size=(height, 2 * width, 3))
    texture = np.clip(texture, 0, 255).astype(np.uint8)
    shapes = [(rng.uniform(0, width), rng.uniform(0, height), rng.uniform(-4, 4), rng.uniform(-2, 2),
               int(rng.uniform(0.05, 0.15) * height), rng.integers(0, 255, size=3, dtype=np.uint8)) for _ in range(5)]
    with av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=FPS, options={"preset": "veryfast", "crf": "23"})
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        audio = out.add_stream("aac", rate=AUDIO_RATE, layout="stereo")
        for i in range(int(seconds * FPS)):
            shift = (3 * i) % width
            img = texture[:, shift : shift + width].copy()
            for sx, sy, vx, vy, r, colour in shapes:
                cx, cy = int(sx + vx * i) % width, int(sy + vy * i) % height
                img[max(0, cy - r) : cy + r, max(0, cx - r) : cx + r] = colour
            out.mux(video.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        out.mux(video.encode())
        wave = _voice(seconds, rng)
        chunk = audio.codec_context.frame_size
        for start in range(0, len(wave), chunk):
            piece = np.zeros((2, chunk), np.float32)
            piece[:, : len(wave[start : start + chunk])] = wave[start : start + chunk]
            frame = av.AudioFrame.from_ndarray(piece, format="fltp", layout="stereo")
            frame.sample_rate, frame.pts, frame.time_base = AUDIO_RATE, start, Fraction(1, AUDIO_RATE)
            out.mux(audio.encode(frame))
        out.mux(audio.encode())


def _voice(seconds: float, rng):
    """Speech-like audio: a gliding voiced pitch with harmonics, in syllables and pauses."""
    import numpy as np

    t = np.arange(int(seconds * AUDIO_RATE)) / AUDIO_RATE
    pitch = rng.uniform(110, 220) * (1 + 0.15 * np.sin(2 * np.pi * 0.7 * t))
    phase = 2 * np.pi * np.cumsum(pitch) / AUDIO_RATE
    voiced = sum(np.sin(k * phase) / k for k in range(1, 6))
    syllables = np.clip(np.sin(2 * np.pi * rng.uniform(3, 5) * t), 0, None)
    pauses = (np.sin(2 * np.pi * 0.3 * t + rng.uniform(0, 6)) > -0.6).astype(np.float32)
    noise = rng.normal(0, 0.01, size=len(t))
    return (0.25 * voiced * syllables * pauses + noise).astype(np.float32)


def _shards(originals: list[Path], folder: Path, count: int, shard_size: int) -> Path:
    """`count` copies of the originals under distinct names, packed into tar shards."""
    from ray_jobs.commands.pack import pack

    videos = folder / "videos"
    videos.mkdir(parents=True)
    for i in range(count):
        source = originals[i % len(originals)]
        os.link(source, videos / f"v{i:05d}_{source.name}")
    pack(str(videos), str(folder / "shards"), shard_size=shard_size, progress=io.StringIO())
    shutil.rmtree(videos)
    return folder / "shards"


# --- the three ways -------------------------------------------------------------------------------


def _job(shards: Path, output: Path, ray_tmp: Path, model: str, videos: int, *, env: dict | None = None,
         head: int | None = None) -> dict:
    """The `groupemotion infer` command as a user runs it: on the Ray in `env`'s RAY_ADDRESS, whose
    head process is `head`, or else on a local Ray it starts, its logs in `ray_tmp`."""
    if env is None:
        ray_tmp.mkdir()
        env = {**os.environ, "RAY_TMPDIR": str(ray_tmp)}
        env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "ray_jobs.cli", "infer", str(shards / "manifest.json"), "--model", model,
           "--output", str(output), "--windows", "first"]
    out, figures = _measured(cmd, env, also=head)
    summary = json.loads((output / "_SUCCESS").read_text())
    if summary["videos"] != videos or summary["errors"]:
        raise SystemExit(f"the job labelled {summary['videos']} of {videos} videos, errors {summary['errors']}")
    figures["videos_per_s"] = round(videos / figures["process_wall_s"], 3)
    figures["job_own_seconds"] = round(summary["seconds"], 2)
    figures["ray_data_stats"] = _ray_data_stats(ray_tmp)
    return figures


@contextlib.contextmanager
def _running_ray():
    """A Ray head on loopback for the job to join, as a cluster that is up: yields (the job's env,
    the head's pid). `ray start --block` in a session of its own, with its own temp dir and token;
    stopped by its process group, so only this bench's Ray processes end."""
    temp_dir = Path(tempfile.mkdtemp(prefix="ray-bench-", dir="/tmp"))  # short: Ray's socket paths must fit
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    env.pop("RAY_ADDRESS", None)
    ray = str(Path(sys.executable).with_name("ray"))
    head = subprocess.Popen(
        [ray, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--include-dashboard=false", "--disable-usage-stats", f"--num-cpus={max(4, os.cpu_count() or 1)}",
         f"--temp-dir={temp_dir}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while subprocess.run([ray, "status", f"--address=127.0.0.1:{port}"], env=env,
                             capture_output=True).returncode != 0:
            if head.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the bench's Ray head did not start")
            time.sleep(1)
        time.sleep(5)  # the head settles: its processes idle, as on a cluster waiting for jobs
        yield {**env, "RAY_ADDRESS": f"127.0.0.1:{port}", "RAY_TMPDIR": str(temp_dir)}, head.pid
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(head.pid, sig)
                head.wait(timeout=15)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        shutil.rmtree(temp_dir, ignore_errors=True)


def _ray_data_stats(ray_tmp: Path) -> list[str]:
    """The per-operator lines of the statistics the job logged to Ray Data's log file."""
    logs = glob.glob(str(ray_tmp / "**" / "ray-data.log"), recursive=True)
    text = "\n".join(Path(p).read_text(errors="replace") for p in logs)
    stats = text.rsplit("per-operator statistics", 1)[-1] if "per-operator statistics" in text else ""
    keep = ("Operator", "* Remote wall time", "* Remote cpu time", "* UDF time", "* Output rows per task",
            "* Tasks per node", "* Operator throughput", "Dataset throughput", "* Total time", "* Total execution")
    return [line.strip() for line in stats.splitlines() if line.strip().startswith(keep)]


def _ceiling(shards: str, spec_json: str) -> None:
    """decode_clip alone, one process per core, one FFmpeg thread each, the videos read from the
    same shards as the other two ways, as the pool takes them; prints its rate as JSON. The
    pool's start (a fresh interpreter per process) is not in the rate: a ceiling."""
    import multiprocessing

    started = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(os.cpu_count(), initializer=_pool_init,
                                                   initargs=(spec_json,)) as pool:
        pool.map(_ready, range(os.cpu_count()), chunksize=1)
        warm = time.perf_counter()
        videos = (data for _, data in _shard_videos(Path(shards)))
        done = sum(pool.imap_unordered(_decode_one, videos, chunksize=1))
    seconds = time.perf_counter() - warm
    print(json.dumps({"videos_per_s": round(done / seconds, 3), "seconds": round(seconds, 2),
                      "pool_start_s": round(warm - started, 2), "processes": os.cpu_count()}))


_SPEC = None


def _pool_init(spec_json: str) -> None:
    global _SPEC
    from groupemotion_core.media.spec import DecodeSpec

    _SPEC = DecodeSpec(**{**json.loads(spec_json), "threads": 1})


def _ready(_) -> None:
    import groupemotion_core.media.decode  # noqa: F401  (what every process needs, loaded before the clock starts)

    time.sleep(0.2)  # each process takes one, so all of them are up


def _decode_one(data: bytes) -> int:
    from groupemotion_core.media.decode import decode_clip

    decode_clip(data, _SPEC)
    return 1


def _naive(shards: str, output: str, model_ref: str) -> None:
    """Read, decode, model, write: one video after another; prints its rate as JSON."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from groupemotion_core.errors import GroupEmotionError
    from groupemotion_core.media.decode import decode_clip
    from groupemotion_core.schema import CLASSES, PROB_COLUMNS, VideoRow
    from ray_jobs.predict.model_ref import load_model_ref

    started = time.perf_counter()
    model, info = load_model_ref(model_ref, warn=False)
    spec = model.config.decode_spec()
    videos = 0
    with pq.ParquetWriter(output, VideoRow.SCHEMA) as writer:
        for key, data in _shard_videos(Path(shards)):
            row = {"key": key, "model": info["model_id"], "label": None, "error": None, "windows": 0, "seconds": 0.0}
            row.update(dict.fromkeys(PROB_COLUMNS))
            try:
                clip = decode_clip(data, spec)
                with torch.inference_mode():
                    logits = model(torch.from_numpy(clip.frames[None]), torch.from_numpy(clip.audio[None]),
                                   torch.tensor([clip.audio_len]))
                probs = torch.softmax(logits.float(), -1)[0].numpy()
                row.update(zip(PROB_COLUMNS, probs.tolist()), label=CLASSES[int(np.argmax(probs))], windows=1,
                           seconds=clip.seconds)
            except GroupEmotionError as e:
                row["error"] = str(e)
            writer.write_table(pa.Table.from_pylist([row], schema=VideoRow.SCHEMA))
            videos += 1
    seconds = time.perf_counter() - started
    print(json.dumps({"videos_per_s": round(videos / seconds, 3), "seconds": round(seconds, 2)}))


def _shard_videos(shards: Path):
    for shard in sorted(shards.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.name.endswith(".mp4"):
                    yield f"{shard}/{member.name[:-4]}", tar.extractfile(member).read()


# --- measuring a process --------------------------------------------------------------------------


def _measured(cmd: list[str], env: dict | None = None, also: int | None = None) -> tuple[str, dict]:
    """Run `cmd`, sampling its process tree, and the tree of process `also` when given (a Ray
    head the command works on); return (stdout, figures). Its stderr goes to ours.

    Besides the totals, `cpu_s_by_part` splits the tree's CPU seconds by what each process was
    doing when sampled (`_part`: the driver, Ray's daemons, workers starting, each stage's actors
    or tasks, the decoder children), which is where a job's CPU goes beside the decoding itself.
    The 1-minute load average before and after tells how much other work shared the machine."""
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    peaks = {"peak_driver_rss_mib": 0.0, "peak_tree_rss_mib": 0.0}
    cpu: dict[int, float] = {}  # the last CPU seconds seen of every process of the tree
    by_part: dict[str, float] = {}
    stop = threading.Event()

    roots = [proc.pid] if also is None else [proc.pid, also]
    # The head's processes count from what they have used by now: CPU before the run is not its.
    cpu.update({pid: _cpu_seconds(pid) for root in roots[1:] for pid in [root, *_descendants(root)]})
    before = dict(cpu)
    sampler_cpu = [0.0]

    def sample():
        while not stop.is_set():
            pids = [pid for root in roots for pid in [root, *_descendants(root)]]
            rss = {pid: _rss_mib(pid) for pid in pids}
            peaks["peak_driver_rss_mib"] = max(peaks["peak_driver_rss_mib"], rss[proc.pid])
            peaks["peak_tree_rss_mib"] = max(peaks["peak_tree_rss_mib"], sum(rss.values()))
            for pid in pids:
                seconds = _cpu_seconds(pid)
                if seconds > cpu.get(pid, 0.0):
                    role = "driver" if pid == proc.pid else _part(pid)
                    by_part[role] = by_part.get(role, 0.0) + seconds - cpu.get(pid, 0.0)
                    cpu[pid] = seconds
            sampler_cpu[0] = time.thread_time()
            stop.wait(0.25)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = proc.communicate()
    stop.set()
    sampler.join()
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:4]} failed with exit status {proc.returncode}")
    used = sum(cpu.values()) - sum(before.values())
    return out, {"process_wall_s": round(wall, 2), "cpu_busy_cores": round(used / wall, 2),
                 "sampler_cpu_s": round(sampler_cpu[0], 2),
                 **{k: round(v, 1) for k, v in peaks.items()},
                 "load_1m_before": round(load_before, 2), "load_1m_after": round(os.getloadavg()[0], 2),
                 "cpu_s_by_part": {k: round(v, 2) for k, v in sorted(by_part.items(), key=lambda kv: -kv[1])}}


_RAY_DAEMONS = ("gcs_server", "raylet", "dashboard.py", "agent.py", "main.py", "log_monitor.py", "monitor.py",
                "ray::DashboardAgent", "ray::RuntimeEnvAgent")
_RAY_DATA_ACTORS = ("ray::_StatsActor", "ray::datasets_stats_actor", "ray::_AutoscalingCoordinatorActor",
                    "ray::AutoscalingCoordinator", "ray::ActorLocationTracker")


def _part(pid: int) -> str:
    """What a process of the tree is doing, from its command line (a Ray worker's is the title
    Ray gives it: `ray::<actor or task>`, `ray::IDLE` before it has one)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            words = [w.decode(errors="replace") for w in f.read().split(b"\0") if w]
    except OSError:
        return "other"
    if not words:
        return "other"
    title = words[0].split(" ")[0]
    program = os.path.basename(next((w for w in words[1:] if w.endswith(".py")), words[0]))
    if "ray_jobs.decode.child" in words:
        return "decoder children"
    if "_DecodeBatch" in title:
        return "decode actors (around the children)"
    if "Predictor" in title:
        return "model actors: start (torch, model)" if title.endswith(".__init__") else "model actors: batches"
    if title.startswith("ray::Read"):
        return "read tasks"
    if title.startswith(_RAY_DATA_ACTORS):
        return "Ray Data's own actors"
    if title == "ray::IDLE" or program in ("default_worker.py", "setup_worker.py"):
        return "Ray workers starting"
    if title in _RAY_DAEMONS or program in _RAY_DAEMONS:
        return "Ray daemons"
    if "--ceiling" in words or program == "python" or "multiprocessing" in " ".join(words):
        return "decode pool processes"
    return program


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


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process (its own, not its children's)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


if __name__ == "__main__":
    main()
