"""Decoding untrusted video bytes into the model's inputs with PyAV.

One clip is one window of a video: `clip_seconds` long from `start`, or the rest of the video
when that is shorter. Inside the window the decoder picks `num_frames` frames by timestamp and cuts
the mono audio of the same window, so a variable frame rate or a missing duration header changes
nothing.

The window is read twice, because where it ends decides which frames are wanted:
1. scan: demux the window's packets without decoding a single video frame; packet timestamps give
   the true end of the video (headers lie, or say nothing), and the audio is decoded on the way;
2. pick: seek back, decode video only, and convert just the chosen frames; stop after the last.
Demuxing is cheap next to decoding video, so the scan costs little and needs no trust in headers.

Every input is untrusted: its size, pixels per frame and duration are checked against the spec
before any frame is decoded, only real video containers are demuxed (FFmpeg would otherwise follow
HLS or concat playlists to other files and URLs), and every failure is a DecodeError whose
reason is one of REASONS.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import os
from dataclasses import dataclass
from typing import BinaryIO, Iterator, Union

import av
import numpy as np

from groupemotion_core.errors import GroupEmotionError
from groupemotion_core.spec import DecodeSpec, WindowPlan, plan_windows

Source = Union[bytes, bytearray, memoryview, str, os.PathLike, BinaryIO]

REASONS = ("empty", "not_media", "no_video", "undecodable", "too_large", "too_long")

# FFmpeg demuxer names that a web video comes in. Anything else is refused at open: image
# demuxers (a PNG named .mp4 would otherwise be a one-frame "video"), and playlist demuxers
# (hls, concat) that open further files or URLs named inside untrusted input.
CONTAINERS = "mov,matroska,webm,avi,flv,mpegts,mpeg,ogg,asf"

# File extensions of those containers: what a plain video object may be called.
VIDEO_EXTENSIONS = ("mp4", "m4v", "mov", "3gp", "mkv", "webm", "avi", "flv", "ts", "mpg", "mpeg", "ogv", "wmv", "asf")

# The first bytes of those containers. When FFmpeg cannot open an input, these tell a damaged or
# truncated video (undecodable) from something that was never a video (not_media).
_SIGNATURES = (
    (4, b"ftyp", "mp4/mov"),
    (0, b"\x1a\x45\xdf\xa3", "matroska/webm"),
    (8, b"AVI ", "avi"),
    (0, b"FLV", "flv"),
    (0, b"OggS", "ogg"),
    (0, b"\x30\x26\xb2\x75", "asf"),
    (0, b"\x00\x00\x01\xba", "mpeg"),
)

# Demuxers interleave streams by time only roughly; a packet this far past the window's end
# means no packet of the window is still to come.
_INTERLEAVE_SLACK_S = 2.0


@dataclass
class DecodedClip:
    frames: np.ndarray  # uint8 [T, frame_size, frame_size, 3]
    audio: np.ndarray  # float32 [spec.audio_samples], zero padded
    audio_len: int  # valid samples in audio; 0 = no audio track
    frame_times: list[float]  # seconds from the start of the video
    seconds: float = 0.0  # video time the window covers: clip_seconds, or less at the video's end


class DecodeError(GroupEmotionError):
    """Reasons: empty, not_media, no_video, undecodable, too_large, too_long."""


def decode_clip(source: Source, spec: DecodeSpec = DecodeSpec(), start: float = 0.0) -> DecodedClip:
    """Decode the clip window [start, start + spec.clip_seconds) of `source`.

    `source` is the encoded video as bytes, a path, or a binary file object. Time 0 is the first
    frame of the video. Frames: `num_frames` targets at the centres of equal slices of the window,
    each filled by the frame on screen at that time (the last one whose timestamp is not after
    it); `frame_times` are those frames' own timestamps. Resize policy is letterbox: the whole
    frame is scaled to fit inside frame_size x frame_size with its display aspect ratio kept and
    the rest padded black, never cropped, because the people at the edge of a group matter as
    much as those in the middle. Audio: the first audio track, mixed to mono, resampled to
    `sample_rate`, cut from the same window and zero padded; `audio_len` = 0 without a track.

    Damage is treated as a player treats it: a packet the decoder rejects is dropped (its audio
    becomes silence), and a truncated file whose container still reads (Matroska, WebM) gives the
    part that is there; one whose index is gone (an MP4 cut before its moov box) is undecodable.

    Raises DecodeError for any bad input. An OSError reading a path or file object is the
    storage's fault, not the media's, and a negative `start` the caller's: both raise as they are.
    """
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    with _open_container(source, spec) as container:
        try:
            return _decode(container, spec, float(start))
        except (av.error.FFmpegError, ValueError, UnicodeDecodeError) as e:  # PyAV's own checks too
            raise DecodeError("undecodable", _short(e)) from None


@dataclass
class Window:
    """One planned window of a video: the clip decoded from it, or why it could not be."""

    index: int  # 0-based, in time order
    count: int  # windows planned for the video
    start_s: float
    end_s: float  # the window's own end: start_s + clip_seconds, or the video's end
    clip: DecodedClip | None
    error: DecodeError | None = None


def decode_windows(source: Source, spec: DecodeSpec = DecodeSpec(), plan: WindowPlan = WindowPlan()) -> Iterator[Window]:
    """The windows of `plan` over the whole video, in time order (see `spec.plan_windows`).

    Raises DecodeError, before yielding anything, when the video as a whole cannot be decoded
    (the reasons of decode_clip); a window in which no picture can be decoded is yielded with its
    `error` set instead. Each window's clip is the one `decode_clip(source, spec, start_s)` gives.

    Reference implementation: one demux-only pass finds where the video ends, then each window
    is decoded on its own.
    """
    if not isinstance(source, (bytes, bytearray, memoryview, str, os.PathLike)) and not source.seekable():
        source = source.read(spec.max_input_bytes + 1)
    if plan.mode == "first":
        clip = decode_clip(source, spec, 0.0)
        yield Window(0, 1, 0.0, clip.seconds, clip)
        return
    with _open_container(source, spec) as container:
        try:
            video_end = _video_end(container, spec)
        except (av.error.FFmpegError, ValueError, UnicodeDecodeError) as e:
            raise DecodeError("undecodable", _short(e)) from None
    windows = plan_windows(video_end, spec.clip_seconds, plan)
    for index, (start, end) in enumerate(windows):
        try:
            clip = decode_clip(source, spec, start)
        except DecodeError as e:
            yield Window(index, len(windows), start, end, None, e)
            continue
        yield Window(index, len(windows), start, start + clip.seconds, clip)


def _video_end(container, spec: DecodeSpec) -> float:
    """Seconds from the first frame to the end of the last one, from packet timestamps alone."""
    video = _video_stream(container, spec)
    origin = _seconds(video.start_time, video) or 0.0
    _demux_only(container, [video])
    end = None
    for packet in container.demux(video):
        ts = packet.pts if packet.pts is not None else packet.dts
        if ts is None:
            continue
        t = _seconds(ts, video) - origin
        if t > spec.max_duration_s:
            raise DecodeError("too_long", f"streams run past max_duration_s {spec.max_duration_s:g}")
        shown_until = t + (_seconds(packet.duration, video) or 0.0)
        end = shown_until if end is None else max(end, shown_until)
    if end is None:
        raise DecodeError("undecodable", "the video stream has no timed packet")
    return end


@contextlib.contextmanager
def _open_container(source: Source, spec: DecodeSpec):
    """The opened container of `source`, or DecodeError: not_media, undecodable, empty, too_large."""
    input_file, head = _open_input(source, spec)
    try:
        container = av.open(
            input_file, container_options={"format_whitelist": CONTAINERS}, metadata_errors="ignore"
        )
    except (av.error.FFmpegError, ValueError, UnicodeDecodeError) as e:
        kind = next((name for at, magic, name in _SIGNATURES if head[at:].startswith(magic)), None)
        if kind is None:
            raise DecodeError("not_media", "not a video container that may be opened") from None
        raise DecodeError("undecodable", f"truncated or damaged {kind}: {_short(e)}") from None
    with container:
        yield container


def _open_input(source: Source, spec: DecodeSpec):
    """-> (what av.open takes, its first bytes), refusing empty and oversized input unopened."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = bytes(source)
        size, input_file, head = len(source), io.BytesIO(source), source[:16]
    elif isinstance(source, (str, os.PathLike)):
        input_file = os.fspath(source)
        size = os.stat(input_file).st_size  # FileNotFoundError is the caller's, not the media's
        with open(input_file, "rb") as f:
            head = f.read(16)
    elif source.seekable():  # FFmpeg seeks in it by absolute offsets: it is read from its start
        size = source.seek(0, io.SEEK_END)
        source.seek(0)
        head = source.read(16)
        source.seek(0)
        input_file = source
    else:  # a pipe or a socket: read it, but never more than the limit allows
        data = source.read(spec.max_input_bytes + 1)
        size, input_file, head = len(data), io.BytesIO(data), data[:16]
    if size == 0:
        raise DecodeError("empty", "the input has no bytes")
    if size > spec.max_input_bytes:
        raise DecodeError("too_large", f"{size} bytes > max_input_bytes {spec.max_input_bytes}")
    return input_file, head


