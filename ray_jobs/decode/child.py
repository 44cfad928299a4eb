"""The decoder child process of the decode stage (`ray_jobs.decode.stage.SupervisedDecoder`).

A fresh interpreter (`python -m ray_jobs.decode.child READ_FD WRITE_FD CONFIG`), not a
multiprocessing spawn: a spawned child would import its parent's main module, which in a Ray
actor is Ray's worker, and so pay for importing Ray before decoding anything. This module imports
only NumPy and the core decoder, so a child starts in a fraction of the time, also when it is
restarted after a crash. CONFIG is JSON (the DecodeSpec, the WindowPlan, the fault injection and
the parent's pid); nothing is unpickled on either side.

The framing, over two pipes: the parent sends a video's key and bytes; the child answers with a
JSON header per window (`kind` window, its index, count, start and end, and either `ok` with the
frame times and audio length, followed by the raw frame and audio buffers, or the window's error),
then `end`, or `error` when the decoder stops on the video.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection

import numpy as np

from groupemotion_core.errors import GroupEmotionError
from groupemotion_core.media.spec import DecodeSpec, WindowPlan


def main(argv: list[str]) -> None:
    from groupemotion_core.media.decode import decode_windows

    inbox, outbox = Connection(int(argv[0]), writable=False), Connection(int(argv[1]), readable=False)
    config = json.loads(argv[2])
    spec, plan = DecodeSpec(**config["spec"]), WindowPlan(**config["plan"])
    faults = [tuple(f) for f in config["faults"]]
    _exit_with_parent(config["parent"])
    outbox.send_bytes(b"ready")
    while True:
        try:
            key = inbox.recv_bytes().decode("utf-8")
            video = inbox.recv_bytes()
        except EOFError:
            return
        _inject(key, faults, None)
        try:
            for window in decode_windows(video, spec, plan):
                _inject(key, faults, window.index)
                _send_window(outbox, window, spec)
        except GroupEmotionError as e:
            _send_json(outbox, {"kind": "error", "reason": e.reason, "detail": e.detail})
            continue
        except Exception as e:  # a decoder bug on this input: report it as a value, keep the trace
            traceback.print_exc()
            _send_json(outbox, {"kind": "error", "reason": "decoder_error", "detail": f"{type(e).__name__}: {e}"})
            continue
        _send_json(outbox, {"kind": "end"})


def _send_window(conn: Connection, window, spec: DecodeSpec) -> None:
    header = {"kind": "window", "index": window.index, "count": window.count,
              "start_s": float(window.start_s), "end_s": float(window.end_s)}
    if window.error is not None:
        _send_json(conn, {**header, "ok": False, "reason": window.error.reason, "detail": window.error.detail})
        return
    clip = window.clip
    if (clip.frames.shape, clip.audio.shape) != (spec.frame_shape, (spec.audio_samples,)):
        detail = f"decode_windows gave frames {clip.frames.shape} and audio {clip.audio.shape}"
        _send_json(conn, {**header, "ok": False, "reason": "decoder_error", "detail": detail})
        return
    frames = np.ascontiguousarray(clip.frames, np.uint8).tobytes()
    audio = np.ascontiguousarray(clip.audio, np.float32).tobytes()
    _send_json(conn, {**header, "ok": True, "audio_len": int(clip.audio_len),
                      "frame_times": [float(t) for t in clip.frame_times]})
    conn.send_bytes(frames)
    conn.send_bytes(audio)


def _send_json(conn: Connection, value: dict) -> None:
    conn.send_bytes(json.dumps(value).encode())


def _inject(key: str, faults: list[tuple], window: int | None) -> None:
    for mode, needle, at in faults:
        if needle in key and at == window:
            if mode == "crash":
                os.abort()
            while True:  # hang
                time.sleep(3600)


def _exit_with_parent(parent_pid: int) -> None:
    """A child stuck in FFmpeg cannot notice its pipe closing; this thread ends it when the actor
    that owns it is gone, so a killed actor leaves no orphan decoding forever."""

    def watch():
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


if __name__ == "__main__":
    main(sys.argv[1:])
