"""The schemas between pipeline stages, written once and imported everywhere.

DESIGN.md names three row types: SourceRow (what a reader yields), ClipRow (what the decode
stage yields, consumed by training and inference) and LabelRow (the Parquet output). Every job
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
    # Beyond DESIGN.md's three columns: why the reader could not produce the video (an object over
    # the size limit, a truncated shard), so that the decode stage turns it into an error row
    # instead of the read task failing.
    ERROR = "error"

    SCHEMA = pa.schema(
        [
            pa.field(KEY, pa.string(), nullable=False),
            pa.field(VIDEO, pa.large_binary()),
            pa.field(LABEL, pa.string()),
            pa.field(ERROR, pa.string()),
        ]
    )


class ClipRow:
    """Column names of a ClipRow: one decoded clip, ready for the model."""

    KEY = "key"
    FRAMES = "frames"  # uint8 [T, H, W, 3]
    AUDIO = "audio"  # float32 [S], mono 16 kHz, zero padded
    AUDIO_LEN = "audio_len"  # int, valid samples in AUDIO; 0 = no audio track
    LABEL = "label"  # int logit index, UNKNOWN_LABEL when unknown
    ERROR = "error"  # None, or "<reason>: <detail>" when the clip could not be decoded


class LabelRow:
    """Column names and Arrow schema of the Parquet output of the inference job."""

    KEY = "key"
    LABEL = "label"
    PROB_COLUMNS = tuple(f"prob_{c.lower()}" for c in CLASSES)
    MODEL = "model"
    ERROR = "error"

    SCHEMA = pa.schema(
        [
            pa.field(KEY, pa.string(), nullable=False),
            pa.field(LABEL, pa.string()),
            *[pa.field(name, pa.float32()) for name in PROB_COLUMNS],
            pa.field(MODEL, pa.string(), nullable=False),
            pa.field(ERROR, pa.string()),
        ]
    )
