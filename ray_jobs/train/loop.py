"""What every Ray Train worker runs: load-or-init, train an epoch, validate, checkpoint, repeat.

The shape is Ray's own examples (`train_func_per_worker(config)`) with torchtune's split into
setup, epoch and save steps. Each worker reads only its own shard of the `train` and `val` Ray
Datasets (a streaming split: decoding happens in Ray Data tasks, not here), so no worker ever
holds a copy of the dataset.

Why some of it looks the way it does:
- DDP needs every rank to take the same number of steps. Ray gives each worker the same number
  of rows, but clips that failed to decode (or carry no label) are dropped inside a batch, so a
  batch can end up empty on one rank; that rank then steps on a zero-loss placeholder clip so the
  gradient all-reduce still happens on every rank.
- Validation metrics are computed once over every worker's predictions (gathered to all ranks),
  not averaged per worker, so they equal what one process would compute on the whole val set.
- Checkpoints are safetensors + JSON only: the model in the core's format, the optimizer's
  tensors in one safetensors file and the rest of its state dict in JSON. Nothing is pickled.
- Lines for the person at the console (each epoch's metrics, a resume, an injected fault) go
  to the driver through `console.Relay`, which prints each once; a worker's own stdout goes to
  its log file unless the job runs with --verbose.
- Fault injection (`fail_once_at_epoch`) is part of the config, as in Ray's examples: one worker
  exits mid-epoch, once; a marker object in the output makes "once" survive the restart.
- Every batch beats the driver's `watchdog.Pulse` (config `pulse`, at most one message every few
  seconds): training batches never reach the driver, so the beats are how it knows the run still
  moves, and stops it after `--stall-timeout` seconds without one.
- An epoch in which no training clip (or no validation clip) could be used stops the run with the
  reason the clips failed for (e.g. `storage_unavailable`, `undecodable`): every rank returns
  without a checkpoint and rank 0 hands the reason to the driver through the pulse. An untrained
  model is never checkpointed or exported as the best one, and a failure of the data is not
  retried as if a worker had died.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import random
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
from ray.data.collate_fn import NumpyBatchCollateFn
from safetensors.torch import load_file, save_file

from groupemotion_core.weights.checkpoint import load_checkpoint, save_checkpoint
from groupemotion_core.errors import GroupEmotionError, error_reason, split_error
from groupemotion_core.model.config import ModelConfig
from groupemotion_core.model.classifier import GroupEmotionModel
from groupemotion_core.weights.pretrained import load_pretrained
from groupemotion_core.schema import CLASSES, UNKNOWN_LABEL, ClipRow
from groupemotion_core.model.training import build_optimizer, classification_metrics, encoder_lr_scale, loss_fn
from ray_jobs.inputs import storage

# Files of one training checkpoint, beside the core's model files (model.safetensors, config.json).
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_STATE = "optimizer.json"
TRAIN_STATE = "train_state.json"
FAULT_MARKER = "fault_injected.json"
METRICS_FILE = "metrics.jsonl"


def train_func_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train worker function; `config` is TorchTrainer's train_loop_config (see train.py)."""
    run = _setup(config)
    _beat(config)
    for epoch in range(run.start_epoch + 1, config["epochs"] + 1):
        # Seeded per epoch and rank, so a resumed epoch draws the same dropout and augmentation
        # as it would have in an uninterrupted run, and the ranks do not draw the same masks.
        _seed_everything(_epoch_seed(run, epoch))
        failures = _Failures()
        train_stats = _train_epoch(run, epoch, failures)
        if not train_stats["train_clips"]:
            return _stop(run, "training", train_stats["train_skipped_unlabelled"], failures)
        failures = _Failures()
        val_metrics = _validate(run, failures)
        if not val_metrics["val_count"]:
            return _stop(run, "validation", val_metrics["val_skipped_unlabelled"], failures)
        _report(run, epoch, train_stats, val_metrics)


@dataclass
class _Run:
    config: dict[str, Any]
    model: torch.nn.Module  # DDP-wrapped when world_size > 1
    optimizer: torch.optim.Optimizer
    device: torch.device
    rank: int
    world_size: int
    start_epoch: int  # epochs already done (0 for a fresh run)
    history: list[dict]  # one metrics dict per finished epoch, carried through checkpoints

    @property
    def module(self) -> GroupEmotionModel:
        return getattr(self.model, "module", self.model)


