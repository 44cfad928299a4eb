"""Decoding untrusted video bytes into the model's inputs with PyAV.

A window is `clip_seconds` of a video from a start time, or the rest of the video when that is
shorter (spec.py). Inside a window the decoder picks `num_frames` frames by timestamp and cuts
the mono audio of the same window, so a variable frame rate or a missing duration header changes
nothing.

Where a window ends decides which frames are wanted, so packets are demuxed before any frame is
decoded: their timestamps give the true end of the video (headers lie, or say nothing), and
demuxing costs little next to decoding. decode_clip demuxes its one window; decode_windows demuxes
the whole video's packets once, then decodes it in one forward pass for all its windows, seeking
only across a gap that holds a keyframe (sparse windows) and holding only the windows that are
open, so memory does not grow with the video's length.

Both fill a window with the same machinery, fed the same decoded frames, so a window's clip is the
same array either way: its pictures are the frames from the one on screen at its start on (a
video decoder starts clean at every keyframe, so where the read started changes none of them),
its audio comes from a decoder of its own started a second before it (an audio decoder never
starts clean: see `_AudioRun`), resampled by a resampler of its own; so a window costs the same
early or late in a long video. Reading from time 0 opens the input afresh rather than seeking
back: some containers (FLV) cannot; an MP4, which can exactly, reads its pictures on in the opening
its packets were demuxed in (`_reusable`).

Most frames are never shown in a window (8 of 150 in a 5 s window at 30 fps), and web encoders
make many of them non-reference B-frames that no other frame is predicted from: FFmpeg can drop
those before decoding them (skip_frame NONREF), a third to a half of the decoding. The packets'
presentation times, read before decoding, say which frame is on screen at each target time; the
decoder is told per packet to decode those in full and may drop the others (`_Drops`). Where the
times cannot be trusted to say that, every frame is decoded, so a window is always the one a
decode of every frame gives.

Pictures are shown as a player shows them: the display matrix's rotation applied (a phone video
stored sideways comes out upright), then the display aspect ratio kept (letterbox).

Every input is untrusted: its size, pixels per frame and duration are checked against the spec
before any frame is decoded, only real video containers are demuxed (FFmpeg would otherwise follow
HLS or concat playlists to other files and URLs), and every failure is a DecodeError whose
reason is one of REASONS.
"""

from __future__ import annotations

import bisect
import contextlib
import io
import os
from collections import deque
from dataclasses import dataclass
from typing import BinaryIO, Iterator, Union

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from groupemotion_core.errors import GroupEmotionError
from groupemotion_core.media.spec import DecodeSpec, WindowPlan, plan_windows

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

# Video decoders that, told to skip non-reference frames (skip_frame NONREF), drop exactly the
# frames no other frame is predicted from, and give every frame the pts of its own packet: H.264,
# HEVC and MPEG-1/2 non-reference pictures and VP8/VP9 frames that refresh no reference. Others
# decode everything (MPEG-4 part 2 may pack two frames in one packet, WMV's times are guesses).
_DROPPING_CODECS = frozenset({"h264", "hevc", "mpeg1video", "mpeg2video", "vp8", "vp9"})

# Audio decoders that a new codec context with the stream's extradata, rate, layout and bit rate
# sets up exactly as the stream's own (tested sample for sample against it).
_FRESH_DECODERS = frozenset({"aac", "mp3float", "mp3", "mp2float", "mp2", "opus", "vorbis"})

# Each window's audio decoder starts this long before the window (see _AudioRun), and the audio
# read seeks when the next window's start is further ahead than AUDIO_SEEK_S.
AUDIO_PREROLL_S = 1.0
AUDIO_SEEK_S = 10.0

# Seconds at the end of a video, by its header, demuxed to find where it really ends when its
# windows are sparse (see _tail_end).
TAIL_S = 30.0