def _video_stream(container, spec: DecodeSpec):
    """The video stream of the container (not cover art), its size and declared length checked."""
    cover_art = av.stream.Disposition.attached_pic  # a video stream too, but not a video
    video = next((s for s in container.streams.video if not s.disposition & cover_art), None)
    if video is None:
        kind = container.format.name.split(",")[0]
        raise DecodeError("no_video", f"{kind} file without a video stream")
    if video.codec_context is None:
        raise DecodeError("undecodable", "no decoder for the video codec")
    _check_pixels(video.codec_context.width, video.codec_context.height, spec)
    declared = container.duration / av.time_base if container.duration else None
    declared = declared or _seconds(video.duration, video)
    if declared and declared > spec.max_duration_s:
        raise DecodeError("too_long", f"{declared:.1f} s > max_duration_s {spec.max_duration_s:g}")
    return video


def _decode(container, spec: DecodeSpec, start: float) -> DecodedClip:
    video = _video_stream(container, spec)
    audio = next((s for s in container.streams.audio if s.codec_context is not None), None)
    video.thread_type = "AUTO"
    video.codec_context.thread_count = spec.threads
    origin = _seconds(video.start_time, video) or 0.0

    end = start + spec.clip_seconds
    video_end, audio_samples = _scan(container, video, audio, start, end, origin, spec)
    if video_end is None:
        raise DecodeError("undecodable", f"no video frame in the window [{start:g}, {end:g}) s")
    length = min(end, video_end) - start
    targets = start + (np.arange(spec.num_frames) + 0.5) * length / spec.num_frames
    frames, frame_times = _pick(container, video, start, targets, origin, spec)

    clip_audio = np.zeros(spec.audio_samples, np.float32)
    audio_len = min(len(audio_samples), int(round(length * spec.sample_rate)), spec.audio_samples)
    clip_audio[:audio_len] = audio_samples[:audio_len]
    return DecodedClip(frames, clip_audio, audio_len, frame_times, float(length))


