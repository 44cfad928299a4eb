"""The prediction pipeline that `groupemotion infer` and `groupemotion eval` share: read, decode
windows, run the model, and turn a video's windows into its video-level answer.

Sharing it is the point: an evaluation scores the very pipeline that labels production data,
decoder, window plan and video-level averaging included.

How the cluster is used (`PredictOptions.resolved`). Decoding is the bottleneck of the job (a
GPU labels windows far faster than a CPU decodes them), so every CPU that nothing else needs
decodes, from the first second: the model actors (one per GPU, or one CPU actor without GPUs)
hold one CPU each, the read tasks share a small reserve, and the decode pool is a fixed-size
pool of one-CPU actors on all the rest, sized from the nodes that are alive when the job starts
(`ray_jobs.runtime.pools`, which the clip cache's fill uses too). The flags `--decode-cpus`,
`--actors`, `--gpus-per-actor` and `--batch-size` override the sizes. A decode task is one read
block of about VIDEOS_PER_DECODE_TASK videos, the read's block count set from the inputs' video
count (manifests, or one per plain object): a second or so of decoding, long enough for Ray
Data's cost per task (tens of CPU-milliseconds over driver, actor and raylet) to stay small, short
enough for the last tasks to spread over the pool.
Left to itself Ray Data splits a small job's shards into blocks of one video (its 200-block
default) and leaves a large job's in blocks of up to 128 MiB. Ray Data keeps a second task queued
at each actor, so a decode actor never waits for work while there is any; the model actors take
`--batch-size` windows a call. One read task runs at a time per DECODERS_PER_READ_TASK decode
actors: on a small machine that is one worker process reading, not one per read task at once.
What the stages may hold in the object store is bounded by the decode pool's needs
(`bound_object_store`), so reading never runs far ahead and memory stays flat as the job grows.

On a local Ray, `ensure_ray` gives a small machine at least 4 logical CPUs: on a 2-core laptop
that is 2 decode actors (one FFmpeg thread each, one per core), one model actor and the readers,
so both cores decode while the model and the readers fill the gaps.
"""

from __future__ import annotations

import argparse
import collections
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from groupemotion_core.schema import CLASSES, PROB_COLUMNS, ClipRow, VideoRow, WindowRow
from groupemotion_core.media.spec import WINDOW_MODES, DecodeSpec, WindowPlan
from ray_jobs.runtime import pools

TRUTH = "truth"  # prediction rows also carry the ClipRow label index, for evaluation
# One read task at a time feeds this many decode actors: it streams a shard at the store's speed,
# far faster than they decode it, and every task more at once can cost a worker process more.
DECODERS_PER_READ_TASK = 4
# Videos a decode task gets (module docstring).
VIDEOS_PER_DECODE_TASK = 4
# What the pipeline may hold in the object store, per decode actor (`bound_object_store`).
OBJECT_STORE_PER_DECODER = 128 << 20
BLOCKS_PER_DECODER = 8


@dataclass(frozen=True)
class PredictOptions:
    """How the prediction stages use the cluster. None means: size from the live nodes."""

    batch_size: int = 16
    actors: int | None = None  # model actors; default one per GPU share, or 1 without GPUs
    gpus_per_actor: float | None = None  # default 1 when the cluster has GPUs, else 0 (CPU actors)
    decode_cpus: int | None = None  # one-CPU decode actors; default every CPU not held by the rest

    def resolved(self, capacity: pools.Capacity | None = None) -> "PredictOptions":
        """Every None filled in by `pools.size_pools` from `capacity` (default: `pools.live_capacity()`)."""
        sizes = pools.size_pools(capacity or pools.live_capacity(), small_stages=1, model_actors=self.actors,
                                 gpus_per_model_actor=self.gpus_per_actor)
        return PredictOptions(self.batch_size, sizes.model_actors, sizes.gpus_per_model_actor,
                              self.decode_cpus or sizes.decoders)


