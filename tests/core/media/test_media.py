"""Decoding generated clips in every container a web video comes in, turned or not, and every
kind of bad input, with real FFmpeg."""

from __future__ import annotations

import io
from fractions import Fraction

import av
import numpy as np
import pytest
from PIL import Image

from groupemotion_core.media.decode import REASONS, VIDEO_EXTENSIONS, DecodeError, DecodeSpec, decode_clip, decode_windows
from groupemotion_core.schema import CLASSES
from groupemotion_core.media.synthetic import CLASS_COLOURS, CLASS_PITCH_HZ, CONTAINERS, SyntheticClip, render_clip

SMALL = DecodeSpec(frame_size=64)


def nearest_class(rgb) -> str:
    """The class whose colour points the same way as `rgb` (clips jitter brightness, not hue)."""
    rgb = np.asarray(rgb, np.float64)
    cosines = [np.dot(rgb, c) / (np.linalg.norm(rgb) * np.linalg.norm(c)) for c in CLASS_COLOURS]
    return CLASSES[int(np.argmax(cosines))]


def dominant_hz(audio: np.ndarray, sample_rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(len(audio))))
    return float(np.fft.rfftfreq(len(audio), 1 / sample_rate)[np.argmax(spectrum)])


def assert_evenly_spaced(times, window: float, frame_interval: float):
    """Each chosen frame is the one on screen at its target, so it is off by under one frame."""
    targets = (np.arange(len(times)) + 0.5) * window / len(times)
    assert np.all(np.diff(times) >= 0)
    assert np.all(np.asarray(times) <= targets + 1e-6)
    assert np.all(np.asarray(times) > targets - frame_interval - 1e-6)


@pytest.mark.parametrize(
    "name, label, width, height, fps",
    [
        ("small.mp4", "Negative", 96, 64, 10),
        ("ntsc.mp4", "Neutral", 160, 90, 30000 / 1001),
        ("portrait.mp4", "Positive", 64, 112, 24),
        ("clip.mkv", "Negative", 96, 64, 25),
        ("clip.webm", "Positive", 96, 64, 15),
    ],
)
def test_decodes_sizes_rates_and_containers(make_clip, name, label, width, height, fps):
    path = make_clip(name, label=label, width=width, height=height, fps=fps, seconds=2.0)
    clip = decode_clip(path, SMALL)

    assert clip.frames.shape == (8, 64, 64, 3) and clip.frames.dtype == np.uint8
    assert clip.audio.shape == (SMALL.audio_samples,) and clip.audio.dtype == np.float32
    assert abs(clip.audio_len - 2.0 * SMALL.sample_rate) <= 0.05 * SMALL.sample_rate
    assert np.all(clip.audio[clip.audio_len :] == 0)
    assert_evenly_spaced(clip.frame_times, 2.0, 1 / fps)
    centre = clip.frames[:, 24:40, 24:40].reshape(-1, 3)
    assert nearest_class(np.median(centre, axis=0)) == label


def test_every_video_extension_can_be_generated():
    assert sorted(VIDEO_EXTENSIONS) == sorted(CONTAINERS)


@pytest.mark.parametrize("container", sorted(CONTAINERS))
def test_every_container_a_video_object_may_come_in_decodes(make_clip, container):
    """FLV among them: it cannot seek back to its start, where the decoder once did."""
    fps = 25 if container in ("mpg", "mpeg") else 10  # MPEG-1/2 video knows only MPEG rates
    path = make_clip(f"clip.{container}", label="Positive", fps=fps, seconds=2.0)

    [window] = decode_windows(path, SMALL)  # a 2 s video is one window

    clip = window.clip
    assert clip.seconds == pytest.approx(2.0, abs=1.5 / fps)  # FLV, ASF, TS: no last frame duration
    assert_evenly_spaced(clip.frame_times, clip.seconds, 1 / fps + 0.03)  # FLV and ASF start video late
    centre = clip.frames[:, 24:40, 24:40].reshape(-1, 3)
    assert nearest_class(np.median(centre, axis=0)) == "Positive"
    assert clip.audio_len == round(clip.seconds * SMALL.sample_rate)
    pitch = CLASS_PITCH_HZ[CLASSES.index("Positive")]
    assert 0.88 * pitch <= dominant_hz(clip.audio[: clip.audio_len], SMALL.sample_rate) <= 1.12 * pitch


@pytest.mark.parametrize("rotation", [90, 180, 270, -90])
@pytest.mark.parametrize("container", ["mp4", "mkv"])
def test_a_turned_video_comes_out_upright(container, rotation):
    """Stored turned, with a display matrix saying how a player turns it back (PyAV writes it as
    FFmpeg reads it: counterclockwise degrees), as a phone stores a video shot upright."""
    def decoded(turn):
        clip = SyntheticClip(container=container, width=96, height=64, seconds=1.0, seed=4, rotation=turn)
        return decode_clip(render_clip(clip), SMALL).frames.astype(np.float32)

    upright, turned = decoded(0), decoded(rotation)

    assert not turned[:, :10].any() and not turned[:, -10:].any()  # landscape: black bars above and below
    errors = [np.abs(np.rot90(turned, k, axes=(1, 2)) - upright).mean() for k in range(4)]
    assert errors[0] < 4 and min(errors[1:]) > 8  # the same picture, and no other turn of it


