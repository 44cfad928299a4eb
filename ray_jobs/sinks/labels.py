"""Exactly-once output of the inference job: `windows/` and `videos/` Parquet, one file of each per
input unit (below), committed when the unit is complete, in whatever order units complete. How a
unit is known complete in a stream of no order, how a unit a store failure touched is left for a rerun
(`Summary.units_left`), and the fault-injection kill (GROUPEMOTION_INFER_EXIT_AFTER_UNITS=N) are
`ray_jobs.sinks.units`, which the clip cache shares; the driver holds the rows of the units in
flight only.

The unit of work is an input unit: one tar shard, or one row group of the job's saved listing
(`ray_jobs.inputs.listing`: consecutive rows of one table, or of the listed plain objects). A unit
is complete when its known number of videos is complete, and a video when all its windows have a
row (or its one whole-video error row has come). A row group knows its size from the listing; a
shard's size is known to its reader only, which ends the shard with a marker row that counts its
videos (`ray_jobs.inputs.sources`, `shard_ends`). So the stream needs no order: one slow video
holds back only its own unit, and the driver holds the rows of the units in flight (and one small
`Unit` per unit of the job: a row group is 256 videos).

A table unit's videos/ rows come in the order of its rows, keyed by the row's URI, with the
row's carried columns (read back from the listing's row group when the unit commits, so they
never travel through the decoders) after the VideoRow columns, unchanged.

The stream is placed, and each unit committed once, by `ray_jobs.sinks.units` (which the clip
cache shares). A unit's files are named from its input URIs (`part-<16 hex>.parquet`) and each is
written in one atomic step (a single S3 PUT, or a rename on a local disk): first `windows/`, then `videos/`. The
`videos/` file marks the unit done; its Parquet metadata lists the unit's inputs under
`groupemotion.inputs` (the shard, or `_inputs/<part>#<row group>`), and a job starts by reading those lists to plan only what no unit holds
yet. A `windows/` file without its `videos/` file (a job killed between the two) is deleted at
the start, and the unit labelled again.
"""

from __future__ import annotations

import collections
import hashlib
import json
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from groupemotion_core.errors import GroupEmotionError
from groupemotion_core.schema import PROB_COLUMNS, ClipRow, VideoRow, WindowRow
from groupemotion_core.videos import error_counts, video_row
from ray_jobs.inputs import storage, tables
from ray_jobs.inputs.listing import INPUTS_DIR, Listing
from ray_jobs.sinks import units as unit_commits

WINDOWS_DIR = "windows"
VIDEOS_DIR = "videos"
JOB_FILE = "_job.json"  # the resolved run: model, inputs, window plan, options (`groupemotion infer`)
SUCCESS_FILE = "_SUCCESS"  # the run's summary, written once every unit is committed
PART_PREFIX = "part-"
INPUTS_METADATA_KEY = b"groupemotion.inputs"
EXIT_AFTER_UNITS_ENV = "GROUPEMOTION_INFER_EXIT_AFTER_UNITS"


@dataclass
class Unit:
    """One unit of work: a tar shard, or one row group of a part of the listing."""

    inputs: tuple[str, ...]
    videos: int | None  # None for a shard until its reader's count arrives
    part: str | None = None  # a row group's: the part's URI
    group: int = 0

    @property
    def name(self) -> str:
        digest = hashlib.sha1("\n".join(self.inputs).encode()).hexdigest()[:16]
        return f"{PART_PREFIX}{digest}.parquet"

    def describe(self) -> str:
        return unit_commits.describe(self.inputs)


def plan_units(listing: Listing, output: str) -> list[Unit]:
    """A saved listing -> units: one per shard, and one per row group of each part."""
    units = [Unit((uri,), None) for uri in listing.shards]
    for i, part in enumerate(listing.parts):
        uri, last = listing.part_uri(output, i), listing.groups(i) - 1
        for g in range(last + 1):
            rows = part["rows"] - last * listing.unit_rows if g == last else listing.unit_rows
            units.append(Unit((f"{_part_name(part['name'])}#{g}",), rows, uri, g))
    return units


def _part_name(name: str) -> str:
    """How a unit's input names its part: relative to the output, so that the same output named
    another way (a relative path) finds its committed units."""
    return f"{INPUTS_DIR}/{name}"


