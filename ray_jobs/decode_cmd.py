"""Decode one video file exactly as the pipelines do, and print what came out as JSON.

The quickest way to see why a clip fails in a job, or what the model will be given: the same
decoder, the same limits, one file. Prints one JSON object (frames_shape, frame_times in seconds,
audio_len, ...) and exits 0; bad input prints `error: <reason>: <detail>` and exits 2.
"""

from __future__ import annotations

import argparse
import json
import os

from groupemotion_core.errors import GroupEmotionError
from groupemotion_core.media import DecodeSpec, decode_clip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    default = DecodeSpec()
    parser.add_argument("file", metavar="FILE", help="a local video file or an s3:// object")
    parser.add_argument("--frames", type=_at_least(int, 1), default=default.num_frames,
                        help="frames to sample, evenly spaced in time (default %(default)s)")
    parser.add_argument("--size", type=_at_least(int, 1), default=default.frame_size,
                        help="side of the square, letterboxed output frames (default %(default)s)")
    parser.add_argument("--seconds", type=_at_least(float, 1e-3), default=default.clip_seconds,
                        help="length of the clip window in seconds (default %(default)s)")
    parser.add_argument("--start", type=_at_least(float, 0.0), default=0.0,
                        help="start of the clip window in seconds (default %(default)s)")


def _at_least(kind, low):
    def parse(text: str):
        value = kind(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {text}")
        return value

    return parse


def run(args: argparse.Namespace) -> int:
    spec = DecodeSpec(num_frames=args.frames, frame_size=args.size, clip_seconds=args.seconds)
    source = _source(args.file, spec)
    clip = decode_clip(source, spec, start=args.start)
    summary = {
        "file": args.file,
        "frames_shape": list(clip.frames.shape),
        "frame_times": clip.frame_times,
        "frame_mean_rgb": [round(float(v), 1) for v in clip.frames.reshape(-1, 3).mean(axis=0)],
        "audio_len": clip.audio_len,
        "audio_seconds": round(clip.audio_len / spec.sample_rate, 3),
        "sample_rate": spec.sample_rate,
    }
    print(json.dumps(summary))
    return 0


def _source(file: str, spec: DecodeSpec):
    """A local path as it is; an s3:// object's bytes, read through the project's storage (its
    retries and errors) and refused unread when over the decoder's size limit."""
    if file.startswith("s3://"):
        from ray_jobs import storage

        return storage.read_bytes(file, max_bytes=spec.max_input_bytes)
    if not os.path.isfile(file):
        raise GroupEmotionError("not_found", f"{file} is not a file")
    return file


if __name__ == "__main__":
    from ray_jobs.cli import entrypoint

    entrypoint("decode")
