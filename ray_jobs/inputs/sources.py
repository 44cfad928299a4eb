"""Clip archives in local folders or object storage -> a Ray Dataset of SourceRows.

Two layouts, told apart by file extension:

- tar shards (`*.tar`, written by `groupemotion pack` or any WebDataset-style writer): the members
  `<key>.<ext>` and `<key>.json` (`{"label": ...}`) of one key form one clip. The key of a row is
  `<shard uri>/<member key>`.
- plain video objects (every container the decoder opens: `media.VIDEO_EXTENSIONS`, from
  `.mp4` and `.webm` to `.flv`, `.wmv`, `.ts` and `.3gp`): the key of a row is the object's URI;
  its label comes from a labels CSV (see `read_labels_csv`) or, without one, from a
  class-named parent folder (`Negative/`, `Neutral/`, `Positive/`).

- tables (`.parquet`, `.csv`, `.jsonl`: `ray_jobs.inputs.tables`): one row per plain video object,
  named by its `uri` column, labelled by its `label` column. A read task streams one table (or
  the row groups asked for) and gives rows without their bytes: fetching them is a stage of its
  own (`fetch_stage`), so that a table of millions of rows is planned as one task and read at the
  speed the fetchers and decoders take it. The key of a row is `tables.row_key`. The tables are
  read by this Datasource with pyarrow's streaming readers rather than by Ray Data's
  `read_parquet`/`read_csv`/`read_json`, because a row must keep its position in its table (the
  inference job's units are runs of consecutive rows, and a rerun reads only the row groups of
  the units still to do), which those readers do not give.

Each input URI may be a folder or prefix, a glob, one object, or a `manifest.json` written by
pack. One custom `ray.data.Datasource` plans the reads: one read task per shard, one per small
group of plain objects, one per table. It is a Datasource of its own rather than `read_binary_files` because
the size limit must be checked before an object is read, each object's label must travel with
its own read task (not a whole-dataset dict shipped to every worker), and both layouts must give
the same schema. A read task hands over its rows a few videos at a time (`_BLOCK_VIDEOS`), so
that the decode actors share the work of one shard instead of one actor decoding a whole block.

Shards are untrusted input. A shard is streamed with `tarfile` (mode `r|`, no seeking, no
decompression) and members are only ever read into memory: a member name is never a filesystem
path. Links, devices, directories and other special members, and names that are absolute or
contain `..`, are skipped. A video over `max_video_bytes` is not read; its row carries an error.

Besides the SourceRow columns, every row has an `error` column (null, or `<reason>: <detail>` for
a clip the reader already knows is bad: too large, a shard that ends mid-member, a label member
that is not JSON); the decode stage turns it into an error ClipRow so that every input clip still
yields exactly one row. An object store that still fails after the retries (`storage`) gives the
same kind of row, with the StorageError's reason (`storage_unavailable: ...`): for a plain object
its own row, for a shard one row for the shard after the clips read so far. The jobs tell those
apart (`storage.is_storage_failure`) and leave such a unit for a rerun instead of recording the
store's failure as the videos' answer. Label values are canonicalised with `schema.parse_label` where they are
valid (class names in any case, VGAF numbers) and passed through as written otherwise, so that
the decode stage can report them as errors rather than the reader failing the job.

With `shard_ends`, each shard's read task ends with a marker row (`SourceRow.SHARD_END`) that
counts the rows the shard gave: the inference job commits a shard's labels once that many videos
are done, in whatever order they finish. The count is the reader's, not the manifest's, so a shard
cut short in storage (which gives its clips so far and one `bad_shard` row) still completes.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import posixpath
import tarfile
from dataclasses import dataclass
from typing import Iterator

import pyarrow as pa
import ray.data
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from groupemotion_core.errors import GroupEmotionError
from groupemotion_core.media.decode import VIDEO_EXTENSIONS, DecodeSpec
from groupemotion_core.schema import CLASSES, SourceRow, parse_label
from ray_jobs.inputs import storage, tables

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "groupemotion-shards/1"

# Limits on the small text inputs that are read whole.
MAX_MANIFEST_BYTES = 64 << 20
MAX_LABELS_CSV_BYTES = 256 << 20
MAX_LABEL_MEMBER_BYTES = 64 << 10

# Plain objects are grouped into read tasks of at most this many objects and bytes.
_OBJECTS_PER_TASK = 64
_BYTES_PER_TASK = 256 << 20
# A read task hands a block to Ray Data once it holds this many videos or bytes of video: small
# blocks spread a shard over the decode actors (a block is decoded by one actor), and a few videos
# a block keep the number of Ray Data tasks per second low on a large cluster. Ray Data joins a
# task's blocks up to its own target block size (128 MiB), then splits them into the block count
# asked for (`blocks`): where that is given, it is what sizes a decode task.
_BLOCK_VIDEOS = 4
BLOCK_BYTES = 64 << 20
# A table's read task hands over this many rows (no bytes yet) a block; each is one fetch task.
_TABLE_BLOCK_ROWS = 64
_FETCH_THREADS = 4


@dataclass(frozen=True)
class TableRead:
    """One table to read: all of it, or only some of its Parquet row groups."""

    uri: str
    row_groups: tuple[int, ...] | None = None


def read_sources(
    uris: list[str] | str,
    labels_csv: str | None = None,
    *,
    max_video_bytes: int = DecodeSpec().max_input_bytes,
    shard_ends: bool = False,
    num_cpus: float | None = None,
    concurrency: int | None = None,
    blocks: int | None = None,
    table_reads: list[TableRead] = (),
    uri_column: str = tables.URI_COLUMN,
    fetch: bool = True,
) -> ray.data.Dataset:
    """A Ray Dataset of SourceRows (plus `error` and `shard_end`) for every clip under `uris`
    and in `table_reads` (tables in `uris` are read whole; table i of the key is the i-th of
    `table_reads` and then of those).

    The inputs are listed on the driver (see `list_inputs`); reading happens in Ray tasks, each
    holding `num_cpus` (Ray's default: 1), at most `concurrency` at once (default: as resources
    allow), and giving `blocks` blocks in all (Ray Data's `override_num_blocks`; default: Ray
    Data's choice, at least 200). `labels_csv` labels plain video objects (one it does not name
    has no label); shards carry their own labels. Objects and members over `max_video_bytes` are
    not read (an error row). `shard_ends` ends each shard with its marker row (module docstring).
    Without `fetch` the table rows come without their bytes: the caller adds `fetch_stage`.
    """
    inputs = _expand(uris) if uris or not table_reads else []
    reads = [*table_reads, *(TableRead(uri) for uri, _ in inputs if layout(uri) == "table")]
    labels = read_labels_csv(labels_csv) if labels_csv else None
    source = _SourceDatasource(inputs, labels, max_video_bytes, shard_ends, reads, uri_column)
    ds = ray.data.read_datasource(source, num_cpus=num_cpus, concurrency=concurrency, override_num_blocks=blocks)
    if not (fetch and reads):
        return ds
    return fetch_stage(ds, max_video_bytes, num_cpus=num_cpus, concurrency=concurrency)


def fetch_stage(ds: ray.data.Dataset, max_video_bytes: int = DecodeSpec().max_input_bytes, *,
                num_cpus: float | None = None, concurrency: int | None = None) -> ray.data.Dataset:
    """The table rows of `ds` with their video bytes (or the error reading them: missing, too
    large, the store failing after its retries); every other row as it was. Each task takes one
    read block and hands it on _BLOCK_VIDEOS videos at a time, reading a few objects at once."""
    return ds.map_batches(_fetch, fn_args=(max_video_bytes,), batch_size=None, batch_format="pyarrow",
                          num_cpus=num_cpus, concurrency=concurrency)


def _fetch(batch: pa.Table, max_video_bytes: int) -> Iterator[pa.Table]:
    from concurrent.futures import ThreadPoolExecutor

    def read(row: dict) -> dict:
        located = tables.row_of(row[SourceRow.KEY])
        if located is None or row[SourceRow.VIDEO] is not None or row[SourceRow.ERROR] is not None:
            return row
        try:
            return {**row, SourceRow.VIDEO: storage.read_bytes(located[0], max_bytes=max_video_bytes)}
        except GroupEmotionError as e:  # missing, too large, or the store failed (StorageError)
            return {**row, SourceRow.ERROR: str(e)}

    rows = batch.to_pylist()
    with ThreadPoolExecutor(_FETCH_THREADS) as pool:
        for start in range(0, len(rows), _BLOCK_VIDEOS):
            yield pa.Table.from_pylist(list(pool.map(read, rows[start : start + _BLOCK_VIDEOS])),
                                       schema=SourceRow.SCHEMA)


def list_inputs(uris: list[str] | str) -> list[str]:
    """The shard and video object URIs that `uris` name, deduplicated, in a deterministic order
    (inputs in the order given, each expanded in sorted order)."""
    return [uri for uri, _ in _expand(uris)]


def shard_videos(shards: list[str]) -> dict[str, int]:
    """{shard URI: its clip count} for the shards a `manifest.json` written by pack lists, read
    from the manifest beside each shard (one read per folder); a shard without one is absent."""
    counts: dict[str, int] = {}
    for root in dict.fromkeys(posixpath.dirname(uri) for uri in shards):
        manifest = storage.join(root, MANIFEST_NAME)
        if not storage.exists(manifest):
            continue
        try:
            listed = json.loads(storage.read_bytes(manifest, max_bytes=MAX_MANIFEST_BYTES))["shards"]
            counts.update({storage.join(root, s["name"]): int(s["clips"]) for s in listed})
        except (ValueError, KeyError, TypeError) as e:
            raise GroupEmotionError("bad_manifest", f"{manifest}: {e}") from None
    return {uri: counts[uri] for uri in shards if uri in counts}


def read_videos(keys: list[str], max_video_bytes: int = DecodeSpec().max_input_bytes) -> Iterator[dict]:
    """SourceRows of the videos that rows of a job named by `keys`, read again (a report shows
    their frames): a plain object directly, the members of one shard by streaming it once, up to
    the last member wanted. A key that is not there any more gives a row with its `error`."""
    shards: dict[str, set[str]] = {}
    for key in dict.fromkeys(keys):
        cut = key.find(".tar/")
        if layout(key) == "video" or cut < 0:
            try:
                yield _row(key, storage.read_bytes(key, max_bytes=max_video_bytes), None)
            except GroupEmotionError as e:
                yield _row(key, None, None, str(e))
        else:
            shards.setdefault(key[: cut + len(".tar")], set()).add(key)
    for shard, wanted in shards.items():
        with contextlib.closing(_shard_rows(shard, max_video_bytes)) as rows:
            for row in rows:
                if row[SourceRow.KEY] == shard:  # the shard failed part way: its error is theirs
                    yield from (_row(key, None, None, row[SourceRow.ERROR]) for key in sorted(wanted))
                    wanted = set()
                elif row[SourceRow.KEY] in wanted:
                    wanted.discard(row[SourceRow.KEY])
                    yield row
                if not wanted:
                    break
        yield from (_row(key, None, None, f"not_found: {shard} has no member {key[len(shard) + 1:]}")
                    for key in sorted(wanted))


def layout(uri: str) -> str | None:
    """"tar", "video", "table" or None (not an input) from a URI's extension."""
    ext = posixpath.splitext(uri)[1].lower().lstrip(".")
    if ext == "tar":
        return "tar"
    if tables.is_table(uri):
        return "table"
    return "video" if ext in VIDEO_EXTENSIONS else None