class Predictor:
    """The model stage's map_batches callable: the model loads once per actor, in __init__."""

    def __init__(self, model_ref: str, use_gpu: bool):
        import torch

        from ray_jobs.predict.model_ref import load_model_ref

        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.model = load_model_ref(model_ref, warn=False)[0].to(self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        # An all-null string column can reach numpy as floats (NaN), so "is an error" is "is a str".
        errors = np.array([e if isinstance(e, str) else None for e in batch[ClipRow.ERROR]], dtype=object)
        windows = np.asarray(batch[ClipRow.WINDOW])
        ok = np.array([e is None for e in errors], dtype=bool) & (windows >= 0)  # not a marker
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
        passed = (ClipRow.KEY, ClipRow.WINDOW, ClipRow.WINDOWS, ClipRow.START_S, ClipRow.END_S)
        out = {name: batch[name] for name in passed}
        out.update({WindowRow.LABEL: np.where(ok, names, None), WindowRow.ERROR: errors, TRUTH: batch[ClipRow.LABEL]})
        out.update({name: probs[:, i] for i, name in enumerate(PROB_COLUMNS)})
        return out


def predict(
    uris: list[str],
    model_ref: str,
    spec: DecodeSpec,
    plan: WindowPlan,
    options: PredictOptions,
    *,
    labels_csv: str | None = None,
    shard_ends: bool = False,
):
    """Inputs -> a lazy Dataset of window prediction rows: the ClipRow key, window, windows,
    start_s and end_s, WindowRow's label, prob_* (NaN on error) and error, and TRUTH.

    `options` must be resolved (PredictOptions.resolved). Rows come in no particular order;
    `VideoCollector` tells when a video's rows are all in. With `shard_ends`, each shard's
    marker row (window = ClipRow.SHARD_END) comes through too.
    """
    import ray.data

    from ray_jobs.decode.stage import decode_dataset

    videos = video_count(uris)
    sources = read_stage(uris, options, videos, labels_csv=labels_csv, shard_ends=shard_ends)
    bound_object_store(sources, options, videos)
    clips = decode_dataset(sources, spec, plan, num_cpus=1, actors=options.decode_cpus)
    gpus = options.gpus_per_actor or 0
    return clips.map_batches(
        Predictor,
        fn_constructor_kwargs={"model_ref": model_ref, "use_gpu": gpus > 0},
        batch_size=options.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=options.actors),
        num_cpus=pools.MODEL_ACTOR_CPUS,
        num_gpus=gpus or None,
        udf_modifying_row_count=False,
    )


def driver_batches(predictions, stall_timeout_s: float):
    """The prediction rows as they reach the driver, a pyarrow batch at a time, under the stall
    watchdog (`watchdog.watched`): infer's and eval's one loop over the stream."""
    from ray_jobs.runtime.watchdog import watched

    batches = predictions.iter_batches(batch_size=None, batch_format="pyarrow")
    return watched(batches, stall_timeout_s, "no labelled window reached the driver")