# What FFmpeg raises, and PyAV's own checks of what FFmpeg gives it.
_FFMPEG_ERRORS = (av.error.FFmpegError, ValueError, UnicodeDecodeError)


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
    frame, turned upright, is scaled to fit inside frame_size x frame_size with its display aspect
    ratio kept and the rest padded black, never cropped, because the people at the edge of a
    group matter as much as those in the middle. Audio: the first audio track, mixed to mono,
    resampled to `sample_rate`, cut from the same window and zero padded; `audio_len` = 0
    without a track.

    Damage is treated as a player treats it: a packet the decoder rejects is dropped (its audio
    becomes silence, its picture is concealed or the one before stays on screen), and a truncated
    file whose container still reads (Matroska, WebM) gives the part that is there; one whose
    index is gone (an MP4 cut before its moov box) is undecodable.

    The audio is decoded from AUDIO_PREROLL_S before `start` by a decoder of its own (see
    `_AudioRun`), so that a late window costs no more than an early one.

    Raises DecodeError for any bad input. An OSError reading a path or file object is the
    storage's fault, not the media's, and a negative `start` the caller's: both raise as they are.
    """
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    source = _replayable(source, spec)
    start = float(start)
    try:
        with contextlib.ExitStack() as stack:
            length, read = _window_length(source, spec, start)
            stack.callback(read.close)
            reused = _reusable(read)
            if reused is None:
                read.close()
            clip = next(_fill(source, spec, [(start, length)], reused=reused))
    except _FFMPEG_ERRORS as e:
        raise _decode_error(e) from None
    if isinstance(clip, DecodeError):
        raise clip
    return clip


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
    `error` set instead, and so are the windows left when decoding breaks down part way. Each
    window's clip is the one `decode_clip(source, spec, start_s)` gives. Plan `first` reads only
    the first window, never the rest of the file.
    """
    source = _replayable(source, spec)
    if plan.mode == "first":
        clip = decode_clip(source, spec, 0.0)
        yield Window(0, 1, 0.0, clip.seconds, clip)
        return
    with contextlib.ExitStack() as stack:
        try:
            surveyed = stack.enter_context(_open_container(source, spec))
            sparse = _sparse(surveyed, spec, plan)
            video_end, keyframes = _tail_end(surveyed, spec) if sparse else None, None
            if video_end is None:
                if sparse:  # sought in vain: demux it whole from the start
                    surveyed.close()
                    surveyed = stack.enter_context(_open_container(source, spec))
                video_end, keyframes = _survey(surveyed, spec)
        except _FFMPEG_ERRORS as e:
            raise _decode_error(e) from None
        reused = _reusable(surveyed)
        if reused is None:
            surveyed.close()
        yield from _windows(source, spec, plan_windows(video_end, spec.clip_seconds, plan), keyframes, reused)


def _windows(source: Source, spec: DecodeSpec, windows: list[tuple[float, float]], keyframes: list[float] | None,
             reused):
    """decode_windows' Windows of the (start, end) `windows`, once the survey has placed them."""
    spans = [(start, end - start) for start, end in windows]
    with contextlib.closing(_fill(source, spec, spans, keyframes, reused)) as clips:
        for index, (start, end) in enumerate(windows):
            try:
                clip = next(clips)
            except (DecodeError, *_FFMPEG_ERRORS) as e:
                if index == 0:
                    raise _decode_error(e) from None
                for late, (start, end) in enumerate(windows[index:], index):
                    yield Window(late, len(windows), start, end, None, _decode_error(e))
                return
            if isinstance(clip, DecodeError):
                yield Window(index, len(windows), start, end, None, clip)
            else:
                yield Window(index, len(windows), start, start + clip.seconds, clip)


def _replayable(source: Source, spec: DecodeSpec) -> Source:
    """A source that can be opened more than once: a pipe or a socket is read (within the limit)."""
    if isinstance(source, (bytes, bytearray, memoryview, str, os.PathLike)) or source.seekable():
        return source
    return source.read(spec.max_input_bytes + 1)


def _sparse(container, spec: DecodeSpec, plan: WindowPlan) -> bool:
    """Whether the plan keeps few of the video's windows (`max_windows` of many more), by the
    length its header declares."""
    declared = _declared_seconds(container, _video_stream(container, spec)) or 0.0
    return plan.max_windows is not None and declared / (plan.stride_s or spec.clip_seconds) > 2 * plan.max_windows


def _tail_end(container, spec: DecodeSpec) -> float | None:
    """Where the video ends, from its last packets alone; None to demux it whole (`_survey`).

    Demuxing a two-hour video's every packet costs more than its 8 sparse windows, so only its
    last TAIL_S seconds, as its header says, are: the last frame is among them wherever the
    header is wrong, since the read goes on to the end of the file. The keyframes are then not
    known, and each window is sought. A file that cannot seek is demuxed whole.
    """
    video = _video_stream(container, spec)
    declared = _declared_seconds(container, video) or 0.0
    try:
        _seek(container, video, max(0.0, declared - TAIL_S))
    except av.error.FFmpegError:
        return None
    end = _last_frame_end(_video_packets(container, video, spec), video)
    return end if end is not None and end > 0 else None


def _survey(container, spec: DecodeSpec) -> tuple[float, list[float]]:
    """(seconds from the first frame to the end of the last one, the keyframes' times)."""
    keyframes: list[float] = []

    def noting_keyframes(packets):
        for packet, t in packets:
            if packet.is_keyframe:
                keyframes.append(t)
            yield packet, t

    video = _video_stream(container, spec)
    end = _last_frame_end(noting_keyframes(_video_packets(container, video, spec)), video)
    if end is None or end <= 0:
        raise DecodeError("undecodable", "the video stream has no timed packet")
    return end, sorted(keyframes)


