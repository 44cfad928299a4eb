"""Resolving `--model REF` into a model: a checkpoint directory or URI, a hub id, or a random preset.

Jobs take one string for the model, so a checkpoint that `groupemotion train` wrote to s3:// is
used as it is. `hf-hub:OWNER/REPO[@REVISION]` is a checkpoint on the Hugging Face hub (the folder
`train` exports, uploaded as it is), resolved by `groupemotion_core.weights.pretrained` like the
pretrained encoders: to one commit, safetensors and JSON only, from the HF cache when offline
(HF_HUB_OFFLINE=1). `preset:tiny` / `preset:paper` build the preset with random weights, for smoke
tests and throughput benchmarks: its labels mean nothing, and a loud warning on stderr says so.

There are two entry points because the driver and the actors need different things:
`describe_model_ref` reads only the config (the driver needs the decode geometry and the model
id, not the weights), `load_model_ref` builds the model (once per actor). A random preset is
built under a fixed seed, so every actor of a pool holds the same weights and a clip gets the
same answer whichever actor labels it. The info's `pinned_ref` is what the actors load: a hub id
pinned to the commit the driver resolved (a branch that moves while they start cannot give them
other weights than the job records), the ref itself otherwise.

A remote checkpoint is downloaded into a per-machine cache named after its URI and model id;
the download goes to a temporary folder that is renamed into place (or deleted when the store
fails midway), so actors starting side by side on one node never see half a checkpoint. Storage
failures leave as `storage.StorageError`, the driver's first one (reading config.json) before
Ray starts.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import uuid
from typing import Any

from groupemotion_core.model.config import ModelConfig, preset
from groupemotion_core.errors import GroupEmotionError
from groupemotion_core.schema import CLASSES
from ray_jobs.inputs import storage

PRESET_PREFIX = "preset:"
PRESET_SEED = 0
CONFIG_FILE = "config.json"  # written by groupemotion_core.weights.checkpoint.save_checkpoint
CACHE_ENV = "GROUPEMOTION_MODEL_CACHE"  # where remote checkpoints are cached (default: the temp dir)


def describe_model_ref(ref: str) -> tuple[ModelConfig, dict[str, Any]]:
    """The model config and info (`model_id`, `labels`, `ref`, `pinned_ref`, and `hub`: the hub
    commit and weights' sha256 for a hub id, else None) behind REF, without any weights."""
    if _preset_name(ref) is not None:
        cfg = _preset_config(ref)
        return cfg, _preset_info(ref, cfg)
    hub = _hub_source(ref)
    meta = _read_config_json(ref if hub is None else str(hub.path))
    try:
        cfg = ModelConfig.from_dict(meta["model"])
        model_id = str(meta["model_id"])
    except KeyError as e:
        raise GroupEmotionError("bad_checkpoint", f"{ref}: {CONFIG_FILE} has no {e.args[0]!r}") from None
    info = {"model_id": model_id, "labels": list(meta.get("labels", cfg.labels)), "ref": ref,
            "pinned_ref": ref if hub is None else f"hf-hub:{hub.repo}@{hub.commit}",
            "hub": None if hub is None else hub.record()}
    _check_labels(ref, info["labels"])
    return cfg, info


def load_model_ref(ref: str, *, warn: bool = True):
    """REF -> (GroupEmotionModel in eval mode, info dict with at least `model_id` and `labels`).

    REF is a checkpoint directory, a checkpoint URI (s3://...), a hub id (hf-hub:OWNER/REPO[@REV]),
    or `preset:NAME` for random weights (with a warning on stderr unless `warn` is False). Bad refs raise GroupEmotionError.
    """
    import torch

    from groupemotion_core.model.classifier import GroupEmotionModel

    if _preset_name(ref) is not None:
        cfg = _preset_config(ref)
        if warn:
            warn_random_weights(ref)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(PRESET_SEED)
            model = GroupEmotionModel(cfg)
        info = _preset_info(ref, cfg)
    else:
        from groupemotion_core.weights.checkpoint import load_checkpoint

        model, meta = load_checkpoint(_local_checkpoint_dir(ref))
        info = {**meta, "labels": list(meta.get("labels", model.config.labels)), "ref": ref}
        if not info.get("model_id"):
            raise GroupEmotionError("bad_checkpoint", f"{ref}: the checkpoint has no model_id")
        _check_labels(ref, info["labels"])
    model.eval()
    return model, info


def warn_random_weights(ref: str) -> None:
    bar = "!" * 78
    print(
        f"{bar}\nWARNING: --model {ref} has RANDOMLY INITIALISED weights.\n"
        "Its labels are meaningless: use it only for smoke tests and throughput benchmarks.\n"
        f"{bar}",
        file=sys.stderr,
        flush=True,
    )


def _preset_name(ref: str) -> str | None:
    return ref[len(PRESET_PREFIX) :] if ref.startswith(PRESET_PREFIX) else None


def _preset_config(ref: str) -> ModelConfig:
    try:
        return preset(_preset_name(ref))
    except GroupEmotionError as e:
        raise GroupEmotionError("bad_model_ref", f"{ref}: {e.detail}") from None


def _preset_info(ref: str, cfg: ModelConfig) -> dict[str, Any]:
    return {"model_id": f"{ref}-random", "labels": list(cfg.labels), "ref": ref, "pinned_ref": ref, "hub": None}


def _hub_source(ref: str):
    """The hub snapshot (`pretrained.WeightsSource`) that a `hf-hub:` REF names, or None for another REF."""
    from groupemotion_core.weights.pretrained import HUB_PREFIX, resolve_hub

    return resolve_hub(ref, "checkpoint") if ref.startswith(HUB_PREFIX) else None


def _check_labels(ref: str, labels: list[str]) -> None:
    # The output has one probability column per class in CLASSES order (WindowRow and VideoRow.SCHEMA).
    if list(labels) != list(CLASSES):
        raise GroupEmotionError(
            "bad_checkpoint", f"{ref}: labels {labels} differ from {list(CLASSES)} (the output's columns)"
        )


def _read_config_json(ref: str) -> dict[str, Any]:
    # The checkpoint format's own bound; imported here because that module pulls in torch.
    from groupemotion_core.weights.checkpoint import MAX_CONFIG_BYTES

    if not ref:
        raise GroupEmotionError("bad_model_ref", "empty --model; give a checkpoint directory, URI or preset:NAME")
    uri = storage.join(ref, CONFIG_FILE)
    if not storage.exists(uri):
        raise GroupEmotionError(
            "bad_checkpoint", f"{ref}: no {CONFIG_FILE} there; expected a checkpoint directory or preset:tiny|paper"
        )
    try:
        meta = json.loads(storage.read_bytes(uri, max_bytes=MAX_CONFIG_BYTES))
    except ValueError as e:
        raise GroupEmotionError("bad_checkpoint", f"{uri} is not JSON: {e}") from None
    if not isinstance(meta, dict):
        raise GroupEmotionError("bad_checkpoint", f"{uri} is not a JSON object")
    return meta


def _local_checkpoint_dir(ref: str) -> str:
    """A local directory holding REF's files: REF itself, its hub snapshot, or a cached download of it."""
    hub = _hub_source(ref)
    if hub is not None:
        return str(hub.path)
    model_id = describe_model_ref(ref)[1]["model_id"]
    if not storage.is_remote(ref):
        return storage.filesystem(ref)[1]
    cache_root = os.environ.get(CACHE_ENV) or os.path.join(tempfile.gettempdir(), "groupemotion-models")
    name = hashlib.sha1(f"{ref}\n{model_id}".encode()).hexdigest()[:16]
    target = os.path.join(cache_root, name)
    if os.path.isfile(os.path.join(target, CONFIG_FILE)):
        return target
    tmp = f"{target}.tmp-{uuid.uuid4().hex}"
    try:
        storage.download_dir(ref, tmp)
    except BaseException:  # the store failed midway (a StorageError): leave no half checkpoint behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.rename(tmp, target)
    except OSError:  # another process on this machine finished the same download first
        shutil.rmtree(tmp, ignore_errors=True)
    return target
