"""From window rows to a video's answer: the collector that knows when a video is complete, in any
order, and the video-level row (weighted mean, covered time, errors), as pure functions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from groupemotion_core.schema import PROB_COLUMNS, ClipRow
from groupemotion_core.videos import VideoCollector, video_row


def _row(key: str, window: int, windows: int, start: float, end: float, probs=None, error=None) -> dict:
    row = {"key": key, "window": window, "windows": windows, "start_s": start, "end_s": end, "error": error,
           "label": None, "truth": 2}
    row.update(zip(PROB_COLUMNS, probs if probs is not None else [math.nan] * 3))
    return row


def test_a_video_is_complete_when_all_its_windows_are_in_whatever_their_order():
    collector = VideoCollector()
    rows = [_row("a", i, 3, 5.0 * i, 5.0 * i + 5, [0.2, 0.3, 0.5]) for i in range(3)]
    assert collector.add(rows[2]) is None
    assert collector.add(_row("b", ClipRow.WHOLE_VIDEO, 0, 0.0, 0.0, error="not_media: x")) is not None
    assert collector.add(rows[0]) is None and collector.unfinished == ["a"]
    assert [r["window"] for r in collector.add(rows[1])] == [0, 1, 2]
    assert collector.unfinished == []


def test_the_video_row_weights_windows_by_length_and_counts_overlaps_once():
    # Stride 2.5 s over a 9 s video: [0, 5), [2.5, 7.5), [5, 9); the middle window failed.
    rows = [
        _row("v", 0, 3, 0.0, 5.0, [0.1, 0.1, 0.8]),
        _row("v", 1, 3, 2.5, 7.5, error="undecodable: no picture"),
        _row("v", 2, 3, 5.0, 9.0, [0.7, 0.2, 0.1]),
    ]
    video = video_row(rows)
    expected = (5 * np.array([0.1, 0.1, 0.8]) + 4 * np.array([0.7, 0.2, 0.1])) / 9
    np.testing.assert_allclose([video[c] for c in PROB_COLUMNS], expected)
    assert (video["label"], video["windows"], video["seconds"], video["error"], video["truth"]) == (
        "Positive", 2, 9.0, None, 2)


@pytest.mark.parametrize("rows", [
    [_row("v", ClipRow.WHOLE_VIDEO, 0, 0.0, 0.0, error="not_media: not a video")],
    [_row("v", 0, 2, 0.0, 5.0, error="crashed: exit -6"), _row("v", 1, 2, math.nan, math.nan, error="crashed: exit -6")],
])
def test_a_video_without_a_labelled_window_carries_an_error_and_no_probabilities(rows):
    video = video_row(rows)
    assert video["error"] == rows[0]["error"] and video["label"] is None
    assert (video["windows"], video["seconds"]) == (0, 0.0)
    assert all(video[c] is None for c in PROB_COLUMNS)