def _last_frame_end(packets, video) -> float | None:
    """Where the last of the (packet, time) frames stops being shown, by its duration."""
    end, tb = None, float(video.time_base)
    for packet, t in packets:
        shown_until = t + (packet.duration or 0) * tb
        end = shown_until if end is None else max(end, shown_until)
    return end


def _window_length(source: Source, spec: DecodeSpec, start: float):
    """(seconds of the window from `start` that the video covers: clip_seconds, or less where the
    video ends inside it; the opening they were read from, the caller's to close)."""
    container = _open_container(source, spec)
    try:
        video = _video_stream(container, spec)
        if start > 0:
            try:
                _seek(container, video, start)
            except av.error.FFmpegError:  # no seeking in this file: read it from time 0
                container.close()
                container = _open_container(source, spec)
                video = _video_stream(container, spec)
        return _covered(container, video, start, spec), container
    except BaseException:
        container.close()
        raise


def _reusable(container):
    """`container`, where the pictures may be read from it after it was demuxed, or None.

    Opening an input costs FFmpeg's stream probe (it decodes a frame or two of each stream), and
    an MP4's opening reads its whole sample index (50 ms for two hours): an MP4, which seeks back
    to time 0 exactly by that index, is read on in the opening the window's length or the video's
    end was found in. Other containers seek back by guesses, or not at all (FLV), and are opened
    afresh.
    """
    return container if container.format.name.startswith("mov") else None


def _covered(container, video, start: float, spec: DecodeSpec) -> float:
    end = start + spec.clip_seconds
    video_end, tb, origin = None, float(video.time_base), _origin(video)
    for packet, t in _video_packets(container, video, spec):
        # A frame at or after the end fills the window, whatever the packet durations say
        # (MPEG-TS leaves them 0); before it, a frame is on screen until its duration ends.
        shown_until = end if t >= end else t + (packet.duration or 0) * tb
        if shown_until > start:
            video_end = max(video_end or shown_until, shown_until)
        decode_order = packet.dts if packet.dts is not None else packet.pts
        if decode_order * tb - origin >= end:
            break
    if video_end is None:
        raise DecodeError("undecodable", f"no video frame in the window [{start:g}, {end:g}) s")
    return min(end, video_end) - start


def _video_packets(container, video, spec: DecodeSpec):
    """(packet, seconds from the first frame) for each timed video packet read from here on,
    demuxed only: packet timestamps are all it takes to know where the video ends."""
    _demux_only(container, [video])
    origin, tb = _origin(video), float(video.time_base)
    for packet in container.demux(video):
        ts = packet.pts if packet.pts is not None else packet.dts
        if ts is not None:
            t = ts * tb - origin
            _check_duration(t, spec)
            yield packet, t


def _fill(source: Source, spec: DecodeSpec, windows: list[tuple[float, float]], keyframes: list[float] | None = None,
          reused=None):
    """The clip, or the DecodeError of the window, of each (start, length) window, in order.

    Pictures and sound are read side by side from two openings of the input, each demuxing only
    its own stream and seeking across gaps on its own (`_pictures`, `_sounds`). Where every
    window is sought (no `keyframes`: decode_clip, sparse windows) in a `reused` MP4, whose seeks
    are exact, both are read from that one opening instead, a window at a time, each reader
    seeking to it: a second opening would parse the MP4's whole sample index again (50 ms for two
    hours). FFmpegErrors raise as they are.
    """
    if reused is not None and keyframes is None:
        pictures = (_first(_pictures(source, spec, [window], None, reused)) for window in windows)
        sounds = (_first(_sounds(source, spec, [window], reused)) for window in windows)
    else:
        pictures, sounds = _pictures(source, spec, windows, keyframes, reused), _sounds(source, spec, windows)
    with contextlib.closing(pictures), contextlib.closing(sounds):
        for (start, length), picture, samples in zip(windows, pictures, sounds):
            if isinstance(picture, DecodeError):
                yield picture
                continue
            frames, times = picture
            audio = np.zeros(spec.audio_samples, np.float32)
            audio_len = min(len(samples), int(round(length * spec.sample_rate)), spec.audio_samples)
            audio[:audio_len] = samples[:audio_len]
            yield DecodedClip(frames, audio, audio_len, times, float(length))


def _first(reader):
    """The first thing `reader` yields, the reader closed after it."""
    with contextlib.closing(reader):
        return next(reader)


