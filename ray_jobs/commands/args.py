"""The command-line options more than one job takes, and the one set of number validators.

Here, beside the commands, so the stages and the runtime they call (`ray_jobs.predict`,
`ray_jobs.runtime.watchdog`) know nothing of argparse, and a mistake in a number reads the same in
every command: `argument --actors: 0 is not a positive integer`, before anything starts.
"""

from __future__ import annotations

import argparse
from typing import Callable

from groupemotion_core.media.spec import WINDOW_MODES, WindowPlan
from ray_jobs.inputs.tables import URI_COLUMN
from ray_jobs.predict.pipeline import PredictOptions
from ray_jobs.runtime.watchdog import DEFAULT_STALL_TIMEOUT_S


def _number(kind: type, ok: Callable[[float], bool], what: str) -> Callable[[str], float]:
    def parse(text: str):
        value = kind(text)  # a ValueError reads "invalid int value: 'x'" (argparse names the type)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{text} is not {what}")
        return value

    parse.__name__ = kind.__name__
    return parse


positive_int = _number(int, lambda v: v >= 1, "a positive integer")
positive_float = _number(float, lambda v: v > 0, "a positive number")
non_negative_float = _number(float, lambda v: v >= 0, "zero or a positive number")


def int_between(low: int, high: int) -> Callable[[str], int]:
    return _number(int, lambda v: low <= v <= high, f"a whole number from {low} to {high}")


def add_window_arguments(parser: argparse.ArgumentParser) -> None:
    """Which windows of a video are decoded (`WindowPlan`), as `decode`, `infer` and `eval` take them."""
    parser.add_argument("--windows", choices=WINDOW_MODES, default="all",
                        help="all: windows over the whole video (default); first: one window from 0")
    parser.add_argument("--stride", type=positive_float, metavar="S",
                        help="seconds between window starts (default: the window length)")
    parser.add_argument("--max-windows", type=positive_int, metavar="K",
                        help="at most K windows per video, spread evenly over it")


def window_plan(args: argparse.Namespace) -> WindowPlan:
    return WindowPlan(args.windows, args.stride, args.max_windows)


def add_prediction_arguments(parser: argparse.ArgumentParser) -> None:
    """The options `infer` and `eval` share: their inputs, the model, the windows and the pools."""
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="tar shards, videos, tables of videos (.parquet/.csv/.jsonl), folders, prefixes, "
                             "globs, manifests")
    add_uri_column_argument(parser)
    parser.add_argument("--model", required=True,
                        help="checkpoint folder or URI, hf-hub:OWNER/REPO[@REVISION] (a checkpoint on the "
                             "Hugging Face hub), or preset:tiny|paper (random weights)")
    add_window_arguments(parser)
    parser.add_argument("--batch-size", type=positive_int, default=PredictOptions.batch_size,
                        help="windows per model call")
    parser.add_argument("--actors", type=positive_int, help="model actors (default: one per GPU, or 1 without GPUs)")
    parser.add_argument("--gpus-per-actor", type=non_negative_float,
                        help="GPUs per model actor (default: 1 with GPUs, else 0 = CPU)")
    parser.add_argument("--decode-cpus", type=positive_int,
                        help="one-CPU decode actors (default: every CPU the model actors and readers leave)")
    parser.add_argument("--verbose", action="store_true", help="show Ray's own log output on the console")


def add_uri_column_argument(parser) -> None:
    """Which column of a table input names the videos (`ray_jobs.inputs.tables`): infer, eval, train."""
    parser.add_argument("--uri-column", default=URI_COLUMN, metavar="NAME",
                        help="a table input's column of video URIs (default: %(default)s)")


def prediction_options(args: argparse.Namespace) -> PredictOptions:
    return PredictOptions(args.batch_size, args.actors, args.gpus_per_actor, args.decode_cpus)


def add_stall_argument(parser) -> None:
    parser.add_argument(
        "--stall-timeout", type=positive_float, default=DEFAULT_STALL_TIMEOUT_S, metavar="S",
        help="stop the job (error: stalled, exit status 75) when it has made no progress for S seconds, "
             "e.g. after losing a node the cluster does not replace; running the same command again "
             "finishes the work exactly once (default: %(default)g)")