def shards_of_manifest(uri: str) -> list[str]:
    """The shard URIs a `manifest.json` written by pack lists."""
    return [shard for shard, _ in _from_manifest(uri)]


def read_labels_csv(uri: str) -> dict[str, str]:
    """A labels CSV -> {video name stem: label as written}.

    The VGAF layout: one row per clip, video name then class, separated by a comma (or, as in
    VGAF's own `*_labels.txt`, by whitespace), with an optional header row. The name may carry
    a directory and a video extension; both are dropped, so `a/10_1.mp4` and `10_1` are the same
    clip. The class is a name in any case or a VGAF number (`schema.VGAF_NUMERIC_LABELS`:
    1 = Positive, 2 = Neutral, 3 = Negative); values are returned unvalidated so each caller
    picks its policy (pack refuses a bad one, read_sources reports it as a row error).
    A name listed twice with different labels is a GroupEmotionError.
    """
    text = storage.read_bytes(uri, max_bytes=MAX_LABELS_CSV_BYTES).decode("utf-8-sig")
    labels: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        cells = next(csv.reader([line])) if "," in line else line.split()
        if len(cells) < 2:
            raise GroupEmotionError("bad_labels", f"{uri} line {number}: expected `name,label`")
        name, label = video_stem(cells[0]), cells[1].strip()
        if number == 1 and not _is_label(label):
            continue  # a header row such as `Vid_name,Label`
        if labels.setdefault(name, label) != label:
            raise GroupEmotionError(
                "bad_labels", f"{uri} line {number}: {name} is labelled twice, differently"
            )
    return labels


