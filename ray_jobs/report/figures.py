"""The report's pictures, drawn with matplotlib (Agg, no display) from a `scan.Scan`.

Each class has one colour on every picture. Keys and error texts come from the inputs, so every
text is drawn with `parse_math=False`: a `$` in a file name is a dollar sign, not mathtext.
"""

from __future__ import annotations

import math

import numpy as np

from groupemotion_core.schema import CLASSES, PROB_COLUMNS, WindowRow
from ray_jobs.report.scan import CONFIDENCE_EDGES, Scan

COLOURS = {"Negative": "#c0392b", "Neutral": "#7f8c8d", "Positive": "#27ae60"}
OTHER_COLOUR = "#8e44ad"  # a label outside CLASSES (a model with other classes)
FAILED_COLOUR = "#2c3e50"
DPI = 100
KEY_CHARS = 80
EDGED_WINDOWS = 120  # up to this many windows in a strip, a thin line shows where each one ends
FRAME_GAP = 4  # pixels between two frames on a contact sheet
TITLE_PIXELS = 20  # the line above each row of a contact sheet
JPEG_QUALITY = 88


def short(key: str, chars: int = KEY_CHARS) -> str:
    """A key that fits a title: its end, where the file name is."""
    return key if len(key) <= chars else "…" + key[-(chars - 1):]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> None:
    fig.savefig(path, dpi=DPI)
    _pyplot().close(fig)


def label_counts(scan: Scan, path: str) -> None:
    """Videos per label, failed videos last, each bar with its count and share."""
    plt = _pyplot()
    names = [*CLASSES, *sorted(set(scan.labels) - set(CLASSES))]
    counts = [scan.labels.get(n, 0) for n in names] + [scan.failed]
    colours = [COLOURS.get(n, OTHER_COLOUR) for n in names] + [FAILED_COLOUR]
    names.append("failed")
    fig, ax = plt.subplots(figsize=(7.0, 0.55 * len(names) + 1.2), layout="constrained")
    bars = ax.barh(names, counts, color=colours)
    ax.invert_yaxis()
    for bar, count in zip(bars, counts):
        share = count / scan.videos if scan.videos else 0.0
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f"  {count:,} ({share:.1%})", va="center")
    ax.set_xlim(0, max(max(counts), 1) * 1.35)
    ax.set_xlabel("videos")
    ax.set_title(f"{scan.videos:,} videos")
    _save(fig, path)