def _scan(container, video, audio, start: float, end: float, origin: float, spec: DecodeSpec):
    """Demux the window: -> (end time of its last video frame or None, its mono audio).

    No video frame is decoded here; only packet timestamps are read, so the true end of the video
    is known before any frame is chosen.
    """
    wanted = [video] if audio is None else [video, audio]
    _seek(container, video, start, origin, wanted)
    cut = _AudioCut(audio, start, end, origin, spec.sample_rate)
    video_end, video_done = None, False
    for packet in container.demux(wanted):
        ts = packet.pts if packet.pts is not None else packet.dts
        t = None if ts is None else _seconds(ts, packet.stream) - origin  # None: a flush packet
        if t is not None and t > spec.max_duration_s:
            limit = spec.max_duration_s
            raise DecodeError("too_long", f"streams run past max_duration_s {limit:g}")
        if packet.stream.index == video.index:
            if t is None:
                continue
            # A frame at or after the end fills the window, whatever the packet durations say
            # (MPEG-TS leaves them 0); before it, a frame is on screen until its duration ends.
            shown_until = end if t >= end else t + (_seconds(packet.duration, video) or 0.0)
            if shown_until > start:
                video_end = max(video_end or shown_until, shown_until)
            decode_order = packet.dts if packet.dts is not None else ts
            video_done = _seconds(decode_order, video) - origin >= end
        elif not cut.done:
            cut.add(packet)
        # A stream that ends before the window does never says "done": the other one, well past
        # the window's end, says that nothing more of the window can come.
        if (video_done and cut.done) or (t is not None and t >= end + _INTERLEAVE_SLACK_S):
            break
    return video_end, cut.samples()