def video_stem(name: str) -> str:
    """The name a labels CSV uses for a video: its base name without a video extension."""
    base = posixpath.basename(name.strip().replace("\\", "/"))
    stem, ext = posixpath.splitext(base)
    return stem if ext.lower().lstrip(".") in VIDEO_EXTENSIONS else base


def folder_label(uri: str) -> str | None:
    """The class a class-named parent folder gives a video (`.../Positive/x.mp4`), or None."""
    parent = posixpath.basename(posixpath.dirname(uri.replace("\\", "/")))
    return next((c for c in CLASSES if c.lower() == parent.lower()), None)


def _is_label(value: str) -> bool:
    try:
        parse_label(value)
        return True
    except ValueError:
        return False


def _canonical(value) -> str | None:
    """A label as stored -> class name if it is one, else the value as text (reported later)."""
    if value is None:
        return None
    try:
        return parse_label(str(value))
    except ValueError:
        return str(value)[:200]


def _expand(uris: list[str] | str) -> list[tuple[str, int]]:
    seen: set[str] = set()
    out: list[tuple[str, int]] = []
    for uri in [uris] if isinstance(uris, str) else uris:
        for item in _expand_one(uri):
            if item[0] not in seen:
                seen.add(item[0])
                out.append(item)
    if not out:
        raise GroupEmotionError("not_found", "no inputs given")
    return out


