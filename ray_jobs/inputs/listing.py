"""The saved plan of an inference job: its inputs listed page by page into `OUTPUT/_inputs/`.

    OUTPUT/_inputs/part-00000.parquet ...   the videos, one row each: `uri`, and a table's
                                            carried columns; row groups of `unit_rows` rows
    OUTPUT/_inputs/_LISTED.json             written last: the inputs, the parts, the shards

Why a saved listing. Listing a folder or prefix of a million objects on the driver, and holding
the list, made the driver grow with the input (2 KB and a quarter of a millisecond per video), and
on S3 the listing was paid again at every rerun, where a bucket that changed between two runs
changed the units. Here each folder, prefix or glob is listed as a stream (S3 answers at most
`page_keys` keys a request; a local folder is walked with `os.scandir`, in the order the
filesystem gives) and written out a row group at a time, and each table input is copied the same
way, a record batch at a time (`ray_jobs.inputs.tables`). Nothing is held whole, and the job then
reads these parts as a stream. Tar shards (and pack manifests) are few and stay a list in the
marker: each is a unit of its own.

Units. A row group of a part is one unit of the job (consecutive rows of one table, never two),
so the units are fixed by the saved listing: a rerun reads `_LISTED.json` and gets the units the
first run committed. A listing cut short (no `_LISTED.json`) had no unit committed from it and
is made again. `relist` lists again from scratch, and the caller then labels everything again:
objects added later are labelled with `--relist`, or into a new output.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import re
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from groupemotion_core.errors import GroupEmotionError
from groupemotion_core.media.decode import VIDEO_EXTENSIONS
from ray_jobs.inputs import storage, tables

INPUTS_DIR = "_inputs"
LISTED_FILE = "_LISTED.json"
PART_NAME = "part-{:05d}.parquet"
UNIT_ROWS = 256
UNITS_PER_PART = 256
PART_BYTES = 64 << 20  # a part is cut at the next unit past this much Parquet in memory
PAGE_KEYS = 1000  # S3's own maximum per list request


@dataclass
class Listing:
    """What `_LISTED.json` holds."""

    inputs: list[str]
    uri_column: str
    columns: list[str] | None
    unit_rows: int
    parts: list[dict] = field(default_factory=list)  # {"name", "rows", "source"}
    shards: list[str] = field(default_factory=list)
    videos: int = 0  # rows of the parts
    pages: int = 0  # list requests (S3) or folders read (local)
    fresh: bool = False  # made by this run (not saved)

    def part_uri(self, output: str, index: int) -> str:
        return storage.join(output, INPUTS_DIR, self.parts[index]["name"])

    def groups(self, index: int) -> int:
        return -(-self.parts[index]["rows"] // self.unit_rows)


def plan(output: str, inputs: list[str], *, uri_column: str = tables.URI_COLUMN, columns: list[str] | None = None,
         reserved: tuple[str, ...] = (), unit_rows: int = UNIT_ROWS, relist: bool = False,
         page_keys: int = PAGE_KEYS, on_relist: Callable[[], None] = lambda: None,
         note: Callable[[str], None] = lambda line: None) -> Listing:
    """The listing of `inputs` saved under `output`: the saved one, or a new one when there is
    none (or `relist`). A saved listing of other inputs is refused. Carried table columns named in
    `reserved` are refused (`tables.carried_columns`). Before a new listing is made, and after the
    old one stopped counting, `on_relist` forgets what was made from the old one (its labels:
    their units would otherwise name rows of the new one)."""
    marker = storage.join(output, INPUTS_DIR, LISTED_FILE)
    wanted = Listing(list(inputs), uri_column, columns, unit_rows)
    if not relist and storage.exists(marker):
        saved = Listing(**json.loads(storage.read_bytes(marker, max_bytes=64 << 20)))
        if (saved.inputs, saved.uri_column, saved.columns) != (wanted.inputs, uri_column, columns):
            raise GroupEmotionError("output_in_use", f"{output} holds the listing of {saved.inputs} (uri column "
                                    f"{saved.uri_column!r}, columns {saved.columns}), not of these inputs; use "
                                    "--relist to list these instead (the output's labels are made again), or "
                                    "another output")
        return saved
    storage.remove(marker)
    on_relist()
    for uri, _ in storage.find(storage.join(output, INPUTS_DIR, "part-*.parquet")):
        storage.remove(uri)
    listing = _list(output, wanted, reserved, page_keys, note)
    storage.write_bytes_atomic(marker, (json.dumps(asdict(listing) | {"fresh": False}, indent=1) + "\n").encode())
    listing.fresh = True
    return listing


def _list(output: str, listing: Listing, reserved: tuple[str, ...], page_keys: int, note) -> Listing:
    parts = _Parts(output, listing)
    for given in listing.inputs:
        if posixpath.basename(given.rstrip("/")) == "manifest.json":
            from ray_jobs.inputs.sources import shards_of_manifest

            listing.shards += shards_of_manifest(given)
            continue
        found = False
        lister = Lister(given, page_keys)
        for uri in lister:
            ext = posixpath.splitext(uri)[1].lower().lstrip(".")
            if ext == "tar":
                listing.shards.append(uri)
            elif ext in VIDEO_EXTENSIONS:
                parts.add_video(uri)
            elif tables.is_table(uri):
                parts.add_table(uri, reserved)
            elif lister.single:
                raise GroupEmotionError("bad_input", f"{given} is neither a video, a .tar shard nor a table "
                                        f"({', '.join(tables.TABLE_EXTENSIONS)})")
            else:
                continue
            found = True
            if parts.rows_noted:
                note(f"listing: {parts.held} videos so far ({given})")
        listing.pages += lister.pages
        if not found:
            raise GroupEmotionError("not_found", f"no videos, .tar shards or tables at {given}")
    parts.close()
    return listing


class _Parts:
    """Writes the listing's rows into parts, a unit (row group) at a time."""

    def __init__(self, output: str, listing: Listing):
        self.output, self.listing = output, listing
        self.uris: list[str] = []  # listed videos of the unit being filled
        self.writer = self.buffer = None
        self.source = ""
        self.rows = 0  # in the open part
        self.held = 0
        self.rows_noted = False

    def add_video(self, uri: str) -> None:
        if self.source != "listing":
            self.close()
            self.source = "listing"
        self.uris.append(uri)
        self.held += 1
        self.rows_noted = self.held % 100_000 == 0
        if len(self.uris) == self.listing.unit_rows:
            self._write_listed()

    def add_table(self, uri: str, reserved: tuple[str, ...]) -> None:
        """Copy a table: its URI column (as `uri`, relative paths resolved) and carried columns."""
        self.close()
        self.source = uri
        found = tables.schema(uri, self.listing.uri_column)
        carried = tables.carried_columns(uri, found, self.listing.uri_column, self.listing.columns,
                                         (*reserved, tables.URI_COLUMN))
        pending: pa.Table | None = None
        for _, batch in tables.batches(uri, self.listing.uri_column, columns=[self.listing.uri_column, *carried]):
            values = batch.column(self.listing.uri_column).to_pylist()
            uris = pa.array([tables.resolve(v, uri)[0] or (v or "") for v in values], pa.string())
            if carried:
                rows = pa.Table.from_batches([batch.select(carried)]).add_column(0, tables.URI_COLUMN, uris)
            else:
                rows = pa.table({tables.URI_COLUMN: uris})
            pending = rows if pending is None else pa.concat_tables([pending, rows])
            while pending.num_rows >= self.listing.unit_rows:
                self._write(pending.slice(0, self.listing.unit_rows))
                pending = pending.slice(self.listing.unit_rows)
            self.held += batch.num_rows
        if pending is not None and pending.num_rows:
            self._write(pending)
        self.close()

    def close(self) -> None:
        """End the open part (a new source starts a new part)."""
        if self.uris:
            self._write_listed()
        if self.writer is None:
            return
        self.writer.close()
        name = PART_NAME.format(len(self.listing.parts))
        storage.write_bytes_atomic(storage.join(self.output, INPUTS_DIR, name), self.buffer.getvalue())
        self.listing.parts.append({"name": name, "rows": self.rows, "source": self.source})
        self.listing.videos += self.rows
        self.writer = self.buffer = None
        self.rows = 0

    def _write_listed(self) -> None:
        uris, self.uris = self.uris, []
        self._write(pa.table({tables.URI_COLUMN: pa.array(uris, pa.string())}))

    def _write(self, unit: pa.Table) -> None:
        """One unit: one row group of the open part."""
        if self.writer is not None and not unit.schema.equals(self.writer.schema, check_metadata=False):
            raise GroupEmotionError("bad_table", f"{self.source}: the column types change from one block to "
                                    f"the next ({unit.schema} after {self.writer.schema}); give the table as "
                                    "Parquet, or make the column's type clear in its first rows")
        if self.writer is None:
            self.buffer = io.BytesIO()
            self.writer = pq.ParquetWriter(self.buffer, unit.schema)
        self.writer.write_table(unit, row_group_size=self.listing.unit_rows)
        self.rows += unit.num_rows
        units = -(-self.rows // self.listing.unit_rows)
        if units >= UNITS_PER_PART or self.buffer.tell() >= PART_BYTES:
            source = self.source
            self.close()
            self.source = source


class Lister:
    """The objects that one input names, as a stream of URIs: a folder or prefix (recursively),
    a glob (`*` and `?` within a path segment, `**` across them, `[...]`), or one object.
    `pages` counts the list requests (S3) or folders (local) read; `single` is set when the input
    named one object."""

    def __init__(self, uri: str, page_keys: int = PAGE_KEYS):
        self.uri, self.page_keys = uri, page_keys
        self.pages = 0
        self.single = False

    def __iter__(self) -> Iterator[str]:
        if self.uri.startswith("s3://"):
            yield from self._s3()
        else:
            yield from self._local()

    def _local(self) -> Iterator[str]:
        path = storage.filesystem(self.uri)[1]
        pattern = _glob_pattern(path)
        if pattern is None and os.path.isfile(path):
            self.single = True
            yield path
            return
        root = _literal_prefix(path) if pattern else path
        if not os.path.isdir(root):
            raise GroupEmotionError("not_found", f"{self.uri} does not exist")
        folders = [root]
        while folders:
            folder = folders.pop()
            self.pages += 1
            with os.scandir(folder) as entries:
                for entry in entries:
                    if entry.is_dir():
                        folders.append(entry.path)
                    elif entry.is_file() and (pattern is None or pattern.fullmatch(entry.path)):
                        yield entry.path

    def _s3(self) -> Iterator[str]:
        fs, path = storage.filesystem(self.uri)
        bucket, _, key = path.partition("/")
        if not bucket:
            raise GroupEmotionError("bad_uri", f"{self.uri}: no bucket name")
        pattern = _glob_pattern(path)
        prefix = _literal_prefix(key) if pattern else (key.rstrip("/") + "/" if key else "")
        found = False
        for name in self._pages(fs, bucket, prefix):
            if pattern is None or pattern.fullmatch(f"{bucket}/{name}"):
                found = True
                yield f"s3://{bucket}/{name}"
        if not found and pattern is None and key and storage.exists(self.uri):
            self.single = True
            yield self.uri

    def _pages(self, fs, bucket: str, prefix: str) -> Iterator[str]:
        token = None
        while True:
            more = {"ContinuationToken": token} if token else {}
            with storage.classified(self.uri):
                page = fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=prefix, MaxKeys=self.page_keys, **more)
            self.pages += 1
            for item in page.get("Contents", []):
                if not item["Key"].endswith("/"):
                    yield item["Key"]
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return


def _glob_pattern(path: str) -> re.Pattern | None:
    if not any(c in path for c in "*?["):
        return None
    out, i = [], 0
    while i < len(path):
        if path.startswith("**", i):
            out.append(".*")
            i += 2
        elif path[i] == "*":
            out.append("[^/]*")
            i += 1
        elif path[i] == "?":
            out.append("[^/]")
            i += 1
        elif path[i] == "[" and "]" in path[i + 1 :]:
            end = path.index("]", i + 1)
            out.append("[" + path[i + 1 : end].replace("!", "^", 1) + "]")
            i = end + 1
        else:
            out.append(re.escape(path[i]))
            i += 1
    return re.compile("".join(out))


def _literal_prefix(path: str) -> str:
    """The folder a glob's matches all lie under."""
    cut = min(i for i in (path.find(c) for c in "*?[") if i >= 0)
    return path[: path.rfind("/", 0, cut) + 1]
