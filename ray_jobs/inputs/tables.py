"""Tables of videos: `.parquet`, `.csv` and `.jsonl` files, one row per video, read as streams.

A team that labels web videos holds them as a table (video id, URL, language, source, ...), not
as a bare prefix. A table names each video in its `uri` column (another name with
`--uri-column`): an `s3://` URI or a local path, a relative path taken from the table's own
folder. For eval and train a `label` column gives the class (a name in any case or a VGAF
number). Every other column is carried, unchanged, into the output rows of `infer`.

A table is untrusted input like a video. Mistakes about the file (it cannot be read, it has no
`uri` column, a carried column clashes with an output column) are GroupEmotionErrors raised
while planning, before Ray starts; mistakes in one row (an empty cell, a value that is not a
URI, a scheme the job does not read) are that row's error (`row_error`), and the row still gets
its output row.

Files are read a record batch at a time with pyarrow's streaming readers (`ParquetFile
.iter_batches`, `csv.open_csv`, `json.open_json`), never whole: a table of ten million rows costs
the reader one batch of memory. pyarrow infers the column types from the first block of a CSV or
JSONL file, so an integer column stays int64 in the output; the uri and label columns are read
as text whatever they look like.

Inside the pipeline a table row is known by its stream key (`row_key`): the video's URI, then
which table of the job and which row of it, so that the same video named twice is still two
rows and the inference writer finds a row's unit without a lookup table of every video.
"""

from __future__ import annotations

import os
import posixpath
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from groupemotion_core.errors import GroupEmotionError
from ray_jobs.inputs import storage

TABLE_EXTENSIONS = ("parquet", "csv", "jsonl")
URI_COLUMN = "uri"
LABEL_COLUMN = "label"
BATCH_ROWS = 4096
# A CSV or JSONL block (and so its longest line) is at most this big.
BLOCK_BYTES = 4 << 20
MAX_URI_CHARS = 4096
_SCHEMES = ("s3://", "file://")


def is_table(uri: str) -> bool:
    return posixpath.splitext(uri)[1].lower().lstrip(".") in TABLE_EXTENSIONS


def schema(uri: str, uri_column: str) -> pa.Schema:
    """The table's columns, as the job will read them; a clear error when the file is no table or
    has no `uri_column`."""
    with _OpenTable(uri, uri_column, (uri_column,)) as (found, _):
        return found


def check(uris: list[str], uri_column: str, *, labelled: bool = False) -> None:
    """Raise the table mistakes (`schema`) of the tables among `uris` (inputs as given), and with
    `labelled` a table without a `label` column: the checks a job makes before Ray starts."""
    for uri in filter(is_table, uris):
        if LABEL_COLUMN not in schema(uri, uri_column).names and labelled:
            raise GroupEmotionError("bad_table", f"{uri} has no `{LABEL_COLUMN}` column: training needs a label "
                                    "per video (a class name or a VGAF number)")


def batches(uri: str, uri_column: str, text_columns: tuple[str, ...] = (), columns: list[str] | None = None,
            row_groups: list[int] | None = None) -> Iterator[tuple[int, pa.RecordBatch]]:
    """The table's rows a record batch of at most BATCH_ROWS at a time, with the index of each
    batch's first row in the table: `columns` only (all when None; names the table lacks are left
    out), `uri_column` and `text_columns` as strings. `row_groups` (Parquet only) reads just
    those row groups."""
    with _OpenTable(uri, uri_column, (uri_column, *text_columns), columns, row_groups) as (_, found):
        yield from found