class _AudioCut:
    """The window's audio: decoded packet by packet, mixed to mono, resampled, trimmed by time."""

    def __init__(self, stream, start: float, end: float, origin: float, rate: int):
        self.stream, self.start, self.end, self.origin = stream, start, end, origin
        self.resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
        self.chunks: list[np.ndarray] = []
        self.first: float | None = None  # time of the first decoded frame kept
        self.done = stream is None

    def add(self, packet) -> None:
        frames = _decode_packet(packet)
        if frames is None and self.first is not None and packet.duration:  # later audio keeps its time
            gap = _seconds(packet.duration, self.stream) * self.resampler.rate
            self.chunks.append(np.zeros(round(gap), np.float32))
        for frame in frames or ():
            if frame.pts is None:
                continue
            t = _seconds(frame.pts, self.stream) - self.origin
            if t >= self.end:
                self.done = True
                return
            if t + frame.samples / frame.sample_rate > self.start:
                self.first = t if self.first is None else self.first
                self._resample(frame)

    def samples(self) -> np.ndarray:
        if self.first is None:
            return np.zeros(0, np.float32)
        self._resample(None)  # flush what the resampler holds back
        samples = np.concatenate(self.chunks or [np.zeros(0, np.float32)])
        skip = round((self.start - self.first) * self.resampler.rate)  # < 0: the audio starts late
        if skip < 0:
            return np.concatenate([np.zeros(-skip, np.float32), samples])
        return samples[skip:]

    def _resample(self, frame) -> None:
        self.chunks.extend(f.to_ndarray()[0] for f in self.resampler.resample(frame))


def _pick(container, video, start: float, targets: np.ndarray, origin: float, spec: DecodeSpec):
    """Decode the window's video; convert only the frame on screen at each target time."""
    timed = _timed_frames(container, video, start, origin, spec)
    first = next(timed, None)
    if start > 0 and (first is None or first[1] > start):  # the seek overshot: start over
        timed.close()
        timed = _timed_frames(container, video, 0.0, origin, spec)
    elif first is not None:
        timed = itertools.chain([first], timed)
    return _select(timed, targets, spec.frame_size, float(video.sample_aspect_ratio or 1))


def _timed_frames(container, video, start: float, origin: float, spec: DecodeSpec):
    """(frame, seconds) from the keyframe before `start` on, damaged packets skipped."""
    _seek(container, video, start, origin, [video])
    clock = _FrameClock()
    for packet in container.demux(video):
        for frame in _decode_packet(packet) or ():
            ts = clock(frame)
            if ts is not None:
                _check_pixels(frame.width, frame.height, spec)
                yield frame, _seconds(ts, video) - origin


