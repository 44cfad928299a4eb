"""Fine-tune the audio-visual model end to end with Ray Train (DDP), as in the paper's section 5.

Reads labelled clips (tar shards written by `groupemotion pack`, video folders with one
subfolder per class, or tables of videos with a `uri` and a `label` column: see
`ray_jobs.inputs.tables`) from local paths or s3:// URIs, decodes them in the Ray Data decode stage,
and trains on N Ray Train workers (one GPU each with --gpu): Adam at --lr, pretrained encoders at
lr x 1e-2 (random ones at lr), label smoothing 0.2, bf16 autocast on GPUs. After every epoch the
validation accuracy, macro-F1, per-class recall and confusion matrix are printed and a checkpoint
is written.

What lands under --output (a local folder or s3://bucket/prefix):
  run_config.json   the resolved model and training configuration
  metrics.jsonl     one JSON line of metrics per finished epoch
  checkpoints/      the Ray Train run: epoch_NNNN/ (model, optimizer, epoch; safetensors + JSON)
  best/             the best epoch by validation accuracy in the core's checkpoint format,
                    ready for `groupemotion infer` and `groupemotion eval`, with a model card
                    (README.md: the paper, data, config, validation scores) so that the folder
                    can be uploaded to the Hugging Face hub as it is (`--model hf-hub:...`)

Decode once: with --cache URI (local or s3://) each split is decoded once into a cache of decoded
clips (`ray_jobs.train.clip_cache`: JPEG frames at most a quarter of their raw size, 16-bit audio)
before training starts, and every epoch reads the cache, as does every later run with the
same inputs and decode settings; a changed input, spec or decoder makes a new cache entry.

The console shows the job's own lines, one per epoch; Ray's own output goes to its session log
files unless --verbose.

Faults: run the same command again with the same --output and it resumes from the latest
checkpoint (it prints the epoch it continues at; --epochs may be raised to train longer). A worker
that dies, or the node it runs on, is replaced and the run continues from the latest checkpoint,
up to --max-failures times, as soon as the cluster has room for the workers again. When no batch
has reached a worker for --stall-timeout seconds (default 600: a lost node the cluster does not
replace, workers it cannot place, a store that stopped answering) the job stops with
`error: stalled: ...` and exit status 75, and running it again resumes. A run in which no
training clip (or no validation clip) could be read stops with the clips' reason, e.g.
`error: storage_unavailable: ...` (exit status 75) or `error: undecodable: ...` (2), and exports no
model; a failure to write the checkpoints or metrics to --output stops it in one line too.
--fail-once-at-epoch E is the switch that proves recovery: one worker exits in the middle of
epoch E, once per output folder (a marker file, fault_injected.json, remembers it happened), as
soon as Ray Train holds the checkpoint of epoch E-1, so the run resumes from that checkpoint.

With RAY_ADDRESS unset a local Ray is started; under `ray job submit` use
`python -m ray_jobs.commands.train ARGS`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from typing import Any

from groupemotion_core.errors import GroupEmotionError
from groupemotion_core.model.config import PRESETS, ModelConfig, preset
from ray_jobs.inputs import storage
from ray_jobs.commands.args import add_stall_argument, add_uri_column_argument
from ray_jobs.inputs.tables import check, is_table
from ray_jobs.runtime.watchdog import exit_in_bounded_time

RUN_CONFIG = "run_config.json"
CHECKPOINTS = "checkpoints"  # the Ray Train run name under --output
BEST = "best"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data")
    data.add_argument("--train", nargs="+", required=True, metavar="URI",
                      help="training data: tar shard prefixes/manifests, video folders, or tables "
                           "(.parquet/.csv/.jsonl with uri and label columns) (local or s3://)")
    data.add_argument("--val", nargs="+", required=True, metavar="URI",
                      help="validation data, same forms as --train")
    add_uri_column_argument(data)
    data.add_argument("--output", required=True, metavar="URI",
                      help="run folder (local or s3://); reusing it resumes the run")
    data.add_argument("--decode-cpus", type=float, default=1.0, metavar="N",
                      help="CPUs reserved by each decode task (default: %(default)s)")
    data.add_argument("--cache", metavar="URI",
                      help="a cache of decoded clips (local or s3://): each split is decoded into it "
                           "once, and every epoch, and every later run with the same inputs and "
                           "decode settings, reads it instead of decoding again")

    model = parser.add_argument_group("model").add_mutually_exclusive_group()
    model.add_argument("--preset", choices=PRESETS, default="paper",
                       help="model preset: `paper` (ResNet-101d + HuBERT base, the frames averaged "
                            "before the CNN as the paper's formula), `paper-framewise` (the CNN on "
                            "every frame, its feature maps averaged: about 8x the vision cost) or "
                            "`tiny` (small encoders for CPU smoke runs) (default: %(default)s)")
    model.add_argument("--config", metavar="FILE.json",
                       help="a model configuration file (ModelConfig fields) instead of a preset")
    weights = parser.add_argument_group("pretrained encoders (fresh runs only; a resumed run loads its checkpoint)")
    weights.add_argument("--pretrained-vision", metavar="ID_OR_PATH",
                         help="timm hub id or local weights file for the vision encoder")
    weights.add_argument("--pretrained-audio", metavar="ID_OR_PATH",
                         help="Hugging Face hub id or local directory for the audio encoder")

    train = parser.add_argument_group("training")
    train.add_argument("--workers", type=int, default=1, help="Ray Train workers (default: %(default)s)")
    train.add_argument("--gpu", action="store_true", help="one GPU per worker, bf16 autocast")
    train.add_argument("--epochs", type=int, default=10, help="total epochs (default: %(default)s)")
    train.add_argument("--batch-size", type=int, default=8,
                       help="clips per worker per step (default: %(default)s)")
    train.add_argument("--grad-accum", type=int, default=1, metavar="N",
                       help="steps whose gradients are summed before each optimizer step; the "
                            "effective batch is workers x batch size x N (default: %(default)s)")
    train.add_argument("--lr", type=float, default=1e-4,
                       help="Adam learning rate of the fusion head; encoders get lr x 1e-2 when they start from "
                            "pretrained weights, lr when they start random (default: %(default)s)")
    train.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    train.add_argument("--shuffle-buffer", type=int, default=256, metavar="N",
                       help="decoded clips each worker shuffles among; the stream is otherwise in "
                            "shard order (default: %(default)s)")

    faults = parser.add_argument_group("checkpoints and faults")
    faults.add_argument("--max-failures", type=int, default=3,
                        help="worker failures to recover from, from the latest checkpoint; -1 = "
                             "unlimited (default: %(default)s)")
    faults.add_argument("--keep-checkpoints", type=int, default=2, metavar="N",
                        help="epoch checkpoints kept: the N best by val accuracy, plus always the "
                             "latest (default: %(default)s)")
    faults.add_argument("--fail-once-at-epoch", type=int, metavar="E",
                        help="testing switch: the last worker exits in the middle of epoch E, once "
                             "per output folder, once the checkpoint of epoch E-1 is saved: the run "
                             "must resume from it")
    add_stall_argument(faults)
    parser.add_argument("--verbose", action="store_true",
                        help="show Ray's, Ray Data's and Ray Train's own output on the console "
                             "(otherwise it goes to the Ray session's log files)")


def run(args: argparse.Namespace) -> int:
    with exit_in_bounded_time():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    """Driver: resolve the config, look for a run to resume, fit, export the best epoch."""
    _check_arguments(args)
    cfg = _model_config(args)
    from ray_jobs.runtime.session import ensure_ray

    # Embedded Ray: room for the train workers plus a decode actor for each dataset at least, or
    # nothing would feed them.
    ray = ensure_ray(min_cpus=args.workers + 2 * math.ceil(args.decode_cpus), verbose=args.verbose)
    _check_resources(ray, args)

    run_config = _resolved_config(args, cfg)
    _check_same_model(args.output, run_config)
    storage.write_bytes_atomic(storage.join(args.output, RUN_CONFIG),
                               json.dumps(run_config, indent=2, sort_keys=True).encode())

    previous = _previous_result(args.output)
    done = int(previous.metrics["epoch"]) if previous is not None and previous.metrics else 0
    if done:
        print(f"[train] resuming from {storage.join(args.output, CHECKPOINTS)}: {done} of "
              f"{args.epochs} epochs done, continuing at epoch {done + 1}", flush=True)
    if done >= args.epochs:
        print(f"[train] all {args.epochs} epochs are done already; exporting the best epoch", flush=True)
        result = previous
    else:
        datasets = _datasets(args, cfg)
        result = _fit(args, run_config, datasets)
    _export_best(result, args.output, run_config)
    return 0


def _check_arguments(args: argparse.Namespace) -> None:
    positive = {"--workers": args.workers, "--epochs": args.epochs, "--batch-size": args.batch_size,
                "--grad-accum": args.grad_accum, "--shuffle-buffer": args.shuffle_buffer,
                "--keep-checkpoints": args.keep_checkpoints}
    for flag, value in positive.items():
        if value < 1:
            raise GroupEmotionError("bad_argument", f"{flag} must be at least 1, got {value}")
    if args.lr <= 0 or args.decode_cpus <= 0:
        raise GroupEmotionError("bad_argument", "--lr and --decode-cpus must be positive")
    if args.max_failures < -1:
        raise GroupEmotionError("bad_argument", "--max-failures must be -1 (unlimited) or more")
    if args.cache and any(is_table(uri) for uri in [*args.train, *args.val]):
        raise GroupEmotionError("bad_argument", "--cache reads shards and video folders; read a table without it")
    check([*args.train, *args.val], args.uri_column, labelled=True)


def _model_config(args: argparse.Namespace):
    if args.config is None:
        return preset(args.preset)
    try:
        with open(args.config) as f:
            return ModelConfig.from_dict(json.load(f))
    except FileNotFoundError:
        raise GroupEmotionError("not_found", f"{args.config} does not exist") from None
    except (ValueError, TypeError) as e:
        raise GroupEmotionError("bad_config", f"{args.config}: {e}") from None


def _check_resources(ray, args: argparse.Namespace) -> None:
    """On the embedded local Ray a missing GPU would leave the trainer waiting forever."""
    if args.gpu and not os.environ.get("RAY_ADDRESS"):
        gpus = ray.cluster_resources().get("GPU", 0)
        if gpus < args.workers:
            raise GroupEmotionError("no_gpu", f"--gpu with {args.workers} workers needs "
                                              f"{args.workers} GPUs; this machine has {gpus:g}")


def _resolved_config(args: argparse.Namespace, cfg) -> dict[str, Any]:
    """Everything that decided the run, saved beside its checkpoints.

    The pretrained sources are resolved here, before any worker starts: a hub id becomes the
    commit it names and the sha256 of its weights (a missing or pickle-only source fails now,
    in one line, rather than in every worker).
    """
    import ray
    import torch

    from groupemotion_core.weights.pretrained import describe

    return {
        "pretrained": describe(args.pretrained_vision, args.pretrained_audio),
        "model": cfg.to_dict(),
        "data": {"train": list(args.train), "val": list(args.val), "cache": args.cache},
        "training": {
            "workers": args.workers, "gpu": args.gpu, "epochs": args.epochs,
            "batch_size_per_worker": args.batch_size, "grad_accum": args.grad_accum,
            "effective_batch_size": args.workers * args.batch_size * args.grad_accum,
            "lr": args.lr, "seed": args.seed, "shuffle_buffer": args.shuffle_buffer,
            "max_failures": args.max_failures,
            "pretrained_vision": args.pretrained_vision, "pretrained_audio": args.pretrained_audio,
        },
        "versions": {"ray": ray.__version__, "torch": torch.__version__},
    }


def pinned_source(record: dict[str, Any] | None) -> str | None:
    """The source the workers load: a hub id pinned to the commit the driver resolved, so that a
    branch that moves while the workers start cannot give them other weights than run_config.json names."""
    if record is None:
        return None
    return f"{record['repo']}@{record['commit']}" if record["commit"] else record["source"]


def _check_same_model(output: str, run_config: dict[str, Any]) -> None:
    """A resumed run must build the model its checkpoints hold."""
    path = storage.join(output, RUN_CONFIG)
    if not storage.exists(path):
        return
    saved = json.loads(storage.read_bytes(path))
    # Through ModelConfig, so a run saved before a field existed compares with that field's default.
    if ModelConfig.from_dict(saved.get("model", {})).to_dict() != run_config["model"]:
        raise GroupEmotionError("config_mismatch", f"{output} holds a run of another model "
                                f"configuration (see {path}); use a new --output or the same model")


def _storage_args(output: str) -> dict[str, Any]:
    """RunConfig storage for --output: s3:// through the project's filesystem, else a local path."""
    if storage.is_remote(output):
        fs, path = storage.arrow_filesystem(output)
        return {"storage_path": path, "storage_filesystem": fs}
    return {"storage_path": storage.filesystem(output)[1]}


