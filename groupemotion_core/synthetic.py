"""Generated audio-visual clips whose class can be learned from picture and sound.

Tests, benchmarks and the quickstart need real encoded media (H.264 + AAC through FFmpeg, so
every decoder path is exercised), but no dataset can be downloaded here. Each class gets its own
dominant colour and its own tone pitch, with per-clip jitter, a moving block and noise, so a small
model can learn the task from either modality, and a broken modality shows up as lost accuracy.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO

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
    container: str = "mp4"  # mp4, mkv, mov, webm (webm uses VP8 + Opus)


def render_clip(spec: SyntheticClip, dest: str | Path | BinaryIO | None = None) -> bytes | None:
    """Encode `spec` to `dest` (a path or a binary file); with no `dest`, return the bytes."""
    if dest is None:
        buffer = io.BytesIO()
        _encode(spec, buffer)
        return buffer.getvalue()
    _encode(spec, str(dest) if isinstance(dest, Path) else dest)
    return None


def _encode(spec: SyntheticClip, target) -> None:
    rng = np.random.default_rng(spec.seed)
    cls = CLASSES.index(spec.label)
    webm = spec.container == "webm"
    fmt = {"mkv": "matroska", "mov": "mov", "webm": "webm"}.get(spec.container, "mp4")
    with av.open(target, mode="w", format=fmt) as out:
        rate = Fraction(spec.fps).limit_denominator(1001)
        video = out.add_stream("libvpx" if webm else "libx264", rate=rate)
        video.width, video.height, video.pix_fmt = spec.width, spec.height, "yuv420p"
        if not webm:
            video.options = {"preset": "ultrafast", "tune": "zerolatency"}
        audio = None
        if spec.audio:
            audio = out.add_stream("libopus" if webm else "aac", rate=48000 if webm else spec.sample_rate)
            audio.layout = "mono"
        for frame in _video_frames(spec, cls, rng):
            out.mux(video.encode(frame))
        out.mux(video.encode())
        if audio is not None:
            for frame in _audio_frames(spec, cls, rng, audio):
                out.mux(audio.encode(frame))
            out.mux(audio.encode())


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
    for start in range(0, total, chunk):
        piece = wave[start : start + chunk]
        if len(piece) < chunk:
            piece = np.pad(piece, (0, chunk - len(piece)))
        frame = av.AudioFrame.from_ndarray(piece[None, :], format="fltp", layout="mono")
        frame.sample_rate = rate
        frame.pts = start
        yield frame


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
