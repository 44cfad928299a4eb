"""Real web clips (tests/media/real, see its README): each decodes whole, window after window,
as a player would show it, and the one-pass windows are the clips decode_clip gives alone."""

from __future__ import annotations

import csv
from pathlib import Path

import av
import numpy as np
import pytest

from groupemotion_core.media.decode import DecodeSpec, decode_clip, decode_windows
from groupemotion_core.media.spec import MIN_WINDOW_S

REAL = Path(__file__).resolve().parents[2] / "media" / "real"
with open(REAL / "SOURCES.tsv", newline="") as f:
    SOURCES = {row["file"]: row for row in csv.DictReader(f, delimiter="\t")}
SPEC = DecodeSpec(frame_size=64)  # default 5 s windows and 8 frames; small frames keep it quick


def video_end(path: Path) -> float:
    """Seconds from the first video frame to the end of the last, from the packets' own times."""
    with av.open(str(path)) as container:
        video = next(s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic)
        ends = []
        for packet in container.demux(video):
            ts = packet.pts if packet.pts is not None else packet.dts
            if ts is not None:
                ends.append(ts + (packet.duration or 0))
        return float((max(ends) - (video.start_time or 0)) * video.time_base)


def test_the_sources_list_names_every_clip():
    assert sorted(p.name for p in REAL.iterdir() if p.suffix not in (".tsv", ".md")) == sorted(SOURCES)


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_every_real_clip_decodes_whole(name):
    path = REAL / name
    has_audio = SOURCES[name]["audio_codec"] != "none"

    windows = list(decode_windows(path, SPEC))

    end = video_end(path)
    assert [w.start_s for w in windows] == [5.0 * i for i in range(len(windows))]
    assert -1e-6 < end - windows[-1].end_s < MIN_WINDOW_S  # a shorter tail is dropped
    assert len(windows) == max(1, int(np.ceil(end / 5.0 - MIN_WINDOW_S / 5.0)))
    for window in windows:
        assert window.error is None, window.error
        clip = window.clip
        assert window.end_s - window.start_s == pytest.approx(min(5.0, end - window.start_s), abs=1e-6)
        assert clip.seconds == pytest.approx(window.end_s - window.start_s)
        assert all(window.start_s - 1.0 < t < window.end_s for t in clip.frame_times)
        assert np.all(np.diff(clip.frame_times) >= 0)
        assert clip.frames.std() > 5  # pictures, not blanks (a frame may be black: the WMV opens on one)
        assert (clip.audio_len > 0) == has_audio
    if has_audio:
        assert max(np.abs(w.clip.audio).max() for w in windows) > 0.01  # sound, not silence


@pytest.mark.parametrize(
    "name", ["face_recognition_short_hamilton_clip.mp4", "moviepy_chaplin.mp4", "mmaction2_test.avi"]
)  # H.264 + AAC with a late video start; H.264 + MP3; MPEG-4 part 2 + MP3 in AVI
def test_one_pass_windows_are_the_clips_decode_clip_gives_alone(name):
    path = REAL / name
    for window in decode_windows(path, SPEC):
        alone = decode_clip(path, SPEC, window.start_s)
        np.testing.assert_array_equal(window.clip.frames, alone.frames)
        np.testing.assert_array_equal(window.clip.audio, alone.audio)
        assert (window.clip.frame_times, window.clip.audio_len) == (alone.frame_times, alone.audio_len)
