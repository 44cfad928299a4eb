"""The decode stage: SourceRow batches -> ClipRow batches, one row per window, hostile input contained.

Each actor of the pool owns one supervised child process (`SupervisedDecoder`) that runs the core
decoder, `groupemotion_core.media.decode_windows`, one video at a time. FFmpeg can segfault or
loop forever on a hostile file; in a child that costs one video, not the actor. Were the decoder
to run in the actor itself, a segfault would kill the actor and Ray would retry the whole batch on
a new one, crashing again on the same video until the job failed, and a hang would stall the job
for good. The supervisor waits at most `timeout_s` for each window, not for a whole video (a
two-hour video takes long, but never long without a window); if the child dies the video's
missing windows become error rows with reason `crashed`, if it goes quiet the child is killed and
they get `timeout`; the child is started again and the batch goes on.

Streaming: the child sends each window back as soon as it is decoded and the pipe holds about one
window, so the child runs at most one window ahead; the batch function is a generator that hands
Ray Data its output every few windows. A long video never sits in memory whole.

Errors are values: every input row gives ClipRows, one per planned window. A window that fails has
`error` set to `<reason>: <detail>`; a video that fails as a whole (its reader's error, no video
bytes, a label that is not a class, or a decoder that gave up before its first window) gives one
row with `window` = ClipRow.WHOLE_VIDEO and `windows` = 0. When the decoder dies in the middle of
a video, the windows it did not reach are error rows whose start and end are NaN: their times are
not known. Error rows have zero frames and audio of the usual shapes, audio_len 0, and the label
index when the label was valid. Reasons come from the decoder (DecodeError's), from the reader
(the `error` column of `ray_jobs.sources`), `bad_label`, and `crashed`/`timeout`/`decoder_error`
from the supervisor (the last for an unexpected exception inside the decoder, whose traceback
goes to the child's stderr). A shard-end marker (`SourceRow.SHARD_END`) passes through as a
ClipRow with `window` = ClipRow.SHARD_END.

The child is started with the `spawn` method (never `fork`: a Ray worker is multi-threaded) and
talks over a pipe with a fixed framing, no pickle on the way back: the video bytes go in; a JSON
header per window, then its raw frame and audio buffers, come out, their sizes checked against the
DecodeSpec.

Fault injection, for tests and drills: `GROUPEMOTION_FAULT_INJECT="crash:<substring>,hang@2:<substring>"`
makes the child `os.abort()` (crash) or sleep forever (hang) on every video whose key contains the
substring: before its first window, or with `@N` just before sending window N. Ray workers do not
see variables set after Ray started, so the value is read on the driver by `decode_dataset` (or
given as its `fault_inject` argument) and handed to each actor.
"""

from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing
import os
import threading
import time
import traceback
from typing import Iterator

import numpy as np
import pyarrow as pa
import ray.data
from ray.data.extensions import ArrowTensorArray

from groupemotion_core.errors import GroupEmotionError
from groupemotion_core.media import DecodedClip, DecodeSpec, Window
from groupemotion_core.schema import UNKNOWN_LABEL, ClipRow, SourceRow, label_index
from groupemotion_core.spec import WindowPlan

FAULT_INJECT_ENV = "GROUPEMOTION_FAULT_INJECT"
_FAULT_MODES = ("crash", "hang")
_STARTUP_TIMEOUT_S = 300.0  # importing PyAV in a fresh interpreter on a busy node
# The batch function hands Ray Data its rows every this many windows.
_WINDOWS_PER_OUTPUT = 8