def _select(timed, targets: np.ndarray, size: int, sar: float):
    """Fill each target with the frame on screen then; a frame is converted once, when chosen."""
    n = len(targets)
    frames = np.zeros((n, size, size, 3), np.uint8)
    times = [0.0] * n
    i, shown, last = 0, None, None

    def take(frame, t):
        nonlocal i, last
        if last is None or last[0] is not frame:
            last = (frame, _letterbox(frame, size, sar))
        frames[i], times[i] = last[1], round(t, 6)
        i += 1

    for frame, t in timed:
        while i < n and t > targets[i]:
            take(*shown) if shown is not None else take(frame, t)  # none yet: the first frame
        if i == n:
            break
        shown = (frame, t)
    if shown is None and i == 0:
        raise DecodeError("undecodable", "not one video frame could be decoded")
    while i < n:  # the video ended: its last frame stays on screen
        take(*shown)
    return frames, times


class _FrameClock:
    """FFmpeg's best-effort frame timestamp (its guess_correct_pts): the pts, unless the pts run
    backwards more often than the decode times do, as in an AVI with B-frames, which has no pts."""

    def __init__(self):
        self.faults, self.last = [0, 0], [None, None]

    def __call__(self, frame) -> int | None:
        for k, ts in enumerate((frame.pts, frame.dts)):
            if ts is not None:
                self.faults[k] += self.last[k] is not None and ts <= self.last[k]
                self.last[k] = ts
        if frame.pts is not None and (frame.dts is None or self.faults[0] <= self.faults[1]):
            return frame.pts
        return frame.dts


def _decode_packet(packet) -> list | None:
    """The packet's frames, or None when the decoder rejects it.

    A damaged packet is dropped, as every player does (the codec conceals the gap), instead of
    failing the whole clip; a clip fails only when no video frame decodes at all.
    """
    try:
        return packet.decode()
    except av.error.FFmpegError:
        return None


def _demux_only(container, wanted) -> None:
    """Let the demuxer skip the packets of streams nobody reads (subtitles, other tracks)."""
    keep = {s.index for s in wanted}
    for s in container.streams:
        s.discard = av.stream.Discard.default if s.index in keep else av.stream.Discard.all


def _seek(container, video, t: float, origin: float, wanted) -> None:
    """Go to the video keyframe at or before time t, reading only the `wanted` streams.

    Containers without an index (MPEG-TS) can only guess where t is and may land after it;
    _pick notices and starts over from the beginning. Time 0 is a rewind, exact everywhere.
    """
    _demux_only(container, wanted)
    if t > 0:
        container.seek(int(np.floor((t + origin) / video.time_base)), stream=video)
    else:
        container.seek(0)


def _letterbox(frame, size: int, sar: float) -> np.ndarray:
    """Scale the whole frame into size x size (swscale, straight to RGB), keep aspect, pad black."""
    width, height = frame.width * sar, frame.height
    scale = size / max(width, height)
    w, h = max(1, round(width * scale)), max(1, round(height * scale))
    rgb = frame.reformat(width=w, height=h, format="rgb24", interpolation="AREA").to_ndarray()
    out = np.zeros((size, size, 3), np.uint8)
    top, left = (size - h) // 2, (size - w) // 2
    out[top : top + h, left : left + w] = rgb
    return out


def _check_pixels(width: int, height: int, spec: DecodeSpec) -> None:
    if width * height > spec.max_pixels:
        raise DecodeError("too_large", f"{width}x{height} frames > max_pixels {spec.max_pixels}")


def _seconds(value, stream) -> float | None:
    return None if value is None else float(value * stream.time_base)


def _short(e: Exception) -> str:
    """FFmpeg's message without the errno and file name noise, at most one line."""
    text = getattr(e, "strerror", None) or str(e) or type(e).__name__
    return text.splitlines()[0][:200]
