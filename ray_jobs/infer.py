"""Label videos with a model and write Parquet, exactly once per clip.

    groupemotion infer INPUT... --model REF --output URI [--batch-size N] [--actors N]
                       [--gpus-per-actor F] [--decode-cpus N] [--overwrite]

INPUT: tar shards, plain video objects, folders/prefixes, globs or a pack manifest.json, local or
s3:// (the layouts of `ray_jobs.sources`). REF: a checkpoint directory or URI, or preset:tiny /
preset:paper for random weights (smoke tests and benchmarks only). The job runs on the Ray
cluster in RAY_ADDRESS, or on a local Ray it starts when that is unset; `ray job submit -- python
-m ray_jobs.infer ARGS` runs the same thing on a cluster.

Output (OUTPUT is a local folder or an s3:// prefix):

    OUTPUT/part-<16 hex>.parquet  one file per input unit, committed when all its clips are labelled
    OUTPUT/_job.json              the resolved run: model id and config, inputs, options, decode spec
    OUTPUT/_SUCCESS               written last, holding the summary, once every unit is committed

Every file has the Arrow schema `groupemotion_core.schema.LabelRow.SCHEMA`, one row per clip:

    key            string, not null  the clip: `<shard uri>/<member key>` or the video object's URI
    label          string            Negative | Neutral | Positive (argmax); null when error is set
    prob_negative  float32           softmax probabilities in class order, summing to 1;
    prob_neutral   float32             null when error is set
    prob_positive  float32
    model          string, not null  the model id (a checkpoint's model_id, or preset:NAME-random)
    error          string            null, or `<reason>: <detail>` for a clip that could not be labelled

Read it back with `pandas.read_parquet(OUTPUT)` or `pyarrow.dataset.dataset(OUTPUT)` (both skip
names starting with `_`). Each file's Parquet metadata also lists its input URIs under the key
`groupemotion.inputs`.

Exactly once. The unit of work is an input unit: one tar shard, or a group of up to
OBJECTS_PER_UNIT plain video objects. A unit's rows are written as one Parquet file, named from
its input URIs, in one atomic step (a single S3 PUT, or a rename on a local disk), only after every
clip of the unit has a row; so a committed file is always complete, and an interrupted job never
leaves a file that looks complete. A job starts by reading the input lists of the committed files
and plans only the inputs no file holds yet, so running the same command again adds no duplicate
row, and new objects under a prefix are labelled in new files. `--overwrite` deletes the old
files and labels everything again. One output holds one model's labels: a run with a different
model is refused unless `--overwrite` is given. Two jobs must not write one output at once.

How it streams. Ray Data runs three stages with their own resources: reading (one task per shard
or object group), decoding (a CPU actor pool, `ray_jobs.decode_stage`), and the model (an actor
pool, one GPU each by default when the cluster has GPUs, CPU actors otherwise; the model loads once
per actor, uint8 frames travel and are normalised on the model's device). Only the small label
rows come back to the driver, which groups them by unit and commits each unit as soon as it is
complete. A group of objects is complete when all its objects have a row; a shard's clip count is
known only to its reader, so the stream runs with Ray Data's `preserve_order` and the shards are
read first: a shard is complete when a row of a later unit arrives (or the stream ends). Driver
memory holds the rows of one unit at a time.

Fault injection, for tests and drills: GROUPEMOTION_INFER_EXIT_AFTER_UNITS=N kills the job
process with SIGKILL right after its N-th commit, like a node loss between two commits.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import io
import json
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from groupemotion_core.errors import GroupEmotionError
from groupemotion_core.schema import CLASSES, ClipRow, LabelRow
from ray_jobs import storage

OBJECTS_PER_UNIT = 256
PART_PREFIX = "part-"
JOB_FILE = "_job.json"
SUCCESS_FILE = "_SUCCESS"
INPUTS_METADATA_KEY = b"groupemotion.inputs"
EXIT_AFTER_UNITS_ENV = "GROUPEMOTION_INFER_EXIT_AFTER_UNITS"
TRUTH = "truth"  # prediction rows also carry the ClipRow label index, for evaluation


@dataclass(frozen=True)
class PredictOptions:
    """How the prediction stages use the cluster. None means: pick from the cluster's resources."""

    batch_size: int = 16
    actors: int | None = None  # model actors; default one per GPU-share, or 1 without GPUs
    gpus_per_actor: float | None = None  # default 1 when the cluster has GPUs, else 0 (CPU actors)
    decode_cpus: int | None = None  # at most this many one-CPU decode actors; default Ray Data's choice

    def resolved(self) -> "PredictOptions":
        import ray

        gpus = ray.cluster_resources().get("GPU", 0)
        per_actor = self.gpus_per_actor if self.gpus_per_actor is not None else (1.0 if gpus else 0.0)
        actors = self.actors or (max(1, int(gpus // per_actor)) if per_actor else 1)
        return PredictOptions(self.batch_size, actors, per_actor, self.decode_cpus)


@dataclass(frozen=True)
class Unit:
    """One unit of work: a tar shard, or a group of plain video objects (then `expected` rows)."""

    inputs: tuple[str, ...]
    expected: int | None  # None for a shard: its clip count is known only once it is read

    @property
    def name(self) -> str:
        digest = hashlib.sha1("\n".join(self.inputs).encode()).hexdigest()[:16]
        return f"{PART_PREFIX}{digest}.parquet"

    def describe(self) -> str:
        return self.inputs[0] if len(self.inputs) == 1 else f"{len(self.inputs)} objects from {self.inputs[0]}"


@dataclass
class Summary:
    units: int = 0
    units_skipped: int = 0
    units_committed: int = 0
    clips: int = 0
    labelled: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def clips_per_second(self) -> float:
        return self.clips / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "clips_per_second": round(self.clips_per_second, 3)}

    def line(self) -> str:
        errors = ", ".join(f"{k}: {v}" for k, v in sorted(self.errors.items())) or "none"
        return (
            f"{self.clips} clips in {self.units_committed} units ({self.units_skipped} of {self.units} units "
            f"already committed, skipped): {self.labelled} labelled, {sum(self.errors.values())} errors "
            f"({errors}); {self.clips_per_second:.2f} clips/s over {self.seconds:.1f} s"
        )


# --- the prediction pipeline (shared with `groupemotion eval`) -----------------------------------


class Predictor:
    """The model stage's map_batches callable: the model loads once per actor, in __init__."""

    def __init__(self, model_ref: str, use_gpu: bool):
        import torch

        from ray_jobs.model_ref import load_model_ref

        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.model = load_model_ref(model_ref, warn=False)[0].to(self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        # An all-null string column can reach numpy as floats (NaN), so "is an error" is "is a str".
        errors = np.array([e if isinstance(e, str) else None for e in batch[ClipRow.ERROR]], dtype=object)
        ok = np.array([e is None for e in errors], dtype=bool)
        probs = np.full((len(errors), len(CLASSES)), np.nan, dtype=np.float32)
        if ok.any():
            frames = torch.from_numpy(np.ascontiguousarray(batch[ClipRow.FRAMES][ok])).to(self.device)
            audio = torch.from_numpy(np.ascontiguousarray(batch[ClipRow.AUDIO][ok])).to(self.device)
            audio_len = torch.from_numpy(batch[ClipRow.AUDIO_LEN][ok].astype(np.int64)).to(self.device)
            on_gpu = self.device.type == "cuda"
            with torch.inference_mode(), torch.autocast(self.device.type, torch.bfloat16, enabled=on_gpu):
                logits = self.model(frames, audio, audio_len)
            probs[ok] = torch.softmax(logits.float(), dim=-1).cpu().numpy()
        names = np.array(CLASSES, dtype=object)[np.argmax(np.nan_to_num(probs, nan=0.0), axis=1)]
        out = {
            LabelRow.KEY: batch[ClipRow.KEY],
            LabelRow.LABEL: np.where(ok, names, None),
            LabelRow.ERROR: errors,
            TRUTH: batch[ClipRow.LABEL],
        }
        out.update({name: probs[:, i] for i, name in enumerate(LabelRow.PROB_COLUMNS)})
        return out


def predict(sources, model_ref: str, decode_spec, options: PredictOptions):
    """SourceRows -> prediction rows (LabelRow columns but `model`, plus TRUTH), a lazy Dataset.

    `options` must be resolved (see PredictOptions.resolved).
    """
    from ray_jobs.decode_stage import decode_dataset

    clips = decode_dataset(
        sources,
        decode_spec,
        num_cpus=1,
        concurrency=(1, options.decode_cpus) if options.decode_cpus else None,
    )
    import ray.data

    gpus = options.gpus_per_actor or 0
    return clips.map_batches(
        Predictor,
        fn_constructor_kwargs={"model_ref": model_ref, "use_gpu": gpus > 0},
        batch_size=options.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=options.actors),
        num_cpus=1,
        num_gpus=gpus or None,
        udf_modifying_row_count=False,
    )


def error_reason(error: str) -> str:
    return error.split(":", 1)[0].strip() or "unknown"


# --- the job --------------------------------------------------------------------------------------


def plan_units(inputs: list[str]) -> list[Unit]:
    """Input URIs -> units in the order they are read: every shard, then groups of plain objects.

    Shards come first because that is the order `ray_jobs.sources` plans its read tasks in, and a
    shard's completeness is told by the stream's order (module docstring).
    """
    from ray_jobs.sources import layout

    shards = [Unit((uri,), None) for uri in inputs if layout(uri) == "tar"]
    videos = [uri for uri in inputs if layout(uri) != "tar"]
    groups = [videos[i : i + OBJECTS_PER_UNIT] for i in range(0, len(videos), OBJECTS_PER_UNIT)]
    return shards + [Unit(tuple(g), len(g)) for g in groups]


def committed_files(output: str) -> list[str]:
    fs, path = storage.filesystem(output)
    scheme = "s3://" if output.startswith("s3://") else ""
    return sorted(scheme + p for p in fs.glob(f"{path}/{PART_PREFIX}*.parquet"))


def committed_inputs(output: str) -> set[str]:
    """The input URIs that committed files of `output` already hold (read from their footers)."""

    def inputs_of(uri: str) -> list[str]:
        fs, path = storage.filesystem(uri)
        with fs.open(path, "rb") as f:
            meta = pq.read_schema(f).metadata or {}
        if INPUTS_METADATA_KEY not in meta:
            raise GroupEmotionError("bad_output", f"{uri} was not written by groupemotion infer")
        return json.loads(meta[INPUTS_METADATA_KEY])

    with ThreadPoolExecutor(16) as pool:
        return {uri for found in pool.map(inputs_of, committed_files(output)) for uri in found}


class _Committer:
    """Buffers prediction rows per unit and commits each unit's file once it is complete."""

    def __init__(self, units: list[Unit], output: str, model_id: str, summary: Summary):
        self.units, self.output, self.model_id, self.summary = units, output, model_id, summary
        self.unit_of = {uri: i for i, unit in enumerate(units) for uri in unit.inputs}
        self.current = 0
        self.pieces: list[pa.Table] = []  # the current unit's rows, as slices of batches
        self.held = 0
        self.exit_after = int(os.environ.get(EXIT_AFTER_UNITS_ENV, "0") or 0)

    def add(self, batch: pa.Table) -> None:
        indices = [self._index(key) for key in batch[LabelRow.KEY].to_pylist()]
        start = 0
        while start < len(indices):
            index = indices[start]
            if index < self.current:
                raise RuntimeError(f"a row of {self.units[index].describe()} came after its file was committed")
            while index > self.current:
                self._commit()
            stop = start
            while stop < len(indices) and indices[stop] == index:
                stop += 1
            self.pieces.append(batch.slice(start, stop - start))
            self.held += stop - start
            if self.held == self.units[index].expected:
                self._commit()
            start = stop

    def finish(self) -> None:
        while self.current < len(self.units):
            self._commit()

    def _index(self, key: str) -> int:
        if key in self.unit_of:  # a plain object, or a shard's own error row
            return self.unit_of[key]
        cut = key.rfind("/")
        while cut > 0:  # `<shard uri>/<member key>`; a member key may contain slashes
            if key[:cut] in self.unit_of:
                return self.unit_of[key[:cut]]
            cut = key.rfind("/", 0, cut)
        raise RuntimeError(f"row {key!r} belongs to no planned input")

    def _commit(self) -> None:
        unit = self.units[self.current]
        if unit.expected is not None and self.held != unit.expected:
            raise RuntimeError(f"{unit.describe()}: {self.held} rows for {unit.expected} objects")
        table = label_table(self.pieces, self.model_id)
        if len(set(table[LabelRow.KEY].to_pylist())) != table.num_rows:
            raise RuntimeError(f"{unit.describe()}: duplicate keys")
        table = table.replace_schema_metadata({INPUTS_METADATA_KEY: json.dumps(list(unit.inputs))})
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        storage.write_bytes_atomic(storage.join(self.output, unit.name), buffer.getvalue())

        errors = collections.Counter(error_reason(e) for e in table[LabelRow.ERROR].to_pylist() if e)
        s = self.summary
        s.units_committed += 1
        s.clips += table.num_rows
        s.labelled += table.num_rows - sum(errors.values())
        for reason, count in errors.items():
            s.errors[reason] = s.errors.get(reason, 0) + count
        print(
            f"committed {unit.name}: {table.num_rows} clips, {sum(errors.values())} errors, from "
            f"{unit.describe()} [{s.units_committed}/{s.units - s.units_skipped}]",
            flush=True,
        )
        self.current += 1
        self.pieces, self.held = [], 0
        if self.exit_after and s.units_committed >= self.exit_after:
            print(f"{EXIT_AFTER_UNITS_ENV}={self.exit_after}: killing the job now", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)


def label_table(pieces: list[pa.Table], model_id: str) -> pa.Table:
    """Slices of prediction batches -> one LabelRow table; failed clips' probabilities are null."""
    if not pieces:
        return LabelRow.SCHEMA.empty_table()
    rows = pa.concat_tables(pieces, promote_options="default")
    columns = {}
    for name in LabelRow.SCHEMA.names:
        if name == LabelRow.MODEL:
            columns[name] = pa.array([model_id] * rows.num_rows, pa.string())
        elif name in LabelRow.PROB_COLUMNS:
            values = rows[name].to_numpy().astype(np.float32)
            columns[name] = pa.array(values, pa.float32(), mask=np.isnan(values))
        else:
            columns[name] = rows[name].cast(LabelRow.SCHEMA.field(name).type)
    return pa.table(columns, schema=LabelRow.SCHEMA)


def infer(
    inputs: list[str], model_ref: str, output: str, options: PredictOptions = PredictOptions(), *, overwrite=False
) -> Summary:
    """Label every clip of `inputs` not yet committed under `output`; see the module docstring."""
    from ray_jobs.model_ref import describe_model_ref, warn_random_weights
    from ray_jobs.runtime import ensure_ray
    from ray_jobs.sources import list_inputs, read_sources

    started = time.monotonic()
    cfg, info = describe_model_ref(model_ref)
    if model_ref.startswith("preset:"):
        warn_random_weights(model_ref)
    all_inputs = list_inputs(inputs)
    _claim_output(output, info["model_id"], overwrite)
    done = committed_inputs(output)
    units = plan_units([uri for uri in all_inputs if uri not in done])
    summary = Summary(units=len(units) + len(plan_units([u for u in all_inputs if u in done])))
    summary.units_skipped = summary.units - len(units)
    success = storage.join(output, SUCCESS_FILE)
    if not units:  # nothing new: no Ray, no model; an earlier run's summary stays in _SUCCESS
        if not storage.exists(success):
            _write_json(success, summary.to_dict())
        return summary

    ensure_ray()
    options = options.resolved()
    storage.remove(success)
    _write_json(storage.join(output, JOB_FILE), {
        "model_id": info["model_id"],
        "model_ref": model_ref,
        "model_config": cfg.to_dict(),
        "decode_spec": asdict(cfg.decode_spec()),
        "inputs": list(inputs),
        "options": asdict(options),
    })
    sources = read_sources([uri for unit in units for uri in unit.inputs])
    predictions = predict(sources, model_ref, cfg.decode_spec(), options)
    predictions.context.execution_options.preserve_order = True  # see "How it streams" above
    committer = _Committer(units, output, info["model_id"], summary)
    for batch in predictions.iter_batches(batch_size=None, batch_format="pyarrow"):
        committer.add(batch)
    committer.finish()
    summary.seconds = time.monotonic() - started
    _write_json(success, summary.to_dict())
    return summary


def _claim_output(output: str, model_id: str, overwrite: bool) -> None:
    """Refuse to mix two models' labels in one output; with `overwrite`, clear the output."""
    job_file = storage.join(output, JOB_FILE)
    if overwrite:
        for uri in committed_files(output):
            storage.remove(uri)
        storage.remove(storage.join(output, SUCCESS_FILE))
        return
    if storage.exists(job_file):
        previous = json.loads(storage.read_bytes(job_file)).get("model_id")
        if previous != model_id:
            raise GroupEmotionError(
                "output_in_use",
                f"{output} holds labels from model {previous}, not {model_id}; use --overwrite or another output",
            )


def _write_json(uri: str, value: Any) -> None:
    storage.write_bytes_atomic(uri, (json.dumps(value, indent=2) + "\n").encode())


# --- command line ----------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_prediction_arguments(parser)
    parser.add_argument("--output", required=True, help="output folder or s3:// prefix for the Parquet files")
    parser.add_argument("--overwrite", action="store_true", help="delete earlier output and label everything again")


def add_prediction_arguments(parser: argparse.ArgumentParser) -> None:
    """The options `infer` and `eval` share."""
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="tar shards, videos, folders, prefixes, globs, manifests")
    parser.add_argument("--model", required=True, help="checkpoint folder or URI, or preset:tiny|paper (random weights)")
    parser.add_argument("--batch-size", type=_positive_int, default=PredictOptions.batch_size, help="clips per model call")
    parser.add_argument("--actors", type=_positive_int, help="model actors (default: one per GPU, or 1 without GPUs)")
    parser.add_argument("--gpus-per-actor", type=float, help="GPUs per model actor (default: 1 with GPUs, else 0 = CPU)")
    parser.add_argument("--decode-cpus", type=_positive_int, help="at most this many one-CPU decode actors")


def prediction_options(args: argparse.Namespace) -> PredictOptions:
    return PredictOptions(args.batch_size, args.actors, args.gpus_per_actor, args.decode_cpus)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def run(args: argparse.Namespace) -> int:
    summary = infer(args.inputs, args.model, args.output, prediction_options(args), overwrite=args.overwrite)
    print(f"infer: {summary.line()}", flush=True)
    return 0


if __name__ == "__main__":
    from ray_jobs.cli import entrypoint

    entrypoint("infer")