def _setup(config: dict[str, Any]) -> _Run:
    """Seed, then build model and optimizer from the latest checkpoint or from scratch."""
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    # The same seed on every rank for the initial weights. Full determinism
    # (ray.train.torch.enable_reproducibility) is left off because it makes CUDA kernels without
    # a deterministic variant raise, and the paper's encoders use some of them.
    _seed_everything(config["seed"])
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        model = GroupEmotionModel(ModelConfig.from_dict(config["model"]))
        load_pretrained(model, vision=config.get("pretrained_vision"), audio=config.get("pretrained_audio"))
        optimizer_state, train_state = None, {"epoch": 0, "history": []}
    else:
        with checkpoint.as_directory() as directory:
            model, _ = load_checkpoint(directory)
            optimizer_state = _load_optimizer_state(directory)
            with open(os.path.join(directory, TRAIN_STATE)) as f:
                train_state = json.load(f)
        if rank == 0:
            _say(config, f"[train] worker group resumes from the checkpoint of epoch {train_state['epoch']}: "
                         f"continuing at epoch {train_state['epoch'] + 1} of {config['epochs']}")
    device = ray.train.torch.get_device()
    model = ray.train.torch.prepare_model(model)
    pretrained = bool(config.get("pretrained_vision") or config.get("pretrained_audio"))
    optimizer = build_optimizer(getattr(model, "module", model), lr=config["lr"],
                                encoder_lr_scale=encoder_lr_scale(pretrained))
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    return _Run(config, model, optimizer, device, rank, world_size,
                start_epoch=int(train_state["epoch"]), history=list(train_state["history"]))


def _beat(config: dict[str, Any]) -> None:
    pulse = config.get("pulse")
    if pulse is not None:
        pulse.beat()


class _Failures:
    """Why rows of a split failed, by reason, with the first error of each (`<reason>: <detail>`).
    Filled by the collate function, which Ray Data calls from its own threads."""

    def __init__(self):
        self._lock = threading.Lock()
        self.counts: collections.Counter = collections.Counter()
        self.first: dict[str, str] = {}

    def add(self, errors) -> None:
        with self._lock:
            for error in errors:
                reason = error_reason(error)
                self.counts[reason] += 1
                self.first.setdefault(reason, error)


def _stop(run: _Run, split: str, unlabelled: int, failures: _Failures) -> None:
    """No clip of `split` could be used by any rank: stop the run with the reason (module docstring)."""
    counts: collections.Counter = collections.Counter()
    first: dict[str, str] = {}
    parts = [(failures.counts, failures.first)]
    if run.world_size > 1:
        parts = [None] * run.world_size
        torch.distributed.all_gather_object(parts, (failures.counts, failures.first))
    for part_counts, part_first in parts:
        counts.update(part_counts)
        for reason, error in part_first.items():
            first.setdefault(reason, error)
    if counts:
        reason, _ = counts.most_common(1)[0]
        summary = ", ".join(f"{r}: {n}" for r, n in counts.most_common())
        unlabelled_too = f", unlabelled: {unlabelled}" if unlabelled else ""
        detail = (f"no {split} clip could be used (failed: {summary}{unlabelled_too}); "
                  f"first: {split_error(first[reason])[1]}")
    elif unlabelled:
        reason, detail = "no_labels", f"none of the {unlabelled} {split} clips has a label"
    else:
        reason, detail = "no_clips", f"the {split} data holds no clip"
    if run.rank != 0:
        return
    pulse = run.config.get("pulse")
    if pulse is None:
        raise GroupEmotionError(reason, detail)
    pulse.stop(reason, detail)


def _say(config: dict[str, Any], line: str) -> None:
    """A line for the person at the console: through the driver's relay (`console.Relay`, in the
    config as `console`), which prints it once; to this worker's log without one."""
    sender = config.get("console")
    if sender is None:
        print(line, flush=True)
    else:
        sender(line)


def _epoch_seed(run: _Run, epoch: int) -> int:
    return (run.config["seed"] * 1_000_003 + epoch) * 1_009 + run.rank


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


