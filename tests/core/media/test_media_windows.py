"""decode_windows: a whole video in one forward pass, each window exactly the clip decode_clip
gives for it alone, on generated H.264/VP8/FLV video with AAC/Opus/MP3 audio."""

from __future__ import annotations

import io

import numpy as np
import pytest

import groupemotion_core.media.decode as decode
from groupemotion_core.media.decode import DecodeError, DecodeSpec, Window, decode_clip, decode_windows
from groupemotion_core.media.spec import FIRST_WINDOW, WindowPlan, plan_windows
from groupemotion_core.media.synthetic import SyntheticClip, garble, render_clip

SPEC = DecodeSpec(frame_size=32, clip_seconds=2.0)
SECONDS = 11.0
PLANS = {
    "back_to_back": WindowPlan(),
    "overlapping": WindowPlan(stride_s=0.75),
    "sparse": WindowPlan(stride_s=3.5),  # gaps with keyframes in them: sought across
    "max_windows": WindowPlan(max_windows=3),
}


@pytest.fixture(scope="module")
def videos() -> dict[str, bytes]:
    """11 s clips with a keyframe every second; 44.1 kHz audio, so it is resampled. The native
    AAC encoder fills noise bands from a random generator that the decoder runs on from frame to
    frame: the audio of a window depends on all that was decoded before it."""
    def clip(container: str, **kwargs) -> bytes:
        spec = SyntheticClip(container=container, seconds=SECONDS, fps=10, keyint=10, seed=5, **kwargs)
        return render_clip(spec)

    return {
        "mp4": clip("mp4", sample_rate=44100),
        "ts": clip("ts", sample_rate=44100),  # no index: seeks only guess
        "flv": clip("flv"),  # FLV cannot seek back to its start
        "webm": clip("webm"),
        "mute.mkv": clip("mkv", audio=False),
    }


def assert_same_clip(window, alone):
    np.testing.assert_array_equal(window.clip.frames, alone.frames)
    np.testing.assert_array_equal(window.clip.audio, alone.audio)
    assert window.clip.frame_times == alone.frame_times
    assert (window.clip.audio_len, window.clip.seconds) == (alone.audio_len, alone.seconds)


@pytest.mark.parametrize("plan", PLANS.values(), ids=PLANS.keys())
def test_each_window_is_the_clip_decode_clip_gives_alone(videos, plan):
    data = videos["mp4"]
    windows = list(decode_windows(data, SPEC, plan))

    spans = plan_windows(SECONDS, SPEC.clip_seconds, plan)
    assert [(w.index, w.count) for w in windows] == [(i, len(spans)) for i in range(len(spans))]
    np.testing.assert_allclose([(w.start_s, w.end_s) for w in windows], spans, atol=1e-6)
    for window in windows:
        assert window.error is None
        assert window.clip.audio_len == round((window.end_s - window.start_s) * SPEC.sample_rate)
        assert all(window.start_s - 0.1 < t < window.end_s for t in window.clip.frame_times)
        assert_same_clip(window, decode_clip(data, SPEC, window.start_s))


@pytest.mark.parametrize("name", ["ts", "flv", "webm", "mute.mkv"])
def test_containers_that_seek_badly_or_not_at_all_give_the_same_clips(videos, name):
    data = videos[name]
    for plan in (PLANS["back_to_back"], PLANS["sparse"]):
        windows = list(decode_windows(data, SPEC, plan))
        assert [w.start_s for w in windows] == pytest.approx([i * (plan.stride_s or 2.0) for i in range(len(windows))])
        for window in windows:
            # FLV and MPEG-TS store no frame durations: their video ends with its last frame's start
            assert window.end_s == pytest.approx(min(window.start_s + 2.0, SECONDS), abs=0.11)
            assert_same_clip(window, decode_clip(data, SPEC, window.start_s))
            assert (window.clip.audio_len > 0) == (name != "mute.mkv")


def test_first_window_plan_reads_only_the_start_of_the_file():
    data = render_clip(SyntheticClip(seconds=60.0, fps=10, seed=2))
    reads = []

    class Recorded(io.BytesIO):
        def read(self, n=-1):
            chunk = super().read(n)
            reads.append(len(chunk))
            return chunk

    [window] = decode_windows(Recorded(data), SPEC, FIRST_WINDOW)
    assert (window.start_s, window.end_s, window.count) == (0.0, 2.0, 1)
    assert sum(reads) < len(data) / 2  # headers and the first seconds, a few times; not the minute
    assert_same_clip(window, decode_clip(data, SPEC))


def test_a_pipe_gives_the_same_windows_as_bytes(videos):
    class Pipe(io.RawIOBase):
        def __init__(self, data: bytes):
            self.data = io.BytesIO(data)

        def readable(self):
            return True

        def readinto(self, buffer):
            chunk = self.data.read(min(len(buffer), 4096))
            buffer[: len(chunk)] = chunk
            return len(chunk)

    data = videos["mp4"]
    piped = list(decode_windows(io.BufferedReader(Pipe(data)), SPEC))
    assert len(piped) == 6
    for window, expected in zip(piped, decode_windows(data, SPEC)):
        assert_same_clip(window, expected.clip)


