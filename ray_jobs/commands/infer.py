"""Label every window of every video with a model, and each video as a whole, into Parquet, exactly once.

    groupemotion infer INPUT... --model REF --output URI [--windows all|first] [--stride S]
                       [--max-windows K] [--batch-size N] [--actors N] [--gpus-per-actor F]
                       [--decode-cpus N] [--stall-timeout S] [--uri-column NAME] [--columns A,B]
                       [--unit-videos N] [--relist] [--overwrite] [--verbose]

INPUT: tar shards, plain video objects, folders/prefixes, globs or a pack manifest.json, local or
s3:// (the layouts of `ray_jobs.inputs.sources`), or tables of videos (`.parquet`, `.csv`,
`.jsonl`, or a folder/prefix of them: `ray_jobs.inputs.tables`) with a `uri` column
(`--uri-column NAME` for another name); every other column of a table (`--columns a,b` to
choose) is carried unchanged into its videos/ rows, after the columns below. REF: a checkpoint
directory or URI, a checkpoint on the Hugging Face hub, hf-hub:OWNER/REPO[@REVISION] (resolved to
one commit; offline from the HF cache with HF_HUB_OFFLINE=1), or preset:tiny / preset:paper for
random weights (smoke tests and benchmarks only). The job runs on the Ray
cluster in RAY_ADDRESS, or on a local Ray it starts when that is unset; `ray job submit -- python
-m ray_jobs.commands.infer ARGS` runs the same thing on a cluster.

Windows. A window is the model's clip length (5 s) of a video. By default (`--windows all`)
windows start at 0, `--stride S` seconds apart (default: the clip length, no overlap), up to the
video's end; a last window shorter than 1 s is dropped unless it is the only one. `--max-windows
K` keeps at most K of them, spread evenly from the first to the last, so a two-hour video costs K
windows. `--windows first` labels one window from 0 (VGAF-style 5 s clips).

Output (OUTPUT is a local folder or an s3:// prefix):

    OUTPUT/windows/part-<16 hex>.parquet  one row per window (`schema.WindowRow`)
    OUTPUT/videos/part-<16 hex>.parquet   one row per input video, failed ones too (`schema.VideoRow`)
    OUTPUT/_job.json                      the resolved run: model id and config (for a hub model, the
                                          commit and the weights' sha256), inputs, window plan,
                                          options, decode spec
    OUTPUT/_SUCCESS                       written last, holding the summary, once every unit is committed

    windows/: key (the video), window (0-based), start_s, end_s (seconds from the video's first
              frame; NaN for a window the decoder died before reaching), label (Negative |
              Neutral | Positive, null on error), prob_negative, prob_neutral, prob_positive
              (float32, softmax, null on error), model (the model id), error (null, or
              `<reason>: <detail>`)
    videos/:  key, label, prob_* (the mean over the video's labelled windows, weighted by window
              length), windows (labelled windows), seconds (video time they cover), model, error
              (set when no window could be labelled; the video then has no window rows if it
              failed as a whole)

Read them back with pandas (both skip names starting with `_` or `.`):

    import pandas as pd
    videos = pd.read_parquet("OUTPUT/videos")     # one label per video
    windows = pd.read_parquet("OUTPUT/windows")   # how the label moves through each video

The listing. Before the first unit, the inputs are listed page by page into OUTPUT/_inputs/
(`ray_jobs.inputs.listing`): every plain video of a folder, prefix or glob, and a copy of every
table, in units of `--unit-videos` consecutive rows of one table or listing (default 256), plus
the list of shards. The job then reads that listing as a stream. A rerun uses the saved listing,
so its units are the ones the first run committed, whatever changed in the bucket since; a
listing cut short is made again. To label objects added later, run with `--relist` (the inputs
are listed again and every video labelled again into this output) or give the new objects to a
new output. A rerun with other inputs than the saved listing's is refused.

Exactly once. One file of each per unit (a tar shard, or a row group of the listing), committed
when every video of the unit has all its rows, `videos/` last: a committed unit is always
complete, and an interrupted job never leaves a unit that looks complete (`ray_jobs.sinks.labels`).
Running the same command again labels only the units not committed yet, so it adds no duplicate
row. `--overwrite` deletes the old files and the listing, and labels everything again. One
output holds one model's labels over one window plan: a run with another model or plan is
refused unless `--overwrite` is given. Two jobs must not write one output at once.

How it streams. Ray Data runs three stages with their own resources: reading (one task per shard
or object group), decoding (a fixed pool of one-CPU actors, `ray_jobs.decode.stage`, one row per
window), and the model (an actor pool, one GPU each by default when the cluster has GPUs, CPU
actors otherwise; uint8 frames travel and are normalised on the model's device). Every CPU the
model and the readers do not need decodes (`ray_jobs.predict.pipeline`). Only the small label rows come
back to the driver, in no particular order; units commit as they complete.

The driver holds the units in flight and one small record per unit (256 videos), never a list
of the videos: its memory stays flat from a thousand videos to millions, and progress and ETA
come from the listing's row counts.

Faults. A node lost mid-job costs the work in flight on it, not the job: Ray restarts the lost
actors and retries their tasks where the cluster has room. Where it has none (a node that is not
replaced), the job stops after `--stall-timeout` seconds without a batch (default 600) with
`error: stalled: ...` and exit status 75; run the same command again (or let the orchestrator do
it: a RayJob's backoffLimit, a retry around `ray job submit`) and it labels what no committed unit
holds. Videos the object store failed
to serve after its retries (`storage_unavailable`, ...) are not labelled as errors: their units are
left uncommitted, the others are committed, and the job ends with the summary, then
`error: <reason>: N of M units were left for a rerun: ...` and exit status 75; the rerun tries those units
again. A failure to write the output stops the job at once, in one line (exit status 75 when the
store kept failing, 2 for a mistake such as access denied). Nothing
is lost or duplicated in any of these cases, and `_SUCCESS` is written only when every unit is.

The console shows one progress line (videos and windows done, rate, errors, ETA) and a line per
committed unit, on stderr; the summary goes to stdout. Ray's own logs go to its log files
(`--verbose` shows them), Ray Data's per-operator statistics to its `ray-data.log` at the end.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from typing import Any

from groupemotion_core.errors import GroupEmotionError, split_error
from groupemotion_core.schema import ClipRow, VideoRow, WindowRow
from groupemotion_core.media.spec import WindowPlan
from ray_jobs.sinks import labels
from ray_jobs.inputs import listing, storage, tables
from ray_jobs.sinks.labels import JOB_FILE, SUCCESS_FILE, LabelWriter, Summary, plan_units
from ray_jobs.commands.args import (
    add_prediction_arguments,
    add_stall_argument,
    positive_int,
    prediction_options,
    window_plan,
)
from ray_jobs.predict.pipeline import PredictOptions, driver_batches, log_stats, predict
from ray_jobs.runtime.watchdog import DEFAULT_STALL_TIMEOUT_S, exit_in_bounded_time


def infer(
    inputs: list[str],
    model_ref: str,
    output: str,
    options: PredictOptions = PredictOptions(),
    *,
    plan: WindowPlan = WindowPlan(),
    overwrite: bool = False,
    relist: bool = False,
    uri_column: str = tables.URI_COLUMN,
    columns: list[str] | None = None,
    unit_videos: int = listing.UNIT_ROWS,
    verbose: bool = False,
    stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S,
) -> Summary:
    """Label every video of `inputs` not yet committed under `output`; see the module docstring.

    Raises GroupEmotionError when units were left for a rerun (after noting the summary), and
    `watchdog.Stalled` when the stream made no progress for `stall_timeout_s` seconds.
    """
    from ray_jobs.runtime.console import Progress
    from ray_jobs.predict.model_ref import describe_model_ref, warn_random_weights
    from ray_jobs.runtime.pools import live_capacity
    from ray_jobs.runtime.session import ensure_ray
    from ray_jobs.inputs.sources import TableRead, shard_videos

    started = time.monotonic()
    cfg, info = describe_model_ref(model_ref)
    if model_ref.startswith("preset:"):
        warn_random_weights(model_ref)
    _claim_output(output, info["model_id"], plan, overwrite)
    listed = listing.plan(output, inputs, uri_column=uri_column, columns=columns, reserved=tuple(VideoRow.SCHEMA.names),
                          unit_rows=unit_videos, relist=relist or overwrite,
                          on_relist=lambda: labels.remove_all(output), note=_note)
    labels.remove_uncommitted(output)
    done = labels.committed_inputs(output)
    every_unit = plan_units(listed, output)
    units = [unit for unit in every_unit if unit.inputs[0] not in done]
    summary = Summary(units=len(every_unit), units_skipped=len(every_unit) - len(units))
    del every_unit
    success = storage.join(output, SUCCESS_FILE)
    if not units:  # nothing new: no Ray, no model; an earlier run's summary stays in _SUCCESS
        if not storage.exists(success):
            _write_json(success, summary.to_dict())
        return summary

    ensure_ray(verbose=verbose)
    capacity = live_capacity()
    options = options.resolved(capacity)
    storage.remove(success)
    _write_json(storage.join(output, JOB_FILE), {
        "model_id": info["model_id"],
        "model_ref": model_ref,
        "model_hub": info["hub"],
        "model_config": cfg.to_dict(),
        "decode_spec": asdict(cfg.decode_spec()),
        "window_plan": asdict(plan),
        "inputs": list(inputs),
        "uri_column": uri_column,
        "columns": columns,
        "options": asdict(options),
    })
    shards = [unit.inputs[0] for unit in units if unit.part is None]
    groups: dict[str, list[int]] = {}
    for unit in units:
        if unit.part is not None:
            groups.setdefault(unit.part, []).append(unit.group)
    reads = [TableRead(part, tuple(g)) for part, g in groups.items()]
    counted = shard_videos(shards)
    videos = None if len(counted) < len(shards) else sum(counted.values()) + sum(
        unit.videos for unit in units if unit.part is not None)
    progress = Progress("infer", videos, "videos")
    progress.note(
        f"infer: {'?' if videos is None else videos} videos in {len(units)} units "
        f"({summary.units_skipped} already committed); {options.decode_cpus} decode actors, "
        f"{options.actors} model actors{' on GPUs' if options.gpus_per_actor else ''}; {capacity.describe()}"
    )
    writer = LabelWriter(units, output, info["model_id"], summary, on_video=lambda rows: _advance(progress, rows),
                         on_commit=progress.note, parts=[r.uri for r in reads], unit_rows=listed.unit_rows)
    predictions = predict(shards, info["pinned_ref"], cfg.decode_spec(), plan, options, shard_ends=True,
                          table_reads=reads, videos=videos)
    try:
        for batch in driver_batches(predictions, stall_timeout_s):
            writer.add(batch)
        writer.finish()
    finally:
        progress.close()
    log_stats(predictions)
    summary.seconds = time.monotonic() - started
    if summary.units_left:
        progress.note(f"infer: {summary.line()}")
        reason, detail = split_error(summary.left_error)
        raise GroupEmotionError(reason, f"{summary.units_left} of {len(units)} units were left for a rerun: the "
                                f"object store failed reading them after retries (first: {detail}); the other "
                                "units are committed; run the same command again to finish")
    _write_json(success, summary.to_dict())
    return summary


def _note(line: str) -> None:
    import sys

    print(line, file=sys.stderr, flush=True)


def _advance(progress, rows: list[dict]) -> None:
    errors = sum(r[WindowRow.ERROR] is not None for r in rows)
    windows = sum(ClipRow.is_window(r[ClipRow.WINDOW]) for r in rows)
    progress.advance(1, windows=windows, errors=errors)


def _claim_output(output: str, model_id: str, plan: WindowPlan, overwrite: bool) -> None:
    """Refuse to mix two models' or two window plans' labels in one output; with `overwrite`,
    clear the output."""
    if overwrite:
        labels.remove_all(output)
        storage.remove(storage.join(output, SUCCESS_FILE))
        return
    job_file = storage.join(output, JOB_FILE)
    if not storage.exists(job_file):
        return
    previous = json.loads(storage.read_bytes(job_file))
    if previous.get("model_id") != model_id:
        raise GroupEmotionError(
            "output_in_use",
            f"{output} holds labels from model {previous.get('model_id')}, not {model_id}; "
            "use --overwrite or another output",
        )
    if previous.get("window_plan") != asdict(plan):
        raise GroupEmotionError(
            "output_in_use",
            f"{output} holds labels of the windows {previous.get('window_plan')}, not {asdict(plan)}; "
            "use --overwrite or another output",
        )


def _write_json(uri: str, value: Any) -> None:
    storage.write_bytes_atomic(uri, (json.dumps(value, indent=2) + "\n").encode())


# --- command line ----------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_prediction_arguments(parser)
    parser.add_argument("--output", required=True, help="output folder or s3:// prefix for the Parquet files")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete earlier output and its listing, and label everything again")
    parser.add_argument("--relist", action="store_true",
                        help="list the inputs again (objects added since the saved listing) and label every "
                             "video of the new listing again into this output")
    parser.add_argument("--columns", type=_names, metavar="A,B",
                        help="a table input's columns to carry into videos/ (default: all but the URI column)")
    parser.add_argument("--unit-videos", type=positive_int, default=listing.UNIT_ROWS, metavar="N",
                        help="videos per output unit (a file in windows/ and videos/), fixed by the first "
                             "run of an output (default: %(default)s)")
    add_stall_argument(parser)


def _names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"{text!r} names no column")
    return names


def run(args: argparse.Namespace) -> int:
    with exit_in_bounded_time():
        summary = infer(args.inputs, args.model, args.output, prediction_options(args), plan=window_plan(args),
                        overwrite=args.overwrite, relist=args.relist, uri_column=args.uri_column,
                        columns=args.columns, unit_videos=args.unit_videos, verbose=args.verbose,
                        stall_timeout_s=args.stall_timeout)
    print(f"infer: {summary.line()}", flush=True)
    return 0


if __name__ == "__main__":
    from ray_jobs.cli import entrypoint

    entrypoint("infer")
