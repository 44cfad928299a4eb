"""Decode one video file exactly as the pipelines do, and print what came out as JSON.

The quickest way to see why a video fails in a job, or what the model will be given: the same
decoder, the same limits, the same windows, one file. Prints one JSON object (the video's fields
and one summary per window: start_s, end_s, frame_times in seconds, audio_len, error) and exits
0, also when some windows could not be decoded; a video that cannot be decoded at all prints
`error: <reason>: <detail>` and exits 2.
"""

from __future__ import annotations

import argparse
import json
import os

from groupemotion_core.errors import GroupEmotionError
from groupemotion_core.media.decode import DecodeSpec, Window, decode_clip, decode_windows
from groupemotion_core.media.spec import WindowPlan
from groupemotion_core.videos import covered_seconds
from ray_jobs.commands.args import add_window_arguments, non_negative_float, positive_float, positive_int, window_plan


def add_arguments(parser: argparse.ArgumentParser) -> None:
    default = DecodeSpec()
    parser.add_argument("file", metavar="FILE", help="a local video file or an s3:// object")
    parser.add_argument("--frames", type=positive_int, default=default.num_frames,
                        help="frames to sample per window, evenly spaced in time (default %(default)s)")
    parser.add_argument("--size", type=positive_int, default=default.frame_size,
                        help="side of the square, letterboxed output frames (default %(default)s)")
    parser.add_argument("--seconds", type=positive_float, default=default.clip_seconds,
                        help="length of a window in seconds (default %(default)s)")
    add_window_arguments(parser)
    parser.add_argument("--start", type=non_negative_float, default=None, metavar="S",
                        help="decode only the one window that starts at S seconds")


def run(args: argparse.Namespace) -> int:
    spec = DecodeSpec(num_frames=args.frames, frame_size=args.size, clip_seconds=args.seconds)
    source = _source(args.file, spec)
    plan = window_plan(args)
    if args.start is None:
        windows = list(decode_windows(source, spec, plan))
    elif plan != WindowPlan():
        raise GroupEmotionError("bad_arguments", "--start decodes one window: leave out --windows, --stride, --max-windows")
    else:
        clip = decode_clip(source, spec, start=args.start)
        windows = [Window(0, 1, args.start, args.start + clip.seconds, clip)]
    summary = {
        "file": args.file,
        "frames_shape": list(spec.frame_shape),
        "sample_rate": spec.sample_rate,
        "clip_seconds": spec.clip_seconds,
        "seconds": round(covered_seconds((w.start_s, w.end_s) for w in windows if w.error is None), 3),
        "errors": sum(w.error is not None for w in windows),
        "windows": [_window_summary(w, spec) for w in windows],
    }
    print(json.dumps(summary))
    return 0


def _source(file: str, spec: DecodeSpec):
    """A local path as it is; an s3:// object's bytes, read through the project's storage (its
    retries and errors) and refused unread when over the decoder's size limit."""
    if file.startswith("s3://"):
        from ray_jobs.inputs import storage

        return storage.read_bytes(file, max_bytes=spec.max_input_bytes)
    if not os.path.isfile(file):
        raise GroupEmotionError("not_found", f"{file} is not a file")
    return file


def _window_summary(window: Window, spec: DecodeSpec) -> dict:
    summary = {"window": window.index, "start_s": round(window.start_s, 3), "end_s": round(window.end_s, 3)}
    if window.error is not None:
        return {**summary, "error": str(window.error)}
    clip = window.clip
    return {
        **summary,
        "frame_times": clip.frame_times,
        "frame_mean_rgb": [round(float(v), 1) for v in clip.frames.reshape(-1, 3).mean(axis=0)],
        "audio_len": clip.audio_len,
        "audio_seconds": round(clip.audio_len / spec.sample_rate, 3),
        "error": None,
    }


if __name__ == "__main__":
    from ray_jobs.cli import entrypoint

    entrypoint("decode")