def read_stage(uris: list[str], options: PredictOptions, videos: int | None, *, labels_csv: str | None = None,
               shard_ends: bool = False):
    """The SourceRows of `predict`, read for its decode pool (module docstring): blocks of about
    VIDEOS_PER_DECODE_TASK videos when the inputs' video count (`video_count`) is known, one read
    task at a time per DECODERS_PER_READ_TASK decode actors, each in the CPUs the fixed pools leave."""
    from ray_jobs.inputs.sources import read_sources

    return read_sources(uris, labels_csv, shard_ends=shard_ends, num_cpus=pools.SMALL_TASK_CPUS,
                        concurrency=max(1, options.decode_cpus // DECODERS_PER_READ_TASK),
                        blocks=None if videos is None else max(1, -(-videos // VIDEOS_PER_DECODE_TASK)))


def bound_object_store(sources, options: PredictOptions, videos: int | None) -> None:
    """Hold the pipeline that starts at `sources` to what its decode pool needs in the object store.

    Reading is far faster than decoding, and Ray Data lets a stage run ahead until half the
    cluster's object store is full: the input read ahead, and the memory, would grow with the
    job up to gigabytes. Each decode actor gets OBJECT_STORE_PER_DECODER, or room for
    BLOCKS_PER_DECODER read blocks of the inputs' mean video size when that is more: its task in
    hand, the one queued, the next ones ready, and their decoded windows. Ray Data still lets an
    idle stage take one task over its budget, so a video larger than that slows the job; it never
    stalls it. The limit is set on the context that `sources` and every stage built on it share.
    """
    per_video = sources.size_bytes() / videos if videos else 0
    per_decoder = max(OBJECT_STORE_PER_DECODER, BLOCKS_PER_DECODER * VIDEOS_PER_DECODE_TASK * per_video)
    execution = sources.context.execution_options
    execution.resource_limits = execution.resource_limits.copy(object_store_memory=options.decode_cpus * per_decoder)


class VideoCollector:
    """Gathers prediction rows by video: `add` returns a video's rows, in window order, once all
    of them are in (its `windows` rows, or its one WHOLE_VIDEO row). Holds only unfinished videos."""

    def __init__(self):
        self._pending: dict[str, dict[int, dict]] = {}

    def add(self, row: dict) -> list[dict] | None:
        key = row[ClipRow.KEY]
        if row[ClipRow.WINDOW] == ClipRow.WHOLE_VIDEO:
            return [row]
        got = self._pending.setdefault(key, {})
        got[row[ClipRow.WINDOW]] = row
        if len(got) < row[ClipRow.WINDOWS]:
            return None
        del self._pending[key]
        return [got[i] for i in sorted(got)]

    @property
    def unfinished(self) -> list[str]:
        return list(self._pending)


def video_row(rows: list[dict]) -> dict:
    """One video's window rows -> its VideoRow values (all but `model`), and TRUTH.

    The probabilities are the mean of the labelled windows' probabilities weighted by each
    window's length (a short last window counts for less); `seconds` is the video time those
    windows cover (overlapping windows counted once). With no labelled window the row carries
    the first window's error.
    """
    first = rows[0]
    labelled = [r for r in rows if r[WindowRow.ERROR] is None and r[ClipRow.WINDOW] >= 0]
    out = {VideoRow.KEY: first[ClipRow.KEY], VideoRow.WINDOWS: len(labelled), TRUTH: first.get(TRUTH)}
    if not labelled:
        error = next(r[WindowRow.ERROR] for r in rows if r[WindowRow.ERROR] is not None)
        return {**out, VideoRow.LABEL: None, **dict.fromkeys(PROB_COLUMNS), VideoRow.SECONDS: 0.0,
                VideoRow.ERROR: error}
    spans = np.array([(r[ClipRow.START_S], r[ClipRow.END_S]) for r in labelled], dtype=np.float64)
    weights = np.maximum(spans[:, 1] - spans[:, 0], 0.0)
    if weights.sum() <= 0:  # a video of one frame: one window of no length
        weights = np.ones(len(labelled))
    probs = np.array([[r[name] for name in PROB_COLUMNS] for r in labelled], dtype=np.float64)
    mean = weights @ probs / weights.sum()
    return {**out, VideoRow.LABEL: CLASSES[int(np.argmax(mean))], **dict(zip(PROB_COLUMNS, mean.tolist())),
            VideoRow.SECONDS: _covered(spans), VideoRow.ERROR: None}


def _covered(spans: np.ndarray) -> float:
    """The length of the union of [start, end) spans."""
    total, end = 0.0, -np.inf
    for start, stop in sorted(map(tuple, spans)):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return float(total)


def video_count(uris: list[str]) -> int | None:
    """How many videos `uris` (listed inputs) hold, when every shard's count is in a manifest."""
    from ray_jobs.inputs.sources import layout, shard_videos

    shards = [uri for uri in uris if layout(uri) == "tar"]
    counts = shard_videos(shards)
    return None if len(counts) < len(shards) else len(uris) - len(shards) + sum(counts.values())


def error_reason(error: str) -> str:
    return error.split(":", 1)[0].strip() or "unknown"


def error_counts(rows: Iterable[dict]) -> collections.Counter:
    return collections.Counter(error_reason(r[WindowRow.ERROR]) for r in rows if r[WindowRow.ERROR] is not None)


# --- command line (the options `infer` and `eval` share) ------------------------------------------


def add_prediction_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="tar shards, videos, folders, prefixes, globs, manifests")
    parser.add_argument("--model", required=True,
                        help="checkpoint folder or URI, or preset:tiny|paper (random weights)")
    parser.add_argument("--windows", choices=WINDOW_MODES, default="all",
                        help="all: windows over the whole video (default); first: one window from 0")
    parser.add_argument("--stride", type=_positive_float, metavar="S",
                        help="seconds between window starts (default: the model's clip length)")
    parser.add_argument("--max-windows", type=_positive_int, metavar="K",
                        help="at most K windows per video, spread evenly over it")
    parser.add_argument("--batch-size", type=_positive_int, default=PredictOptions.batch_size,
                        help="windows per model call")
    parser.add_argument("--actors", type=_positive_int, help="model actors (default: one per GPU, or 1 without GPUs)")
    parser.add_argument("--gpus-per-actor", type=float,
                        help="GPUs per model actor (default: 1 with GPUs, else 0 = CPU)")
    parser.add_argument("--decode-cpus", type=_positive_int,
                        help="one-CPU decode actors (default: every CPU the model actors and readers leave)")
    parser.add_argument("--verbose", action="store_true", help="show Ray's own log output on the console")


def prediction_options(args: argparse.Namespace) -> PredictOptions:
    return PredictOptions(args.batch_size, args.actors, args.gpus_per_actor, args.decode_cpus)


def window_plan(args: argparse.Namespace) -> WindowPlan:
    return WindowPlan(args.windows, args.stride, args.max_windows)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value