def decode_dataset(
    ds: ray.data.Dataset,
    spec: DecodeSpec,
    plan: WindowPlan,
    *,
    num_cpus: float = 1,
    actors: int | None = None,
    timeout_s: float = 60.0,
    fault_inject: str | None = None,
) -> ray.data.Dataset:
    """SourceRows -> ClipRows, one per window of `plan`, decoded on a pool of CPU actors.

    `actors` fixes the pool's size (all of them start at once, which is what a job on a cluster
    of known size wants); None autoscales from one actor as Ray Data sees fit. Each actor holds
    `num_cpus` CPUs, which its decoder child uses. Each input block is one task for one actor, so
    the reader's block size (`ray_jobs.sources`) spreads the videos over the pool.
    `fault_inject` defaults to the driver's GROUPEMOTION_FAULT_INJECT.
    """
    faults = parse_faults(os.environ.get(FAULT_INJECT_ENV, "") if fault_inject is None else fault_inject)
    # The decoder gets the threads of the CPUs its actor holds: FFmpeg's default (one per core of
    # the node) would oversubscribe a node that runs one decode actor per core.
    spec = dataclasses.replace(spec, threads=max(1, int(num_cpus)))
    if actors is not None:
        compute = ray.data.ActorPoolStrategy(size=actors)
    else:
        compute = ray.data.ActorPoolStrategy(min_size=1, max_size=None)
    return ds.map_batches(
        _DecodeBatch,
        fn_constructor_kwargs={"spec": spec, "plan": plan, "timeout_s": timeout_s, "faults": faults},
        batch_size=None,
        batch_format="numpy",
        compute=compute,
        num_cpus=num_cpus,
    )


Fault = tuple[str, str, "int | None"]  # (mode, key substring, window index or None: before the video)


def parse_faults(value: str) -> tuple[Fault, ...]:
    """`"crash:abc,hang@2:def"` -> (("crash", "abc", None), ("hang", "def", 2)); "" -> ()."""
    faults = []
    for item in filter(None, (part.strip() for part in value.split(","))):
        head, _, needle = item.partition(":")
        mode, at, window = head.partition("@")
        if mode not in _FAULT_MODES or not needle or (at and not window.isdigit()):
            raise GroupEmotionError(
                "bad_fault_inject",
                f"{FAULT_INJECT_ENV} item {item!r}: expected crash[@N]:<key part> or hang[@N]:<key part>",
            )
        faults.append((mode, needle, int(window) if at else None))
    return tuple(faults)


class _DecodeBatch:
    """The map_batches callable: one SupervisedDecoder per actor, ClipRows out as they come."""

    def __init__(self, spec: DecodeSpec, plan: WindowPlan, timeout_s: float, faults: tuple[Fault, ...]):
        self._spec = spec
        self._decoder = SupervisedDecoder(spec, plan, timeout_s=timeout_s, faults=faults)

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[pa.Table]:
        keys = batch[SourceRow.KEY]
        nothing = [None] * len(keys)
        rows = zip(keys, batch[SourceRow.VIDEO], batch[SourceRow.LABEL], batch.get(SourceRow.ERROR, nothing),
                   batch.get(SourceRow.SHARD_END, nothing))
        out: list[tuple] = []
        for key, video, label, reader_error, shard_end in rows:
            for row in self._rows(str(key), video, label, reader_error, shard_end):
                out.append(row)
                if len(out) >= _WINDOWS_PER_OUTPUT:
                    yield _table(out)
                    out = []
        if out:
            yield _table(out)

    def _rows(self, key: str, video, label, reader_error, shard_end) -> Iterator[tuple]:
        """(key, window, windows, start_s, end_s, clip, label index, error) for each window."""
        if _present(shard_end):
            yield key, ClipRow.SHARD_END, int(shard_end), 0.0, 0.0, self._blank(), UNKNOWN_LABEL, None
            return
        try:
            index = label_index(None if label is None else str(label))
        except ValueError as e:
            yield self._failed(key, UNKNOWN_LABEL, f"bad_label: {e}")
            return
        if reader_error is not None:
            yield self._failed(key, index, str(reader_error))
            return
        if video is None:
            yield self._failed(key, index, "empty: the row has no video bytes")
            return
        try:
            for w in self._decoder.windows(key, bytes(video)):
                error = None if w.error is None else f"{w.error.reason}: {w.error.detail}"
                yield key, w.index, w.count, w.start_s, w.end_s, w.clip or self._blank(), index, error
        except GroupEmotionError as e:
            yield self._failed(key, index, f"{e.reason}: {e.detail}")

    def _failed(self, key: str, label: int, error: str) -> tuple:
        return key, ClipRow.WHOLE_VIDEO, 0, 0.0, 0.0, self._blank(), label, error

    def _blank(self) -> DecodedClip:
        s = self._spec
        return DecodedClip(
            frames=np.zeros((s.num_frames, s.frame_size, s.frame_size, 3), np.uint8),
            audio=np.zeros(s.audio_samples, np.float32),
            audio_len=0,
            frame_times=[],
        )

    def __del__(self):
        if hasattr(self, "_decoder"):
            self._decoder.close()