@dataclass
class Summary:
    units: int = 0
    units_skipped: int = 0
    units_committed: int = 0
    videos: int = 0
    videos_labelled: int = 0
    windows: int = 0
    windows_labelled: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # by reason: failed windows, and videos failed whole
    units_left: int = 0  # not committed: a row failed on the object store; a rerun tries them again
    left_error: str | None = None  # the first of those failures
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        rate = self.videos / self.seconds if self.seconds > 0 else 0.0
        return {**asdict(self), "videos_per_second": round(rate, 3)}

    def line(self) -> str:
        errors = ", ".join(f"{k}: {v}" for k, v in sorted(self.errors.items())) or "none"
        rate = self.videos / self.seconds if self.seconds > 0 else 0.0
        left = f"; {self.units_left} units left for a rerun ({self.left_error})" if self.units_left else ""
        return (
            f"{self.videos} videos ({self.windows} windows) in {self.units_committed} units "
            f"({self.units_skipped} of {self.units} units already committed, skipped): "
            f"{self.videos_labelled} videos and {self.windows_labelled} windows labelled, errors: {errors}; "
            f"{rate:.2f} videos/s over {self.seconds:.1f} s{left}"
        )


def part_files(output: str, folder: str) -> list[str]:
    uri = storage.join(output, folder)
    fs, path = storage.filesystem(uri)
    scheme = "s3://" if output.startswith("s3://") else ""
    with storage.classified(uri):
        return sorted(scheme + p for p in fs.glob(f"{path}/{PART_PREFIX}*.parquet"))


def committed_inputs(output: str) -> set[str]:
    """The input URIs that committed units of `output` hold (read from their videos/ footers)."""

    def inputs_of(uri: str) -> list[str]:
        with storage.open_read(uri) as f:
            meta = pq.read_schema(f).metadata or {}
        if INPUTS_METADATA_KEY not in meta:
            raise GroupEmotionError("bad_output", f"{uri} was not written by groupemotion infer")
        return json.loads(meta[INPUTS_METADATA_KEY])

    with ThreadPoolExecutor(16) as pool:
        return {uri for found in pool.map(inputs_of, part_files(output, VIDEOS_DIR)) for uri in found}


def remove_uncommitted(output: str) -> None:
    """Delete windows/ files whose unit has no videos/ file: a job died between the two."""
    done = {uri.rsplit("/", 1)[1] for uri in part_files(output, VIDEOS_DIR)}
    for uri in part_files(output, WINDOWS_DIR):
        if uri.rsplit("/", 1)[1] not in done:
            storage.remove(uri)


def remove_all(output: str) -> None:
    for folder in (VIDEOS_DIR, WINDOWS_DIR):  # videos/ first: a unit is never half-done-looking
        for uri in part_files(output, folder):
            storage.remove(uri)


@dataclass
class _InFlight:
    videos: list[dict] = field(default_factory=list)  # VideoRow values
    windows: list[dict] = field(default_factory=list)  # window prediction rows


