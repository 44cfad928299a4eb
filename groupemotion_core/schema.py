"""The schemas between pipeline stages, written once and imported everywhere.

docs/architecture.md ("Schemas between stages") names the row types: SourceRow (what a reader yields), ClipRow (what the decode stage
yields, one per window, consumed by training and inference), and the two Parquet outputs of
inference, WindowRow (`windows/`) and VideoRow (`videos/`). Every job
imports the column names and the Arrow schema from here, so a rename cannot drift between stages.
"""

from __future__ import annotations

import pyarrow as pa

# The class order is the order of the model's logits and of the prob_* columns.
CLASSES: tuple[str, ...] = ("Negative", "Neutral", "Positive")
UNKNOWN_LABEL = -1

# VGAF's numeric labels (its CSV files use 1/2/3 for Positive/Neutral/Negative). A number in a
# labels CSV is read through this mapping; a class name is read as itself (any case).
VGAF_NUMERIC_LABELS: dict[int, str] = {1: "Positive", 2: "Neutral", 3: "Negative"}


def label_index(name: str | None) -> int:
    """Class name (any case) -> logit index; None -> UNKNOWN_LABEL. Raises ValueError otherwise."""
    if name is None:
        return UNKNOWN_LABEL
    for i, cls in enumerate(CLASSES):
        if cls.lower() == str(name).strip().lower():
            return i
    raise ValueError(f"{name!r} is not a class; expected one of {', '.join(CLASSES)}")


def parse_label(value: str) -> str:
    """A label as written in a CSV cell (a class name or a VGAF number) -> canonical class name."""
    text = str(value).strip()
    if text.isdigit():
        number = int(text)
        if number not in VGAF_NUMERIC_LABELS:
            raise ValueError(
                f"label number {number} is not a class; VGAF numbers are "
                + ", ".join(f"{k}={v}" for k, v in VGAF_NUMERIC_LABELS.items())
            )
        return VGAF_NUMERIC_LABELS[number]
    return CLASSES[label_index(text)]


class SourceRow:
    """Column names and Arrow schema of a SourceRow: one encoded video as read from storage."""

    KEY = "key"  # unique and stable: shard URI + "/" + member key, or the object URI
    VIDEO = "video"  # the encoded bytes
    LABEL = "label"  # class name, or None when unknown
    # Beyond the architecture's three columns (key, video, label): why the reader could not produce the video (an object over
    # the size limit, a truncated shard), so that the decode stage turns it into an error row
    # instead of the read task failing.
    ERROR = "error"
    # Null on every video row. A shard's read task may end with one marker row (key = the shard
    # URI, no video) whose SHARD_END counts the rows the shard gave: only the reader learns how
    # many videos a shard without a manifest holds, and the inference job must know when a
    # shard is complete without waiting on the order of the stream.
    SHARD_END = "shard_end"

    SCHEMA = pa.schema(
        [
            pa.field(KEY, pa.string(), nullable=False),
            pa.field(VIDEO, pa.large_binary()),
            pa.field(LABEL, pa.string()),
            pa.field(ERROR, pa.string()),
            pa.field(SHARD_END, pa.int64()),
        ]
    )


class ClipRow:
    """Column names of a ClipRow: one decoded window of a video, ready for the model.

    A video gives one ClipRow per planned window. A video that cannot be decoded at all gives
    one ClipRow with `window` = WHOLE_VIDEO, `windows` = 0 and `error` set; a window that
    cannot be decoded keeps its index and has `error` set. A SourceRow shard-end marker passes
    through as a ClipRow with `window` = SHARD_END and the shard's video count in `windows`.
    """

    KEY = "key"  # the video (SourceRow.KEY)
    WINDOW = "window"  # int, 0-based window index; WHOLE_VIDEO for a video that failed as a whole
    WINDOWS = "windows"  # int, windows planned for this video (0 when it failed as a whole)
    START_S = "start_s"  # float, seconds from the video's first frame; NaN when the decoder
    END_S = "end_s"  # died before reaching the window. end: start + clip_seconds, or the video's end
    FRAMES = "frames"  # uint8 [T, H, W, 3]
    AUDIO = "audio"  # float32 [S], mono 16 kHz, zero padded
    AUDIO_LEN = "audio_len"  # int, valid samples in AUDIO; 0 = no audio track
    LABEL = "label"  # int logit index, UNKNOWN_LABEL when unknown
    ERROR = "error"  # None, or "<reason>: <detail>" when the clip could not be decoded

    WHOLE_VIDEO = -1
    SHARD_END = -2

    @staticmethod
    def is_window(window):
        """Whether a `window` value is a window of a video, not a marker row (WHOLE_VIDEO,
        SHARD_END: both negative). Elementwise on a NumPy array. Every stage tells markers from
        windows with this one test."""
        return window >= 0


PROB_COLUMNS = tuple(f"prob_{c.lower()}" for c in CLASSES)


class WindowRow:
    """Column names and Arrow schema of OUTPUT/windows/: one row per labelled (or failed) window."""

    KEY = "key"  # the video
    WINDOW = "window"
    START_S = "start_s"  # seconds from the video's first frame; NaN for a window the decoder
    END_S = "end_s"  # died before reaching (ClipRow)
    LABEL = "label"  # class name; null when error is set
    PROB_COLUMNS = PROB_COLUMNS  # softmax probabilities in CLASSES order; null on error
    MODEL = "model"  # the checkpoint's model id
    ERROR = "error"

    SCHEMA = pa.schema(
        [
            pa.field(KEY, pa.string(), nullable=False),
            pa.field(WINDOW, pa.int32(), nullable=False),
            pa.field(START_S, pa.float64(), nullable=False),
            pa.field(END_S, pa.float64(), nullable=False),
            pa.field(LABEL, pa.string()),
            *[pa.field(name, pa.float32()) for name in PROB_COLUMNS],
            pa.field(MODEL, pa.string(), nullable=False),
            pa.field(ERROR, pa.string()),
        ]
    )


class VideoRow:
    """Column names and Arrow schema of OUTPUT/videos/: one row per input video, failed ones too.

    The probabilities are the mean over the video's labelled windows, weighted by window length;
    `label` is their argmax. `error` is set when no window could be labelled.
    """

    KEY = "key"
    LABEL = "label"
    PROB_COLUMNS = PROB_COLUMNS
    WINDOWS = "windows"  # int, labelled windows
    SECONDS = "seconds"  # float, video time the labelled windows cover
    MODEL = "model"
    ERROR = "error"

    SCHEMA = pa.schema(
        [
            pa.field(KEY, pa.string(), nullable=False),
            pa.field(LABEL, pa.string()),
            *[pa.field(name, pa.float32()) for name in PROB_COLUMNS],
            pa.field(WINDOWS, pa.int32(), nullable=False),
            pa.field(SECONDS, pa.float64(), nullable=False),
            pa.field(MODEL, pa.string(), nullable=False),
            pa.field(ERROR, pa.string()),
        ]
    )
