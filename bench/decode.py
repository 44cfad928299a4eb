"""Clips per second of decode_clip against other ways to decode the same clips, and CPU seconds
per window of decode_windows against a decode of every frame and against the peers.

Usage: python bench/decode.py [--clips N] [--repeat N] [--window-seconds S]

Prints one JSON object: `clips_per_s` maps a decoder's name to clips per second (8 frames and the
audio of one 5 s 720p H.264 + AAC clip, given as bytes in memory as the pipelines give it), and
`cpu_s_per_clip` the CPU seconds each spent per clip, summed over its threads.

`per_window` does it for the windows of whole web-like videos (`--window-seconds` long, 5 s
windows, 8 frames each), one thread each: x264 `-preset medium` (3 B-frames in a pyramid, as web
encoders write them) at 720p and 1080p, and at 720p with no B-frames (every frame a reference,
nothing to drop). `groupemotion` is decode_windows; `full_decode` the same with no frame dropped;
`torchcodec` (seek_mode "exact", get_frames_played_at) and `decord` (get_batch) fetch the frames
decode_windows shows, pictures only. `ratios` set ours against the full decode and against the
best peer, beside TARGETS. torchcodec loads FFmpeg's shared libraries: where the system has
none, point LD_LIBRARY_PATH at PyAV's (see `skipped`).
The clips are generated here rather than by groupemotion_core.media.synthetic: its per-pixel noise
makes H.264 at 720p some 30x the bitrate of a web video, so the benchmark would time the entropy
decoder instead of what a real clip costs. These have smooth moving shapes, x264 `veryfast`
with B-frames, 30 fps, and 44.1 kHz stereo AAC, so the audio has to be resampled as usual.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import groupemotion_core.media.decode as decode  # noqa: E402
from groupemotion_core.media.decode import DecodeSpec, decode_clip, decode_windows  # noqa: E402

WIDTH, HEIGHT, FPS, SECONDS, AUDIO_RATE = 1280, 720, 30, 5.0, 44100
SPEC = DecodeSpec()
ONE_THREAD = DecodeSpec(threads=1)
# Per-window kinds: name -> (width, height, x264 B-frames: None for the preset's own).
KINDS = {"bframes_720p": (1280, 720, None), "bframes_1080p": (1920, 1080, None), "no_bframes_720p": (1280, 720, 0)}
TARGETS = {"bframes_vs_full_decode": 0.7, "bframes_vs_best_peer": 0.75, "no_bframes_vs_full_decode": 1.03}


def make_clip(path: Path, seed: int, seconds: float = SECONDS, preset: str = "veryfast",
              width: int = WIDTH, height: int = HEIGHT, bframes: int | None = None) -> None:
    """A web-like clip (720p unless told): a drifting gradient with coloured blobs moving across
    it (coming back in at the far edge), and a tone, the audio interleaved with the video as a web
    video has it. x264 `preset` decides the B-frames unless `bframes` does."""
    rng = np.random.default_rng(seed)
    frames = int(seconds * FPS)
    base = rng.uniform(40, 200, size=3).astype(np.float32)
    blobs = [(rng.uniform(0, width), rng.uniform(0, height), rng.uniform(-12, 12), rng.uniform(-6, 6),
              rng.uniform(40, 120), rng.uniform(0, 255, size=3)) for _ in range(6)]
    # The gradient drifts 8 pixels a frame: every frame is a window on one wide strip.
    drift = np.outer(np.cos(np.arange(height, dtype=np.float32) / 61.0),
                     np.sin(np.arange(width + 8 * frames, dtype=np.float32) / 97.0))
    strip = np.clip(base + 30 * drift[..., None], 0, 255).astype(np.uint8)
    t = np.arange(int(seconds * AUDIO_RATE)) / AUDIO_RATE
    wave = (0.3 * np.sin(2 * np.pi * rng.uniform(200, 800) * t)).astype(np.float32)
    with av.open(str(path), "w") as out:
        options = {"preset": preset, "crf": "23"}
        if bframes is not None:
            options["x264-params"] = f"bframes={bframes}"
        video = out.add_stream("libx264", rate=FPS, options=options)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        audio = out.add_stream("aac", rate=AUDIO_RATE, layout="stereo")
        out.start_encoding()
        chunk, sent = audio.codec_context.frame_size, 0
        for i in range(frames):
            img = strip[:, 8 * i : 8 * i + width].copy()
            for bx, by, vx, vy, r, colour in blobs:
                cx, cy = (bx + vx * i) % width, (by + vy * i) % height
                img[max(0, int(cy - r)) : int(cy + r), max(0, int(cx - r)) : int(cx + r)] = colour
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            out.mux(video.encode(frame))
            while sent < min(len(wave), (i + 1) * AUDIO_RATE / FPS):  # the audio of this frame's time
                piece = np.zeros((2, chunk), np.float32)
                piece[:, : len(wave[sent : sent + chunk])] = wave[sent : sent + chunk]
                frame = av.AudioFrame.from_ndarray(piece, format="fltp", layout="stereo")
                frame.sample_rate, frame.pts, frame.time_base = AUDIO_RATE, sent, Fraction(1, AUDIO_RATE)
                out.mux(audio.encode(frame))
                sent += chunk
        out.mux(video.encode())
        out.mux(audio.encode())


def naive_pyav(data: bytes):
    """What a first attempt looks like: every frame to an array, pick 8, then the audio."""
    with av.open(io.BytesIO(data)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        picked = [frames[i] for i in np.linspace(0, len(frames) - 1, SPEC.num_frames).round().astype(int)]
    with av.open(io.BytesIO(data)) as container:
        resampler = av.AudioResampler(format="flt", layout="mono", rate=SPEC.sample_rate)
        audio = [r.to_ndarray() for f in container.decode(audio=0) for r in resampler.resample(f)]
    return picked, np.concatenate(audio, axis=1)


def decoders() -> tuple[dict, dict]:
    """-> ({name: decode(bytes)}, {name: why it is absent})."""
    found = {
        "groupemotion": lambda data: decode_clip(data, SPEC),
        "groupemotion_1thread": lambda data: decode_clip(data, DecodeSpec(threads=1)),
        "naive_pyav": naive_pyav,
    }
    missing = {}
    try:
        from torchcodec.decoders import VideoDecoder

        def torchcodec_frames(data: bytes):
            decoder = VideoDecoder(data)
            n = decoder.metadata.num_frames
            return decoder.get_frames_at(np.linspace(0, n - 1, SPEC.num_frames).round().astype(int).tolist())

        found["torchcodec"] = torchcodec_frames
    except ImportError as e:
        missing["torchcodec"] = f"not importable: {e}"
    try:
        import decord

        def decord_frames(data: bytes):
            reader = decord.VideoReader(io.BytesIO(data), width=SPEC.frame_size, height=SPEC.frame_size)
            return reader.get_batch(np.linspace(0, len(reader) - 1, SPEC.num_frames).round().astype(int).tolist())

        found["decord"] = decord_frames
    except ImportError as e:
        missing["decord"] = f"not importable: {e}"
    return found, missing


def windows_of(data: bytes) -> list:
    return list(decode_windows(data, ONE_THREAD))


def full_decode(data: bytes) -> list:
    """decode_windows with every frame decoded: FFmpeg is told to drop none."""
    dropping, decode._DROPPING_CODECS = decode._DROPPING_CODECS, frozenset()
    try:
        return windows_of(data)
    finally:
        decode._DROPPING_CODECS = dropping


def window_peers(shown: list[float]) -> tuple[dict, dict]:
    """-> ({name: fetch(bytes)} of the peers that fetch the frames at times `shown`, {name: why absent})."""
    found, missing = {}, {}
    try:
        from torchcodec.decoders import VideoDecoder

        found["torchcodec"] = lambda data: VideoDecoder(data, seek_mode="exact", num_ffmpeg_threads=1) \
            .get_frames_played_at(shown)
    except (ImportError, RuntimeError, OSError) as e:
        missing["torchcodec"] = f"not loadable: {str(e).splitlines()[0][:200]}"
    try:
        import decord

        indices = [int(round(t * FPS)) for t in shown]  # constant frame rate: time to frame number
        found["decord"] = lambda data: decord.VideoReader(io.BytesIO(data), num_threads=1).get_batch(indices)
    except ImportError as e:
        missing["decord"] = f"not importable: {e}"
    return found, missing


def per_window(kind: str, clips: int, seconds: float, repeat: int) -> dict:
    """CPU seconds per window of each decoder on `clips` generated videos of one kind."""
    width, height, bframes = KINDS[kind]
    with tempfile.TemporaryDirectory() as tmp:
        videos = []
        for i in range(clips):
            path = Path(tmp) / f"{kind}{i}.mp4"
            make_clip(path, seed=10 + i, seconds=seconds, preset="medium", width=width, height=height, bframes=bframes)
            videos.append(path.read_bytes())
    decoders = {"groupemotion": windows_of, "full_decode": full_decode}
    counts, cpu, missing = {}, {}, {}
    for index, data in enumerate(videos):
        windows = windows_of(data)
        assert all(np.array_equal(w.clip.frames, f.clip.frames) for w, f in zip(windows, full_decode(data)))
        shown = [t for w in windows for t in w.clip.frame_times]
        peers, missing = window_peers(shown)
        fetchers = {**decoders, **peers}
        for fetch in fetchers.values():
            fetch(data)  # warm-up
        for _ in range(repeat):  # in turns, so that a busier spell of the machine falls on all alike
            for name, fetch in fetchers.items():
                busy = time.process_time()
                fetch(data)
                cpu[name] = cpu.get(name, 0.0) + time.process_time() - busy
                counts[name] = counts.get(name, 0) + len(windows)
    per = {name: round(cpu[name] / counts[name], 4) for name in cpu}
    peer_times = [per[name] for name in per if name not in decoders]
    return {
        "cpu_s_per_window": per,
        "vs_full_decode": round(per["groupemotion"] / per["full_decode"], 3),
        "vs_best_peer": round(per["groupemotion"] / min(peer_times), 3) if peer_times else None,
        "video": f"{width}x{height} {FPS} fps {seconds:g} s x264 medium crf 23"
                 + ("" if bframes is None else f" bframes={bframes}") + " + AAC 44.1 kHz stereo",
        "mean_video_kbytes": round(sum(map(len, videos)) / len(videos) / 1024),
        "windows_per_video": len(windows_of(videos[0])),
        "skipped": missing,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=4, help="clips to generate (default 4)")
    parser.add_argument("--repeat", type=int, default=3, help="passes over the clips (default 3)")
    parser.add_argument("--window-seconds", type=float, default=10.0,
                        help="seconds of each per-window video, 0 to skip that part (default 10)")
    parser.add_argument("--window-clips", type=int, default=2, help="per-window videos of each kind (default 2)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        paths = [Path(tmp) / f"clip{i}.mp4" for i in range(args.clips)]
        for i, path in enumerate(paths):
            make_clip(path, seed=i)
        clips = [p.read_bytes() for p in paths]

    found, missing = decoders()
    rates, cpu = {}, {}
    for name, decode in found.items():
        decode(clips[0])  # warm-up: codec tables, first allocation
        wall, busy = time.perf_counter(), time.process_time()
        for _ in range(args.repeat):
            for data in clips:
                decode(data)
        done = args.repeat * len(clips)
        rates[name] = round(done / (time.perf_counter() - wall), 2)
        cpu[name] = round((time.process_time() - busy) / done, 3)

    print(json.dumps({
        "clips_per_s": rates,
        "cpu_s_per_clip": cpu,  # all threads of this process: steadier than wall time on a shared machine
        "clip": f"{WIDTH}x{HEIGHT} {FPS} fps {SECONDS:g} s H.264 (x264 veryfast, crf 23) + AAC 44.1 kHz stereo",
        "mean_clip_kbytes": round(sum(map(len, clips)) / len(clips) / 1024),
        "clips": args.clips,
        "repeat": args.repeat,
        "cpu_count": os.cpu_count(),
        "notes": [
            "groupemotion: decode_clip, 8 letterboxed 224x224 frames + 16 kHz mono audio, decoder threads auto",
            "groupemotion_1thread: the same with DecodeSpec(threads=1), as one Ray CPU task would run it",
            "naive_pyav: every frame converted to full-size RGB, 8 picked by index (not resized), "
            "then a second pass decoding and resampling the audio",
            "torchcodec and decord (when importable) decode the 8 frames only, no audio",
            "the clips are generated by this script with smooth content and a web-like bitrate",
        ],
        "skipped": missing,
        **(per_window_report(args) if args.window_seconds > 0 else {}),
    }, indent=None))


def per_window_report(args) -> dict:
    kinds = {kind: per_window(kind, args.window_clips, args.window_seconds, args.repeat) for kind in KINDS}
    return {
        "per_window": kinds,
        "targets": TARGETS,
        "ratios": {
            "bframes_vs_full_decode": {k: kinds[k]["vs_full_decode"] for k in kinds if k.startswith("bframes")},
            "bframes_vs_best_peer": {k: kinds[k]["vs_best_peer"] for k in kinds if k.startswith("bframes")},
            "no_bframes_vs_full_decode": {k: kinds[k]["vs_full_decode"] for k in kinds if k.startswith("no_bframes")},
        },
    }


if __name__ == "__main__":
    main()
