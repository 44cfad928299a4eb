"""Input units committed exactly once: the one mechanism under the label sink (`sinks.labels`) and
the clip cache (`train.clip_cache`).

A job's inputs are split into units (`plan`): one tar shard, or a group of consecutive plain
video objects. The decode stream brings rows in no order. `UnitStream` takes them one at a time
and says which unit each belongs to (a row's key is an input URI, or `<shard uri>/<member key>`),
which video it completes (`groupemotion_core.videos.VideoCollector`: all its windows, or its one
WHOLE_VIDEO row), and when a unit is whole: its known number of videos complete. A group knows
its size from the listing, a shard from its reader's end marker row (ClipRow.SHARD_END, the
shard's video count in `windows`). So one slow video holds back only its own unit, and a writer
holds only the rows of the units in flight.

A writer then commits the whole unit: it `close`s it (a row that comes for it later is a bug,
and raises), and writes each of its files in one atomic step (`write_parquet`: a single S3 PUT,
or a rename on a local disk), unless a row of the unit failed on the object store (`close`
returns that failure): the failure was the store's, not the video's, so the unit is left for a
rerun instead of written with the error as its answer. A killed job leaves whole files only.

Fault injection, for tests and drills: each writer names an environment variable
(GROUPEMOTION_INFER_EXIT_AFTER_UNITS, GROUPEMOTION_CACHE_EXIT_AFTER_UNITS); set to N, the job
process is killed with SIGKILL right after its N-th commit, like a node lost between two commits.
"""

from __future__ import annotations

import collections
import io
import os
import signal
import sys
from typing import Iterable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from groupemotion_core.schema import ClipRow
from groupemotion_core.videos import VideoCollector
from ray_jobs.inputs import storage
from ray_jobs.inputs.tables import row_of


def plan(uris: list[str], objects_per_unit: int) -> list[tuple[tuple[str, ...], bool]]:
    """Input URIs -> units as (their URIs, whether it is a shard): one unit per tar shard, then
    groups of up to `objects_per_unit` consecutive plain objects."""
    from ray_jobs.inputs.sources import layout

    shards = [((uri,), True) for uri in uris if layout(uri) == "tar"]
    objects = [uri for uri in uris if layout(uri) != "tar"]
    groups = [tuple(objects[i : i + objects_per_unit]) for i in range(0, len(objects), objects_per_unit)]
    return shards + [(group, False) for group in groups]


def describe(uris: Sequence[str]) -> str:
    """A unit for people: its shard, or how many objects from where."""
    return uris[0] if len(uris) == 1 else f"{len(uris)} objects from {uris[0]}"


class UnitStream:
    """Rows in any order -> whole units, each closed once (module docstring).

    `units` gives each unit's input URIs and its video count (None for a shard: its end marker
    brings the count). `exit_after_env` names the fault-injection variable of the writer. A
    table row's key (`ray_jobs.inputs.tables.row_key`) names its table by number: its unit's
    input is `f"{tables[number]}#{row // rows_per_unit}"`.
    """

    def __init__(self, units: Iterable[tuple[Sequence[str], int | None]], exit_after_env: str, *,
                 tables: Sequence[str] = (), rows_per_unit: int = 0):
        self.uris: list[tuple[str, ...]] = []
        self.videos: list[int | None] = []  # per unit; a shard's arrives with its end marker
        for uris, videos in units:
            self.uris.append(tuple(uris))
            self.videos.append(videos)
        self._unit_of = {uri: i for i, uris in enumerate(self.uris) for uri in uris}
        self._tables, self._rows_per_unit = list(tables), rows_per_unit
        self._complete: collections.Counter = collections.Counter()  # complete videos per open unit
        self._collector = VideoCollector()
        self._closed: set[int] = set()
        self._commits = 0
        self._exit_env = exit_after_env
        self._exit_after = int(os.environ.get(exit_after_env) or 0)

    def add(self, row: dict) -> tuple[int, list[dict] | None]:
        """Place one row (a dict with the ClipRow key, window and windows at least): its unit's
        index, and the rows of the video it completes, in window order (else None)."""
        index = self._index(row[ClipRow.KEY])
        if index in self._closed:
            raise RuntimeError(f"a row of {self.describe(index)} came after its files were committed")
        if row[ClipRow.WINDOW] == ClipRow.SHARD_END:
            self.videos[index] = row[ClipRow.WINDOWS]
            return index, None
        video = self._collector.add(row)
        if video is not None:
            self._complete[index] += 1
        return index, video

    def whole(self, index: int) -> bool:
        """Whether every video of the unit is complete (a shard's count must have come)."""
        return self._complete[index] == self.videos[index]

    def close(self, index: int, errors: Iterable[str | None]) -> str | None:
        """The unit is whole and its rows are taken: no row may come for it any more. Returns the
        first of its rows' `errors` that the object store caused (the unit is left for a rerun:
        write nothing), or None (write its files, then call `committed`)."""
        self._closed.add(index)
        del self._complete[index]
        return next((e for e in errors if storage.is_storage_failure(e)), None)

    def committed(self) -> None:
        """A unit's files are written. With the writer's fault-injection variable set to N, the
        N-th commit kills this process."""
        self._commits += 1
        if self._exit_after and self._commits >= self._exit_after:
            print(f"{self._exit_env}={self._exit_after}: killing the job now", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    def finish(self) -> None:
        """The stream has ended: every unit must have been closed."""
        left = [self.describe(i) for i in range(len(self.uris)) if i not in self._closed]
        if left:
            raise RuntimeError(
                f"the stream ended with {len(left)} units incomplete (first: {left[0]}); "
                f"{len(self._collector.unfinished)} videos lack windows"
            )

    def describe(self, index: int) -> str:
        return describe(self.uris[index])

    def _index(self, key: str) -> int:
        located = row_of(key)
        if located is not None:  # a table's row
            return self._unit_of[f"{self._tables[located[1]]}#{located[2] // self._rows_per_unit}"]
        if key in self._unit_of:  # a plain object, or a shard's own row (its error or its end)
            return self._unit_of[key]
        cut = len(key)
        while (cut := key.rfind("/", 0, cut)) > 0:  # `<shard uri>/<member key>`; a member key may contain slashes
            if key[:cut] in self._unit_of:
                return self._unit_of[key[:cut]]
        raise RuntimeError(f"row {key!r} belongs to no planned input")


def write_parquet(uri: str, table: pa.Table, **options) -> int:
    """Write `table` as one Parquet file in one atomic step (`pq.write_table` options apply);
    returns the bytes written."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer, **options)
    data = buffer.getvalue()
    storage.write_bytes_atomic(uri, data)
    return len(data)
