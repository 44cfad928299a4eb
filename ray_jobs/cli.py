"""The `groupemotion` command: one subcommand per job.

Each subcommand lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`.
Only the module of the chosen subcommand is imported, so `groupemotion decode` does not pay for
importing Ray. A user mistake (GroupEmotionError) prints `error: <reason>: <detail>` and exits 2
with no traceback; Ctrl-C exits 130. Every s3:// argument is checked before the command runs, so
a storage mistake takes seconds to report, not a job's worth of retries.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import sys

from groupemotion_core.errors import GroupEmotionError

# name -> (module, one-line summary shown by `groupemotion --help`)
COMMANDS: dict[str, tuple[str, str]] = {
    "decode": ("ray_jobs.commands.decode", "decode one video file and print its clip summary as JSON"),
    "pack": ("ray_jobs.commands.pack", "pack a folder of labelled videos into tar shards (local or s3://)"),
    "train": ("ray_jobs.commands.train", "fine-tune the model end to end with Ray Train (DDP)"),
    "eval": ("ray_jobs.commands.evaluate", "evaluate a checkpoint on labelled data: metrics JSON, confusion PNG"),
    "infer": ("ray_jobs.commands.infer", "label videos with a checkpoint and write Parquet (exactly once)"),
    "report": ("ray_jobs.commands.report", "write a page (HTML and pictures) about the labels infer wrote"),
    "quickstart": ("ray_jobs.commands.quickstart", "generate data, train, label and evaluate, all locally"),
    "weights": ("ray_jobs.commands.weights", "convert pretrained encoder weights from a PyTorch pickle to safetensors"),
}


def _chosen(argv: list[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="groupemotion",
        description="Audio-visual group emotion recognition (Negative, Neutral, Positive) on Ray.",
        epilog="Run `groupemotion COMMAND --help` for a command's options. "
        "Jobs use the Ray cluster in RAY_ADDRESS, or start a local one when it is unset.",
    )
    # The installed distribution's version (pyproject.toml): one place says it.
    parser.add_argument("--version", action="version", version=f"%(prog)s {importlib.metadata.version('groupemotion')}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = _chosen(argv)
    for name, (module_name, summary) in COMMANDS.items():
        module = importlib.import_module(module_name) if name == chosen else None
        description = (module.__doc__ or summary) if module else summary
        p = sub.add_parser(
            name,
            help=summary,
            description=description,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if module is not None:
            module.add_arguments(p)
            p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser(argv).parse_args(argv)
        check_storage(args)
        return int(args._run(args) or 0)
    except GroupEmotionError as e:
        print(f"error: {e.reason}: {e.detail}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


# The arguments a command writes to; every other s3:// argument is only read.
WRITES: dict[str, tuple[str, ...]] = {"pack": ("dest",), "train": ("output", "cache"), "infer": ("output",)}


def check_storage(args: argparse.Namespace) -> None:
    """Meet a storage mistake (credentials, bucket, access, endpoint) in seconds, before a job
    reads anything or starts Ray: every s3:// argument is checked once, for writing where the
    command writes to it."""
    uris: dict[str, bool] = {}
    for name, value in vars(args).items():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str) and item.startswith("s3://"):
                uris[item] = uris.get(item, False) or name in WRITES.get(args.command, ())
    if uris:
        from ray_jobs.inputs import storage

        for uri, write in uris.items():
            storage.check(uri, write=write)


def entrypoint(command: str) -> None:
    """`python -m ray_jobs.<module> ARGS` == `groupemotion <command> ARGS` (for `ray job submit`)."""
    sys.exit(main([command, *sys.argv[1:]]))


if __name__ == "__main__":
    sys.exit(main())
