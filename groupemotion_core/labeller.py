"""Label one video from Python, without Ray: the numbers `groupemotion infer` writes for it.

    from groupemotion_core import Labeller
    labeller = Labeller.load("runs/paper-v1/best")        # or "hf-hub:OWNER/REPO@REVISION"
    result = labeller.label("party.mp4")                   # a path, the video's bytes, or a file object
    result.label, result.probabilities                     # "Positive", {"Negative": 0.1, ...}
    [(w.start_s, w.end_s, w.label) for w in result.windows]

It is infer's pipeline without the cluster, built from the same pieces so that the answers are
the same: the decoder's window plan (`media.decode.decode_windows`), the model's probabilities
(`GroupEmotionModel.probabilities`: device and autocast as infer's model actors), and the video's
answer from its windows' rows (`videos.video_row`, the function that writes infer's `videos/`).
Windows are decoded and labelled a batch at a time as the decoder yields them, so a long video
never sits in memory whole.

Errors are values, as in infer's output: a window that could not be decoded has its `error` and
no label; a video of which no window could be labelled (one that is not a video at all, or
damaged throughout) has its `error` and no label. A path that does not exist raises, as open()
does: that is the caller's mistake, not the video's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO, Iterable, Iterator

import numpy as np

from groupemotion_core.errors import GroupEmotionError
from groupemotion_core.media.decode import DecodeError, Window, decode_windows
from groupemotion_core.media.spec import WindowPlan
from groupemotion_core.schema import CLASSES, PROB_COLUMNS, ClipRow, VideoRow, WindowRow
from groupemotion_core.videos import video_row

if TYPE_CHECKING:
    import torch

    from groupemotion_core.model.classifier import GroupEmotionModel


@dataclass(frozen=True)
class WindowLabel:
    """One window: infer's `windows/` row. `label` and `probabilities` are None when `error` is set."""

    index: int
    start_s: float
    end_s: float
    label: str | None
    probabilities: dict[str, float] | None
    error: str | None = None  # "<reason>: <detail>"


@dataclass(frozen=True)
class VideoLabel:
    """One video: infer's `videos/` row, and its windows in time order."""

    label: str | None  # the class with the highest mean probability; None when `error` is set
    probabilities: dict[str, float] | None  # mean over the labelled windows, weighted by length
    windows: list[WindowLabel]  # every planned window, labelled or failed; [] when the video failed whole
    seconds: float  # video time the labelled windows cover
    model_id: str
    error: str | None = None  # why no window could be labelled


class Labeller:
    """A fine-tuned model ready to label videos one at a time (module docstring)."""

    def __init__(self, model: GroupEmotionModel, model_id: str, batch_size: int = 16):
        if list(model.config.labels) != list(CLASSES):  # as infer refuses it: its rows name CLASSES
            raise GroupEmotionError("bad_checkpoint", f"labels {model.config.labels} differ from {list(CLASSES)}")
        self.model = model.eval()
        self.model_id = model_id
        self.batch_size = batch_size
        self.spec = model.config.decode_spec()

    @classmethod
    def load(cls, checkpoint: str, device: str | torch.device | None = None, batch_size: int = 16) -> "Labeller":
        """A checkpoint folder (what `groupemotion train` exports) or a hub id
        `hf-hub:OWNER/REPO[@REVISION]` (resolved to one commit; offline from the HF cache with
        HF_HUB_OFFLINE=1). `device` defaults to the GPU when there is one. Safetensors only;
        a bad checkpoint raises GroupEmotionError."""
        import torch

        from groupemotion_core.weights.checkpoint import load_checkpoint
        from groupemotion_core.weights.pretrained import HUB_PREFIX, resolve_hub

        if str(checkpoint).startswith(HUB_PREFIX):
            checkpoint = resolve_hub(str(checkpoint), "checkpoint").path
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model, config = load_checkpoint(checkpoint, map_location=device)
        return cls(model, config["model_id"], batch_size)

    def label(self, video: str | os.PathLike | bytes | BinaryIO, windows: str = "all", max_windows: int | None = None,
              stride_s: float | None = None) -> VideoLabel:
        """Label VIDEO (a path, the video's bytes, or a binary file object, read from its start)
        with the window options of `infer`:
        `windows` "all" (every window, `stride_s` apart, default the clip length) or "first" (one
        window from 0), and at most `max_windows` spread evenly over the video."""
        plan = WindowPlan(windows, stride_s, max_windows)
        try:
            labels = [w for batch in _batches(decode_windows(video, self.spec, plan), self.batch_size)
                      for w in self._label_batch(batch)]
        except DecodeError as e:  # the video as a whole: infer gives it one marker row, no windows
            row = {ClipRow.KEY: "", ClipRow.WINDOW: ClipRow.WHOLE_VIDEO, WindowRow.ERROR: str(e)}
            return self._video([], video_row([row]))
        return self._video(labels, video_row([_row(w) for w in labels]))

    def _label_batch(self, batch: list[Window]) -> list[WindowLabel]:
        clips = [w.clip for w in batch if w.clip is not None]
        probabilities = iter(self.model.probabilities(
            np.stack([c.frames for c in clips]), np.stack([c.audio for c in clips]),
            np.array([c.audio_len for c in clips])) if clips else ())
        out = []
        for w in batch:
            if w.clip is None:
                out.append(WindowLabel(w.index, w.start_s, w.end_s, None, None, str(w.error)))
            else:
                p = next(probabilities)
                out.append(WindowLabel(w.index, w.start_s, w.end_s, CLASSES[int(np.argmax(p))],
                                       dict(zip(CLASSES, p.tolist()))))
        return out

    def _video(self, windows: list[WindowLabel], row: dict) -> VideoLabel:
        probabilities = None if row[VideoRow.ERROR] else {c: row[p] for c, p in zip(CLASSES, PROB_COLUMNS)}
        return VideoLabel(row[VideoRow.LABEL], probabilities, windows, row[VideoRow.SECONDS], self.model_id,
                          row[VideoRow.ERROR])


def _row(window: WindowLabel) -> dict:
    """A labelled window as the prediction row `videos.video_row` reads."""
    probabilities = window.probabilities or {}
    return {ClipRow.KEY: "", ClipRow.WINDOW: window.index, ClipRow.START_S: window.start_s,
            ClipRow.END_S: window.end_s, WindowRow.ERROR: window.error,
            **{p: probabilities.get(c) for c, p in zip(CLASSES, PROB_COLUMNS)}}


def _batches(windows: Iterable[Window], size: int) -> Iterator[list[Window]]:
    """itertools.batched, which Python 3.10 and 3.11 do not have."""
    batch: list[Window] = []
    for window in windows:
        batch.append(window)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