def _previous_result(output: str):
    """The Ray Train result saved under --output by an earlier run, or None."""
    from ray.train import Result

    if not storage.exists(storage.join(output, CHECKPOINTS)):
        return None
    where = _storage_args(output)
    path = f"{where['storage_path']}/{CHECKPOINTS}"
    try:
        return Result.from_path(path, storage_filesystem=where.get("storage_filesystem"))
    except RuntimeError:  # the run folder exists but no epoch was checkpointed
        return None


def _datasets(args: argparse.Namespace, cfg) -> dict[str, Any]:
    """The `train` and `val` ClipRow datasets (one window per labelled clip): from the decode
    stage, or with --cache from the cache, which is filled first (decode -> cache -> train)."""
    from groupemotion_core.media.spec import FIRST_WINDOW
    from ray_jobs.decode.stage import decode_dataset
    from ray_jobs.inputs.sources import read_sources

    spec = cfg.decode_spec()
    splits = (("train", args.train), ("val", args.val))
    if not args.cache:
        return {split: decode_dataset(read_sources(uris, uri_column=args.uri_column), spec, FIRST_WINDOW,
                                      num_cpus=args.decode_cpus)
                for split, uris in splits}
    from ray_jobs.train.clip_cache import ClipCache

    cache = ClipCache(args.cache, spec, FIRST_WINDOW)
    datasets = {}
    for split, uris in splits:
        units = cache.units(uris)
        stats = cache.fill(units, decode_cpus=args.decode_cpus, title=f"[train] decoding {split} into the cache",
                           stall_timeout_s=args.stall_timeout)
        print(f"[train] cache {split}: {stats.line()}; {cache.root}", flush=True)
        datasets[split] = cache.dataset(units)
    return datasets