def test_every_source_kind_gives_the_same_clip(make_clip):
    path = make_clip("a.mp4", seconds=1.0)
    data = path.read_bytes()
    expected = decode_clip(data, SMALL)
    with open(path, "rb") as f:
        others = [decode_clip(s, SMALL) for s in (str(path), path, bytearray(data), f)]
    for clip in others:
        np.testing.assert_array_equal(clip.frames, expected.frames)
        np.testing.assert_array_equal(clip.audio, expected.audio)
        assert clip.frame_times == expected.frame_times


def test_clip_without_audio_is_not_an_error(make_clip):
    clip = decode_clip(make_clip("mute.mp4", audio=False), SMALL)
    assert clip.audio_len == 0
    assert not clip.audio.any()
    assert clip.frames.any()


def test_long_video_is_cut_to_the_window(make_clip):
    path = make_clip("long.mp4", seconds=6.5, fps=10)

    clip = decode_clip(path, SMALL)
    assert clip.audio_len == SMALL.audio_samples
    assert_evenly_spaced(clip.frame_times, 5.0, 0.1)

    late = decode_clip(path, SMALL, start=1.0)
    assert all(1.0 <= t < 6.0 for t in late.frame_times)
    assert late.audio_len == SMALL.audio_samples
    shifted = np.asarray(late.frame_times) - 1.0
    np.testing.assert_allclose(shifted, clip.frame_times, atol=0.1 + 1e-6)

    tail = decode_clip(path, SMALL, start=4.0)  # only 2.5 s left: a window of its own length
    assert abs(tail.audio_len - 2.5 * SMALL.sample_rate) <= 0.05 * SMALL.sample_rate
    assert all(4.0 <= t < 6.5 for t in tail.frame_times)


def test_start_after_the_end_is_an_error(make_clip):
    with pytest.raises(DecodeError) as e:
        decode_clip(make_clip(seconds=1.0), SMALL, start=3.0)
    assert e.value.reason == "undecodable"


@pytest.mark.parametrize("width, height", [(160, 90), (90, 160)])
def test_letterbox_pads_black_and_keeps_the_whole_frame(make_clip, width, height):
    clip = decode_clip(make_clip(width=width, height=height, label="Negative", seconds=1.0), SMALL)
    frames = clip.frames if width > height else clip.frames.transpose(0, 2, 1, 3)
    content = round(64 * 90 / 160)  # 36 rows (or columns) of picture, 14 black on each side
    pad = (64 - content) // 2
    assert not frames[:, :pad].any() and not frames[:, pad + content :].any()
    picture = frames[:, pad : pad + content]
    assert picture[:, [0, -1]].mean() > 40  # the picture reaches the padding: nothing cropped
    assert nearest_class(np.median(picture.reshape(-1, 3), axis=0)) == "Negative"


