"""A window's audio comes from a decoder of its own started AUDIO_PREROLL_S before it: that is
enough for the codec to settle (the samples are those of a decode from time 0, but for the noise
AAC and WMA draw at random), and a late window costs no more audio than an early one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import groupemotion_core.media.decode as decode
from groupemotion_core.media.decode import DecodeSpec, decode_clip, decode_windows
from groupemotion_core.media.spec import WindowPlan
from groupemotion_core.media.synthetic import SyntheticClip, garble, render_clip

SPEC = DecodeSpec(frame_size=16, clip_seconds=2.0)
REAL = Path(__file__).resolve().parents[2] / "media" / "real"


def synthetic(container: str, **kwargs) -> bytes:
    return render_clip(SyntheticClip(container=container, seconds=9.0, seed=3, **kwargs))


# source, and how far from a decode from time 0 its samples may be: 0 where the decoder draws no
# noise at random; the synthetic tone carries noise of amplitude 0.02 that AAC and WMA code as noise.
CODECS = {
    "aac": (lambda: synthetic("mp4", sample_rate=44100), 0.05),
    "aac_real": (lambda: REAL / "face_recognition_short_hamilton_clip.mp4", 0.0),
    "mp3": (lambda: synthetic("flv"), 0.0),
    "mp3_real": (lambda: REAL / "moviepy_chaplin.mp4", 0.0),
    "opus": (lambda: synthetic("webm"), 0.0),
    "vorbis_real": (lambda: REAL / "mediaelement_echo-hereweare.webm", 0.0),
    "wma": (lambda: synthetic("wmv"), 0.005),
}


@pytest.mark.parametrize("name", CODECS)
def test_the_pre_roll_is_enough_for_the_decoder_to_settle(monkeypatch, name):
    make, noise = CODECS[name]
    source = make()
    for start in (3.3, 6.05):
        clip = decode_clip(source, SPEC, start)
        with monkeypatch.context() as patch:
            patch.setattr(decode, "AUDIO_PREROLL_S", 1e6)  # every decoder starts at the first packet
            from_zero = decode_clip(source, SPEC, start)
        assert clip.audio_len == from_zero.audio_len == SPEC.audio_samples
        assert np.abs(from_zero.audio).max() > 0.2  # sound, not silence
        np.testing.assert_allclose(clip.audio, from_zero.audio, rtol=0, atol=noise)


def test_sparse_windows_decode_the_audio_of_the_windows_only(monkeypatch):
    """A minute of AAC at 16 kHz (15.6 packets a second), 3 windows of 2 s: each decodes its
    pre-roll and itself, whether the video is long or short."""
    data = render_clip(SyntheticClip(seconds=60.0, fps=5, width=32, height=32, seed=1))
    packets = []
    original = decode._decode_packet

    def counting(packet, decoder=None):
        packets.append(decoder is not None)  # a window's own audio decoder
        return original(packet, decoder)

    monkeypatch.setattr(decode, "_decode_packet", counting)
    windows = list(decode_windows(data, SPEC, WindowPlan(max_windows=3)))

    assert [w.start_s for w in windows] == [0.0, 28.0, 58.0]
    assert all(w.clip.audio_len == SPEC.audio_samples for w in windows)
    assert sum(packets) <= 3 * (SPEC.clip_seconds + decode.AUDIO_PREROLL_S + 0.5) * 16000 / 1024


def test_silence_for_rejected_packets_lands_where_it_did_with_a_frame_resampled_at_a_time(monkeypatch):
    """The resampler is fed a batch of frames at a time; a packet the decoder rejects becomes
    silence after all the samples before it, as when every frame was resampled on its own."""
    source = render_clip(SyntheticClip(container="mkv", seconds=6.0, fps=10, seed=4, sample_rate=44100))
    rng = np.random.default_rng(1)
    data = garble(source, lambda packet: packet.stream.type == "audio" and rng.random() < 0.1, seed=1)
    rejected = []
    original = decode._decode_packet

    def noting(packet, decoder=None):
        frames = original(packet, decoder)
        rejected.append(decoder is not None and frames is None)
        return frames

    monkeypatch.setattr(decode, "_decode_packet", noting)
    batched = list(decode_windows(data, SPEC))
    assert sum(rejected) > 5
    monkeypatch.setattr(decode._Sound, "BATCH", 1)
    for window, alone in zip(batched, decode_windows(data, SPEC)):
        assert window.clip.audio_len == SPEC.audio_samples
        np.testing.assert_array_equal(window.clip.audio, alone.clip.audio)
