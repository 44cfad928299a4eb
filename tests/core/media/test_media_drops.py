"""Dropping the frames no window shows: every window stays, array for array, what a decode of
every frame gives, on every container and codec the generated clips cover (B-frame H.264 and HEVC
among them), variable frame rate, turned video and the real clips; and frames are really dropped."""

from __future__ import annotations

import io
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

import groupemotion_core.media.decode as decode
from groupemotion_core.media.decode import DecodeSpec, decode_clip, decode_windows
from groupemotion_core.media.spec import WindowPlan
from groupemotion_core.media.synthetic import CONTAINERS, SyntheticClip, render_clip

SPEC = DecodeSpec(frame_size=32, clip_seconds=2.0)
PLANS = {
    "back_to_back": WindowPlan(),
    "overlapping": WindowPlan(stride_s=0.75),
    "sparse": WindowPlan(stride_s=2.5),  # gaps of 0.5 s, keyframes 1 s apart: sought across
}
REAL = Path(__file__).resolve().parents[2] / "media" / "real"


def synthetic(container: str, **kwargs) -> bytes:
    fps = 25 if container in ("mpg", "mpeg") else 10  # MPEG-1/2 video knows only MPEG rates
    return render_clip(SyntheticClip(container=container, seconds=7.0, fps=fps, keyint=10, seed=7, **kwargs))


def variable_rate_b_frames() -> bytes:
    """H.264 with B-frames whose frames come 0.4 s apart, then 0.1 s, then 0.25 s."""
    times_ms = [0, 400, 800, 1200] + list(range(1300, 4000, 100)) + list(range(4000, 7000, 250))
    out_buffer = io.BytesIO()
    with av.open(out_buffer, "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=10, options={"preset": "ultrafast", "x264-params": "bframes=3"})
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        for i, ms in enumerate(times_ms):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 6 * i, np.uint8), format="rgb24")
            frame.pts, frame.time_base = ms, Fraction(1, 1000)
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return out_buffer.getvalue()


@pytest.fixture(scope="module")
def clips() -> dict[str, bytes]:
    made = {f"plain.{container}": synthetic(container) for container in sorted(CONTAINERS)}
    made.update({
        "bframes.mp4": synthetic("mp4", bframes=3),
        "bframes.mkv": synthetic("mkv", bframes=3),
        "bframes.ts": synthetic("ts", bframes=3),
        "bframes.flv": synthetic("flv", bframes=3, video_codec="libx264"),
        "bframes_turned.mp4": synthetic("mp4", bframes=3, rotation=90),
        "hevc.mp4": synthetic("mp4", bframes=3, video_codec="libx265"),
        "hevc.mkv": synthetic("mkv", bframes=3, video_codec="libx265"),
        "vfr_bframes.mp4": variable_rate_b_frames(),
        "bframes.avi": synthetic("avi", bframes=3, video_codec="libx264"),  # no pts: nothing dropped
    })
    return made


@pytest.fixture
def full_decode(monkeypatch):
    """Decoding with no frame dropped, whatever the codec: the reference every test compares to."""
    def decoded(run):
        with monkeypatch.context() as patch:
            patch.setattr(decode, "_DROPPING_CODECS", frozenset())
            return run()
    return decoded


@pytest.fixture
def frames_decoded(monkeypatch):
    """Counts the video frames the decoder gives back (a dropped one is never given)."""
    counted = [0]
    original = decode._decode_packet

    def counting(packet, decoder=None):
        frames = original(packet, decoder)
        counted[0] += sum(isinstance(f, av.VideoFrame) for f in frames or ())
        return frames

    monkeypatch.setattr(decode, "_decode_packet", counting)
    return counted


def assert_same_windows(got, expected):
    assert [(w.start_s, w.end_s, w.error) for w in got] == [(w.start_s, w.end_s, w.error) for w in expected]
    for window, reference in zip(got, expected):
        np.testing.assert_array_equal(window.clip.frames, reference.clip.frames)
        np.testing.assert_array_equal(window.clip.audio, reference.clip.audio)
        assert window.clip.frame_times == reference.clip.frame_times
        assert (window.clip.audio_len, window.clip.seconds) == (reference.clip.audio_len, reference.clip.seconds)


@pytest.mark.parametrize("plan", PLANS.values(), ids=PLANS.keys())
def test_windows_are_those_of_a_full_decode_for_every_clip(clips, full_decode, plan):
    for name, data in clips.items():
        expected = full_decode(lambda: list(decode_windows(data, SPEC, plan)))
        got = list(decode_windows(data, SPEC, plan))
        assert len(got) >= 3, name
        assert_same_windows(got, expected)


@pytest.mark.parametrize("name", ["bframes.mp4", "bframes.ts", "hevc.mkv", "vfr_bframes.mp4", "bframes_turned.mp4"])
def test_a_clip_alone_is_that_of_a_full_decode(clips, full_decode, name):
    data = clips[name]
    for start in (0.0, 1.35, 2.0, 4.9):
        expected = full_decode(lambda: decode_clip(data, SPEC, start))
        clip = decode_clip(data, SPEC, start)
        np.testing.assert_array_equal(clip.frames, expected.frames)
        np.testing.assert_array_equal(clip.audio, expected.audio)
        assert clip.frame_times == expected.frame_times


@pytest.mark.parametrize("name, dropped", [
    ("bframes.mp4", True), ("hevc.mkv", True), ("vfr_bframes.mp4", True),
    ("plain.mp4", False),  # no B-frames: every frame is a reference
    ("bframes.avi", False),  # B-frames, but AVI stores no presentation times
])
def test_non_reference_frames_no_window_shows_are_dropped(clips, full_decode, frames_decoded, name, dropped):
    data, spec = clips[name], DecodeSpec(frame_size=32, clip_seconds=2.0, num_frames=2)  # 2 of 20 frames shown
    full_decode(lambda: list(decode_windows(data, spec)))
    everything, frames_decoded[0] = frames_decoded[0], 0
    list(decode_windows(data, spec))
    assert everything >= 43  # each of the 43 to 70 frames of the 7 s, at least once
    assert (frames_decoded[0] < 0.75 * everything) if dropped else (frames_decoded[0] == everything)


REAL_CLIPS = sorted(p.name for p in REAL.iterdir() if p.suffix not in (".tsv", ".md"))


@pytest.mark.parametrize("name", REAL_CLIPS)
def test_real_clips_give_the_windows_of_a_full_decode(full_decode, name):
    spec = DecodeSpec(frame_size=32, clip_seconds=3.0)
    for plan in (WindowPlan(), WindowPlan(stride_s=7.7)):
        expected = full_decode(lambda: list(decode_windows(REAL / name, spec, plan)))
        assert_same_windows(list(decode_windows(REAL / name, spec, plan)), expected)