def write_numbered(path, times_ms, **x264):
    """An H.264 clip whose frame i is grey level 6*i and is shown at times_ms[i]."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=10, options=x264)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        for i, ms in enumerate(times_ms):
            grey = np.full((48, 64, 3), 6 * i, np.uint8)
            frame = av.VideoFrame.from_ndarray(grey, format="rgb24")
            frame.pts, frame.time_base = ms, Fraction(1, 1000)
            out.mux(stream.encode(frame))
        out.mux(stream.encode())


def shown_at(times_ms, window_start: float, window: float) -> list[int]:
    targets = window_start + (np.arange(8) + 0.5) * window / 8
    return [max(i for i, ms in enumerate(times_ms) if ms / 1000 <= t) for t in targets]


@pytest.mark.parametrize("container", ["mp4", "mkv"])
def test_variable_frame_rate_picks_frames_by_timestamp(tmp_path, container):
    """Frames 0.5 s apart, then 0.1 s apart."""
    times_ms = [0, 500, 1000, 1500] + list(range(1600, 4000, 100))
    write_numbered(tmp_path / f"vfr.{container}", times_ms)

    clip = decode_clip(tmp_path / f"vfr.{container}", DecodeSpec(frame_size=32))

    shown = shown_at(times_ms, 0.0, times_ms[-1] / 1000 + 0.1)  # the last frame lasts 0.1 s
    np.testing.assert_allclose(clip.frame_times, [times_ms[i] / 1000 for i in shown], atol=2e-3)
    grey = clip.frames[:, 8:24, 8:24].mean(axis=(1, 2, 3))
    np.testing.assert_allclose(grey, [6 * i for i in shown], atol=3)


@pytest.mark.parametrize("start", [0.0, 1.0])
def test_mpeg_ts_without_index_seeks_right(tmp_path, start):
    """MPEG-TS has no index: a seek only guesses, and packets carry no durations."""
    times_ms = list(range(0, 4000, 100))
    write_numbered(tmp_path / "clip.ts", times_ms, keyint="10", bframes="2")

    clip = decode_clip(tmp_path / "clip.ts", DecodeSpec(frame_size=32, clip_seconds=2.0), start)

    shown = np.asarray(shown_at(times_ms, start, 2.0))
    np.testing.assert_allclose(clip.frame_times, shown / 10, atol=1e-6)
    np.testing.assert_allclose(clip.frames[:, 8:24, 8:24].mean(axis=(1, 2, 3)) / 6, shown, atol=0.5)


def test_avi_with_b_frames_keeps_time_running_forward(tmp_path):
    """AVI stores no presentation times; with B-frames only the decode times can be trusted.

    They lag the picture by the B-frame delay (here 2 frames), as they do in FFmpeg itself.
    """
    times_ms = list(range(0, 4000, 100))
    write_numbered(tmp_path / "clip.avi", times_ms, keyint="10", bframes="2")

    clip = decode_clip(tmp_path / "clip.avi", DecodeSpec(frame_size=32, clip_seconds=2.0))

    shown = np.asarray(shown_at(times_ms, 0.0, 2.0))
    np.testing.assert_allclose(clip.frame_times, shown / 10, atol=1e-6)
    lag = shown - clip.frames[:, 8:24, 8:24].mean(axis=(1, 2, 3)) / 6
    assert np.all((lag > -0.5) & (lag < 2.5))


@pytest.mark.parametrize(
    "label, container, source_rate",
    [("Negative", "mp4", 16000), ("Neutral", "mp4", 44100), ("Positive", "webm", 48000)],
)
def test_audio_is_resampled_to_the_spec_rate(label, container, source_rate):
    data = render_clip(SyntheticClip(label, container=container, sample_rate=source_rate, seed=3))
    clip = decode_clip(data, SMALL)
    pitch = CLASS_PITCH_HZ[CLASSES.index(label)]
    heard = dominant_hz(clip.audio[: clip.audio_len], SMALL.sample_rate)
    assert 0.88 * pitch <= heard <= 1.12 * pitch  # the class pitch, jittered by up to 10%
    assert 0.2 < np.abs(clip.audio[: clip.audio_len]).max() < 1.0  # the 0.4 tone, not silence


def _image(fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), CLASS_COLOURS[0]).save(buffer, fmt)
    return buffer.getvalue()


def _audio_only() -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as out:
        stream = out.add_stream("aac", rate=16000)
        stream.layout = "mono"
        for pts in range(0, 16000, 1024):
            silence = np.zeros((1, 1024), np.float32)
            frame = av.AudioFrame.from_ndarray(silence, format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, pts
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return buffer.getvalue()


GOOD = render_clip(SyntheticClip(seconds=2.0))


@pytest.mark.parametrize(
    "data, spec, reason",
    [
        (b"", SMALL, "empty"),
        (np.random.default_rng(0).bytes(20_000), SMALL, "not_media"),
        (b"just some text, as a video\n" * 100, SMALL, "not_media"),
        (_image("PNG"), SMALL, "not_media"),
        (_image("JPEG"), SMALL, "not_media"),
        (GOOD[: int(len(GOOD) * 0.3)], SMALL, "undecodable"),
        (_audio_only(), SMALL, "no_video"),
        (GOOD, DecodeSpec(frame_size=64, max_input_bytes=1000), "too_large"),
        (GOOD, DecodeSpec(frame_size=64, max_pixels=96 * 64 - 1), "too_large"),
        (GOOD, DecodeSpec(frame_size=64, max_duration_s=1.0), "too_long"),
    ],
    ids=["empty", "random", "text", "png", "jpeg", "truncated", "audio_only", "bytes", "pixels",
         "duration"],
)
def test_bad_input_gives_its_reason(tmp_path, data, spec, reason):
    path = tmp_path / "clip.mp4"  # the name lies for every non-video here: content decides
    path.write_bytes(data)
    for source in (data, path):
        for decode in (lambda: decode_clip(source, spec), lambda: next(decode_windows(source, spec))):
            with pytest.raises(DecodeError) as e:
                decode()  # decode_windows: before its first window
            assert e.value.reason == reason
            assert e.value.detail and len(e.value.detail) < 200 and "\n" not in e.value.detail


def test_damaged_bytes_give_a_clip_or_a_decode_error_never_another_exception():
    rng = np.random.default_rng(1)
    outcomes = set()
    for _ in range(12):
        data = np.frombuffer(GOOD, np.uint8).copy()
        at = rng.integers(0, len(data), size=rng.integers(1, 64))
        data[at] = rng.integers(0, 256, size=len(at), dtype=np.uint8)
        try:
            clip = decode_clip(data.tobytes(), SMALL)
            assert clip.frames.shape == (8, 64, 64, 3)
            outcomes.add("ok")
        except DecodeError as e:
            assert e.reason in REASONS
            outcomes.add(e.reason)
    assert "ok" in outcomes  # damage inside the picture data is concealed, as in any player