class _OpenTable:
    """A context manager around one open table: (schema, batch iterator); file errors -> bad_table."""

    def __init__(self, uri: str, uri_column: str, text: tuple[str, ...], columns: list[str] | None = None,
                 row_groups: list[int] | None = None):
        self.uri, self.uri_column, self.text, self.columns = uri, uri_column, text, columns
        self.row_groups = row_groups
        self._stream = None

    def __enter__(self):
        self._stream = storage.open_read(self.uri)
        f = self._stream.__enter__()
        try:
            found, rows = self._open(f)
        except (pa.ArrowException, OSError, ValueError) as e:
            self.__exit__(None, None, None)
            raise GroupEmotionError("bad_table", f"{self.uri}: {e}") from None
        if self.uri_column not in found.names:
            self.__exit__(None, None, None)
            raise GroupEmotionError("bad_table", f"{self.uri} has no `{self.uri_column}` column (columns: "
                                    f"{', '.join(found.names)}); name the URI column with --uri-column")
        return found, self._checked(rows)

    def __exit__(self, *exc):
        if self._stream is not None:
            self._stream.__exit__(*exc)
            self._stream = None

    def _open(self, f):
        ext = posixpath.splitext(self.uri)[1].lower().lstrip(".")
        if ext == "parquet":
            parquet = pq.ParquetFile(f)
            return parquet.schema_arrow, self._row_groups(parquet)
        if ext == "csv":
            types = {name: pa.string() for name in self.text}
            reader = pacsv.open_csv(f, read_options=pacsv.ReadOptions(block_size=BLOCK_BYTES),
                                    convert_options=pacsv.ConvertOptions(column_types=types))
        else:
            reader = pajson.open_json(f, read_options=pajson.ReadOptions(block_size=BLOCK_BYTES))
        return reader.schema, self._numbered(reader)

    def _numbered(self, found) -> Iterator[tuple[int, pa.RecordBatch]]:
        row = 0
        for batch in found:
            yield row, self._text(batch)
            row += batch.num_rows

    def _row_groups(self, parquet: pq.ParquetFile) -> Iterator[tuple[int, pa.RecordBatch]]:
        starts = [0]
        for i in range(parquet.metadata.num_row_groups):
            starts.append(starts[-1] + parquet.metadata.row_group(i).num_rows)
        wanted = None if self.columns is None else [c for c in self.columns if c in parquet.schema_arrow.names]
        for group in range(parquet.metadata.num_row_groups) if self.row_groups is None else self.row_groups:
            row = starts[group]
            for batch in parquet.iter_batches(BATCH_ROWS, row_groups=[group], columns=wanted):
                yield row, self._text(batch)
                row += batch.num_rows

    def _text(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        """The uri and label columns as strings (a label may be written as a VGAF number)."""
        if self.columns is not None:
            batch = batch.select([c for c in self.columns if c in batch.schema.names])
        for name in self.text:
            if name in batch.schema.names and batch.schema.field(name).type != pa.string():
                i = batch.schema.get_field_index(name)
                batch = batch.set_column(i, name, pc.cast(batch.column(i), pa.string()))
        return batch

    def _checked(self, rows: Iterator[tuple[int, pa.RecordBatch]]) -> Iterator[tuple[int, pa.RecordBatch]]:
        try:
            yield from rows
        except (pa.ArrowException, OSError, ValueError) as e:  # a bad line further down
            raise GroupEmotionError("bad_table", f"{self.uri}: {e}") from None
        finally:
            self.__exit__(None, None, None)


def carried_columns(uri: str, found: pa.Schema, uri_column: str, chosen: list[str] | None,
                    reserved: tuple[str, ...]) -> list[str]:
    """The columns of `found` that go into the output unchanged: `chosen` (each must exist), or
    all but the URI column. One named like an output column (`reserved`) is refused by name."""
    if chosen is not None:
        missing = [name for name in chosen if name not in found.names]
        if missing:
            raise GroupEmotionError("bad_table", f"{uri} has no column {', '.join(missing)} (--columns); its "
                                    f"columns: {', '.join(found.names)}")
    names = [name for name in (found.names if chosen is None else chosen) if name != uri_column]
    clashes = [name for name in names if name in reserved]
    if clashes:
        raise GroupEmotionError("bad_table", f"{uri}: column {', '.join(clashes)} would clash with the output "
                                f"column of that name; choose the carried columns with --columns")
    return names


def resolve(value: str | None, table: str) -> tuple[str | None, str | None]:
    """A uri cell -> (the video's URI, None), or (None, the row's error)."""
    text = (value or "").strip()
    if not text:
        return None, "bad_uri: the row's uri is empty"
    if len(text) > MAX_URI_CHARS or any(c in text for c in "\x00\n\r"):
        return None, f"bad_uri: {text[:200]!r} is not a URI"
    if "://" in text:
        if not text.startswith(_SCHEMES):
            return None, f"bad_uri: {text[:200]} has a scheme this job does not read (local paths and s3:// only)"
        if text.startswith("s3://") and not text[len("s3://") :].split("/", 1)[0]:
            return None, f"bad_uri: {text[:200]} names no bucket"
        return text, None
    if posixpath.isabs(text):
        return text, None
    return storage.join(posixpath.dirname(table) if storage.is_remote(table) else _local_dir(table), text), None


def _local_dir(table: str) -> str:
    return os.path.dirname(os.path.abspath(storage.filesystem(table)[1]))


def row_key(uri: str, table: int, row: int) -> str:
    """The stream key of row `row` of the job's table `table`, naming video `uri`."""
    return f"{uri}#{table}:{row}"


def row_of(key: str) -> tuple[str, int, int] | None:
    """A stream key -> (uri, table, row), or None when it is not a table row's key."""
    uri, hash_, where = key.rpartition("#")
    table, colon, row = where.partition(":")
    if not (hash_ and colon and table.isdigit() and row.isdigit()):
        return None
    return uri, int(table), int(row)
