"""What a decoded clip looks like and where its windows lie: plain data, no PyAV.

The model's config (`groupemotion_core.model.config`) needs the decode geometry, and so does a GPU
machine that runs the model on synthetic input without any media library; keeping these types
apart from the decoder (`groupemotion_core.media.decode`) lets the model import without PyAV.

A window is `clip_seconds` of a video from a start time (docs/architecture.md, "Windows"). `plan_windows` lays windows
over a video of known length: `first` is the VGAF way (one window from 0), `all` covers the whole
video, `stride_s` apart, and `max_windows` spreads at most K of those evenly over a long video.
"""

from __future__ import annotations

from dataclasses import dataclass

# A last window shorter than this is dropped, unless it is the only one (docs/architecture.md, "Windows").
MIN_WINDOW_S = 1.0
WINDOW_MODES = ("all", "first")


@dataclass(frozen=True)
class DecodeSpec:
    """Every size, count and limit of decoding, in one place."""

    num_frames: int = 8
    frame_size: int = 224  # output frames are frame_size x frame_size (letterboxed)
    clip_seconds: float = 5.0
    sample_rate: int = 16000
    max_input_bytes: int = 1 << 30
    max_pixels: int = 4096 * 2304
    max_duration_s: float = 4 * 3600.0
    threads: int = 0  # decoder threads; 0 lets FFmpeg choose

    def __post_init__(self):
        if min(self.num_frames, self.frame_size, self.sample_rate) < 1 or self.clip_seconds <= 0:
            raise ValueError(f"invalid DecodeSpec: {self}")

    @property
    def audio_samples(self) -> int:
        return int(round(self.clip_seconds * self.sample_rate))

    @property
    def frame_shape(self) -> tuple[int, int, int, int]:
        """A clip's uint8 frames: [T, H, W, 3]."""
        return (self.num_frames, self.frame_size, self.frame_size, 3)


@dataclass(frozen=True)
class WindowPlan:
    """Which windows of a video are labelled: `mode` all or first, `stride_s` (None: the clip
    length, no overlap) and `max_windows` (None: no cap)."""

    mode: str = "all"
    stride_s: float | None = None
    max_windows: int | None = None

    def __post_init__(self):
        if self.mode not in WINDOW_MODES:
            raise ValueError(f"window mode must be one of {', '.join(WINDOW_MODES)}, got {self.mode!r}")
        if self.stride_s is not None and not self.stride_s > 0:
            raise ValueError(f"stride must be > 0 seconds, got {self.stride_s}")
        if self.max_windows is not None and self.max_windows < 1:
            raise ValueError(f"max_windows must be >= 1, got {self.max_windows}")


FIRST_WINDOW = WindowPlan(mode="first")


def plan_windows(video_end_s: float, clip_seconds: float, plan: WindowPlan = WindowPlan()) -> list[tuple[float, float]]:
    """The (start_s, end_s) of each window of a video whose last frame ends at `video_end_s`.

    Windows start at 0, `stride` apart, each ending `clip_seconds` later or at the video's end;
    the first window that reaches the end is the last (with overlapping windows, later ones
    would only repeat its tail). A last window shorter than MIN_WINDOW_S is dropped unless it is
    the only one. With more than `max_windows` of them, `max_windows` are picked
    evenly from first to last, so a long video costs K windows, not its length.
    """
    if video_end_s <= 0:
        return [(0.0, 0.0)]
    if plan.mode == "first":
        return [(0.0, float(min(clip_seconds, video_end_s)))]
    stride = plan.stride_s or clip_seconds
    windows = []
    i = 0
    while i * stride < video_end_s:
        start = float(i * stride)
        windows.append((start, float(min(start + clip_seconds, video_end_s))))
        if start + clip_seconds >= video_end_s:
            break
        i += 1
    if len(windows) > 1 and windows[-1][1] - windows[-1][0] < MIN_WINDOW_S:
        windows.pop()
    kept = windows
    k = plan.max_windows
    if k is not None and len(kept) > k:
        if k == 1:
            return kept[:1]
        n = len(kept)
        kept = [kept[round(j * (n - 1) / (k - 1))] for j in range(k)]
    return kept