def _pictures(source: Source, spec: DecodeSpec, windows: list[tuple[float, float]], keyframes: list[float] | None,
              reused=None):
    """Each window's (frames, frame_times), or its DecodeError, in order, read forward.

    A window opens when the read reaches its start, with the frame on screen then, and is given
    every frame after it until its last target is filled: the frames a read from its own seek
    point gives it. With no window open, the next one is sought when that skips video: always for
    decode_clip (no `keyframes`), and for decode_windows only when a keyframe lies between what
    has been read and the window. A seek that fails (FLV without an index), or that lands after
    its window or nowhere (MPEG-TS has no index and only guesses), makes it open the input again
    and read on from time 0 without seeking, as a player does. A `reused` opening (an MP4 the
    survey or the window's length was read from, the caller's to close) is read first, sought
    back to time 0.
    """
    following = 0  # the first window not opened yet
    may_seek = True
    targets = np.sort(np.concatenate([_targets(*window, spec) for window in windows]))
    while following < len(windows):
        with contextlib.nullcontext(reused) if reused is not None else _open_container(source, spec) as container:
            video = _VideoReader(container, spec, targets)
            if reused is not None:
                if not (may_seek and video.should_seek(windows[following][0], keyframes)):
                    video.seek(0.0)  # else the run below seeks to the window
                reused = None
            live: deque[_Picture] = deque()
            while following < len(windows):  # one run: from time 0, or from a seek
                sought = None
                if may_seek and video.should_seek(windows[following][0], keyframes):
                    try:
                        video.seek(windows[following][0])
                    except av.error.FFmpegError:
                        may_seek = False
                        break
                    sought = following
                for frame, t in video.frames():
                    if sought is not None:
                        if t > windows[sought][0]:
                            break  # the seek overshot
                        sought = None
                    while following < len(windows) and t >= windows[following][0]:
                        live.append(_Picture(*windows[following], spec, video))
                        following += 1
                    for picture in live:
                        picture.add(frame, t)
                    if not (live and live[0].done):
                        continue
                    while live and live[0].done:
                        yield live.popleft().result()
                    if not live and (following == len(windows) or (may_seek and video.should_seek(windows[following][0], keyframes))):
                        break  # all done, or on to a seek
                else:
                    if sought is None:  # the end of the video: its last frame stays on screen
                        live.extend(_Picture(*window, spec, video) for window in windows[following:])
                        following = len(windows)
                        while live:
                            yield live.popleft().result()
                if sought is not None:
                    may_seek = False
                    break


class _VideoReader:
    """The video stream of one opened container, decoded forward from time 0 or from a seek,
    every frame timed in seconds from the video's first frame."""

    def __init__(self, container, spec: DecodeSpec, targets: np.ndarray):
        self.container, self.spec = container, spec
        self.stream = _video_stream(container, spec)
        may_drop = self.stream.codec_context.name in _DROPPING_CODECS and "avi" not in container.format.name.split(",")
        self.drops = _Drops(targets) if may_drop else None
        if not self.stream.codec_context.is_open:  # else a reader before set them (windows read one at a time)
            self.stream.thread_type = "AUTO"
            self.stream.codec_context.thread_count = spec.threads
        self.origin, self.tb = _origin(self.stream), float(self.stream.time_base)
        self.sar = float(self.stream.sample_aspect_ratio or 1)
        self.reformatter = VideoReformatter()  # one for all the frames it letterboxes: it keeps its scaler
        _demux_only(container, [self.stream])
        self._restart(0.0)

    def _restart(self, position: float) -> None:
        self.position = position  # time of the last packet read
        self.shown: tuple | None = None  # the last frame decoded, and its time
        self.clock = _FrameClock()
        if self.drops is not None:
            self.drops.restart()

    def should_seek(self, start: float, keyframes: list[float] | None) -> bool:
        """Whether seeking to `start` skips video that reading on would decode."""
        if start <= 0:
            return False
        if keyframes is None:
            return True
        i = bisect.bisect_right(keyframes, start)
        return i > 0 and keyframes[i - 1] > self.position

    def seek(self, t: float) -> None:
        _seek(self.container, self.stream, t)
        self._restart(t)

    def frames(self):
        """(frame, seconds) for each frame decoded from here on, damaged packets skipped, and
        the frames `drops` allows left to FFmpeg to drop."""
        codec, dropping = self.stream.codec_context, False
        codec.skip_frame = "DEFAULT"  # as the read before may have left it
        for packet in self.container.demux(self.stream):
            ts = packet.pts if packet.pts is not None else packet.dts
            if ts is not None:
                self.position = ts * self.tb - self.origin
                _check_duration(self.position, self.spec)
            if self.drops is not None and dropping != self.drops.allows(packet, self.position):
                dropping = not dropping
                codec.skip_frame = "NONREF" if dropping else "DEFAULT"
            for frame in _decode_packet(packet) or ():
                ts = self.clock(frame)
                if ts is None:
                    continue
                _check_pixels(frame.width, frame.height, self.spec)
                t = ts * self.tb - self.origin
                yield frame, t
                self.shown = (frame, t)  # after the yield: a window opened by this frame is given it