def _expand_one(uri: str) -> list[tuple[str, int]]:
    if posixpath.basename(uri.rstrip("/")) == MANIFEST_NAME:
        return _from_manifest(uri)
    found = storage.find(uri)
    inputs = [(u, size) for u, size in found if layout(u)]
    if len(found) == 1 and not inputs:
        raise GroupEmotionError("bad_input", f"{uri} is neither a .tar shard, a video nor a table")
    if not inputs:
        raise GroupEmotionError(
            "not_found", f"no .tar shards, videos ({', '.join(VIDEO_EXTENSIONS)}) or tables at {uri}"
        )
    return inputs


def _from_manifest(uri: str) -> list[tuple[str, int]]:
    try:
        manifest = json.loads(storage.read_bytes(uri, max_bytes=MAX_MANIFEST_BYTES))
        shards = manifest["shards"]
        names = [(s["name"], int(s["bytes"])) for s in shards]
    except (ValueError, KeyError, TypeError) as e:
        raise GroupEmotionError("bad_manifest", f"{uri}: {e}") from None
    root = uri.rstrip("/")[: -len(MANIFEST_NAME)].rstrip("/") or "."
    for name, _ in names:
        if not isinstance(name, str) or "/" in name or "\\" in name or name in ("", ".", ".."):
            raise GroupEmotionError("bad_manifest", f"{uri}: shard name {name!r} is not a file name")
    return [(storage.join(root, name), size) for name, size in names]


@dataclass(frozen=True)
class _Video:
    uri: str
    size: int
    label: str | None


class _SourceDatasource(Datasource):
    """Plans one read task per shard and one per group of plain objects (see module docstring)."""

    def __init__(
        self, inputs: list[tuple[str, int]], labels: dict[str, str] | None, max_video_bytes: int, shard_ends: bool,
        table_reads: list[TableRead], uri_column: str,
    ):
        self._shard_ends = shard_ends
        self._tables, self._uri_column = table_reads, uri_column
        self._shards = [(u, s) for u, s in inputs if layout(u) == "tar"]
        self._videos = [
            _Video(u, s, _canonical(_plain_label(u, labels))) for u, s in inputs if layout(u) == "video"
        ]
        self._max_video_bytes = max_video_bytes

    def get_name(self) -> str:
        return "GroupEmotionSources"

    def estimate_inmemory_data_size(self) -> int:
        """What the shards and objects hold; a table's videos are not known until fetched."""
        return sum(s for _, s in self._shards) + sum(v.size for v in self._videos)

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        """Shard tasks first, in input order, then the object groups, then the tables."""
        limit = self._max_video_bytes
        tasks = [_shard_task(uri, size, limit, self._shard_ends) for uri, size in self._shards]
        tasks += [_video_task(group, limit) for group in _groups(self._videos, parallelism)]
        tasks += [_table_task(i, read, self._uri_column) for i, read in enumerate(self._tables)]
        return tasks