def confidence_histograms(scan: Scan, path: str) -> None:
    """For each class, how confident the model was about the videos it gave that label."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    fig, axes = plt.subplots(1, len(CLASSES), figsize=(4.0 * len(CLASSES), 3.2), layout="constrained")
    for ax, cls in zip(axes, CLASSES):
        counts = scan.histograms[cls]
        ax.stairs(counts, CONFIDENCE_EDGES, fill=True, color=COLOURS[cls])
        mean = scan.mean_confidence(cls)
        ax.set_title(f"{cls}: {sum(counts):,} videos" + (f", mean {mean:.3f}" if mean is not None else ""))
        ax.set_xlim(CONFIDENCE_EDGES[0], 1.0)
        ax.set_ylim(0, max(max(counts), 1) * 1.05)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("confidence (probability of the label)")
    axes[0].set_ylabel("videos")
    _save(fig, path)


def timelines(scan: Scan, path: str) -> None:
    """Each window of a few long videos as a box across its time span, its height split into the
    three class probabilities; a failed window is hatched. The boxes of a video are one
    PolyCollection, not a bar each: a long video has hundreds of windows."""
    from matplotlib.collections import PolyCollection
    from matplotlib.patches import Patch

    plt = _pyplot()
    keys = [key for _, key in scan.longest]
    fig, axes = plt.subplots(len(keys), 1, figsize=(11.0, 1.15 * len(keys) + 1.0), layout="constrained",
                             squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        rows = [r for r in scan.timelines.get(key, []) if math.isfinite(r[WindowRow.START_S])]
        start = np.array([r[WindowRow.START_S] for r in rows], dtype=np.float64)
        end = np.array([r[WindowRow.END_S] for r in rows], dtype=np.float64)
        failed = np.array([r[WindowRow.ERROR] is not None for r in rows], dtype=bool)
        probs = np.array([[r[c] or 0.0 for c in PROB_COLUMNS] for r in rows], dtype=np.float64).reshape(-1, 3)
        top = np.cumsum(probs, axis=1)
        boxes = np.concatenate([_boxes(start, end, top[:, i] - probs[:, i], top[:, i]) for i in range(len(CLASSES))])
        colours = np.repeat([COLOURS[c] for c in CLASSES], len(rows))
        ax.add_collection(PolyCollection(boxes, facecolors=colours, edgecolors="white",
                                         linewidths=0.6 if len(rows) <= EDGED_WINDOWS else 0))
        if failed.any():
            ax.add_collection(PolyCollection(_boxes(start[failed], end[failed], 0.0, 1.0), facecolors="white",
                                             edgecolors=FAILED_COLOUR, hatch="///", linewidths=0))
        ax.set_ylim(0, 1)
        ax.set_xlim(0, float(end.max()) if rows else 1.0)
        ax.set_yticks([])
        ax.set_title(f"{short(key)}: {scan.video_labels.get(key) or 'failed'}", loc="left", fontsize=9,
                     parse_math=False)
    axes[-1, 0].set_xlabel("seconds from the video's first frame")
    handles = [Patch(color=COLOURS[c], label=c) for c in CLASSES]
    handles.append(Patch(facecolor="white", edgecolor=FAILED_COLOUR, hatch="///", label="failed window"))
    fig.legend(handles=handles, loc="outside upper right", ncols=len(handles), frameon=False)
    _save(fig, path)


def _boxes(x0: np.ndarray, x1: np.ndarray, y0, y1) -> np.ndarray:
    """Rectangles [N, 4, 2] from their left and right edges and bottoms and tops."""
    y0, y1 = np.broadcast_to(y0, x0.shape), np.broadcast_to(y1, x0.shape)
    return np.stack([np.stack([x0, y0], -1), np.stack([x1, y0], -1), np.stack([x1, y1], -1),
                     np.stack([x0, y1], -1)], axis=1)


def contact_sheet(cls: str, entries: list[dict], path: str, frame_size: int) -> None:
    """One row per video (`entries`: key, confidence, window, frames or the reason there are none):
    the frames of its most confident window side by side, under a line that names it. Frames are
    placed at their own pixel size (no layout engine to solve) and saved as JPEG, as photographs
    are: a PNG of them takes several times as long to encode."""
    plt = _pyplot()
    count = max((len(e["frames"]) for e in entries if not isinstance(e["frames"], str)), default=8)
    width = count * (frame_size + FRAME_GAP) - FRAME_GAP
    row = TITLE_PIXELS + frame_size + FRAME_GAP * 2
    fig = plt.figure(figsize=(width / DPI, len(entries) * row / DPI), dpi=DPI)
    for i, entry in enumerate(entries):
        top = 1.0 - i * row / (len(entries) * row)
        ax = fig.add_axes((0.0, top - (TITLE_PIXELS + frame_size) / (len(entries) * row), 1.0,
                           frame_size / (len(entries) * row)))
        ax.set_axis_off()
        frames = entry["frames"]
        if isinstance(frames, str):
            ax.imshow(np.full((frame_size, width, 3), 225, np.uint8), aspect="auto")
            ax.text(width / 2, frame_size / 2, f"no frames: {frames}", ha="center", va="center", wrap=True,
                    fontsize=9, parse_math=False)
        else:
            gap = np.full((frame_size, FRAME_GAP, 3), 255, np.uint8)
            ax.imshow(np.concatenate([part for frame in frames for part in (frame, gap)][:-1], axis=1), aspect="auto")
        window = entry["window"]
        where = f", window {window['window']} ({window['start_s']:.1f}-{window['end_s']:.1f} s)" if window else ""
        fig.text(2 / width, top - 4 / (len(entries) * row), f"{short(entry['key'])}: {cls} {entry['confidence']:.3f}{where}",
                 va="top", fontsize=9, parse_math=False)
    fig.savefig(path, dpi=DPI, pil_kwargs={"quality": JPEG_QUALITY})
    plt.close(fig)