class _Drops:
    """Which frames FFmpeg may drop undecoded (when the codec can: non-reference frames only),
    decided packet by packet, in decode order, from the times of the packets before.

    The frame a target time shows is the last one not after it (or the first one, before any).
    A frame at time t is dropped only when a frame already read comes later, at q, with no target
    in [t, q): then whatever follows t comes no later than q, so t shows at no target. It is
    never the earliest frame of a read. A picture is filled from the frames decoded, in time
    order, with the last one not after its target, and that one is never dropped. Non-reference
    frames come after the frames they lie between, so the one after is nearly always read.

    Packet times are trusted to be frame times only while every packet has its own pts, not
    before its dts and not shared with a recent packet; from the first that has not, nothing more
    is dropped in this read (damaged timestamps). AVI stores no presentation times at all.
    """

    RECENT = 64  # packets remembered: far more than any decoder reorders

    def __init__(self, targets: np.ndarray):
        self.targets = targets.tolist()  # sorted; a list: bisect on it costs a tenth of np.searchsorted
        self.restart()

    def restart(self) -> None:
        """A new read, from time 0 or from a seek."""
        self.trusted, self.earliest = True, np.inf
        self.read: deque[float] = deque()  # the last RECENT times, in decode order
        self.sorted: list[float] = []  # the same, in time order

    def allows(self, packet, t: float) -> bool:
        """Whether the next packet's frame, at time t, may be dropped."""
        if not self.trusted:
            return False
        if packet.pts is None or (packet.dts is not None and packet.pts < packet.dts):
            self.trusted = False
            return False
        at = bisect.bisect_left(self.sorted, t)
        if at < len(self.sorted) and self.sorted[at] == t:
            self.trusted = False
            return False
        self.sorted.insert(at, t)
        self.read.append(t)
        if len(self.read) > self.RECENT:
            del self.sorted[bisect.bisect_left(self.sorted, self.read.popleft())]
            at = bisect.bisect_left(self.sorted, t)
        earlier, self.earliest = self.earliest < t, min(self.earliest, t)
        if not earlier or at + 1 == len(self.sorted):
            return False
        after = self.sorted[at + 1]
        return bisect.bisect_left(self.targets, t) == bisect.bisect_left(self.targets, after)


def _targets(start: float, length: float, spec: DecodeSpec) -> np.ndarray:
    """The times a window's frames show: the centres of `num_frames` equal slices of it."""
    return start + (np.arange(spec.num_frames) + 0.5) * length / spec.num_frames


class _Picture:
    """One window's frames: each target time filled with the frame on screen then; a frame is
    converted once, when chosen."""

    def __init__(self, start: float, length: float, spec: DecodeSpec, video: _VideoReader):
        self.start, self.end = start, start + spec.clip_seconds
        self.targets = _targets(start, length, spec)
        self.size, self.sar, self.reformatter = spec.frame_size, video.sar, video.reformatter
        self.frames = np.zeros((spec.num_frames, self.size, self.size, 3), np.uint8)
        self.times = [0.0] * spec.num_frames
        self.filled = 0
        self.shown = video.shown  # (frame, seconds) on screen when the window opens
        self.converted: tuple | None = None  # (frame, its letterboxed picture)
        self.done = False

    def add(self, frame, t: float) -> None:
        if self.done:
            return
        while self.filled < len(self.targets) and t > self.targets[self.filled]:
            if self.shown is None:  # nothing on screen yet: the video starts late
                if t >= self.end:
                    self.done = True  # and not inside this window
                    return
                self.shown = (frame, t)
            self._take(*self.shown)
        self.done = self.filled == len(self.targets)
        self.shown = (frame, t)

    def result(self) -> tuple[np.ndarray, list[float]] | DecodeError:
        if self.shown is None:
            return DecodeError("undecodable", f"no video frame could be decoded in [{self.start:g}, {self.end:g}) s")
        while self.filled < len(self.targets):  # the video ended: its last frame stays on screen
            self._take(*self.shown)
        return self.frames, self.times

    def _take(self, frame, t: float) -> None:
        if self.converted is None or self.converted[0] is not frame:
            self.converted = (frame, _letterbox(frame, self.size, self.sar, self.reformatter))
        self.frames[self.filled], self.times[self.filled] = self.converted[1], round(t, 6)
        self.filled += 1