def _fit(args: argparse.Namespace, run_config: dict[str, Any], datasets: dict[str, Any]):
    """Run the trainer under the stall watchdog (`watchdog.watched_call`); a reason a worker
    stopped the run for, or an error Ray wrapped (a StorageError writing --output), leaves as one
    GroupEmotionError."""
    from ray_jobs.runtime.console import Relay
    from ray_jobs.runtime.watchdog import Pulse, watched_call

    pulse = Pulse()
    try:
        with Relay() as relay:
            trainer = _trainer(args, run_config, datasets, relay.sender,
                               pulse.sender(every_s=min(10.0, args.stall_timeout / 10)))
            result = watched_call(trainer.fit, pulse, args.stall_timeout, "no batch reached a training worker",
                                  uri=args.output)
        stopped = pulse.stopped()
    finally:
        pulse.close()
    if stopped is not None:
        raise stopped
    return result


def _trainer(args: argparse.Namespace, run_config: dict[str, Any], datasets: dict[str, Any], console, pulse):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    loop_config = {
        "model": run_config["model"],
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "grad_accum": args.grad_accum,
        "lr": args.lr,
        "seed": args.seed,
        "shuffle_buffer": args.shuffle_buffer,
        "pretrained_vision": pinned_source(run_config["pretrained"]["vision"]),
        "pretrained_audio": pinned_source(run_config["pretrained"]["audio"]),
        "output": args.output,
        "checkpoints": storage.join(args.output, CHECKPOINTS),
        "fail_once_at_epoch": args.fail_once_at_epoch,
        "console": console,
        "pulse": pulse,
    }
    return TorchTrainer(
        _train_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=args.workers, use_gpu=args.gpu),
        run_config=RunConfig(
            name=CHECKPOINTS,
            failure_config=FailureConfig(max_failures=args.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=args.keep_checkpoints,
                                               checkpoint_score_attribute="val_accuracy",
                                               checkpoint_score_order="max"),
            **_storage_args(args.output),
        ),
        datasets=datasets,
    )