def _present(value) -> bool:
    """A nullable integer cell of a numpy batch: None, or NaN when the column was converted to float."""
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def _table(rows: list[tuple]) -> pa.Table:
    # An Arrow table with explicit types: from a dict of numpy arrays, a batch without errors
    # would get an `error` column of type null instead of string.
    keys, windows, counts, starts, ends, clips, labels, errors = zip(*rows)
    return pa.table({
        ClipRow.KEY: pa.array(keys, pa.string()),
        ClipRow.WINDOW: pa.array(windows, pa.int32()),
        ClipRow.WINDOWS: pa.array(counts, pa.int32()),
        ClipRow.START_S: pa.array(starts, pa.float64()),
        ClipRow.END_S: pa.array(ends, pa.float64()),
        ClipRow.FRAMES: ArrowTensorArray.from_numpy(np.stack([c.frames for c in clips])),
        ClipRow.AUDIO: ArrowTensorArray.from_numpy(np.stack([c.audio for c in clips])),
        ClipRow.AUDIO_LEN: pa.array([c.audio_len for c in clips], pa.int64()),
        ClipRow.LABEL: pa.array(labels, pa.int64()),
        ClipRow.ERROR: pa.array(errors, pa.string()),
    })


class SupervisedDecoder:
    """`decode_windows` in a child process, `timeout_s` at most between two windows, restarted
    after a crash.

    `windows(key, video)` yields the video's `media.Window`s as the child decodes them. It raises
    GroupEmotionError when no window came at all: the decoder's own DecodeError, or reason
    `crashed`, `timeout` or `decoder_error` (see the module docstring). When the child fails
    after some windows, the remaining ones are yielded with that error and NaN times.
    """

    def __init__(self, spec: DecodeSpec, plan: WindowPlan = WindowPlan(), *, timeout_s: float = 60.0,
                 faults: tuple[Fault, ...] = ()):
        self._spec = spec
        self._plan = plan
        self._timeout_s = timeout_s
        self._faults = faults
        self._ctx = multiprocessing.get_context("spawn")
        self._process = None
        self._conn = None
        self._exitcode = None  # of the last child stopped, for the `crashed` detail
        self._start()

    def windows(self, key: str, video: bytes) -> Iterator[Window]:
        if self._process is not None and not self._process.is_alive():  # died between two videos
            self._stop()
        if self._process is None:
            self._start()
        received, count, finished = 0, None, False
        try:
            failure = self._send(key, video)
            while failure is None:
                window = None
                try:
                    header = json.loads(self._receive(time.monotonic() + self._timeout_s, 1 << 16))
                    if header["kind"] == "window":
                        window = self._window(header)
                except _Timeout:
                    self._stop()
                    failure = GroupEmotionError("timeout", f"no window decoded in {self._timeout_s:g} s")
                except (EOFError, OSError):
                    failure = self._crashed()
                else:
                    if header["kind"] == "end":
                        finished = True
                        return
                    if header["kind"] == "error":
                        failure = GroupEmotionError(header["reason"], header["detail"])
                if window is not None:
                    received, count = window.index + 1, window.count
                    yield window
            finished = True
            if count is None:
                raise failure
            for index in range(received, count):
                yield Window(index, count, math.nan, math.nan, None, failure)
        finally:
            if not finished and self._process is not None:  # abandoned mid-video: the pipe is mid-message
                self._stop()

    def close(self) -> None:
        if self._process is not None:
            self._stop()

    def _send(self, key: str, video: bytes) -> GroupEmotionError | None:
        try:
            self._conn.send_bytes(key.encode("utf-8"))
            self._conn.send_bytes(video)
        except OSError:
            return self._crashed()
        return None

    def _crashed(self) -> GroupEmotionError:
        """The pipe broke: the child is gone."""
        self._stop()
        return GroupEmotionError("crashed", f"the decoder process died (exit code {self._exitcode})")

    def _window(self, header: dict) -> Window:
        s = self._spec
        error = None
        clip = None
        if header["ok"]:
            frames = np.frombuffer(self._receive(None, _frame_bytes(s)), np.uint8)
            audio = np.frombuffer(self._receive(None, _audio_bytes(s)), np.float32)
            clip = DecodedClip(
                frames=frames.reshape(s.num_frames, s.frame_size, s.frame_size, 3),
                audio=audio,
                audio_len=int(header["audio_len"]),
                frame_times=list(header["frame_times"]),
                seconds=float(header["end_s"]) - float(header["start_s"]),
            )
        else:
            error = GroupEmotionError(header["reason"], header["detail"])
        return Window(int(header["index"]), int(header["count"]), float(header["start_s"]),
                      float(header["end_s"]), clip, error)

    def _receive(self, deadline: float | None, max_bytes: int) -> bytes:
        """The next message; _Timeout past `deadline`. Only a window's header waits on the
        decoder; the buffers after it are already on their way."""
        wait = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not self._conn.poll(wait):
            raise _Timeout
        return self._conn.recv_bytes(max_bytes)

    def _start(self) -> None:
        parent, child = self._ctx.Pipe()
        self._process = self._ctx.Process(
            target=_child_main, args=(child, self._spec, self._plan, self._faults, os.getpid()), daemon=True
        )
        self._process.start()
        child.close()
        self._conn = parent
        try:
            self._receive(time.monotonic() + _STARTUP_TIMEOUT_S, 16)  # "ready"
        except (_Timeout, EOFError, OSError):
            self._stop()
            raise RuntimeError("the decoder process did not start") from None

    def _stop(self) -> None:
        self._process.kill()
        self._process.join(10)
        self._exitcode = self._process.exitcode
        self._conn.close()
        self._process = self._conn = None