def _sounds(source: Source, spec: DecodeSpec, windows: list[tuple[float, float]], reused=None):
    """Each window's audio, in order: mono float32 at spec.sample_rate from the window's start,
    not cut to its length yet, and empty without a track.

    Each window has a decoder of its own, started at its restart packet (`_AudioRun`), and all
    are fed from one forward read of the first audio track, so that back-to-back windows cost
    one read. With no window being decoded, the read seeks to the next restart packet when that
    is more than AUDIO_SEEK_S ahead; where a seek fails or lands after it (FLV, MPEG-TS), the input
    is opened again and read from time 0 without seeking, as the pictures are.

    A `reused` opening (an MP4 the pictures are read from too, the caller's to close) is read
    first, sought to each window's restart packet wherever the read stands: an MP4 seek lands on
    the last packet not after the time sought, or on the first packet when none is, which is then
    the restart packet; that is trusted for a restart before time 0 (audio that starts late is
    still read from time 0 in an opening of its own).
    """
    following = 0  # the first window whose decoder has not started
    live: deque[_AudioRun] = deque()
    restarts = [start - AUDIO_PREROLL_S for start, _ in windows]
    may_seek = True
    try:
        while following < len(windows):
            with contextlib.nullcontext(reused) if reused is not None else _open_container(source, spec) as container:
                exact, reused = reused is not None, None
                origin = _origin(_video_stream(container, spec))  # time 0 is the video's first frame
                stream = next((s for s in container.streams.audio if s.codec_context is not None), None)
                if stream is None:
                    break
                _demux_only(container, [stream])
                tb, position = float(stream.time_base), 0.0
                while True:  # one read: from time 0, or from a seek
                    # pending: the last packet at or before the next restart, and the untimed ones after it
                    sought, pending = False, []
                    if may_seek and not live and (exact or restarts[following] > position + AUDIO_SEEK_S):
                        try:
                            container.seek(int(np.floor((restarts[following] + origin) / tb)), stream=stream)
                        except av.error.FFmpegError:
                            may_seek = False
                            break
                        sought = True
                    for packet in container.demux(stream):
                        ts = packet.pts if packet.pts is not None else packet.dts
                        t = None if ts is None else ts * tb - origin  # None: untimed, or the flush packet at the end
                        if t is not None:
                            _check_duration(t, spec)
                            position = t
                            # (a restart before time 0 in an MP4: the seek landed on the first packet)
                            if following < len(windows) and t > restarts[following] and sought and not pending \
                                    and not (exact and restarts[following] <= 0):
                                may_seek = False  # the seek landed after the restart packet
                                break
                            while following < len(windows) and t > restarts[following]:
                                live.append(_AudioRun(stream, source, spec, windows[following][0], origin))
                                for early in pending:
                                    live[-1].feed(early)
                                following += 1
                            if following < len(windows):
                                pending = [packet]
                        elif pending:
                            pending.append(packet)
                        sought = sought and not live
                        for run in live:
                            run.feed(packet)
                        while live and live[0].sound.done:
                            yield live.popleft().close()
                        gap = following < len(windows) and restarts[following] > position + AUDIO_SEEK_S
                        if not live and may_seek and gap:
                            break  # on to a seek
                    else:  # the end of the audio
                        while live:
                            yield live.popleft().close()
                        for _ in windows[following:]:
                            yield np.zeros(0, np.float32)
                        return
                    if not may_seek:
                        break  # open the input again and read it from time 0
        for _ in windows[following:]:
            yield np.zeros(0, np.float32)
    finally:  # a read given up part way: the decoders borrowed go back
        for run in live:
            run.release()