def _plain_label(uri: str, labels: dict[str, str] | None) -> str | None:
    if labels is None:
        return folder_label(uri)
    return labels.get(video_stem(uri))


def _groups(videos: list[_Video], parallelism: int) -> Iterator[list[_Video]]:
    """Consecutive runs of objects: enough runs to use `parallelism`, none too big."""
    per_task = max(1, min(_OBJECTS_PER_TASK, -(-len(videos) // max(1, parallelism))))
    group: list[_Video] = []
    held = 0
    for video in videos:
        if group and (len(group) >= per_task or held + video.size > _BYTES_PER_TASK):
            yield group
            group, held = [], 0
        group.append(video)
        held += video.size
    if group:
        yield group


def _metadata(num_rows: int | None, size: int, files: list[str]) -> BlockMetadata:
    return BlockMetadata(num_rows=num_rows, size_bytes=size, exec_stats=None, input_files=files)


def _shard_task(uri: str, size: int, max_video_bytes: int, shard_end: bool) -> ReadTask:
    def rows():
        count = 0
        for row in _shard_rows(uri, max_video_bytes):
            count += 1
            yield row
        if shard_end:
            yield {**_row(uri, None, None), SourceRow.SHARD_END: count}

    return ReadTask(lambda: _blocks(rows()), _metadata(None, size, [uri]), SourceRow.SCHEMA)


def _video_task(group: list[_Video], max_video_bytes: int) -> ReadTask:
    meta = _metadata(len(group), sum(v.size for v in group), [v.uri for v in group])
    return ReadTask(lambda: _blocks(_video_rows(group, max_video_bytes)), meta, SourceRow.SCHEMA)


def _table_task(index: int, read: TableRead, uri_column: str) -> ReadTask:
    def blocks() -> Iterator[pa.Table]:
        batch: list[dict] = []
        for row in _table_rows(index, read, uri_column):
            batch.append(row)
            if len(batch) >= _TABLE_BLOCK_ROWS:
                yield pa.Table.from_pylist(batch, schema=SourceRow.SCHEMA)
                batch = []
        if batch:
            yield pa.Table.from_pylist(batch, schema=SourceRow.SCHEMA)

    return ReadTask(blocks, _metadata(None, 0, [read.uri]), SourceRow.SCHEMA)


def _table_rows(index: int, read: TableRead, uri_column: str) -> Iterator[dict]:
    """One table's rows as SourceRows without bytes; a row's own mistake is its error."""
    groups = None if read.row_groups is None else list(read.row_groups)
    columns = [uri_column, tables.LABEL_COLUMN]
    for first, batch in tables.batches(read.uri, uri_column, (tables.LABEL_COLUMN,), columns, groups):
        values = batch.column(uri_column).to_pylist()
        labels = batch.column(tables.LABEL_COLUMN).to_pylist() if tables.LABEL_COLUMN in batch.schema.names else None
        for offset, value in enumerate(values):
            uri, error = tables.resolve(value, read.uri)
            key = tables.row_key(uri or value or "", index, first + offset)
            yield _row(key, None, _canonical(labels[offset] if labels else None), error)


def _blocks(rows: Iterator[dict]) -> Iterator[pa.Table]:
    """Rows -> Arrow tables of about BLOCK_BYTES, so a big shard never sits in memory whole."""
    batch: list[dict] = []
    held = 0
    for row in rows:
        batch.append(row)
        held += len(row[SourceRow.VIDEO] or b"")
        if held >= BLOCK_BYTES or len(batch) >= _BLOCK_VIDEOS:
            yield pa.Table.from_pylist(batch, schema=SourceRow.SCHEMA)
            batch, held = [], 0
    if batch:
        yield pa.Table.from_pylist(batch, schema=SourceRow.SCHEMA)


def _row(key: str, video: bytes | None, label: str | None, error: str | None = None) -> dict:
    return {SourceRow.KEY: key, SourceRow.VIDEO: video, SourceRow.LABEL: label, SourceRow.ERROR: error,
            SourceRow.SHARD_END: None}


def _video_rows(group: list[_Video], max_video_bytes: int) -> Iterator[dict]:
    for video in group:
        if video.size > max_video_bytes:
            yield _row(video.uri, None, video.label, f"too_large: {video.size} bytes > {max_video_bytes}")
            continue
        try:
            data = storage.read_bytes(video.uri, max_bytes=max_video_bytes)
        except GroupEmotionError as e:  # deleted or grown since listing, or the store failed (StorageError)
            yield _row(video.uri, None, video.label, str(e))
            continue
        yield _row(video.uri, data, video.label)


def _shard_rows(uri: str, max_video_bytes: int) -> Iterator[dict]:
    """The clips of one shard, in member order; a shard cut short, or one the store failed to
    serve, ends with an error row."""
    seen: set[str] = set()
    try:
        with storage.open_read(uri) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            for key, clip in _group_members(tar, uri, max_video_bytes):
                if key in seen:
                    log.warning("%s: key %s appears twice; the second copy is skipped", uri, key)
                    continue
                seen.add(key)
                yield clip
    except tarfile.TarError as e:  # a broken or truncated shard is bad input, not a retryable failure
        yield _row(uri, None, None, f"bad_shard: {e}")
    except GroupEmotionError as e:  # a StorageError after the retries, or the shard is gone
        yield _row(uri, None, None, str(e))


def _group_members(tar: tarfile.TarFile, shard_uri: str, max_video_bytes: int):
    """Consecutive members sharing a key -> (key, row), WebDataset-style."""
    key = None
    parts: dict = {}
    for member in tar:
        name = _safe_name(member, shard_uri)
        if name is None:
            continue
        directory, base = posixpath.split(name)
        stem, _, ext = base.partition(".")
        member_key = posixpath.join(directory, stem)
        if member_key != key:
            if key is not None:
                yield key, _sample_row(shard_uri, key, parts)
            key, parts = member_key, {}
        _take_member(tar, member, ext.lower(), parts, max_video_bytes)
    if key is not None:
        yield key, _sample_row(shard_uri, key, parts)


def _safe_name(member: tarfile.TarInfo, shard_uri: str) -> str | None:
    """The member's name if it is a regular file with a plain relative name, else None."""
    name = member.name
    while name.startswith("./"):
        name = name[2:]
    parts = name.split("/")
    ok = (
        member.isreg()
        and name
        and not name.startswith("/")
        and ".." not in parts
        and "\\" not in name
        and "\x00" not in name
        and not parts[-1].startswith(".")
    )
    if not ok:
        log.warning("%s: skipping member %r (not a regular file with a safe name)", shard_uri, member.name)
        return None
    return name


def _take_member(tar, member: tarfile.TarInfo, ext: str, parts: dict, max_video_bytes: int) -> None:
    if ext == "json":
        if member.size > MAX_LABEL_MEMBER_BYTES:
            parts["error"] = f"bad_label: label member is {member.size} bytes"
            return
        try:
            parts["label"] = _canonical(json.loads(tar.extractfile(member).read()).get("label"))
        except (ValueError, AttributeError) as e:
            parts["error"] = f"bad_label: label member is not a JSON object ({e})"
    elif ext.rsplit(".", 1)[-1] in VIDEO_EXTENSIONS and "video" not in parts:
        if member.size > max_video_bytes:
            parts["error"] = f"too_large: {member.size} bytes > {max_video_bytes}"
            parts["video"] = None
        else:
            parts["video"] = tar.extractfile(member).read()


def _sample_row(shard_uri: str, key: str, parts: dict) -> dict:
    video = parts.get("video")
    error = parts.get("error")
    if video is None and error is None:
        error = "no_video: the shard has no video member for this key"
    return _row(f"{shard_uri}/{key}", video, parts.get("label"), error)