class _ClipCollate(NumpyBatchCollateFn):
    """ClipRow numpy batch -> tensors of the usable rows, plus how many rows were dropped.

    Runs in Ray Data's prefetch threads; Ray moves the output to the worker's device, so frames
    cross to the GPU as uint8 (normalisation happens inside the model). The errors of the rows it
    drops go to `failures`.
    """

    def __init__(self, failures: _Failures):
        self._failures = failures

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        # A block without errors has an all-null `error` column, which reaches numpy as NaN floats:
        # only a string is an error.
        errors = np.array([isinstance(e, str) for e in batch[ClipRow.ERROR]], dtype=bool)
        self._failures.add(e for e in batch[ClipRow.ERROR] if isinstance(e, str))
        labels = np.asarray(batch[ClipRow.LABEL], dtype=np.int64)
        keep = ~errors & (labels != UNKNOWN_LABEL)
        rows = np.flatnonzero(keep)
        if len(rows):
            frames = np.stack([batch[ClipRow.FRAMES][i] for i in rows]).astype(np.uint8, copy=False)
            audio = np.stack([batch[ClipRow.AUDIO][i] for i in rows]).astype(np.float32, copy=False)
        else:  # shapes do not matter for an empty batch: the loop substitutes a placeholder
            frames, audio = np.zeros((0,), np.uint8), np.zeros((0,), np.float32)
        return {
            "frames": torch.from_numpy(frames),
            "audio": torch.from_numpy(audio),
            "audio_len": torch.from_numpy(np.asarray(batch[ClipRow.AUDIO_LEN], dtype=np.int64)[rows]),
            "label": torch.from_numpy(labels[rows]),
            "errors": torch.tensor(int(errors.sum())),
            "unlabelled": torch.tensor(int((~errors & ~keep).sum())),
        }


def _batches(run: _Run, split: str, epoch: int, failures: _Failures):
    shard = ray.train.get_dataset_shard(split)
    shuffle = {}
    if split == "train":
        # A streaming shuffle: a buffer of decoded clips per worker, reseeded every epoch. A global
        # shuffle (random_shuffle, randomize_block_order) would hold the whole input at once.
        size = max(run.config["shuffle_buffer"], run.config["batch_size"])
        shuffle = dict(local_shuffle_buffer_size=size, local_shuffle_seed=_epoch_seed(run, epoch))
    batches = shard.iter_torch_batches(batch_size=run.config["batch_size"], collate_fn=_ClipCollate(failures),
                                       drop_last=False, **shuffle)
    for batch in batches:
        _beat(run.config)
        yield batch


def _placeholder(run: _Run) -> dict[str, torch.Tensor]:
    """One silent black clip: lets a rank whose batch was all errors join the DDP all-reduce."""
    cfg = run.module.config
    spec = cfg.decode_spec()
    return {
        "frames": torch.zeros((1, *spec.frame_shape), dtype=torch.uint8, device=run.device),
        "audio": torch.zeros((1, spec.audio_samples), dtype=torch.float32, device=run.device),
        "audio_len": torch.zeros((1,), dtype=torch.int64, device=run.device),
        "label": torch.full((1,), UNKNOWN_LABEL, dtype=torch.int64, device=run.device),
    }


def _autocast(run: _Run):
    if run.device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _train_epoch(run: _Run, epoch: int, failures: _Failures) -> dict[str, float]:
    """One pass over this worker's shard with gradient accumulation; returns global statistics."""
    run.model.train()
    accum = run.config["grad_accum"]
    loss_sum = torch.zeros((), dtype=torch.float64, device=run.device)
    counts = torch.zeros(3, dtype=torch.float64, device=run.device)  # clips, errors, unlabelled
    started = time.monotonic()
    run.optimizer.zero_grad(set_to_none=True)
    for micro, (batch, last) in enumerate(_with_last(_batches(run, "train", epoch, failures)), start=1):
        counts += torch.stack([batch["label"].new_tensor(len(batch["label"])), batch["errors"],
                               batch["unlabelled"]]).to(run.device, torch.float64)
        empty = len(batch["label"]) == 0
        inputs = _placeholder(run) if empty else batch
        # DDP all-reduces gradients only on the last micro-step of an accumulation window; the
        # epoch's last batch closes a shorter window (every rank has as many batches).
        final = micro % accum == 0 or last
        sync = contextlib.nullcontext() if final or run.world_size == 1 else run.model.no_sync()
        with sync:
            with _autocast(run):
                logits = run.model(inputs["frames"], inputs["audio"], inputs["audio_len"])
            # The placeholder's label is unknown: loss_fn makes that a zero loss that still
            # reaches every parameter, which keeps DDP's reducer in step.
            loss = loss_fn(logits.float(), inputs["label"])
            (loss / accum).backward()
        if not empty:
            loss_sum += loss.detach().double() * len(inputs["label"])
        if final:
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
        _maybe_inject_fault(run, epoch, micro)
    seconds = time.monotonic() - started
    totals = _all_reduce(run, torch.cat([loss_sum.view(1), counts]))
    loss_total, clips, errors, unlabelled = totals.tolist()
    return {
        "train_loss": loss_total / clips if clips else float("nan"),
        "train_clips": int(clips),
        "train_clips_per_s": clips / seconds if seconds > 0 else 0.0,
        "train_skipped_errors": int(errors),
        "train_skipped_unlabelled": int(unlabelled),
    }