class LabelWriter:
    """Takes prediction batches in any order; commits each unit's files once it is complete.

    `on_video(rows)` is called with each finished video's rows (progress); `on_commit(line)` with
    a line about each committed unit.
    """

    def __init__(self, units: list[Unit], output: str, model_id: str, summary: Summary,
                 on_video: Callable[[list[dict]], None] = lambda rows: None,
                 on_commit: Callable[[str], None] = lambda line: None, *,
                 parts: list[str] = (), unit_rows: int = 0):
        """`parts[i]` is the part URI of the stream keys' table i (`sources.read_sources`' order),
        `unit_rows` the listing's rows per row group."""
        self.units, self.output, self.model_id, self.summary = units, output, model_id, summary
        self.on_video, self.on_commit = on_video, on_commit
        self.unit_rows = unit_rows
        self.stream = unit_commits.UnitStream(((u.inputs, u.videos) for u in units), EXIT_AFTER_UNITS_ENV,
                                              tables=[_part_name(posixpath.basename(p)) for p in parts],
                                              rows_per_unit=unit_rows)
        self.in_flight: dict[int, _InFlight] = collections.defaultdict(_InFlight)

    def add(self, batch: pa.Table) -> None:
        for row in batch.to_pylist():
            index, rows = self.stream.add(row)
            if rows is not None:
                self.on_video(rows)
                unit = self.in_flight[index]
                unit.videos.append(video_row(rows))
                unit.windows.extend(r for r in rows if ClipRow.is_window(r[ClipRow.WINDOW]))
            if self.stream.whole(index):
                self._commit(index)

    def finish(self) -> None:
        """The stream has ended: every unit must have been committed (or left for a rerun)."""
        self.stream.finish()

    def _commit(self, index: int) -> None:
        unit, rows = self.units[index], self.in_flight.pop(index, _InFlight())
        failed = self.stream.close(index, (r[WindowRow.ERROR] for r in [*rows.videos, *rows.windows]))
        if failed is not None:
            self.summary.units_left += 1
            self.summary.left_error = self.summary.left_error or failed
            self.on_commit(f"left for a rerun: {unit.describe()}: {failed}")
            return
        metadata = {INPUTS_METADATA_KEY: json.dumps(list(unit.inputs))}
        if unit.part is None:
            windows, videos = window_table(rows.windows, self.model_id), video_table(rows.videos, self.model_id)
        else:
            windows, videos = self._table_unit(unit, rows)
        windows, videos = windows.replace_schema_metadata(metadata), videos.replace_schema_metadata(metadata)
        unit_commits.write_parquet(storage.join(self.output, WINDOWS_DIR, unit.name), windows)
        unit_commits.write_parquet(storage.join(self.output, VIDEOS_DIR, unit.name), videos)

        s = self.summary
        failed_videos = error_counts(rows.videos)
        failed_windows = error_counts(rows.windows)
        with_windows = {w[WindowRow.KEY] for w in rows.windows}
        failed_whole = error_counts(v for v in rows.videos if v[VideoRow.KEY] not in with_windows)
        s.units_committed += 1
        s.videos += videos.num_rows
        s.videos_labelled += videos.num_rows - sum(failed_videos.values())
        s.windows += windows.num_rows
        s.windows_labelled += windows.num_rows - sum(failed_windows.values())
        for reason, count in (failed_whole + failed_windows).items():
            s.errors[reason] = s.errors.get(reason, 0) + count
        self.on_commit(
            f"committed {unit.name}: {videos.num_rows} videos ({sum(failed_videos.values())} failed), "
            f"{windows.num_rows} windows ({sum(failed_windows.values())} failed), from {unit.describe()} "
            f"[{s.units_committed}/{s.units - s.units_skipped}]"
        )
        self.stream.committed()


    def _table_unit(self, unit: Unit, rows: _InFlight) -> tuple[pa.Table, pa.Table]:
        """A row group's tables: rows in the listing's order, keyed by its URIs, its carried
        columns after the VideoRow columns."""
        with storage.open_read(unit.part) as f:
            listed = pq.ParquetFile(f).read_row_group(unit.group)
        first = unit.group * self.unit_rows
        uris = listed.column(tables.URI_COLUMN).to_pylist()

        def listed_row(row: dict) -> dict:
            offset = tables.row_of(row[VideoRow.KEY])[2] - first
            return {**row, VideoRow.KEY: uris[offset], "_row": offset}

        videos = sorted(map(listed_row, rows.videos), key=lambda r: r["_row"])
        table = _table(videos, VideoRow.SCHEMA, self.model_id)
        for name in listed.schema.names:
            if name != tables.URI_COLUMN:
                table = table.append_column(listed.schema.field(name), listed.column(name))
        windows = sorted(map(listed_row, rows.windows), key=lambda r: (r["_row"], r[WindowRow.WINDOW]))
        return _table(windows, WindowRow.SCHEMA, self.model_id), table


def window_table(rows: list[dict], model_id: str) -> pa.Table:
    """Window prediction rows -> a WindowRow table in (key, window) order; failed windows'
    probabilities are null."""
    rows = sorted(rows, key=lambda r: (r[WindowRow.KEY], r[WindowRow.WINDOW]))
    return _table(rows, WindowRow.SCHEMA, model_id)


def video_table(rows: list[dict], model_id: str) -> pa.Table:
    """`groupemotion_core.videos.video_row` values -> a VideoRow table in key order."""
    return _table(sorted(rows, key=lambda r: r[VideoRow.KEY]), VideoRow.SCHEMA, model_id)


def _table(rows: list[dict], schema: pa.Schema, model_id: str) -> pa.Table:
    columns = {}
    for f in schema:
        if f.name == WindowRow.MODEL:
            columns[f.name] = pa.array([model_id] * len(rows), f.type)
        elif f.name in PROB_COLUMNS:
            values = np.array([np.nan if r[f.name] is None else r[f.name] for r in rows], dtype=np.float32)
            columns[f.name] = pa.array(values, f.type, mask=np.isnan(values))
        else:
            columns[f.name] = pa.array([r[f.name] for r in rows], f.type)
    return pa.table(columns, schema=schema)