@pytest.mark.parametrize("name", ["mp4", "ts", "flv"])
def test_a_file_object_gives_the_same_windows_and_clips_as_bytes(videos, name, tmp_path):
    """The pictures and the sound read the file side by side, each opening at a position of its own."""
    data = videos[name]
    path = tmp_path / f"video.{name}"
    path.write_bytes(data)
    for plan in (PLANS["back_to_back"], PLANS["sparse"]):
        with open(path, "rb") as f:
            from_file = list(decode_windows(f, SPEC, plan))
        expected = list(decode_windows(data, SPEC, plan))
        assert len(from_file) == len(expected) > 1
        for window, alone in zip(from_file, expected):
            assert window.error is None and window.clip.audio_len > 0
            assert_same_clip(window, alone.clip)
    with open(path, "rb") as f:
        f.seek(100)  # wherever the caller left it: the video is read from its start
        clip = decode_clip(f, SPEC, 7.0)
    assert expected[2].start_s == 7.0
    assert_same_clip(expected[2], clip)


def test_an_mp4_read_a_window_at_a_time_is_opened_once_and_gives_what_an_opening_per_reader_gives(videos, monkeypatch):
    """decode_clip and sparse windows of an MP4 read the pictures and the sound from the opening
    the window's length or the video's end was found in, each seeking to every window (window 0's
    audio restarts before the first packet)."""
    data, starts, sparse = videos["mp4"], (0.0, 0.5, 7.0, 10.0), WindowPlan(max_windows=2)
    opened = []
    opening = decode._open_container
    monkeypatch.setattr(decode, "_open_container", lambda *args: opened.append(1) or opening(*args))
    clips = [decode_clip(data, SPEC, start) for start in starts]
    windows = list(decode_windows(data, SPEC, sparse))
    assert len(opened) == len(starts) + 1 and len(windows) == 2

    monkeypatch.setattr(decode, "_reusable", lambda container: None)  # each reader opens the input
    for clip, start in zip(clips, starts):
        assert_same_clip(Window(0, 1, start, start + clip.seconds, clip), decode_clip(data, SPEC, start))
    for window, expected in zip(windows, decode_windows(data, SPEC, sparse)):
        assert_same_clip(window, expected.clip)
    assert len(opened) > 3 * (len(starts) + 1)


def garbled_start(seconds: float) -> bytes:
    """A 6 s H.264 MKV, keyframes 2 s apart, whose video packets before `seconds` are garbage."""
    source = render_clip(SyntheticClip(container="mkv", seconds=6.0, fps=10, keyint=20, seed=1))
    return garble(source, lambda packet: packet.stream.type == "video" and packet.pts * packet.time_base < seconds)


def test_a_window_without_a_picture_is_yielded_with_its_error():
    data = garbled_start(2.0)  # nothing decodes before the keyframe at 2 s
    spec = DecodeSpec(frame_size=32, clip_seconds=1.0)

    windows = list(decode_windows(data, spec))

    assert [w.start_s for w in windows] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    for window in windows[:2]:
        assert window.clip is None and window.error.reason == "undecodable"
        with pytest.raises(DecodeError) as alone:
            decode_clip(data, spec, window.start_s)
        assert str(alone.value) == str(window.error)
    for window in windows[2:]:
        assert window.error is None and window.clip.audio_len == spec.audio_samples
        assert window.clip.frame_times[0] == window.start_s  # a frame every 0.1 s again
        assert_same_clip(window, decode_clip(data, spec, window.start_s))


@pytest.mark.parametrize("kind", ["mp4", "ts", "truncated.mkv"])
def test_sparse_windows_find_the_end_from_the_last_packets_as_a_whole_survey_does(monkeypatch, kind):
    """A minute of video, 3 windows: only its tail is demuxed to find its end, also where the
    header is wrong (a Matroska file cut short still declares the whole minute)."""
    container = kind.split(".")[-1]
    data = render_clip(SyntheticClip(container=container, seconds=60.0, fps=5, width=32, height=32, keyint=10, seed=2))
    if kind.startswith("truncated"):
        data = data[: int(len(data) * 0.7)]
    plan = WindowPlan(max_windows=3)

    windows = list(decode_windows(data, SPEC, plan))
    monkeypatch.setattr(decode, "_tail_end", lambda *args: None)  # demux every packet instead
    surveyed = list(decode_windows(data, SPEC, plan))

    assert [(w.start_s, w.end_s) for w in windows] == [(w.start_s, w.end_s) for w in surveyed]
    assert windows[-1].end_s < 45 if kind.startswith("truncated") else windows[-1].end_s == pytest.approx(60, abs=0.21)
    for window, expected in zip(windows, surveyed):
        assert_same_clip(window, expected.clip)