def _with_last(items):
    """(item, is_last) pairs: one item of lookahead."""
    iterator = iter(items)
    try:
        current = next(iterator)
    except StopIteration:
        return
    for following in iterator:
        yield current, False
        current = following
    yield current, True


def _maybe_inject_fault(run: _Run, epoch: int, micro: int) -> None:
    """The documented fault switch: the last rank exits after its first batch of the epoch, once.

    In an epoch after the first it waits until Ray Train has written down the checkpoint of the
    epoch before (its checkpoint manager's snapshot names it), so the run must resume from that
    checkpoint: exiting at once could beat the controller to the report, and the run would
    start again from nothing, which proves less. The other ranks wait in their next all-reduce.
    """
    if run.config.get("fail_once_at_epoch") != epoch or micro != 1 or run.rank != run.world_size - 1:
        return
    marker = storage.join(run.config["output"], FAULT_MARKER)
    if storage.exists(marker):
        return
    if epoch > 1:
        _wait_for_checkpoint(run.config["checkpoints"], epoch - 1)
    storage.write_bytes_atomic(marker, json.dumps({"epoch": epoch, "rank": run.rank}).encode())
    _say(run.config, f"[train] fault injection: rank {run.rank} exits in the middle of epoch {epoch}")
    os._exit(1)


def _wait_for_checkpoint(checkpoints: str, epoch: int, timeout_s: float = 300.0) -> None:
    """Until Ray Train's snapshot of the run under `checkpoints` lists the checkpoint of `epoch`."""
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

    snapshot = storage.join(checkpoints, CHECKPOINT_MANAGER_SNAPSHOT_FILENAME)
    deadline = time.monotonic() + timeout_s
    while not (storage.exists(snapshot) and f"epoch_{epoch:04d}" in storage.read_bytes(snapshot).decode()):
        if time.monotonic() > deadline:
            raise RuntimeError(f"Ray Train wrote no checkpoint of epoch {epoch} to {snapshot} in {timeout_s:g} s")
        time.sleep(0.5)


@torch.no_grad()
def _validate(run: _Run, failures: _Failures) -> dict[str, Any]:
    """Predict this worker's val shard, gather every worker's labels and predictions, score."""
    module = run.module  # not the DDP wrapper: ranks may predict different numbers of batches
    module.eval()
    y_true: list[int] = []
    y_pred: list[int] = []
    skipped = torch.zeros(2, dtype=torch.float64, device=run.device)
    for batch in _batches(run, "val", 0, failures):
        skipped += torch.stack([batch["errors"], batch["unlabelled"]]).to(run.device, torch.float64)
        if len(batch["label"]) == 0:
            continue
        with _autocast(run):
            logits = module(batch["frames"], batch["audio"], batch["audio_len"])
        y_true += batch["label"].tolist()
        y_pred += logits.argmax(dim=-1).tolist()
    if run.world_size > 1:
        gathered: list = [None] * run.world_size
        torch.distributed.all_gather_object(gathered, (y_true, y_pred))
        y_true = [y for part, _ in gathered for y in part]
        y_pred = [y for _, part in gathered for y in part]
    errors, unlabelled = _all_reduce(run, skipped).tolist()
    metrics = classification_metrics(y_true, y_pred, labels=CLASSES)
    return {
        "val_accuracy": float(metrics["accuracy"]),
        "val_macro_f1": float(metrics["macro_f1"]),
        "val_per_class_recall": {k: float(v) for k, v in metrics["per_class_recall"].items()},
        "val_confusion": [[int(c) for c in row] for row in metrics["confusion"]],
        "val_count": int(metrics["count"]),
        "val_skipped_errors": int(errors),
        "val_skipped_unlabelled": int(unlabelled),
    }


