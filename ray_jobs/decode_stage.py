"""The decode stage: SourceRow batches -> ClipRow batches on CPU actors, hostile input contained.

Each actor of the pool owns one supervised child process (`SupervisedDecoder`) that runs the core
decoder, `groupemotion_core.media.decode_clip`, one clip at a time. FFmpeg can segfault or loop
forever on a hostile file; in a child that costs one clip, not the actor. Were the decoder to run
in the actor itself, a segfault would kill the actor and Ray would retry the whole batch on a new
one, crashing again on the same clip until the job failed, and a hang would stall the job for
good. The supervisor gives each clip `timeout_s`; if the child dies the clip becomes an error row
with reason `crashed`, if it runs out of time the child is killed and the clip gets `timeout`; the
child is started again and the batch goes on.

Errors are values: every input row gives exactly one ClipRow. A clip that fails has `error` set
to `<reason>: <detail>`, zero frames and audio of the usual shapes, audio_len 0, and its label
index when the label was valid. Reasons come from the decoder (DecodeError's), from the reader
(the `error` column of `ray_jobs.sources`), `bad_label` for a label that is not a class, and
`crashed`/`timeout`/`decoder_error` from the supervisor (the last for an unexpected exception
inside the decoder, whose traceback goes to the child's stderr).

The child is started with the `spawn` method (never `fork`: a Ray worker is multi-threaded) and
talks over a pipe with a fixed framing, no pickle on the way back: the video bytes go in, the raw
frame and audio buffers come out, and their sizes are checked against the DecodeSpec.

Fault injection, for tests and drills: `GROUPEMOTION_FAULT_INJECT="crash:<substring>,hang:<substring>"`
makes the child `os.abort()` (crash) or sleep forever (hang) on every clip whose key contains the
substring. Ray workers do not see variables set after Ray started, so the value is read on the
driver by `decode_dataset` (or given as its `fault_inject` argument) and handed to each actor.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import threading
import time
import traceback

import numpy as np
import pyarrow as pa
import ray.data
from ray.data.extensions import ArrowTensorArray

from groupemotion_core.errors import GroupEmotionError
from groupemotion_core.media import DecodedClip, DecodeSpec
from groupemotion_core.schema import UNKNOWN_LABEL, ClipRow, SourceRow, label_index

FAULT_INJECT_ENV = "GROUPEMOTION_FAULT_INJECT"
_FAULT_MODES = ("crash", "hang")
_STARTUP_TIMEOUT_S = 300.0  # importing PyAV in a fresh interpreter on a busy node


def decode_dataset(
    ds: ray.data.Dataset,
    spec: DecodeSpec = DecodeSpec(),
    *,
    num_cpus: float = 1,
    concurrency: int | tuple[int, int] | None = None,
    timeout_s: float = 60.0,
    batch_size: int = 8,
    fault_inject: str | None = None,
) -> ray.data.Dataset:
    """SourceRows -> ClipRows, one output row per input row, decoded on a pool of CPU actors.

    `concurrency` is the actor pool size: an int for a fixed pool, (min, max) to autoscale, None
    for Ray Data's default (autoscaling from one). Each actor holds `num_cpus` CPUs, which its
    decoder child uses; a fixed pool holding every CPU of the cluster starves the read tasks and
    the job waits forever, so prefer autoscaling. `fault_inject` defaults to the driver's
    GROUPEMOTION_FAULT_INJECT.
    """
    faults = parse_faults(os.environ.get(FAULT_INJECT_ENV, "") if fault_inject is None else fault_inject)
    # The decoder gets the threads of the CPUs its actor holds: FFmpeg's default (one per core of
    # the node) would oversubscribe a node that runs one decode actor per core.
    spec = dataclasses.replace(spec, threads=max(1, int(num_cpus)))
    if isinstance(concurrency, int):
        compute = ray.data.ActorPoolStrategy(size=concurrency)
    elif concurrency is not None:
        compute = ray.data.ActorPoolStrategy(min_size=concurrency[0], max_size=concurrency[1])
    else:
        compute = ray.data.ActorPoolStrategy(min_size=1, max_size=None)
    return ds.map_batches(
        _DecodeBatch,
        fn_constructor_kwargs={"spec": spec, "timeout_s": timeout_s, "faults": faults},
        batch_size=batch_size,
        batch_format="numpy",
        compute=compute,
        num_cpus=num_cpus,
        udf_modifying_row_count=False,
    )


def parse_faults(value: str) -> tuple[tuple[str, str], ...]:
    """`"crash:abc,hang:def"` -> (("crash", "abc"), ("hang", "def")); "" -> ()."""
    faults = []
    for item in filter(None, (part.strip() for part in value.split(","))):
        mode, _, needle = item.partition(":")
        if mode not in _FAULT_MODES or not needle:
            raise GroupEmotionError(
                "bad_fault_inject", f"{FAULT_INJECT_ENV} item {item!r}: expected crash:<key part> or hang:<key part>"
            )
        faults.append((mode, needle))
    return tuple(faults)


class _DecodeBatch:
    """The map_batches callable: one SupervisedDecoder per actor, one ClipRow per input row."""

    def __init__(self, spec: DecodeSpec, timeout_s: float, faults: tuple[tuple[str, str], ...]):
        self._spec = spec
        self._decoder = SupervisedDecoder(spec, timeout_s=timeout_s, faults=faults)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        keys = batch[SourceRow.KEY]
        reader_errors = batch.get(SourceRow.ERROR, [None] * len(keys))
        rows = [
            self._one(str(key), video, label, error)
            for key, video, label, error in zip(keys, batch[SourceRow.VIDEO], batch[SourceRow.LABEL], reader_errors)
        ]
        # An Arrow table with explicit types: from a dict of numpy arrays, a batch without
        # errors would get an `error` column of type null instead of string.
        return pa.table({
            ClipRow.KEY: pa.array([r[0] for r in rows], pa.string()),
            ClipRow.FRAMES: ArrowTensorArray.from_numpy(np.stack([r[1].frames for r in rows])),
            ClipRow.AUDIO: ArrowTensorArray.from_numpy(np.stack([r[1].audio for r in rows])),
            ClipRow.AUDIO_LEN: pa.array([r[1].audio_len for r in rows], pa.int64()),
            ClipRow.LABEL: pa.array([r[2] for r in rows], pa.int64()),
            ClipRow.ERROR: pa.array([r[3] for r in rows], pa.string()),
        })

    def _one(self, key: str, video, label, reader_error) -> tuple[str, DecodedClip, int, str | None]:
        try:
            index = label_index(None if label is None else str(label))
        except ValueError as e:
            return key, self._blank(), UNKNOWN_LABEL, f"bad_label: {e}"
        if reader_error is not None:
            return key, self._blank(), index, str(reader_error)
        if video is None:
            return key, self._blank(), index, "empty: the row has no video bytes"
        try:
            return key, self._decoder.decode(key, bytes(video)), index, None
        except GroupEmotionError as e:
            return key, self._blank(), index, f"{e.reason}: {e.detail}"

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


class SupervisedDecoder:
    """`decode_clip` in a child process with a time limit per clip, restarted after a crash.

    `decode(key, video)` returns a DecodedClip or raises GroupEmotionError: the decoder's own
    DecodeError, or reason `crashed`, `timeout` or `decoder_error` (see the module docstring).
    """

    def __init__(self, spec: DecodeSpec, *, timeout_s: float = 60.0, faults: tuple[tuple[str, str], ...] = ()):
        self._spec = spec
        self._timeout_s = timeout_s
        self._faults = faults
        self._ctx = multiprocessing.get_context("spawn")
        self._process = None
        self._conn = None
        self._exitcode = None  # of the last child stopped, for the `crashed` detail
        self._start()

    def decode(self, key: str, video: bytes) -> DecodedClip:
        if self._process is None:
            self._start()
        try:
            self._conn.send_bytes(key.encode("utf-8"))
            self._conn.send_bytes(video)
            header = json.loads(self._receive(time.monotonic() + self._timeout_s, 1 << 16))
        except _Timeout:
            self._stop()
            raise GroupEmotionError("timeout", f"decoding took longer than {self._timeout_s:g} s") from None
        except (EOFError, OSError):  # the pipe broke: the child is gone
            self._stop()
            raise GroupEmotionError("crashed", f"the decoder process died (exit code {self._exitcode})") from None
        if not header["ok"]:
            raise GroupEmotionError(header["reason"], header["detail"])
        s = self._spec
        frames = np.frombuffer(self._receive(None, _frame_bytes(s)), np.uint8)
        audio = np.frombuffer(self._receive(None, _audio_bytes(s)), np.float32)
        return DecodedClip(
            frames=frames.reshape(s.num_frames, s.frame_size, s.frame_size, 3),
            audio=audio,
            audio_len=int(header["audio_len"]),
            frame_times=list(header["frame_times"]),
        )

    def close(self) -> None:
        if self._process is not None:
            self._stop()

    def _receive(self, deadline: float | None, max_bytes: int) -> bytes:
        """The next message; _Timeout past `deadline`. Only the first reply of a clip waits
        on the decoder; the buffers after it are already on their way."""
        wait = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not self._conn.poll(wait):
            raise _Timeout
        return self._conn.recv_bytes(max_bytes)

    def _start(self) -> None:
        parent, child = self._ctx.Pipe()
        self._process = self._ctx.Process(
            target=_child_main, args=(child, self._spec, self._faults, os.getpid()), daemon=True
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


def _child_main(conn, spec: DecodeSpec, faults: tuple[tuple[str, str], ...], parent_pid: int) -> None:
    """The child's loop: key and video in; a JSON header, then frames and audio, out."""
    from groupemotion_core.media import decode_clip

    _exit_with_parent(parent_pid)
    conn.send_bytes(b"ready")
    while True:
        try:
            key = conn.recv_bytes().decode("utf-8")
            video = conn.recv_bytes()
        except EOFError:
            return
        _inject(key, faults)
        try:
            clip = decode_clip(video, spec)
        except GroupEmotionError as e:
            conn.send_bytes(json.dumps({"ok": False, "reason": e.reason, "detail": e.detail}).encode())
            continue
        except Exception as e:  # a decoder bug on this input: report it as a value, keep the trace
            traceback.print_exc()
            detail = f"{type(e).__name__}: {e}"
            conn.send_bytes(json.dumps({"ok": False, "reason": "decoder_error", "detail": detail}).encode())
            continue
        frames = np.ascontiguousarray(clip.frames, np.uint8).tobytes()
        audio = np.ascontiguousarray(clip.audio, np.float32).tobytes()
        if (len(frames), len(audio)) != (_frame_bytes(spec), _audio_bytes(spec)):
            detail = f"decode_clip gave frames {clip.frames.shape} and audio {clip.audio.shape}"
            conn.send_bytes(json.dumps({"ok": False, "reason": "decoder_error", "detail": detail}).encode())
            continue
        header = {"ok": True, "audio_len": int(clip.audio_len), "frame_times": [float(t) for t in clip.frame_times]}
        conn.send_bytes(json.dumps(header).encode())
        conn.send_bytes(frames)
        conn.send_bytes(audio)


def _inject(key: str, faults: tuple[tuple[str, str], ...]) -> None:
    for mode, needle in faults:
        if needle in key:
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