class _AudioRun:
    """One window's audio decoder, fed every packet from the window's restart packet on: the last
    audio packet whose time is not after AUDIO_PREROLL_S before the window (or the first packet).

    An audio decoder's output depends on all it decoded before (AAC's noise substitution and
    WMA's noise draw from a generator that runs on; MP3 and Vorbis carry bits and overlap), so
    a window gets the same samples however it was reached only from a decoder started afresh at a
    packet the window alone decides; decode_clip and decode_windows both start it here. The
    pre-roll lets the decoder settle before the window: a decoder started cold gets the first
    block or two wrong, and nothing after. AAC and WMA overlap each block with the one before
    (AAC 1024 samples, HE-AAC's SBR adds some 0.01 s; WMA at most 2048 samples, 0.13 s at 16 kHz);
    MP3 overlaps granules of 576 samples and may take a frame's bits from the 511 bytes before it,
    0.5 s at its lowest rate of 8 kbit/s; Vorbis overlaps blocks of at most 8192 samples (0.19 s at
    44.1 kHz, 0.37 s at 22.05 kHz); Opus converges within 80 ms (RFC 7845, 4.6). One second covers
    each of them. What a cold start leaves different is noise the codec itself draws at random.

    The decoder is a new one with the stream's parameters where PyAV can set them all (the codecs
    of _FRESH_DECODERS); any other codec (WMA needs its block size) borrows the unused decoder of
    another opening of the input.
    """

    def __init__(self, stream, source: Source, spec: DecodeSpec, start: float, origin: float):
        self.tb, self.origin = float(stream.time_base), origin
        self.sound = _Sound(start, spec)
        # where the last frame ended: a frame without a time (some WMA packets decode to several) starts there
        self.end = None
        self.lender = None
        own = stream.codec_context
        if own.name in _FRESH_DECODERS:
            self.decoder = av.CodecContext.create(own.codec, "r")
            self.decoder.extradata, self.decoder.sample_rate = own.extradata, own.sample_rate
            self.decoder.layout, self.decoder.bit_rate = own.layout, own.bit_rate or 0
            self.decoder.options = {"pkt_timebase": str(stream.time_base)}
        else:
            self.lender = _open_container(source, spec)
            self.decoder = self.lender.streams[stream.index].codec_context

    def feed(self, packet) -> None:
        """Decode the next packet; its frames (or, for a packet the decoder rejects, its silence)
        go to the window, so that later audio keeps its time."""
        ts = packet.pts if packet.pts is not None else packet.dts
        t = None if ts is None else ts * self.tb - self.origin
        frames = _decode_packet(packet, self.decoder)
        if frames is None:
            if packet.duration and t is not None:
                gap = packet.duration * self.tb
                self.end = None if self.end is None else self.end + gap
                self.sound.add(None, t, gap)
            return
        for frame in frames:
            t = self.end if frame.pts is None else frame.pts * self.tb - self.origin
            if t is not None:
                self.end = t + frame.samples / frame.sample_rate
                self.sound.add(frame, t, frame.samples / frame.sample_rate)

    def close(self) -> np.ndarray:
        """The window's samples; the decoder is done with."""
        self.release()
        return self.sound.samples()

    def release(self) -> None:
        if self.lender is not None:
            self.lender.close()


class _Sound:
    """One window's audio: decoded frames mixed to mono, resampled, trimmed by time.

    The resampler is the window's own, fed from the first frame that overlaps the window,
    because its output depends on what it was fed before. It is fed BATCH samples at a time,
    joined in a FIFO: each call costs PyAV's filter graph a push, pulls and an exception, as much
    as the resampling of a 1024-sample AAC frame itself, and the resampler gives the same samples
    however its input is cut (it gives all it can from what it has been fed), so the batch is
    resampled before a rejected packet's silence goes in after it.
    """

    BATCH = 16384

    def __init__(self, start: float, spec: DecodeSpec):
        self.start, self.end, self.rate = start, start + spec.clip_seconds, spec.sample_rate
        self.resampler = av.AudioResampler(format="flt", layout="mono", rate=self.rate)
        self.held = av.AudioFifo()
        self.chunks: list[np.ndarray] = []
        self.first: float | None = None  # time of the first frame kept
        self.done = False

    def add(self, frame, t: float, seconds: float) -> None:
        """A decoded frame at time t, or None for a packet the decoder rejected (silence)."""
        if self.done:
            return
        if t >= self.end:
            self.done = True
        elif frame is None:
            if self.first is not None:
                self._resample_held()
                self.chunks.append(np.zeros(round(seconds * self.rate), np.float32))
        elif t + seconds > self.start:
            self.first = t if self.first is None else self.first
            frame.pts = None  # its time is t: the FIFO would check that the frames run on without a gap
            self.held.write(frame)
            if self.held.samples >= self.BATCH:
                self._resample_held()

    def samples(self) -> np.ndarray:
        if self.first is None:
            return np.zeros(0, np.float32)
        self._resample_held()
        self._resample(None)  # flush what the resampler holds back
        samples = np.concatenate(self.chunks or [np.zeros(0, np.float32)])
        skip = round((self.start - self.first) * self.rate)  # < 0: the audio starts late
        if skip < 0:
            return np.concatenate([np.zeros(-skip, np.float32), samples])
        return samples[skip:]

    def _resample_held(self) -> None:
        if self.held.samples:
            self._resample(self.held.read())

    def _resample(self, frame) -> None:
        for mono in self.resampler.resample(frame):  # packed float32, one channel
            self.chunks.append(np.frombuffer(mono.planes[0], np.float32, mono.samples))


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


