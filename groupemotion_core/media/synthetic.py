"""Generated audio-visual clips whose class can be learned from picture and sound.

Tests, benchmarks and the quickstart need real encoded media (H.264 + AAC through FFmpeg, so
every decoder path is exercised), but no dataset can be downloaded here. Each class gets its own
dominant colour and its own tone pitch, with per-clip jitter, a moving block and noise, so a small
model can learn the task from either modality, and a broken modality shows up as lost accuracy.

Web video comes in many containers and is not always stored the way it is shown, so a clip can be
written in every container the decoder accepts (with the codecs usually found in it) and stored
turned, with a display matrix that turns it back, as phones do.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO, Callable

import av
import numpy as np

from groupemotion_core.schema import CLASSES

# One (R, G, B) colour and one tone frequency per class, in CLASSES order.
CLASS_COLOURS = ((200, 40, 40), (60, 160, 60), (40, 60, 210))
CLASS_PITCH_HZ = (220.0, 550.0, 1200.0)


@dataclass(frozen=True)
class SyntheticClip:
    """How to render one generated clip."""

    label: str = "Neutral"
    width: int = 96
    height: int = 64
    fps: float = 10.0
    seconds: float = 2.0
    audio: bool = True
    sample_rate: int = 16000
    seed: int = 0
    container: str = "mp4"  # a key of CONTAINERS (the file extension)
    rotation: int = 0  # degrees counterclockwise a player turns the stored picture (0, 90, 180, 270)
    keyint: int = 0  # frames from one keyframe to the next; 0: the encoder's default
    bframes: int = 0  # B-frames between references (H.264, HEVC), as web encoders write them
    video_codec: str | None = None  # the encoder, e.g. libx265; None: the container's usual one


# Container (file extension) -> (FFmpeg muxer, video encoder, audio encoder, audio rate or None
# for the clip's own). MPEG-1/2 video needs an MPEG frame rate (24, 25, 30, ...); FLV's classic
# pair is Sorenson H.263 and MP3, whose FLV rates are 11/22/44 kHz.
CONTAINERS = {
    "mp4": ("mp4", "libx264", "aac", None),
    "m4v": ("ipod", "libx264", "aac", None),
    "mov": ("mov", "libx264", "aac", None),
    "3gp": ("3gp", "libx264", "aac", None),
    "mkv": ("matroska", "libx264", "aac", None),
    "webm": ("webm", "libvpx", "libopus", 48000),
    "avi": ("avi", "mpeg4", "libmp3lame", None),
    "flv": ("flv", "flv", "libmp3lame", 22050),
    "ts": ("mpegts", "libx264", "aac", None),
    "mpg": ("mpeg", "mpeg1video", "mp2", None),
    "mpeg": ("mpeg", "mpeg2video", "mp2", None),
    "ogv": ("ogg", "libvpx", "libopus", 48000),
    "wmv": ("asf", "wmv2", "wmav2", None),
    "asf": ("asf", "msmpeg4", "wmav2", None),
}


def render_clip(spec: SyntheticClip, dest: str | Path | BinaryIO | None = None) -> bytes | None:
    """Encode `spec` to `dest` (a path or a binary file); with no `dest`, return the bytes."""
    if dest is None:
        buffer = io.BytesIO()
        _encode(spec, buffer)
        return buffer.getvalue()
    _encode(spec, str(dest) if isinstance(dest, Path) else dest)
    return None


def garble(data: bytes, damaged: Callable[[av.Packet], bool], seed: int = 0) -> bytes:
    """The Matroska file `data` remuxed with the packets `damaged` picks replaced by random bytes
    of the same size, times and keyframe flag: damage a decoder has to get through."""
    rng = np.random.default_rng(seed)
    garbled = io.BytesIO()
    with av.open(io.BytesIO(data)) as src, av.open(garbled, "w", format="matroska") as out:
        streams = {s.index: out.add_stream_from_template(s) for s in src.streams}
        for packet in src.demux():
            if packet.dts is None:  # the flush packets at the end
                continue
            stream = streams[packet.stream.index]
            if damaged(packet):
                garbage = av.Packet(rng.bytes(packet.size))
                garbage.pts, garbage.dts, garbage.duration = packet.pts, packet.dts, packet.duration
                garbage.time_base, garbage.is_keyframe = packet.time_base, packet.is_keyframe
                packet = garbage
            packet.stream = stream
            out.mux(packet)
    return garbled.getvalue()


def _encode(spec: SyntheticClip, target) -> None:
    rng = np.random.default_rng(spec.seed)
    cls = CLASSES.index(spec.label)
    fmt, video_codec, audio_codec, audio_rate = CONTAINERS[spec.container]
    video_codec = spec.video_codec or video_codec
    turns = spec.rotation // 90
    if spec.rotation % 90:
        raise ValueError(f"rotation must be a multiple of 90 degrees, got {spec.rotation}")
    # AVI counts frames instead of timing them: moving every stream later to make the MP3
    # encoder's first (negative) time 0 would put a hole after the first video frame.
    options = {"avoid_negative_ts": "disabled"} if fmt == "avi" else {}
    with av.open(target, mode="w", format=fmt, container_options=options) as out:
        rate = Fraction(spec.fps).limit_denominator(1001)
        video = out.add_stream(video_codec, rate=rate)
        video.width, video.height = (spec.height, spec.width) if turns % 2 else (spec.width, spec.height)
        video.pix_fmt = "yuv420p"
        if video_codec == "libx264":  # zerolatency would rule B-frames out
            video.options = {"preset": "ultrafast", "x264-params": f"bframes={spec.bframes}"} if spec.bframes else \
                {"preset": "ultrafast", "tune": "zerolatency"}
        elif video_codec == "libx265":
            video.options = {"preset": "ultrafast", "x265-params": f"bframes={spec.bframes}:log-level=error"}
        if spec.keyint:
            video.codec_context.gop_size = spec.keyint
        if turns % 4:
            video.set_display_rotation(spec.rotation)
        audio = None
        if spec.audio:
            audio = out.add_stream(audio_codec, rate=audio_rate or spec.sample_rate)
            audio.layout = "mono"
            if audio_codec == "wmav2":
                audio.bit_rate = 64000  # it has no default
        packets = []
        for frame in _video_frames(spec, cls, rng):
            if turns % 4:  # stored turned back: a player's turn by `rotation` shows it upright
                frame = av.VideoFrame.from_ndarray(np.rot90(frame.to_ndarray(), -turns).copy(), format="rgb24")
            packets += video.encode(frame)
        packets += video.encode()
        if audio is not None:
            for frame in _audio_frames(spec, cls, rng, audio):
                packets += audio.encode(frame)
            packets += audio.encode()
        # Interleaved by time, as real files are (a muxer left to it puts whole seconds of one
        # stream before the other); each stream's packets keep their order.
        packets.sort(key=lambda p: float((p.dts if p.dts is not None else p.pts or 0) * p.time_base))
        for packet in packets:
            out.mux(packet)


def _video_frames(spec: SyntheticClip, cls: int, rng: np.random.Generator):
    n = max(1, round(spec.seconds * spec.fps))
    base = np.array(CLASS_COLOURS[cls], dtype=np.float32) * rng.uniform(0.75, 1.15)
    block = max(4, min(spec.width, spec.height) // 4)
    for i in range(n):
        img = np.empty((spec.height, spec.width, 3), dtype=np.float32)
        img[:] = base
        img += rng.normal(0, 12, size=img.shape)
        x = int((spec.width - block) * (i / max(1, n - 1)))
        y = (spec.height - block) // 2
        img[y : y + block, x : x + block] = 255 - base
        frame = av.VideoFrame.from_ndarray(np.clip(img, 0, 255).astype(np.uint8), format="rgb24")
        yield frame


def _audio_frames(spec: SyntheticClip, cls: int, rng: np.random.Generator, stream):
    rate = stream.rate
    total = int(round(spec.seconds * rate))
    t = np.arange(total, dtype=np.float32) / rate
    pitch = CLASS_PITCH_HZ[cls] * rng.uniform(0.9, 1.1)
    wave = 0.4 * np.sin(2 * np.pi * pitch * t) + rng.normal(0, 0.02, size=total)
    wave = wave.astype(np.float32)
    chunk = stream.codec_context.frame_size or 1024
    sample_format = stream.codec_context.format.name  # what the encoder takes: fltp, s16p, s32p...
    scale, dtype = _SAMPLE_TYPES[sample_format.rstrip("p")]
    for start in range(0, total, chunk):
        piece = wave[start : start + chunk]
        if len(piece) < chunk:
            piece = np.pad(piece, (0, chunk - len(piece)))
        piece = (piece * scale).astype(dtype)[None, :]
        frame = av.AudioFrame.from_ndarray(piece, format=sample_format, layout="mono")
        frame.sample_rate = rate
        frame.pts = start
        yield frame


_SAMPLE_TYPES = {"flt": (1.0, np.float32), "s16": (32767, np.int16), "s32": (2**31 - 1, np.int32)}


def make_dataset(
    root: str | Path,
    clips_per_class: int,
    *,
    seed: int = 0,
    layout: str = "folders",
    **clip_kwargs,
) -> list[tuple[str, str]]:
    """Write a learnable dataset under `root` and return (relative path, label) pairs.

    layout "folders" writes `root/<Class>/<name>.mp4`; layout "flat" writes `root/<name>.mp4`
    plus `root/labels.csv` in the VGAF style (`Vid_name,Label`, class names).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, str]] = []
    for i in range(clips_per_class):
        for cls in CLASSES:
            name = f"{cls.lower()}_{i:04d}.mp4"
            rel = f"{cls}/{name}" if layout == "folders" else name
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            clip_seed = seed * 100_003 + i * len(CLASSES) + CLASSES.index(cls)
            render_clip(SyntheticClip(label=cls, seed=clip_seed, **clip_kwargs), root / rel)
            rows.append((rel, cls))
    if layout == "flat":
        lines = ["Vid_name,Label"] + [f"{rel},{cls}" for rel, cls in rows]
        (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return rows
