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
    """Each window of a few long videos as a bar across its time span, its height split into the
    three class probabilities; a failed window is hatched."""
    from matplotlib.patches import Patch

    plt = _pyplot()
    keys = [key for _, key in scan.longest]
    fig, axes = plt.subplots(len(keys), 1, figsize=(11.0, 1.15 * len(keys) + 1.0), layout="constrained",
                             squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        rows = [r for r in scan.timelines.get(key, []) if math.isfinite(r[WindowRow.START_S])]
        start = np.array([r[WindowRow.START_S] for r in rows], dtype=np.float64)
        width = np.array([r[WindowRow.END_S] - r[WindowRow.START_S] for r in rows], dtype=np.float64)
        failed = np.array([r[WindowRow.ERROR] is not None for r in rows], dtype=bool)
        bottom = np.zeros(len(rows))
        for cls, column in zip(CLASSES, PROB_COLUMNS):
            height = np.array([r[column] or 0.0 for r in rows], dtype=np.float64)
            ax.bar(start, height, width, bottom, align="edge", color=COLOURS[cls], edgecolor="white",
                   linewidth=0.6 if len(rows) <= EDGED_WINDOWS else 0)
            bottom += height
        if failed.any():
            ax.bar(start[failed], 1.0, width[failed], align="edge", color="white", hatch="///",
                   edgecolor=FAILED_COLOUR, linewidth=0)
        ax.set_ylim(0, 1)
        ax.set_xlim(0, float((start + width).max()) if rows else 1.0)
        ax.set_yticks([])
        ax.set_title(f"{short(key)}: {scan.video_labels.get(key) or 'failed'}", loc="left", fontsize=9,
                     parse_math=False)
    axes[-1, 0].set_xlabel("seconds from the video's first frame")
    handles = [Patch(color=COLOURS[c], label=c) for c in CLASSES]
    handles.append(Patch(facecolor="white", edgecolor=FAILED_COLOUR, hatch="///", label="failed window"))
    fig.legend(handles=handles, loc="outside upper right", ncols=len(handles), frameon=False)
    _save(fig, path)


def contact_sheet(cls: str, entries: list[dict], path: str, frame_size: int) -> None:
    """One row per video (`entries`: key, confidence, window, frames or the reason there are none):
    the frames of its most confident window, side by side."""
    plt = _pyplot()
    frames_per_row = max((len(e["frames"]) for e in entries if not isinstance(e["frames"], str)), default=8)
    fig, axes = plt.subplots(len(entries), 1, figsize=(frames_per_row * (frame_size + FRAME_GAP) / DPI,
                                                        len(entries) * (frame_size / DPI + 0.4)),
                             layout="constrained", squeeze=False)
    for ax, entry in zip(axes[:, 0], entries):
        frames = entry["frames"]
        ax.set_axis_off()
        if isinstance(frames, str):
            width = frames_per_row * (frame_size + FRAME_GAP) - FRAME_GAP
            ax.imshow(np.full((frame_size, width, 3), 225, np.uint8))
            ax.text(width / 2, frame_size / 2, f"no frames: {frames}", ha="center",
                    va="center", wrap=True, fontsize=9, parse_math=False)
        else:
            gap = np.full((frame_size, FRAME_GAP, 3), 255, np.uint8)
            ax.imshow(np.concatenate([part for frame in frames for part in (frame, gap)][:-1], axis=1))
        window = entry["window"]
        where = f", window {window['window']} ({window['start_s']:.1f}-{window['end_s']:.1f} s)" if window else ""
        ax.set_title(f"{short(entry['key'])}: {cls} {entry['confidence']:.3f}{where}", loc="left", fontsize=9,
                     parse_math=False)
    _save(fig, path)
