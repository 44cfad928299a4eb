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
block, of `decode_task_videos` videos, the read's block count set from the inputs' video count
(manifests, or one per plain object). Ray Data's cost per task, tens of CPU-milliseconds over
driver, actor and raylet, is paid per block: a small job gets blocks of a few videos, a second or
so of decoding, so that its few videos spread over the pool; a larger one blocks of up to
MAX_VIDEOS_PER_DECODE_TASK, so that each decode actor still gets DECODE_TASKS_PER_DECODER tasks
or more (the last ones spread over the pool) and the cost per task is spread over more videos.
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

import logging
from dataclasses import dataclass

import numpy as np

from groupemotion_core.media.spec import DecodeSpec, WindowPlan
from groupemotion_core.schema import CLASSES, PROB_COLUMNS, ClipRow, WindowRow
from groupemotion_core.videos import TRUTH
from ray_jobs.runtime import pools

# One read task at a time feeds this many decode actors: it streams a shard at the store's speed,
# far faster than they decode it, and every task more at once can cost a worker process more.
DECODERS_PER_READ_TASK = 4
# Videos a decode task gets (`decode_task_videos`).
MIN_VIDEOS_PER_DECODE_TASK = 4
MAX_VIDEOS_PER_DECODE_TASK = 32
DECODE_TASKS_PER_DECODER = 16
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

        device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.model = load_model_ref(model_ref, warn=False)[0].to(device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # An all-null string column can reach numpy as floats (NaN), so "is an error" is "is a str".
        errors = np.array([e if isinstance(e, str) else None for e in batch[ClipRow.ERROR]], dtype=object)
        windows = np.asarray(batch[ClipRow.WINDOW])
        ok = np.array([e is None for e in errors], dtype=bool) & ClipRow.is_window(windows)
        probs = np.full((len(errors), len(CLASSES)), np.nan, dtype=np.float32)
        if ok.any():
            probs[ok] = self.model.probabilities(batch[ClipRow.FRAMES][ok], batch[ClipRow.AUDIO][ok],
                                                 batch[ClipRow.AUDIO_LEN][ok])
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
    table_reads=(),
    uri_column: str | None = None,
    videos: int | None = None,
):
    """Inputs -> a lazy Dataset of window prediction rows: the ClipRow key, window, windows,
    start_s and end_s, WindowRow's label, prob_* (NaN on error) and error, and TRUTH.

    `options` must be resolved (PredictOptions.resolved). Rows come in no particular order;
    `groupemotion_core.videos.VideoCollector` tells when a video's rows are all in. With `shard_ends`, each shard's
    marker row (window = ClipRow.SHARD_END) comes through too. `table_reads` and `uri_column`
    are `sources.read_sources`'; `videos` counts the inputs' videos when the caller knows.
    """
    import ray.data

    from ray_jobs.decode.stage import decode_dataset

    videos = video_count(uris) if videos is None and not table_reads else videos
    sources = read_stage(uris, options, videos, labels_csv=labels_csv, shard_ends=shard_ends,
                         table_reads=table_reads, uri_column=uri_column)
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


def log_stats(predictions) -> None:
    """Ray Data's per-operator statistics of a finished prediction run, where the time went, to
    its own log file only (infer's and eval's, after their loop over `driver_batches`)."""
    logging.getLogger("ray.data").info("groupemotion: per-operator statistics\n%s", predictions.stats(),
                                       extra={"hide": True})


def read_stage(uris: list[str], options: PredictOptions, videos: int | None, *, labels_csv: str | None = None,
               shard_ends: bool = False, table_reads=(), uri_column: str | None = None):
    """The SourceRows of `predict`, read for its decode pool (module docstring): blocks of
    `decode_task_videos` videos when the inputs' video count (`video_count`) is known, one read
    task (and one fetch task for a table's rows) at a time per DECODERS_PER_READ_TASK decode
    actors, each in the CPUs the fixed pools leave, the whole held to `bound_object_store`."""
    from ray_jobs.inputs.sources import fetch_stage, layout, read_sources
    from ray_jobs.inputs.tables import URI_COLUMN

    concurrency = max(1, options.decode_cpus // DECODERS_PER_READ_TASK)
    if table_reads:  # a block per read task: Ray Data would otherwise split a table's blocks of rows to single rows
        blocks = len(uris) + len(table_reads)
    else:
        blocks = None if videos is None else max(1, -(-videos // decode_task_videos(videos, options.decode_cpus)))
    sources = read_sources(uris, labels_csv, shard_ends=shard_ends, num_cpus=pools.SMALL_TASK_CPUS, concurrency=concurrency,
                           blocks=blocks, table_reads=table_reads, uri_column=uri_column or URI_COLUMN, fetch=False)
    bound_object_store(sources, options, videos)  # before the fetch stage: the read's size is known without reading
    if not table_reads and not any(layout(uri) == "table" for uri in uris):
        return sources
    return fetch_stage(sources, num_cpus=pools.SMALL_TASK_CPUS, concurrency=concurrency)


def decode_task_videos(videos: int | None, decoders: int) -> int:
    """Videos a decode task gets (module docstring): MIN_VIDEOS_PER_DECODE_TASK, or more when
    the job has enough videos to give each of its `decoders` DECODE_TASKS_PER_DECODER tasks or
    more, up to MAX_VIDEOS_PER_DECODE_TASK. An unknown count gets the fewest."""
    if not videos:
        return MIN_VIDEOS_PER_DECODE_TASK
    per_task = videos // (max(1, decoders) * DECODE_TASKS_PER_DECODER)
    return max(MIN_VIDEOS_PER_DECODE_TASK, min(MAX_VIDEOS_PER_DECODE_TASK, per_task))


def bound_object_store(sources, options: PredictOptions, videos: int | None) -> None:
    """Hold the pipeline that starts at `sources` to what its decode pool needs in the object store.

    Reading is far faster than decoding, and Ray Data lets a stage run ahead until half the
    cluster's object store is full: the input read ahead, and the memory, would grow with the
    job up to gigabytes. Each decode actor gets OBJECT_STORE_PER_DECODER, or room for
    BLOCKS_PER_DECODER read blocks (of the inputs' mean video size) when that is more: its task in
    hand, the one queued, the next ones ready, and their decoded windows. Ray Data still lets an
    idle stage take one task over its budget, so a video larger than that slows the job; it never
    stalls it. The limit is set on the context that `sources` and every stage built on it share.
    """
    from ray_jobs.inputs.sources import BLOCK_BYTES

    per_video = sources.size_bytes() / videos if videos else 0
    # A block holds whole videos: decode_task_videos of them, fewer when they pass BLOCK_BYTES, at least one.
    block_videos = decode_task_videos(videos, options.decode_cpus)
    if per_video:
        block_videos = max(1, min(block_videos, int(BLOCK_BYTES // per_video)))
    per_block = block_videos * per_video
    per_decoder = max(OBJECT_STORE_PER_DECODER, BLOCKS_PER_DECODER * per_block)
    execution = sources.context.execution_options
    execution.resource_limits = execution.resource_limits.copy(object_store_memory=options.decode_cpus * per_decoder)


def video_count(uris: list[str]) -> int | None:
    """How many videos `uris` (listed inputs) hold, when every shard's count is in a manifest
    and no table is among them."""
    from ray_jobs.inputs.sources import layout, shard_videos

    if any(layout(uri) == "table" for uri in uris):
        return None
    shards = [uri for uri in uris if layout(uri) == "tar"]
    counts = shard_videos(shards)
    return None if len(counts) < len(shards) else len(uris) - len(shards) + sum(counts.values())