def _open_container(source: Source, spec: DecodeSpec):
    """The opened container of `source`, or DecodeError: not_media, undecodable, empty, too_large."""
    input_file, head = _open_input(source, spec)
    try:
        # options: the probe decodes a frame or two per stream, single threaded: a pool of
        # decoder threads for that costs more than the decoding (the reads use their own).
        return av.open(input_file, container_options={"format_whitelist": CONTAINERS}, options={"threads": "1"},
                       metadata_errors="ignore")
    except _FFMPEG_ERRORS as e:
        kind = next((name for at, magic, name in _SIGNATURES if head[at:].startswith(magic)), None)
        if kind is None:
            raise DecodeError("not_media", "not a video container that may be opened") from None
        raise DecodeError("undecodable", f"truncated or damaged {kind}: {_short(e)}") from None


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
        input_file = _Handle(source, size)
    else:  # a pipe or a socket: read it, but never more than the limit allows
        data = source.read(spec.max_input_bytes + 1)
        size, input_file, head = len(data), io.BytesIO(data), data[:16]
    if size == 0:
        raise DecodeError("empty", "the input has no bytes")
    if size > spec.max_input_bytes:
        raise DecodeError("too_large", f"{size} bytes > max_input_bytes {spec.max_input_bytes}")
    return input_file, head


class _Handle:
    """One opening's own read position in a seekable file object.

    The pictures and the sound are read side by side from openings of their own (and WMA's audio
    decoders borrow more), each reading and seeking where it needs: handed the caller's file object
    itself, they would share its one position and read each other's bytes. A handle seeks the
    file to its own position before every read; the file is never read whole, so a plan that
    needs only the start of a long video reads only that.
    """

    def __init__(self, file: BinaryIO, size: int):
        self.file, self.size, self.position = file, size, 0

    def read(self, n: int = -1) -> bytes:
        self.file.seek(self.position)
        data = self.file.read(n)
        self.position += len(data)
        return data

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.position = offset + {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence]
        return self.position

    def tell(self) -> int:
        return self.position

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True


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
    declared = _declared_seconds(container, video)
    if declared and declared > spec.max_duration_s:
        raise DecodeError("too_long", f"{declared:.1f} s > max_duration_s {spec.max_duration_s:g}")
    return video


def _declared_seconds(container, video) -> float | None:
    """The length the header declares, which may be wrong or missing."""
    declared = container.duration / av.time_base if container.duration else None
    return declared or _seconds(video.duration, video)


def _decode_packet(packet, decoder=None) -> list | None:
    """The packet's frames, or None when the decoder rejects it.

    A damaged packet is dropped, as every player does (the codec conceals the gap), instead of
    failing the whole clip; a clip fails only when no video frame decodes at all.
    """
    try:
        return packet.decode() if decoder is None else decoder.decode(packet)
    except av.error.FFmpegError:
        return None


def _demux_only(container, wanted) -> None:
    """Let the demuxer skip the packets of streams nobody reads (subtitles, other tracks)."""
    keep = {s.index for s in wanted}
    for s in container.streams:
        s.discard = av.stream.Discard.default if s.index in keep else av.stream.Discard.all


def _seek(container, video, t: float) -> None:
    """Go to the video keyframe at or before time t > 0 (seconds from the first frame).

    Containers without an index (MPEG-TS) can only guess where t is and may land after it;
    the callers notice and read from time 0 instead.
    """
    container.seek(int(np.floor((t + _origin(video)) / video.time_base)), stream=video)


def _letterbox(frame, size: int, sar: float, reformatter: VideoReformatter) -> np.ndarray:
    """The frame as a player shows it, in size x size: turned as its display matrix says,
    scaled whole (swscale, straight to RGB) with its display aspect kept, padded black."""
    width, height = frame.width * sar, frame.height
    scale = size / max(width, height)
    w, h = max(1, round(width * scale)), max(1, round(height * scale))
    rgb = reformatter.reformat(frame, width=w, height=h, format="rgb24", interpolation="AREA").to_ndarray()
    rgb = np.rot90(rgb, round(frame.rotation / 90) % 4)  # counterclockwise quarter turns
    h, w = rgb.shape[:2]
    out = np.zeros((size, size, 3), np.uint8)
    top, left = (size - h) // 2, (size - w) // 2
    out[top : top + h, left : left + w] = rgb
    return out


def _check_pixels(width: int, height: int, spec: DecodeSpec) -> None:
    if width * height > spec.max_pixels:
        raise DecodeError("too_large", f"{width}x{height} frames > max_pixels {spec.max_pixels}")


def _check_duration(t: float, spec: DecodeSpec) -> None:
    if t > spec.max_duration_s:
        raise DecodeError("too_long", f"streams run past max_duration_s {spec.max_duration_s:g}")


def _origin(video) -> float:
    """Time 0: the video's first frame, in the container's clock."""
    return _seconds(video.start_time, video) or 0.0


def _seconds(value, stream) -> float | None:
    return None if value is None else value * float(stream.time_base)


def _decode_error(e: Exception) -> DecodeError:
    return e if isinstance(e, DecodeError) else DecodeError("undecodable", _short(e))


def _short(e: Exception) -> str:
    """FFmpeg's message without the errno and file name noise, at most one line."""
    text = getattr(e, "strerror", None) or str(e) or type(e).__name__
    return text.splitlines()[0][:200]
