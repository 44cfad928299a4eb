"""A cache of decoded clips: each training split is decoded once, then read for every epoch and run.

Decoding is the slow part of training (a 720p clip costs 0.1-0.2 s of CPU) and the paper
fine-tunes for many epochs on the same clips, so `groupemotion train --cache URI` decodes each
split into the cache first and trains from the cache: decode -> write cache -> train. The first
epoch reads the cache like every other one. Training from the decode stream while writing the
cache would overlap the two, but it ties the cache's exactly-once commits to the trainer's
retries and its shuffle, and a decode-only pass has every CPU to itself anyway.

Layout (CACHE is a local folder or an s3:// prefix):

    CACHE/<version>/cache.json              what <version> stands for, for people
    CACHE/<version>/unit-<hash>.parquet     the ClipRows of one input unit

`<version>` is a digest of everything besides the input bytes that decides the decoded clips:
the DecodeSpec (all but its thread count), the window plan, the PyAV and FFmpeg library versions,
the source of the decoder (`groupemotion_core.media.decode` and `spec`: a changed decoder makes a new
cache, with no version number to forget), this module's row format, and a fault-injection
setting when one is on. `<hash>` is a digest of the unit's inputs: URI, size and ETag (S3) or
mtime (local disk) of each. A changed input, spec or decoder gives new names, so nothing is ever
read that was written for other inputs; old entries stay until the folder is deleted.

A unit is one tar shard, or a group of up to OBJECTS_PER_UNIT plain video objects in listing
order. `fill` decodes the units whose file is missing in one Ray Data stream (the reader, the
decode stage, then an encode step on the workers) and commits each unit in one atomic write
(a single PUT, or a rename) once all its videos have their rows, in whatever order units
complete: a group knows its size from the listing, a shard from its reader's end marker
(`ray_jobs.sinks.units`, the mechanism the label sink shares). So a file is always a whole unit,
written once; a killed fill leaves whole units and nothing else, and the rerun decodes only the
rest. A unit with a row that failed on the object store (`storage.is_storage_failure`) is not
committed: that failure is the store's, not the video's, and a rerun must try again.

Row format: the decode stage's ClipRow columns as they are, except
- `frames` -> `frames_jpeg`: the T frames stacked into one (T*H) x W image, baseline JPEG at
  quality 90 without chroma subsampling (on real web clips at 224 px: about 40 dB PSNR, largest
  pixel error about 30 of 255, 6-9% of the raw bytes). A clip whose JPEG would be more than a
  quarter of its raw frames (noise) is encoded at lower qualities until it fits, so the bound
  always holds.
- `audio` -> `audio_pcm16`: the `audio_len` valid samples as 16-bit PCM (little endian); the
  zero padding is restored on reading. Quantisation error at most 1/65534, below what the AAC or
  Opus source holds.
Error rows store neither (their frames and audio are zeros). The Parquet file is zstd-compressed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray.data
from ray.data.extensions import ArrowTensorArray

from groupemotion_core.errors import GroupEmotionError, split_error
from groupemotion_core.media.spec import DecodeSpec, WindowPlan
from groupemotion_core.schema import ClipRow
from ray_jobs.inputs import storage
from ray_jobs.runtime import pools
from ray_jobs.sinks import units as unit_commits
from ray_jobs.runtime.watchdog import DEFAULT_STALL_TIMEOUT_S, watched

FORMAT = "groupemotion-clip-cache/1"
OBJECTS_PER_UNIT = 64
JPEG_QUALITIES = (90, 80, 70, 60, 50, 40, 30, 20, 10)  # the first whose size fits the bound
MAX_FRAME_RATIO = 0.25  # a clip's JPEG is at most this share of its raw uint8 frames
FRAMES_JPEG = "frames_jpeg"
AUDIO_PCM16 = "audio_pcm16"
UNIT_PREFIX = "unit-"
INFO_FILE = "cache.json"
METADATA_KEY = b"groupemotion.clip_cache"
EXIT_AFTER_UNITS_ENV = "GROUPEMOTION_CACHE_EXIT_AFTER_UNITS"
_ROWS_PER_GROUP = 64  # rows of a cache file read (and restored) at once


@dataclass(frozen=True)
class Unit:
    """One input unit: its inputs as (uri, size, tag) and the cache file that holds its clips."""

    inputs: tuple[tuple[str, int, str], ...]
    shard: bool

    @property
    def name(self) -> str:
        return f"{UNIT_PREFIX}{_digest(self.inputs)[:24]}.parquet"

    @property
    def uris(self) -> tuple[str, ...]:
        return tuple(uri for uri, _, _ in self.inputs)

    def describe(self) -> str:
        return unit_commits.describe(self.uris)


@dataclass
class FillStats:
    """What `fill` found and did."""

    units: int = 0
    reused: int = 0
    committed: int = 0
    videos: int = 0  # videos decoded now
    rows: int = 0  # ClipRows written now
    errors: int = 0  # of those rows, with `error` set
    bytes: int = 0  # written now
    raw_frame_bytes: int = 0  # the uint8 frames of the decoded rows written now
    frame_bytes: int = 0  # their JPEGs
    not_cached: list[tuple[str, str]] = field(default_factory=list)  # (unit, error) left out: the store failed

    def line(self) -> str:
        text = f"{self.reused} of {self.units} units reused, {self.committed} decoded"
        if self.committed:
            text += f" ({self.videos} videos, {self.errors} errors, {self.bytes / 1e6:.1f} MB"
            if self.raw_frame_bytes:
                text += f"; frames at {self.frame_bytes / self.raw_frame_bytes:.1%} of raw"
            text += ")"
        return text


class ClipCache:
    """The cache of one decode configuration under a cache URI (see the module docstring)."""

    def __init__(self, uri: str, spec: DecodeSpec, plan: WindowPlan, *, fault_inject: str | None = None):
        from ray_jobs.decode.stage import FAULT_INJECT_ENV

        self.spec, self.plan = spec, plan
        self.faults = os.environ.get(FAULT_INJECT_ENV, "") if fault_inject is None else fault_inject
        self.info = _version_info(spec, plan, self.faults)
        self.root = storage.join(uri, _digest(self.info)[:24])

    def units(self, uris: list[str] | str) -> list[Unit]:
        """The input units under `uris` (the forms `ray_jobs.inputs.sources` reads), with the size and
        ETag or mtime of every input as it is now."""
        from ray_jobs.inputs.sources import list_inputs

        inputs = [uri if storage.is_remote(uri) else os.path.abspath(uri) for uri in list_inputs(uris)]
        found = _stat(inputs)
        return [Unit(tuple(found[uri] for uri in group), shard)
                for group, shard in unit_commits.plan(inputs, OBJECTS_PER_UNIT)]

    def missing(self, units: list[Unit]) -> list[Unit]:
        fs, path = storage.filesystem(self.root)
        with storage.classified(self.root):
            listed = fs.ls(path, detail=False, refresh=True) if fs.exists(path) else []
        names = {posixpath.basename(p) for p in listed}
        return [unit for unit in units if unit.name not in names]

    def fill(self, units: list[Unit], *, decode_cpus: float = 1.0, title: str | None = None,
             stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S) -> FillStats:
        """Decode the units that have no file yet and commit each one's file once it is whole.

        With a `title`, a console.Progress of the units shows while there is decoding to do.
        Raises, at the end, the StorageError reason of the first unit that could not be read from
        the object store (the others are committed), and `watchdog.Stalled` when no decoded clip
        came for `stall_timeout_s` seconds.
        """
        from ray_jobs.runtime.console import Progress
        from ray_jobs.decode.stage import decode_dataset
        from ray_jobs.inputs.sources import read_sources

        todo = self.missing(units)
        stats = FillStats(units=len(units), reused=len(units) - len(todo))
        if todo:
            info = storage.join(self.root, INFO_FILE)
            if not storage.exists(info):
                storage.write_bytes_atomic(info, json.dumps(self.info, indent=2, sort_keys=True).encode())
            uris = [uri for unit in todo for uri, _, _ in unit.inputs]
            # Read tasks move bytes and the encode step costs a few ms a clip against 100+ ms of
            # decoding: two small-task stages, the decode actors on every other live CPU.
            sizes = pools.size_pools(pools.live_capacity(), small_stages=2, decode_cpus=decode_cpus)
            sources = read_sources(uris, shard_ends=True, num_cpus=pools.SMALL_TASK_CPUS,
                                   concurrency=min(len(todo), sizes.small_tasks))
            decoded = decode_dataset(sources, self.spec, self.plan, num_cpus=decode_cpus, actors=sizes.decoders,
                                     fault_inject=self.faults)
            encoded = decoded.map_batches(_encode_rows, fn_args=(self.spec,), batch_format="pyarrow",
                                          batch_size=None, num_cpus=pools.SMALL_TASK_CPUS,
                                          compute=ray.data.TaskPoolStrategy(size=sizes.small_tasks))
            progress = Progress(title, len(todo), "units") if title else None
            writer = _UnitWriter(self, todo, stats, progress)
            batches = encoded.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=1)
            for batch in watched(batches, stall_timeout_s, "no decoded clip reached the cache writer"):
                writer.add(batch)
            writer.finish()
            if progress is not None:
                progress.close()
        if stats.not_cached:
            reason, detail = split_error(stats.not_cached[0][1])
            raise GroupEmotionError(
                reason,
                f"{len(stats.not_cached)} units could not be read from the object store after retries "
                f"(first: {detail}); the other units are cached, run again to retry those",
            )
        return stats

    def dataset(self, units: list[Unit]) -> ray.data.Dataset:
        """The cached ClipRows of `units` (all committed), as the decode stage gives them: one
        task per unit file, reading it a row group at a time.

        Not `ray.data.read_parquet`: every epoch runs the dataset again, and its file listing and
        metadata steps cost seconds per run even for a few small files (8-15 s against 0.5 s for
        three files here), which for a small split is longer than the epoch itself.
        """
        uris = [{"uri": storage.join(self.root, unit.name)} for unit in units]
        return ray.data.from_items(uris, override_num_blocks=len(uris)).map_batches(
            _load_units, fn_args=(self.spec,), batch_size=1, batch_format="pyarrow")


def _version_info(spec: DecodeSpec, plan: WindowPlan, faults: str) -> dict:
    import av

    from groupemotion_core.media import decode as media
    from groupemotion_core.media import spec as spec_module

    source = hashlib.sha256()
    for module in (media, spec_module):
        source.update(Path(module.__file__).read_bytes())
    info = {
        "format": FORMAT,
        "spec": {k: v for k, v in dataclasses.asdict(spec).items() if k != "threads"},
        "plan": dataclasses.asdict(plan),
        "decoder": {"pyav": av.__version__,
                    "ffmpeg": {name: list(version) for name, version in sorted(av.library_versions.items())},
                    "source_sha256": source.hexdigest()},
        "frames": {"codec": "jpeg", "qualities": list(JPEG_QUALITIES), "subsampling": "4:4:4",
                   "max_ratio": MAX_FRAME_RATIO},
        "audio": "pcm_s16le, audio_len samples",
    }
    if faults:
        info["fault_inject"] = faults
    return info


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _stat(inputs: list[str]) -> dict[str, tuple[str, int, str]]:
    """{uri: (uri, size, tag)}, from one listing per folder: the tag is the S3 ETag, or the mtime
    on a local disk, so an object rewritten in place gets a new identity."""
    found: dict[str, tuple[str, int, str]] = {}
    folders: dict[str, list[str]] = {}
    for uri in inputs:
        folders.setdefault(posixpath.dirname(uri), []).append(uri)
    for folder, uris in folders.items():
        fs, path = storage.filesystem(folder)
        with storage.classified(folder):
            entries = {posixpath.basename(e["name"]): e for e in fs.ls(path, detail=True, refresh=True)}
        for uri in uris:
            entry = entries.get(posixpath.basename(uri))
            if entry is None:
                raise GroupEmotionError("not_found", f"{uri} vanished while the cache was planned")
            tag = entry.get("ETag") or entry.get("mtime")
            found[uri] = (uri, int(entry.get("size") or 0), str(tag).strip('"'))
    return found


class _UnitWriter:
    """Gathers the encoded rows of each unit and commits the unit once it is whole."""

    def __init__(self, cache: ClipCache, units: list[Unit], stats: FillStats, progress):
        self.cache, self.stats, self.progress = cache, stats, progress
        self.units = units
        self.stream = unit_commits.UnitStream(
            ((u.uris, None if u.shard else len(u.inputs)) for u in units), EXIT_AFTER_UNITS_ENV)
        self.pieces: dict[int, list[pa.Table]] = {}

    def add(self, batch: pa.Table) -> None:
        columns = (ClipRow.KEY, ClipRow.WINDOW, ClipRow.WINDOWS)
        touched: dict[int, list[int]] = {}
        for row, values in enumerate(zip(*(batch.column(name).to_pylist() for name in columns))):
            index, _ = self.stream.add(dict(zip(columns, values)))
            rows = touched.setdefault(index, [])
            if values[1] != ClipRow.SHARD_END:  # the marker only counts the shard's videos
                rows.append(row)
        for index, rows in touched.items():
            if rows:
                self.pieces.setdefault(index, []).append(batch.take(rows))
            if self.stream.whole(index):
                self._commit(index)

    def finish(self) -> None:
        self.stream.finish()

    def _commit(self, index: int) -> None:
        unit = self.units[index]
        table = pa.concat_tables(self.pieces.pop(index, []) or [_empty(self.cache.spec)])
        errors = [e for e in table.column(ClipRow.ERROR).to_pylist() if e is not None]
        failed = self.stream.close(index, errors)
        if failed is not None:
            self.stats.not_cached.append((unit.describe(), failed))
            return
        meta = {"format": FORMAT, "inputs": [list(i) for i in unit.inputs],
                "frames": list(self.cache.spec.frame_shape),
                "audio_samples": self.cache.spec.audio_samples}
        table = table.replace_schema_metadata({METADATA_KEY: json.dumps(meta)})
        written = unit_commits.write_parquet(storage.join(self.cache.root, unit.name), table,
                                             compression="zstd", row_group_size=_ROWS_PER_GROUP)
        s = self.stats
        s.committed += 1
        s.videos += self.stream.videos[index]
        s.rows += table.num_rows
        s.errors += len(errors)
        s.bytes += written
        jpegs = table.column(FRAMES_JPEG).to_pylist()
        s.frame_bytes += sum(len(j) for j in jpegs if j is not None)
        s.raw_frame_bytes += sum(1 for j in jpegs if j is not None) * math.prod(self.cache.spec.frame_shape)
        if self.progress is not None:
            self.progress.advance(1, videos=len(set(table.column(ClipRow.KEY).to_pylist())), errors=len(errors))
        self.stream.committed()


def _encode_rows(table: pa.Table, spec: DecodeSpec) -> pa.Table:
    """ClipRows -> cache rows (module docstring); the shard-end markers pass through."""
    frames = _tensors(table, ClipRow.FRAMES)
    audio = _tensors(table, ClipRow.AUDIO)
    lengths = table.column(ClipRow.AUDIO_LEN).to_pylist()
    usable = [e is None and ClipRow.is_window(w) for e, w in zip(table.column(ClipRow.ERROR).to_pylist(),
                                                                  table.column(ClipRow.WINDOW).to_pylist())]
    jpegs = [encode_frames(f) if ok else None for f, ok in zip(frames, usable)]
    pcm = [encode_audio(a[:n]) if ok else None for a, n, ok in zip(audio, lengths, usable)]
    rest = table.drop_columns([ClipRow.FRAMES, ClipRow.AUDIO])
    return rest.append_column(FRAMES_JPEG, pa.array(jpegs, pa.binary())).append_column(
        AUDIO_PCM16, pa.array(pcm, pa.binary()))


def _tensors(table: pa.Table, name: str) -> np.ndarray:
    return table.column(name).combine_chunks().to_numpy_ndarray()


def encode_frames(frames: np.ndarray) -> bytes:
    """uint8 [T, H, W, 3] -> one JPEG of the frames stacked vertically, within MAX_FRAME_RATIO."""
    from PIL import Image

    image = Image.fromarray(np.ascontiguousarray(frames).reshape(-1, frames.shape[2], 3))
    budget = frames.nbytes * MAX_FRAME_RATIO
    for quality in JPEG_QUALITIES:
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=quality, subsampling=0)
        if buffer.tell() <= budget:
            return buffer.getvalue()
    buffer = io.BytesIO()  # nothing fits at full chroma: halve it at the lowest quality
    image.save(buffer, "JPEG", quality=JPEG_QUALITIES[-1], subsampling=2)
    return buffer.getvalue()


def decode_frames(data: bytes, spec: DecodeSpec) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        frames = np.asarray(image.convert("RGB"))
    if frames.size != math.prod(spec.frame_shape):
        raise ValueError(f"a cached clip has frames of {frames.shape}, the spec wants {spec.frame_shape}")
    return frames.reshape(spec.frame_shape)


def encode_audio(samples: np.ndarray) -> bytes:
    return (np.clip(samples, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()


def decode_audio(data: bytes | None, spec: DecodeSpec) -> np.ndarray:
    audio = np.zeros(spec.audio_samples, np.float32)
    if data:
        pcm = np.frombuffer(data, "<i2")[: spec.audio_samples]
        audio[: len(pcm)] = pcm.astype(np.float32) / 32767.0
    return audio


def _load_units(batch: pa.Table, spec: DecodeSpec) -> Iterator[pa.Table]:
    for uri in batch.column("uri").to_pylist():
        fs, path = storage.arrow_filesystem(uri)
        with storage.classified(uri), fs.open_input_file(path) as f:
            for group in pq.ParquetFile(f).iter_batches(batch_size=_ROWS_PER_GROUP):
                yield _restore(pa.Table.from_batches([group]), spec)


def _restore(table: pa.Table, spec: DecodeSpec) -> pa.Table:
    """Cache rows -> ClipRows with the decode stage's columns, types and order."""
    frames = np.zeros((table.num_rows, *spec.frame_shape), np.uint8)
    audio = np.zeros((table.num_rows, spec.audio_samples), np.float32)
    stored = zip(table.column(FRAMES_JPEG).to_pylist(), table.column(AUDIO_PCM16).to_pylist())
    for i, (jpeg, pcm) in enumerate(stored):
        if jpeg is not None:
            frames[i] = decode_frames(jpeg, spec)
        audio[i] = decode_audio(pcm, spec)
    columns = {name: table.column(name) for name in table.column_names if name not in (FRAMES_JPEG, AUDIO_PCM16)}
    columns[ClipRow.FRAMES] = ArrowTensorArray.from_numpy(frames)
    columns[ClipRow.AUDIO] = ArrowTensorArray.from_numpy(audio)
    order = [ClipRow.KEY, ClipRow.WINDOW, ClipRow.WINDOWS, ClipRow.START_S, ClipRow.END_S, ClipRow.FRAMES,
             ClipRow.AUDIO, ClipRow.AUDIO_LEN, ClipRow.LABEL, ClipRow.ERROR]
    return pa.table({name: columns[name] for name in order if name in columns})


def _empty(spec: DecodeSpec) -> pa.Table:
    """A unit without rows (an empty shard) still gets its file, so it counts as done."""
    return pa.table({
        ClipRow.KEY: pa.array([], pa.string()), ClipRow.WINDOW: pa.array([], pa.int32()),
        ClipRow.WINDOWS: pa.array([], pa.int32()), ClipRow.START_S: pa.array([], pa.float64()),
        ClipRow.END_S: pa.array([], pa.float64()), ClipRow.AUDIO_LEN: pa.array([], pa.int64()),
        ClipRow.LABEL: pa.array([], pa.int64()), ClipRow.ERROR: pa.array([], pa.string()),
        FRAMES_JPEG: pa.array([], pa.binary()), AUDIO_PCM16: pa.array([], pa.binary()),
    })
