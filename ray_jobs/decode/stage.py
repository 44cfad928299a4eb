"""The decode stage: SourceRow batches -> ClipRow batches, one row per window, hostile input contained.

Each actor of the pool owns one supervised child process (`SupervisedDecoder`) that runs the core
decoder, `groupemotion_core.media.decode.decode_windows`, one video at a time. FFmpeg can segfault or
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
(the `error` column of `ray_jobs.inputs.sources`), `bad_label`, and `crashed`/`timeout`/`decoder_error`
from the supervisor (the last for an unexpected exception inside the decoder, whose traceback
goes to the child's stderr). A shard-end marker (`SourceRow.SHARD_END`) passes through as a
ClipRow with `window` = ClipRow.SHARD_END.

The child is a fresh interpreter running `ray_jobs.decode.child` (never a `fork`: a Ray worker is
multi-threaded; nor a multiprocessing spawn, which would import Ray in the child too) and talks
over two pipes with a fixed framing, no pickle either way: the video bytes go in; a JSON header
per window, then its raw frame and audio buffers, come out, their sizes checked against the
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
import os
import subprocess
import sys
import time
from multiprocessing.connection import Connection
from typing import Iterator

import numpy as np
import pyarrow as pa
import ray.data
from ray.data.extensions import ArrowTensorArray

from groupemotion_core.errors import GroupEmotionError
from groupemotion_core.media.decode import DecodedClip, DecodeSpec, Window
from groupemotion_core.schema import UNKNOWN_LABEL, ClipRow, SourceRow, label_index
from groupemotion_core.media.spec import WindowPlan

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
    the reader's block size (`ray_jobs.inputs.sources`) spreads the videos over the pool.
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
                error = None if w.error is None else str(w.error)
                yield key, w.index, w.count, w.start_s, w.end_s, w.clip or self._blank(), index, error
        except GroupEmotionError as e:
            yield self._failed(key, index, str(e))

    def _failed(self, key: str, label: int, error: str) -> tuple:
        return key, ClipRow.WHOLE_VIDEO, 0, 0.0, 0.0, self._blank(), label, error

    def _blank(self) -> DecodedClip:
        s = self._spec
        return DecodedClip(
            frames=np.zeros(s.frame_shape, np.uint8),
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
        self._process = self._inbox = self._outbox = None
        self._exitcode = None  # of the last child stopped, for the `crashed` detail
        self._start()

    def windows(self, key: str, video: bytes) -> Iterator[Window]:
        if self._process is not None and self._process.poll() is not None:  # died between two videos
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
            self._outbox.send_bytes(key.encode("utf-8"))
            self._outbox.send_bytes(video)
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
            # The child sends buffers of exactly these shapes (`ray_jobs.decode.child`).
            frames = np.frombuffer(self._receive(None, math.prod(s.frame_shape)), np.uint8)
            audio = np.frombuffer(self._receive(None, 4 * s.audio_samples), np.float32)
            clip = DecodedClip(
                frames=frames.reshape(s.frame_shape),
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
        if not self._inbox.poll(wait):
            raise _Timeout
        return self._inbox.recv_bytes(max_bytes)

    def _start(self) -> None:
        to_child, from_parent = os.pipe()
        to_parent, from_child = os.pipe()
        config = {"spec": dataclasses.asdict(self._spec), "plan": dataclasses.asdict(self._plan),
                  "faults": self._faults, "parent": os.getpid()}
        self._process = subprocess.Popen(
            [sys.executable, "-m", "ray_jobs.decode.child", str(to_child), str(from_child), json.dumps(config)],
            pass_fds=(to_child, from_child), stdin=subprocess.DEVNULL,
        )
        os.close(to_child)
        os.close(from_child)
        self._inbox = Connection(to_parent, writable=False)
        self._outbox = Connection(from_parent, readable=False)
        try:
            self._receive(time.monotonic() + _STARTUP_TIMEOUT_S, 16)  # "ready"
        except (_Timeout, EOFError, OSError):
            self._stop()
            raise RuntimeError("the decoder process did not start") from None

    def _stop(self) -> None:
        self._process.kill()
        self._exitcode = self._process.wait(10)
        self._inbox.close()
        self._outbox.close()
        self._process = self._inbox = self._outbox = None


class _Timeout(Exception):
    """No reply in time (not TimeoutError: that is an OSError, which here means a broken pipe)."""
