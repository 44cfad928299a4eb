"""Whole-video decoding (decode_windows) against one raw pass over the same file, and its memory.

Usage: python bench/windows.py [--short S] [--long S] [--repeat N] [--max-windows K]
                               [--sparse-short S] [--sparse-long S]

Prints one JSON object. The yardstick is the raw pass: PyAV demuxing the file and decoding every
video and audio frame, nothing converted, decoder threads as decode_windows has them; no windowed
decode can beat it by much, so each figure is a ratio to it, beside its target:
- all windows of a `--short` (60 s) 720p H.264 + AAC video: one pass over it, target <= 1.3x;
  the old way (decode_clip for each window, reading the start of the audio again every time) beside it;
- `--max-windows 8` over a `--long` (10 min) video: seeks across the gaps, target <= 0.25x;
- peak memory (RSS) of a fresh process decoding all windows of the long video, against one doing
  the short one: memory must not grow with the video, target <= 1.5x;
- `--max-windows 8` (one thread) on a `--sparse-short` (10 min) and a `--sparse-long` (2 h)
  320x240 H.264 + AAC video read from a file: sparse windows must cost the same at any length,
  target: the long one <= 1.5x the CPU of the short one.
Times are the best of `--repeat` runs, wall and CPU (all threads of this process). The videos are
made here with bench/decode.py's web-like generator (x264 ultrafast, to make them quickly); the
long one is the short one played over and over, its packets copied with shifted times.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import av

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.decode import make_clip  # noqa: E402
from groupemotion_core.media.decode import DecodeSpec, decode_clip, decode_windows  # noqa: E402
from groupemotion_core.media.spec import WindowPlan  # noqa: E402

SPEC = DecodeSpec()
TARGETS = {"all_windows_vs_raw": 1.3, "max_windows_8_vs_raw": 0.25, "peak_rss_long_vs_short": 1.5,
           "sparse_long_vs_short_cpu": 1.5}
# Peak RSS of a process that decodes every window of the file in argv[1] and nothing else.
MEASURE_RSS = (
    "import resource, sys\n"
    "from groupemotion_core.media.decode import decode_windows\n"
    "windows = sum(1 for _ in decode_windows(sys.argv[1]))\n"
    "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, windows)\n"
)


def raw_pass(data: bytes) -> None:
    with av.open(io.BytesIO(data)) as container:
        video, audio = container.streams.video[0], container.streams.audio[0]
        video.thread_type = "AUTO"
        video.codec_context.thread_count = SPEC.threads
        for packet in container.demux(video, audio):
            packet.decode()


def windows(data: bytes, plan: WindowPlan) -> int:
    return sum(w.error is None for w in decode_windows(data, SPEC, plan))


def best_of(repeat: int, run) -> dict:
    """{wall_s, cpu_s}: the least of `repeat` runs, the way to see through a busy machine."""
    walls, cpus = [], []
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        run()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return {"wall_s": round(min(walls), 3), "cpu_s": round(min(cpus), 3)}


def ratio(measured: dict, baseline: dict) -> dict:
    return {k: round(measured[k] / baseline[k], 3) for k in ("wall_s", "cpu_s")}


def repeat_video(short: Path, dest: Path, times: int, gap_s: float = 0.2) -> None:
    """`short` played `times` times, `gap_s` apart: its packets copied with shifted times."""
    with av.open(str(dest), "w") as out:
        streams, last_dts = {}, {}
        for k in range(times):
            with av.open(str(short)) as src:
                if not streams:
                    streams = {s.index: out.add_stream_from_template(s) for s in src.streams}
                length_s = float(src.duration / av.time_base)
                for packet in src.demux():
                    if packet.dts is None:
                        continue
                    shift = round(k * (length_s + gap_s) / packet.time_base)
                    packet.pts, packet.dts = packet.pts + shift, packet.dts + shift
                    if packet.dts <= last_dts.get(packet.stream.index, -1 << 62):
                        continue  # the encoder's priming overlaps the copy before
                    last_dts[packet.stream.index] = packet.dts
                    packet.stream = streams[packet.stream.index]
                    out.mux(packet)


def peak_rss_mb(path: Path) -> tuple[float, int]:
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", MEASURE_RSS, str(path)], cwd=root, check=True,
                          capture_output=True, text=True)
    kbytes, count = done.stdout.split()
    return round(int(kbytes) / 1024, 1), int(count)


def sparse_by_length(short_s: float, long_s: float, max_windows: int, repeat: int) -> dict:
    """CPU and wall of `max_windows` windows of a short and a long 320x240 video, each the same
    60 s clip repeated, read from files."""
    spec, plan = DecodeSpec(threads=1), WindowPlan(max_windows=max_windows)
    with tempfile.TemporaryDirectory() as tmp:
        clip, videos = Path(tmp) / "clip.mp4", {}
        make_clip(clip, seed=1, seconds=60.0, preset="ultrafast", width=320, height=240)
        for name, seconds in (("short", short_s), ("long", long_s)):
            videos[name] = Path(tmp) / f"{name}.mp4"
            repeat_video(clip, videos[name], max(1, round(seconds / 60.0)))
        sizes = {name: round(path.stat().st_size / 2**20, 1) for name, path in videos.items()}
        seconds = {name: best_of(repeat, lambda p=path: sum(w.error is None for w in decode_windows(p, spec, plan)))
                   for name, path in videos.items()}
    return {
        "long_vs_short": ratio(seconds["long"], seconds["short"]),
        "seconds": seconds,
        "videos": {"short_s": short_s, "long_s": long_s, "mbytes": sizes, "max_windows": max_windows,
                   "kind": "320x240 30 fps H.264 (x264 ultrafast) + AAC 44.1 kHz stereo, a 60 s clip repeated; "
                           "decode_windows with DecodeSpec(threads=1) from a path"},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", type=float, default=60.0, help="seconds of the short video (default 60)")
    parser.add_argument("--long", type=float, default=600.0, help="seconds of the long video (default 600)")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each timing, best kept (default 2)")
    parser.add_argument("--max-windows", type=int, default=8, help="windows of the sparse plans (default 8)")
    parser.add_argument("--sparse-short", type=float, default=600.0, help="seconds of the short sparse video (default 600)")
    parser.add_argument("--sparse-long", type=float, default=7200.0,
                        help="seconds of the long sparse video (default 7200); 0 skips the sparse comparison")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        short, long = Path(tmp) / "short.mp4", Path(tmp) / "long.mp4"
        made = time.perf_counter()
        make_clip(short, seed=0, seconds=args.short, preset="ultrafast")
        repeat_video(short, long, max(1, round(args.long / args.short)))
        made = time.perf_counter() - made
        short_data, long_data = short.read_bytes(), long.read_bytes()

        all_windows = WindowPlan()
        count = windows(short_data, all_windows)
        raw_short = best_of(args.repeat, lambda: raw_pass(short_data))
        one_pass = best_of(args.repeat, lambda: windows(short_data, all_windows))
        starts = [w.start_s for w in decode_windows(short_data, SPEC, all_windows)]
        per_window = best_of(1, lambda: [decode_clip(short_data, SPEC, s) for s in starts])

        sparse = WindowPlan(max_windows=args.max_windows)
        raw_long = best_of(1, lambda: raw_pass(long_data))
        sparse_pass = best_of(args.repeat, lambda: windows(long_data, sparse))

        rss_short, _ = peak_rss_mb(short)
        rss_long, long_windows = peak_rss_mb(long)

    with av.open(io.BytesIO(long_data)) as container:
        long_seconds = float(container.duration / av.time_base)
    by_length = sparse_by_length(args.sparse_short, args.sparse_long, args.max_windows, args.repeat) \
        if args.sparse_long else None
    print(json.dumps({
        "targets": TARGETS,
        "all_windows_vs_raw": ratio(one_pass, raw_short),
        "decode_clip_per_window_vs_raw": ratio(per_window, raw_short),
        "max_windows_8_vs_raw": ratio(sparse_pass, raw_long),
        "peak_rss_long_vs_short": round(rss_long / rss_short, 3),
        "sparse_long_vs_short_cpu": by_length and by_length["long_vs_short"]["cpu_s"],
        "sparse_by_length": by_length,
        "seconds": {
            "raw_pass_short": raw_short, "all_windows_short": one_pass, "decode_clip_per_window_short": per_window,
            "raw_pass_long": raw_long, "max_windows_8_long": sparse_pass,
        },
        "peak_rss_mb": {"short": rss_short, "long": rss_long},
        "videos": {
            "short_s": args.short, "long_s": round(long_seconds, 1), "windows_short": count,
            "windows_long": long_windows, "short_mbytes": round(len(short_data) / 2**20, 1),
            "long_mbytes": round(len(long_data) / 2**20, 1), "made_in_s": round(made, 1),
            "kind": "1280x720 30 fps H.264 (x264 ultrafast, crf 23) + AAC 44.1 kHz stereo; "
                    "the long one is the short one repeated",
        },
        "spec": "decode_windows with DecodeSpec(): 5 s windows, 8 frames of 224x224, 16 kHz mono; input as bytes "
                "(the memory children read a path, so the input's own size is not counted)",
        "cpu_count": os.cpu_count(),
        "repeat": args.repeat,
    }))


if __name__ == "__main__":
    main()