class _Timeout(Exception):
    """No reply in time (not TimeoutError: that is an OSError, which here means a broken pipe)."""


def _frame_bytes(spec: DecodeSpec) -> int:
    return spec.num_frames * spec.frame_size * spec.frame_size * 3


def _audio_bytes(spec: DecodeSpec) -> int:
    return spec.audio_samples * 4


def _child_main(conn, spec: DecodeSpec, plan: WindowPlan, faults: tuple[Fault, ...], parent_pid: int) -> None:
    """The child's loop: key and video in; per window a JSON header, then frames and audio, out;
    then `end`, or `error` when the decoder stops."""
    from groupemotion_core.media import decode_windows

    _exit_with_parent(parent_pid)
    conn.send_bytes(b"ready")
    while True:
        try:
            key = conn.recv_bytes().decode("utf-8")
            video = conn.recv_bytes()
        except EOFError:
            return
        _inject(key, faults, None)
        try:
            for window in decode_windows(video, spec, plan):
                _inject(key, faults, window.index)
                _send_window(conn, window, spec)
        except GroupEmotionError as e:
            _send_json(conn, {"kind": "error", "reason": e.reason, "detail": e.detail})
            continue
        except Exception as e:  # a decoder bug on this input: report it as a value, keep the trace
            traceback.print_exc()
            _send_json(conn, {"kind": "error", "reason": "decoder_error", "detail": f"{type(e).__name__}: {e}"})
            continue
        _send_json(conn, {"kind": "end"})


def _send_window(conn, window: Window, spec: DecodeSpec) -> None:
    header = {"kind": "window", "index": window.index, "count": window.count,
              "start_s": float(window.start_s), "end_s": float(window.end_s)}
    if window.error is not None:
        _send_json(conn, {**header, "ok": False, "reason": window.error.reason, "detail": window.error.detail})
        return
    clip = window.clip
    frames = np.ascontiguousarray(clip.frames, np.uint8).tobytes()
    audio = np.ascontiguousarray(clip.audio, np.float32).tobytes()
    if (len(frames), len(audio)) != (_frame_bytes(spec), _audio_bytes(spec)):
        detail = f"decode_windows gave frames {clip.frames.shape} and audio {clip.audio.shape}"
        _send_json(conn, {**header, "ok": False, "reason": "decoder_error", "detail": detail})
        return
    _send_json(conn, {**header, "ok": True, "audio_len": int(clip.audio_len),
                      "frame_times": [float(t) for t in clip.frame_times]})
    conn.send_bytes(frames)
    conn.send_bytes(audio)


def _send_json(conn, value: dict) -> None:
    conn.send_bytes(json.dumps(value).encode())


def _inject(key: str, faults: tuple[Fault, ...], window: int | None) -> None:
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
