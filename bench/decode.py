"""Clips per second of decode_clip against other ways to decode the same clips.

Usage: python bench/decode.py [--clips N] [--repeat N]

Prints one JSON object: `clips_per_s` maps a decoder's name to clips per second (8 frames and the
audio of one 5 s 720p H.264 + AAC clip, given as bytes in memory as the pipelines give it), and
`cpu_s_per_clip` the CPU seconds each spent per clip, summed over its threads.
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
from groupemotion_core.media.decode import DecodeSpec, decode_clip  # noqa: E402

WIDTH, HEIGHT, FPS, SECONDS, AUDIO_RATE = 1280, 720, 30, 5.0, 44100
SPEC = DecodeSpec()


def make_clip(path: Path, seed: int, seconds: float = SECONDS, preset: str = "veryfast") -> None:
    """A web-like 720p clip: a drifting gradient with coloured blobs moving across it (coming back
    in at the far edge), and a tone, the audio interleaved with the video as a web video has it."""
    rng = np.random.default_rng(seed)
    frames = int(seconds * FPS)
    base = rng.uniform(40, 200, size=3).astype(np.float32)
    blobs = [(rng.uniform(0, WIDTH), rng.uniform(0, HEIGHT), rng.uniform(-12, 12), rng.uniform(-6, 6),
              rng.uniform(40, 120), rng.uniform(0, 255, size=3)) for _ in range(6)]
    # The gradient drifts 8 pixels a frame: every frame is a window on one wide strip.
    drift = np.outer(np.cos(np.arange(HEIGHT, dtype=np.float32) / 61.0),
                     np.sin(np.arange(WIDTH + 8 * frames, dtype=np.float32) / 97.0))
    strip = np.clip(base + 30 * drift[..., None], 0, 255).astype(np.uint8)
    t = np.arange(int(seconds * AUDIO_RATE)) / AUDIO_RATE
    wave = (0.3 * np.sin(2 * np.pi * rng.uniform(200, 800) * t)).astype(np.float32)
    with av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=FPS, options={"preset": preset, "crf": "23"})
        video.width, video.height, video.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        audio = out.add_stream("aac", rate=AUDIO_RATE, layout="stereo")
        out.start_encoding()
        chunk, sent = audio.codec_context.frame_size, 0
        for i in range(frames):
            img = strip[:, 8 * i : 8 * i + WIDTH].copy()
            for bx, by, vx, vy, r, colour in blobs:
                cx, cy = (bx + vx * i) % WIDTH, (by + vy * i) % HEIGHT
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=4, help="clips to generate (default 4)")
    parser.add_argument("--repeat", type=int, default=3, help="passes over the clips (default 3)")
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
    }, indent=None))


if __name__ == "__main__":
    main()
