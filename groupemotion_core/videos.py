"""A video's answer from its windows' answers: the rows the prediction stage gives, gathered by
video and averaged into one VideoRow.

Here, in the core and not in the prediction pipeline, because every consumer of prediction rows
needs it: the label sink writes `videos/` with it, `eval` scores videos with it, and the unit
commit mechanism (`ray_jobs.sinks.units`) learns from `VideoCollector` when a video is complete.
Plain Python and NumPy over row dicts, so a sink and a job can share it without importing a stage.
"""

from __future__ import annotations

import collections
from typing import Iterable

import numpy as np

from groupemotion_core.errors import error_reason
from groupemotion_core.schema import CLASSES, PROB_COLUMNS, ClipRow, VideoRow, WindowRow

TRUTH = "truth"  # prediction rows also carry the ClipRow label index, for evaluation


class VideoCollector:
    """Gathers prediction rows by video: `add` returns a video's rows, in window order, once all
    of them are in (its `windows` rows, or its one WHOLE_VIDEO row). Holds only unfinished videos."""

    def __init__(self):
        self._pending: dict[str, dict[int, dict]] = {}

    def add(self, row: dict) -> list[dict] | None:
        key = row[ClipRow.KEY]
        if row[ClipRow.WINDOW] == ClipRow.WHOLE_VIDEO:
            return [row]
        got = self._pending.setdefault(key, {})
        got[row[ClipRow.WINDOW]] = row
        if len(got) < row[ClipRow.WINDOWS]:
            return None
        del self._pending[key]
        return [got[i] for i in sorted(got)]

    @property
    def unfinished(self) -> list[str]:
        return list(self._pending)


def video_row(rows: list[dict]) -> dict:
    """One video's window rows -> its VideoRow values (all but `model`), and TRUTH.

    The probabilities are the mean of the labelled windows' probabilities weighted by each
    window's length (a short last window counts for less); `seconds` is the video time those
    windows cover (overlapping windows counted once). With no labelled window the row carries
    the first window's error.
    """
    first = rows[0]
    labelled = [r for r in rows if r[WindowRow.ERROR] is None and ClipRow.is_window(r[ClipRow.WINDOW])]
    out = {VideoRow.KEY: first[ClipRow.KEY], VideoRow.WINDOWS: len(labelled), TRUTH: first.get(TRUTH)}
    if not labelled:
        error = next(r[WindowRow.ERROR] for r in rows if r[WindowRow.ERROR] is not None)
        return {**out, VideoRow.LABEL: None, **dict.fromkeys(PROB_COLUMNS), VideoRow.SECONDS: 0.0,
                VideoRow.ERROR: error}
    spans = np.array([(r[ClipRow.START_S], r[ClipRow.END_S]) for r in labelled], dtype=np.float64)
    weights = np.maximum(spans[:, 1] - spans[:, 0], 0.0)
    if weights.sum() <= 0:  # a video of one frame: one window of no length
        weights = np.ones(len(labelled))
    probs = np.array([[r[name] for name in PROB_COLUMNS] for r in labelled], dtype=np.float64)
    mean = weights @ probs / weights.sum()
    return {**out, VideoRow.LABEL: CLASSES[int(np.argmax(mean))], **dict(zip(PROB_COLUMNS, mean.tolist())),
            VideoRow.SECONDS: covered_seconds(spans), VideoRow.ERROR: None}


def covered_seconds(spans: Iterable[tuple[float, float]]) -> float:
    """The length of the union of [start, end) spans: the video time some window covers, with
    overlapping windows counted once (`videos/`'s `seconds`, and `groupemotion decode`'s)."""
    total, end = 0.0, -np.inf
    for start, stop in sorted(map(tuple, spans)):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return float(total)


def error_counts(rows: Iterable[dict]) -> collections.Counter:
    """Failed rows by reason (`errors.error_reason`)."""
    return collections.Counter(error_reason(r[WindowRow.ERROR]) for r in rows if r[WindowRow.ERROR] is not None)