def _all_reduce(run: _Run, tensor: torch.Tensor) -> torch.Tensor:
    if run.world_size > 1:
        torch.distributed.all_reduce(tensor)
    return tensor.cpu()


def _report(run: _Run, epoch: int, train_stats: dict, val_metrics: dict) -> None:
    """Checkpoint (rank 0 writes it, every rank reports), then log and append to metrics.jsonl."""
    metrics = {"epoch": epoch, **train_stats, **val_metrics}
    run.history.append(metrics)
    if run.rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory(prefix="groupemotion-ckpt-") as directory:
        save_checkpoint(run.module, directory, epoch=epoch, val_accuracy=metrics["val_accuracy"])
        _save_optimizer_state(run.optimizer, directory)
        with open(os.path.join(directory, TRAIN_STATE), "w") as f:
            json.dump({"epoch": epoch, "seed": run.config["seed"], "history": run.history}, f, indent=1)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory),
                         checkpoint_dir_name=f"epoch_{epoch:04d}")
    _say(run.config, _format_epoch(metrics, run.config["epochs"]))
    # Rewritten whole (object stores cannot append) from the history the checkpoint carries, so
    # it always lists exactly the epochs a resumed run builds on.
    lines = "".join(json.dumps(m, sort_keys=True) + "\n" for m in run.history)
    storage.write_bytes_atomic(storage.join(run.config["output"], METRICS_FILE), lines.encode())


def _format_epoch(m: dict, epochs: int) -> str:
    recall = " ".join(f"{k}={v:.2f}" for k, v in m["val_per_class_recall"].items())
    skipped = m["train_skipped_errors"] + m["val_skipped_errors"]
    return (
        f"[train] epoch {m['epoch']}/{epochs}: train_loss={m['train_loss']:.4f} "
        f"({m['train_clips']} clips, {m['train_clips_per_s']:.1f} clips/s) "
        f"val_accuracy={m['val_accuracy']:.4f} val_macro_f1={m['val_macro_f1']:.4f} "
        f"recall[{recall}] confusion={m['val_confusion']} val_clips={m['val_count']}"
        + (f" skipped_undecodable={skipped}" if skipped else "")
    )


# --- optimizer state as safetensors + JSON --------------------------------------------------


def _save_optimizer_state(optimizer: torch.optim.Optimizer, directory: str) -> None:
    """Split the optimizer's state dict into its tensors (safetensors) and the rest (JSON)."""
    tensors: dict[str, torch.Tensor] = {}
    structure = _split_tensors(optimizer.state_dict(), "", tensors)
    save_file(tensors, os.path.join(directory, OPTIMIZER_TENSORS))
    with open(os.path.join(directory, OPTIMIZER_STATE), "w") as f:
        json.dump(structure, f)


def _load_optimizer_state(directory: str) -> dict:
    tensors = load_file(os.path.join(directory, OPTIMIZER_TENSORS))
    with open(os.path.join(directory, OPTIMIZER_STATE)) as f:
        return _join_tensors(json.load(f), tensors)


def _split_tensors(value: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-able copy of `value` with each tensor replaced by {"__tensor__": key}.

    Dicts are written as [key, value] pairs because JSON object keys are strings only and the
    optimizer's state is keyed by integer parameter indices; tuples come back as lists, which
    torch accepts.
    """
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().cpu().contiguous()
        return {"__tensor__": path}
    if isinstance(value, dict):
        return {"__dict__": [[k, _split_tensors(v, f"{path}.{k}", tensors)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return [_split_tensors(v, f"{path}.{i}", tensors) for i, v in enumerate(value)]
    return value


def _join_tensors(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, dict) and "__tensor__" in value:
        return tensors[value["__tensor__"]]
    if isinstance(value, dict) and "__dict__" in value:
        return {k: _join_tensors(v, tensors) for k, v in value["__dict__"]}
    if isinstance(value, list):
        return [_join_tensors(v, tensors) for v in value]
    return value
