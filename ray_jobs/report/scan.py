"""One streaming pass over each Parquet dataset of a labels output: what the report shows.

A million-video output must not need a million rows in memory. The `videos/` and `windows/` part
files are read as Arrow record batches (`pyarrow.dataset`: only the columns used, a bounded
read-ahead), and each batch is folded into results of a fixed size: counts, confidence histograms
with fixed bins, the first few examples of each error reason, and top-k lists (`TopK`). The
`videos/` pass picks the few videos the page shows (the most confident of each class, the
longest); the `windows/` pass, which reads every window's error anyway, keeps those videos' window
rows. Columns beyond the schema's (carried over from the inputs) are never read, so they cost
nothing and change nothing.

pandas (`pd.read_parquet`) would hold both datasets whole: at a million videos that is gigabytes
and most of the time (bench/report.py measures both).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from groupemotion_core.errors import GroupEmotionError, error_reason
from groupemotion_core.schema import CLASSES, PROB_COLUMNS, VideoRow, WindowRow
from ray_jobs.inputs import storage
from ray_jobs.sinks import labels

BINS = 20
# A video's confidence is the probability of its label, the largest of the three: never below 1/3.
CONFIDENCE_EDGES = np.linspace(1.0 / len(CLASSES), 1.0, BINS + 1)
BATCH_ROWS = 65536
# Files read ahead at once and batches per file: enough to hide an object store's latency, few
# enough that memory stays a few batches.
FILES_AHEAD = 8
BATCHES_AHEAD = 2
# A dataset keeps each file's Parquet footer once it has read it (tens of KiB): one dataset per
# this many files, so that memory does not grow with the number of files.
FILES_PER_DATASET = 64

VIDEO_COLUMNS = [VideoRow.KEY, VideoRow.LABEL, *PROB_COLUMNS, VideoRow.WINDOWS, VideoRow.SECONDS, VideoRow.ERROR]
WINDOW_COLUMNS = [WindowRow.KEY, WindowRow.WINDOW, WindowRow.START_S, WindowRow.END_S, WindowRow.LABEL,
                  *PROB_COLUMNS, WindowRow.ERROR]


class TopK:
    """The k highest-scoring keys of a stream, ties broken by key, so that the answer does not
    depend on the order the files are read in. It holds k entries however long the stream is;
    a batch offers only its own top k."""

    def __init__(self, k: int):
        self.k = k
        self.items: list[tuple[float, str]] = []  # (score, key), best first

    def offer(self, scores: np.ndarray, keys: pa.Array) -> None:
        candidates = np.flatnonzero(~np.isnan(scores))
        if self.k == 0 or candidates.size == 0:
            return
        if candidates.size > self.k:
            floor = np.partition(scores[candidates], candidates.size - self.k)[candidates.size - self.k]
            above = candidates[scores[candidates] > floor]
            tied = candidates[scores[candidates] == floor]  # many, where scores repeat (5 s, 10 s, ...)
            first = pc.sort_indices(keys.take(pa.array(tied))).to_numpy()[: self.k - above.size]
            candidates = np.concatenate([above, tied[first]])
        offered = zip(scores[candidates].tolist(), keys.take(pa.array(candidates)).to_pylist())
        self.items = sorted([*self.items, *offered], key=lambda item: (-item[0], item[1]))[: self.k]

    def keys(self) -> list[str]:
        return [key for _, key in self.items]


@dataclass
class ErrorReason:
    """One error reason: videos with no labelled window, failed windows, and a few examples."""

    videos: int = 0
    windows: int = 0
    examples: list[dict] = field(default_factory=list)  # {"key", "window" (None: the video), "error"}


@dataclass
class Scan:
    """What the report shows of a labels output, each part of a size fixed by the options."""

    videos: int = 0
    failed: int = 0  # videos with no labelled window
    seconds: float = 0.0  # video time the labelled windows cover
    windows: int = 0  # rows of windows/
    failed_windows: int = 0
    labels: dict[str, int] = field(default_factory=dict)  # label -> videos
    histograms: dict[str, list[int]] = field(default_factory=lambda: {c: [0] * BINS for c in CLASSES})
    confidence_sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(CLASSES, 0.0))
    errors: dict[str, ErrorReason] = field(default_factory=dict)
    most_confident: dict[str, list[tuple[float, str]]] = field(default_factory=dict)  # class -> (confidence, key)
    longest: list[tuple[float, str]] = field(default_factory=list)  # (seconds, key), 2 windows or more
    video_labels: dict[str, str] = field(default_factory=dict)  # label of each video shown
    timelines: dict[str, list[dict]] = field(default_factory=dict)  # key -> its window rows, in order
    best_windows: dict[str, dict] = field(default_factory=dict)  # key -> its most confident window

    def mean_confidence(self, cls: str) -> float | None:
        count = sum(self.histograms[cls])
        return self.confidence_sums[cls] / count if count else None

    def to_dict(self) -> dict:
        return {
            "videos": self.videos,
            "failed": self.failed,
            "video_seconds": round(self.seconds, 3),
            "windows": self.windows,
            "failed_windows": self.failed_windows,
            "labels": dict(sorted(self.labels.items())),
            "confidence": {
                "bin_edges": [round(float(e), 6) for e in CONFIDENCE_EDGES],
                "histograms": self.histograms,
                "mean": {c: self.mean_confidence(c) for c in CLASSES},
            },
            "errors": {reason: vars(e) for reason, e in sorted(self.errors.items())},
            "most_confident": {c: [{"key": k, "confidence": s} for s, k in items]
                               for c, items in self.most_confident.items()},
            "timelines": [{"key": k, "seconds": s, "label": self.video_labels.get(k)} for s, k in self.longest],
        }


def scan(output: str, *, top: int = 4, timelines: int = 6, examples: int = 3,
         batch_rows: int = BATCH_ROWS, on_rows=lambda n: None) -> Scan:
    """Fold `output`'s videos/ then windows/ into a Scan: `top` videos per class for the contact
    sheet, the `timelines` longest videos, `examples` examples per error reason. `on_rows(n)`
    is told of each batch (progress)."""
    result = Scan()
    confident = {c: TopK(top) for c in CLASSES}
    longest = TopK(timelines)
    for batch in _batches(output, labels.VIDEOS_DIR, VIDEO_COLUMNS, batch_rows):
        _fold_videos(result, batch, confident, longest, examples)
        on_rows(batch.num_rows)
    result.most_confident = {c: confident[c].items for c in CLASSES}
    result.longest = longest.items
    shown = {*longest.keys(), *(key for c in CLASSES for key in confident[c].keys())}
    result.timelines = {key: [] for key in longest.keys()}
    wanted = pa.array(sorted(shown), pa.string())
    for batch in _batches(output, labels.WINDOWS_DIR, WINDOW_COLUMNS, batch_rows):
        _fold_windows(result, batch, wanted, examples)
        on_rows(batch.num_rows)
    for rows in result.timelines.values():
        rows.sort(key=lambda r: r[WindowRow.WINDOW])
    return result


def check_output(output: str) -> None:
    """Raise a GroupEmotionError that says what `output` is, unless it is a labels output with at
    least one committed unit."""
    if not storage.exists(output):
        raise GroupEmotionError("not_found", f"{output} does not exist")
    if labels.part_files(output, labels.VIDEOS_DIR):
        return
    if storage.exists(storage.join(output, labels.JOB_FILE)):
        raise GroupEmotionError("no_labels", f"{output} holds no committed unit yet (its run has started: "
                                f"{labels.JOB_FILE} is there); run `groupemotion infer` to the end first")
    parent, name = output.rstrip("/").rsplit("/", 1) if "/" in output.rstrip("/") else ("", output)
    hint = ""
    if name in (labels.VIDEOS_DIR, labels.WINDOWS_DIR) and parent:
        hint = f"; give the output folder itself ({parent}), not its {name}/ folder"
    raise GroupEmotionError("not_labels", f"{output} is not an output of `groupemotion infer`: it has no "
                            f"{labels.VIDEOS_DIR}/{labels.PART_PREFIX}*.parquet{hint}")


def _batches(output: str, folder: str, columns: list[str], batch_rows: int) -> Iterator[pa.RecordBatch]:
    files = labels.part_files(output, folder)
    if not files:
        return
    fs, _ = storage.arrow_filesystem(output)
    where = storage.join(output, folder)
    try:
        with storage.classified(where):
            for first in range(0, len(files), FILES_PER_DATASET):
                group = [storage.filesystem(f)[1] for f in files[first : first + FILES_PER_DATASET]]
                dataset = pads.dataset(group, format="parquet", filesystem=fs)
                missing = [c for c in columns if c not in dataset.schema.names]
                if missing:
                    raise GroupEmotionError("not_labels", f"{where} is not a labels dataset of `groupemotion "
                                            f"infer`: it has no column {', '.join(missing)}")
                yield from _coalesced(dataset.to_batches(columns=columns, batch_size=batch_rows,
                                                         batch_readahead=BATCHES_AHEAD,
                                                         fragment_readahead=FILES_AHEAD), batch_rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as e:
        raise GroupEmotionError("bad_output", f"{where}: a part file cannot be read as labels: {e}") from None


def _coalesced(batches: Iterator[pa.RecordBatch], rows: int) -> Iterator[pa.RecordBatch]:
    """Batches of about `rows` rows. A part file holds one unit (a shard, or 256 objects), so the
    scanner's batches are that small, and the dozen Arrow and NumPy calls of a fold cost more per
    file than the rows do: joined, they are paid once per `rows` rows."""
    held: list[pa.RecordBatch] = []
    count = 0
    for batch in batches:
        held.append(batch)
        count += batch.num_rows
        if count >= rows:
            yield pa.concat_batches(held)
            held, count = [], 0
    if held:
        yield pa.concat_batches(held)


def _fold_videos(result: Scan, batch: pa.RecordBatch, confident: dict[str, TopK], longest: TopK,
                 examples: int) -> None:
    keys, label = batch.column(VideoRow.KEY), batch.column(VideoRow.LABEL)
    result.videos += batch.num_rows
    result.failed += label.null_count
    result.seconds += pc.sum(batch.column(VideoRow.SECONDS)).as_py() or 0.0
    counts = pc.value_counts(label.drop_null())
    for value, count in zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist()):
        result.labels[value] = result.labels.get(value, 0) + count

    probs = np.stack([batch.column(c).to_numpy(zero_copy_only=False) for c in PROB_COLUMNS], axis=1)
    confidence = probs.max(axis=1).astype(np.float64)  # NaN where the video failed
    cls = pc.index_in(label, value_set=pa.array(CLASSES)).fill_null(-1).to_numpy(zero_copy_only=False)
    bins = np.clip(((confidence - CONFIDENCE_EDGES[0]) / (1.0 - CONFIDENCE_EDGES[0]) * BINS), 0, BINS - 1)
    bins = np.nan_to_num(bins).astype(np.int64)
    for i, c in enumerate(CLASSES):
        mine = (cls == i) & ~np.isnan(confidence)
        counts = np.bincount(bins[mine], minlength=BINS)
        result.histograms[c] = [a + int(b) for a, b in zip(result.histograms[c], counts)]
        result.confidence_sums[c] += float(confidence[mine].sum())
        confident[c].offer(np.where(mine, confidence, np.nan), keys)
    windows = batch.column(VideoRow.WINDOWS).to_numpy(zero_copy_only=False)
    seconds = batch.column(VideoRow.SECONDS).to_numpy(zero_copy_only=False).astype(np.float64)
    longest.offer(np.where(windows >= 2, seconds, np.nan), keys)
    _fold_errors(result, batch, examples, window=None)
    shown = {*longest.keys(), *(k for top in confident.values() for k in top.keys())}
    result.video_labels = {k: v for k, v in result.video_labels.items() if k in shown}
    new = shown - result.video_labels.keys()
    if new:
        picked = pc.is_in(keys, value_set=pa.array(sorted(new), pa.string()))
        result.video_labels.update(zip(keys.filter(picked).to_pylist(), label.filter(picked).to_pylist()))


def _fold_windows(result: Scan, batch: pa.RecordBatch, wanted: pa.Array, examples: int) -> None:
    result.windows += batch.num_rows
    result.failed_windows += batch.num_rows - batch.column(WindowRow.ERROR).null_count
    _fold_errors(result, batch, examples, window=WindowRow.WINDOW)
    if len(wanted) == 0:
        return
    picked = pc.is_in(batch.column(WindowRow.KEY), value_set=wanted)
    if not pc.any(picked).as_py():
        return
    for row in batch.filter(picked).to_pylist():
        key = row[WindowRow.KEY]
        if key in result.timelines:
            result.timelines[key].append(row)
        label = result.video_labels.get(key)
        if row[WindowRow.ERROR] is not None or label not in CLASSES:
            continue
        score = row[PROB_COLUMNS[CLASSES.index(label)]]
        best = result.best_windows.get(key)
        if best is None or (score, -row[WindowRow.WINDOW]) > (best["score"], -best["window"]):
            result.best_windows[key] = {"window": row[WindowRow.WINDOW], "start_s": row[WindowRow.START_S],
                                        "end_s": row[WindowRow.END_S], "score": score}


def _fold_errors(result: Scan, batch: pa.RecordBatch, examples: int, window: str | None) -> None:
    """Count the batch's errors by reason and keep the first `examples` of each reason."""
    errors = batch.column(VideoRow.ERROR)
    if errors.null_count == len(errors):
        return
    failed = pc.is_valid(errors)
    keys = batch.column(VideoRow.KEY).filter(failed).to_pylist()
    indices = batch.column(window).filter(failed).to_pylist() if window else [None] * len(keys)
    for key, index, error in zip(keys, indices, errors.filter(failed).to_pylist()):
        reason = result.errors.setdefault(error_reason(error), ErrorReason())
        if window:
            reason.windows += 1
        else:
            reason.videos += 1
        if len(reason.examples) < examples:
            reason.examples.append({"key": key, "window": index, "error": error})
