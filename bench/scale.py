"""Scale of one job: does the inference driver stay flat from a thousand videos to a million?

  python bench/scale.py [--sizes 1000 100000] [--stream-s 60] [--s3-objects 0] [--workdir DIR]

For each N in --sizes, a local folder of N plain video objects (hard links of one short
generated clip; a file takes at most ~65,000 links, so the clip is copied every LINKS_PER_COPY)
is labelled by the real command, as a user runs it, in a process of its own with its own
embedded Ray:

    groupemotion infer DIR --model preset:tiny --windows first --output OUT

and measured from /proc (no sampling gaps: the kernel keeps each process's peak RSS, VmHWM):
seconds from the start to the first committed unit (a file in OUT/videos/), the driver's and the
raylet's peak RSS, and the driver's CPU while streaming: CPU-seconds over the --stream-s seconds
after the first unit, as a share of one core and per 1,000 videos committed in that window
(counted as 256 a unit).
The job is then stopped (each of its processes, by id): a million videos take hours to label on
two cores, and what is measured here is what grows with N, not the labelling rate.

With --s3-objects M, a prefix of M small objects on a moto S3 server on 127.0.0.1 is listed the
way the job lists (`ray_jobs.inputs.listing.plan`, S3 pages of 1,000 keys) in a process of its
own: its seconds and peak RSS.

Prints one JSON object on stdout, with each size's figures beside the 1,000-video (first) size's
as ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINKS_PER_COPY = 60_000
CLOCK = os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="*", default=[1000, 100_000], help="folder sizes (none: S3 only)")
    parser.add_argument("--stream-s", type=float, default=60.0, help="seconds of streaming measured after the first unit")
    parser.add_argument("--timeout-s", type=float, default=900.0, help="give up on a size after this long")
    parser.add_argument("--s3-objects", type=int, default=0, help="also list an S3 (moto) prefix of this many objects")
    parser.add_argument("--workdir", help="where the folders go (default: a temporary folder)")
    args = parser.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="groupemotion-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    clip = work / "clip.mp4"
    from groupemotion_core.media.synthetic import SyntheticClip, render_clip

    render_clip(SyntheticClip(seconds=1.0, width=64, height=48, fps=4.0, seed=0), clip)
    results = {}
    try:
        for n in args.sizes:
            folder = _linked_folder(work, clip, n)
            results[str(n)] = _run_job(folder, work / f"out-{n}", args)
            shutil.rmtree(work / f"out-{n}", ignore_errors=True)
        s3 = _list_s3(args.s3_objects) if args.s3_objects else None
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    base = results[str(args.sizes[0])] if args.sizes else {}
    for figures in results.values():
        for name in ("first_unit_s", "driver_peak_rss_mib", "raylet_peak_rss_mib"):
            if base.get(name) and figures.get(name) is not None:
                figures[f"{name}_vs_{args.sizes[0]}"] = round(figures[name] / base[name], 2)
    print(json.dumps({
        "config": {"sizes": args.sizes, "stream_s": args.stream_s, "host_cpus": os.cpu_count(),
                   "load_avg_1m": round(os.getloadavg()[0], 2),
                   "command": "groupemotion infer DIR --model preset:tiny --windows first --output OUT"},
        "local_folder": results,
        "s3_listing": s3,
    }, indent=2))


def _linked_folder(work: Path, clip: Path, n: int) -> Path:
    folder = work / f"videos-{n}"
    if folder.exists() and len(os.listdir(folder)) == n:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    source = None
    for i in range(n):
        if i % LINKS_PER_COPY == 0:
            source = work / f"copy-{n}-{i // LINKS_PER_COPY}.mp4"  # a copy's links are its folder's alone
            if not source.exists():
                shutil.copyfile(clip, source)
        os.link(source, folder / f"v{i:07d}.mp4")
    return folder


def _run_job(folder: Path, output: Path, args) -> dict:
    shutil.rmtree(output, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    command = [sys.executable, "-m", "ray_jobs.cli", "infer", str(folder), "--model", "preset:tiny",
               "--windows", "first", "--output", str(output)]
    log = open(output.parent / f"{output.name}.log", "w")
    started = time.monotonic()
    driver = subprocess.Popen(command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    seen: dict[int, str] = {}  # every process of the job: to read their peaks and stop them
    first = window_start = None
    cpu = cpu_at_first = units = units_at_first = 0
    figures: dict = {}
    try:
        while driver.poll() is None and time.monotonic() - started < args.timeout_s:
            seen.update(_descendants(driver.pid))
            _peaks(driver.pid, seen, figures)
            cpu = _cpu_s(driver.pid) or cpu  # the last reading before the driver ends
            units = len(list((output / "videos").glob("part-*.parquet"))) if (output / "videos").exists() else 0
            if first is None and units:
                first = time.monotonic() - started
                cpu_at_first, units_at_first, window_start = cpu, units, time.monotonic()
            if window_start is not None and time.monotonic() - window_start >= args.stream_s:
                break
            time.sleep(0.5)
        if window_start is not None:  # the window, or as much of it as the job lasted
            window = time.monotonic() - window_start
            videos = (units - units_at_first) * 256
            figures.update(driver_cpu_core_streaming=round((cpu - cpu_at_first) / window, 4), streamed_s=round(window, 1),
                           driver_cpu_s_per_1000_videos=round(1000 * (cpu - cpu_at_first) / videos, 3) if videos else None,
                           videos_committed_in_window=videos)
        figures["first_unit_s"] = None if first is None else round(first, 1)
        figures["driver_cpu_s_total"] = round(cpu, 1)
    finally:
        _stop([driver.pid, *seen])
        driver.wait()
        log.close()
    return figures


def _descendants(pid: int) -> dict[int, str]:
    parents: dict[int, int] = {}
    names: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            name = stat[stat.index("(") + 1 : stat.rindex(")")]
            parents[int(entry)] = int(stat[stat.rindex(")") + 2 :].split()[1])
            names[int(entry)] = name
    found, frontier = {}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, ppid in parents.items():
            if ppid == parent and child not in found:
                found[child] = names[child]
                frontier.append(child)
    return found


def _peaks(driver: int, processes: dict[int, str], figures: dict) -> None:
    """Peak RSS (VmHWM) of the driver and the raylet, as the kernel has it now."""
    _max(figures, "driver_peak_rss_mib", _hwm_mib(driver))
    for pid, name in processes.items():
        if name == "raylet":
            _max(figures, "raylet_peak_rss_mib", _hwm_mib(pid))


def _max(figures: dict, name: str, value: float | None) -> None:
    if value is not None:
        figures[name] = max(figures.get(name, 0.0), value)


def _hwm_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def _cpu_s(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK  # utime + stime


def _stop(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _list_s3(objects: int) -> dict:
    """Put `objects` tiny objects under a prefix of a moto server, then list them as the job does."""
    from concurrent.futures import ThreadPoolExecutor

    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
           "AWS_REGION": "us-east-1"}
    try:
        client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="bench",
                              aws_secret_access_key="bench", region_name="us-east-1")
        client.create_bucket(Bucket="scale")
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda i: client.put_object(Bucket="scale", Key=f"videos/v{i:07d}.mp4", Body=b"x"),
                          range(objects)))
        out = tempfile.mkdtemp(prefix="groupemotion-scale-s3-")
        code = ("import json, resource, time; from ray_jobs.inputs import listing; t = time.monotonic(); "
                f"l = listing.plan({out!r}, ['s3://scale/videos/']); "
                "print(json.dumps({'videos': l.videos, 'pages': l.pages, 'seconds': round(time.monotonic() - t, 1), "
                "'peak_rss_mib': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))")
        done = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
                              capture_output=True, text=True, check=True)
        shutil.rmtree(out, ignore_errors=True)
        return {"objects": objects, **json.loads(done.stdout)}
    finally:
        server.stop()


if __name__ == "__main__":
    main()