def _train_worker(config: dict[str, Any]) -> None:
    """Ray Train's function for each worker. The training loop's module, with the model stack
    (torch, timm, transformers), is imported here, in the worker: the driver only passes the
    function on, and importing the stack there first held up the workers' start (a 2-epoch tiny
    run took 80.8 s that way, 73.9 s this way)."""
    from ray_jobs.train.loop import train_func_per_worker

    train_func_per_worker(config)


def _export_best(result, output: str, run_config: dict[str, Any]) -> None:
    """Write the best epoch by val accuracy to OUTPUT/best in the core's checkpoint format, with
    its model card (`groupemotion_core.weights.model_card`): a folder to upload to the hub as it is."""
    from groupemotion_core.weights.checkpoint import export_checkpoint
    from groupemotion_core.weights.model_card import write_model_card

    scored = [(c, m) for c, m in (result.best_checkpoints or []) if "val_accuracy" in m]
    if not scored:
        raise GroupEmotionError("no_checkpoint", f"no epoch of {output} finished; nothing to export")
    checkpoint, metrics = max(scored, key=lambda cm: (cm[1]["val_accuracy"], -cm[1]["epoch"]))
    with checkpoint.as_directory() as source, tempfile.TemporaryDirectory(prefix="groupemotion-best-") as directory:
        model_id = export_checkpoint(source, directory, epoch=metrics["epoch"], val_accuracy=metrics["val_accuracy"],
                                     val_macro_f1=metrics["val_macro_f1"])
        write_model_card(directory, run_config, metrics)
        storage.upload_dir(directory, storage.join(output, BEST))
    print(f"[train] best epoch {metrics['epoch']}: val_accuracy={metrics['val_accuracy']:.4f} "
          f"val_macro_f1={metrics['val_macro_f1']:.4f}; exported to {storage.join(output, BEST)} "
          f"(model {model_id})", flush=True)


if __name__ == "__main__":
    from ray_jobs.cli import entrypoint

    entrypoint("train")
