"""Pretrained encoder weights: a separate step from building the model, online or offline.

A source is a local path or a hub id, optionally pinned to a revision with `@` (a branch, a tag,
`refs/pr/N` or a commit hash):
- vision: a .safetensors file, or a directory holding model.safetensors (timm's hub layout, or
  what `groupemotion weights convert` writes); or a hub id, `hf-hub:timm/resnet101d.gluon_in1k`,
  or a timm pretrained tag such as `resnet101d.gluon_in1k` (timm names its hub repository).
- audio: a directory in the `save_pretrained` layout (config.json, model.safetensors, and the
  preprocessor_config.json that says how the waveform was fed), or a hub id such as
  `facebook/hubert-base-ls960@refs/pr/2`.

A hub id is resolved to one commit by huggingface_hub, whose cache then holds (or, offline,
already holds) that commit's safetensors and JSON files: from there on it is a local directory.
We fetch these files ourselves instead of letting timm or transformers do it, because both fall
back to something else when a repository has no model.safetensors at the asked revision: timm
to unpickling pytorch_model.bin, transformers to a conversion on an unmerged hub branch. Here a
missing safetensors file is an error that says what to do. `describe` records the commit and
the sha256 of the weights in run_config.json, so a run names exactly the weights it began from.

Each library's own loader does the rest (timm drops the ImageNet classifier, transformers maps
legacy key names), and the result is copied strictly into the model, so weights of another
architecture or size are refused. Pickle files are refused, never loaded: unpickling runs code.
`groupemotion weights convert` (groupemotion_core.weights.convert) is the explicit step that turns one
into safetensors.

timm and transformers are imported where weights are loaded, not where sources are resolved:
the train driver resolves and records them (`describe`) but never builds a model, and importing
both costs a process about five CPU-seconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError

from groupemotion_core.weights.convert import WEIGHTS_NAME, sha256_file
from groupemotion_core.errors import GroupEmotionError

if TYPE_CHECKING:
    from torch import nn

    from groupemotion_core.model.classifier import GroupEmotionModel

HUB_PREFIX = "hf-hub:"  # optional before a hub id; it marks one where a path is also possible (--model)
# What a hub snapshot fetches: the weights and the JSON that describes them, never a pickle.
HUB_FILES = ("config.json", "preprocessor_config.json", WEIGHTS_NAME)
_PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"}
_LOAD_ERRORS = (OSError, RuntimeError, ValueError, KeyError, SafetensorError)
_CONVERT_HINT = "convert it to safetensors with `groupemotion weights convert SRC DEST`"


@dataclass(frozen=True)
class WeightsSource:
    """A pretrained source resolved to local files, and where they came from."""

    source: str  # as the user wrote it
    path: Path  # a .safetensors file, or a directory holding model.safetensors
    repo: str | None = None  # the hub repository, for a hub id
    revision: str | None = None  # the revision asked for ("main" when none was pinned)
    commit: str | None = None  # the commit the revision resolved to

    @property
    def weights_file(self) -> Path:
        return self.path / WEIGHTS_NAME if self.path.is_dir() else self.path

    def record(self) -> dict[str, Any]:
        """What run_config.json keeps: the source, its hub commit, the sha256 of the weights."""
        return {
            "source": self.source,
            "path": str(self.path.resolve()),
            "repo": self.repo,
            "revision": self.revision,
            "commit": self.commit,
            "sha256": sha256_file(self.weights_file),
        }


def load_pretrained(model: GroupEmotionModel, vision: str | None = None, audio: str | None = None) -> None:
    """Load pretrained weights into the vision backbone and/or HuBERT, in place."""
    if vision is not None:
        _load_vision(model, resolve(vision, "vision"))
    if audio is not None:
        _load_audio(model, resolve(audio, "audio"))


def describe(vision: str | None, audio: str | None) -> dict[str, dict[str, Any] | None]:
    """The resolved sources of a run's pretrained weights (None where there are none)."""
    return {kind: None if source is None else resolve(source, kind).record()
            for kind, source in (("vision", vision), ("audio", audio))}


def resolve(source: str, kind: str) -> WeightsSource:
    """A local path or hub id -> the local safetensors it names (fetched into the hub cache if need be).

    `kind` is "vision" (a file or a directory) or "audio" (a save_pretrained directory).
    """
    path = Path(source).expanduser()
    if path.exists():
        return WeightsSource(source, _local_weights(path, kind, source))
    return resolve_hub(source, kind)


def resolve_hub(source: str, kind: str) -> WeightsSource:
    """A hub id -> the cache's snapshot of the commit it names, which must hold model.safetensors.

    Fine-tuned checkpoints (`--model hf-hub:...`, kind "checkpoint") are resolved here too: the
    same pinning, cache and offline behaviour as the encoders.
    """
    repo, revision = parse_hub_id(source, kind)
    revision = revision or "main"
    snapshot = _fetch(repo, revision, source)
    if not (snapshot / WEIGHTS_NAME).is_file():
        convert = "" if kind == "checkpoint" else f", or download its pickle and {_CONVERT_HINT}"
        raise GroupEmotionError("bad_weights", f"{source}: {repo} has no {WEIGHTS_NAME} at revision {revision} "
                                               f"(commit {snapshot.name}); pin a revision that has one{convert}")
    return WeightsSource(source, snapshot, repo=repo, revision=revision, commit=snapshot.name)


def parse_hub_id(source: str, kind: str) -> tuple[str, str | None]:
    """`[hf-hub:]REPO[@REVISION]` (or, for vision, a timm tag) -> (repository, revision or None)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    name, pinned, revision = source.removeprefix(HUB_PREFIX).partition("@")
    if pinned and not revision:
        raise GroupEmotionError("bad_weights", f"{source}: empty revision after '@'")
    if kind == "vision" and "/" not in name:
        import timm

        cfg = timm.models.get_pretrained_cfg(name)
        if cfg is None or not cfg.hf_hub_id:
            raise GroupEmotionError("bad_weights", f"{source}: not a local path, a hub id, or a timm "
                                                   "pretrained tag with weights on the hub")
        name = cfg.hf_hub_id
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise GroupEmotionError("bad_weights", f"{source}: no such file or directory") from None
    return name, revision or None


def _fetch(repo: str, revision: str, source: str) -> Path:
    """The cache's snapshot directory of `repo` at `revision` (named by its commit hash)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=list(HUB_FILES)))
    except LocalEntryNotFoundError:
        detail = (f"not a local path, and not in the Hugging Face cache ({constants.HF_HUB_CACHE}) "
                  "while the hub cannot be reached; fetch it there first, or give a local path")
    except RevisionNotFoundError:
        detail = f"the hub repository {repo} has no revision {revision}"
    except RepositoryNotFoundError:
        detail = f"no hub repository {repo} (or it is private or gated and no token is set)"
    except (OSError, ValueError) as e:
        detail = _one_line(e)
    raise GroupEmotionError("bad_weights", f"{source}: {detail}")


def _local_weights(path: Path, kind: str, source: str) -> Path:
    """Check that `path` holds safetensors weights of the right layout for `kind`; return it."""
    if path.is_file() and path.suffix in _PICKLE_SUFFIXES:
        raise GroupEmotionError("bad_weights", f"{source} is a pickle file; only safetensors weights are "
                                               f"loaded: {_CONVERT_HINT}")
    if kind == "audio" and not path.is_dir():
        raise GroupEmotionError("bad_weights", f"{source}: audio weights are a save_pretrained directory")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise GroupEmotionError("bad_weights", f"{source}: not a .safetensors file")
        return path
    if not (path / WEIGHTS_NAME).is_file():
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        hint = f"; it holds {', '.join(pickles)}: {_CONVERT_HINT}" if pickles else ""
        raise GroupEmotionError("bad_weights", f"{source}: no {WEIGHTS_NAME} in {path}{hint}")
    return path


def _load_vision(model: GroupEmotionModel, weights: WeightsSource) -> None:
    import timm
    from timm.models._hub import load_model_config_from_path

    cfg = model.config.vision
    overlay: dict[str, Any] = {"file": str(weights.weights_file)}
    try:
        if (weights.path / "config.json").is_file():
            # timm's hub layout: the architecture and the pixel statistics the weights were
            # trained with. Without it (a bare file), the backbone's default tag's statistics.
            try:
                pretrained_cfg, architecture, _ = load_model_config_from_path(weights.path)
            except KeyError:
                raise GroupEmotionError("bad_weights", f"{weights.source}: its config.json is not a timm "
                                                       "model config") from None
            if architecture != cfg.backbone:
                raise GroupEmotionError("bad_weights", f"{weights.source} holds {architecture} weights; "
                                                       f"the model's backbone is {cfg.backbone}")
            overlay.update(mean=pretrained_cfg["mean"], std=pretrained_cfg["std"])
        pretrained = timm.create_model(cfg.backbone, pretrained=True, num_classes=0, global_pool="",
                                       pretrained_cfg_overlay=overlay, **cfg.model_kwargs)
        _copy_strict(pretrained, model.vision.backbone, weights.source)
        model.vision.set_normalization(pretrained.pretrained_cfg["mean"], pretrained.pretrained_cfg["std"])
    except _LOAD_ERRORS as e:
        raise GroupEmotionError("bad_weights", f"vision weights {weights.source}: {_one_line(e)}") from None


def _load_audio(model: GroupEmotionModel, weights: WeightsSource) -> None:
    from transformers import HubertModel

    try:
        # use_safetensors=True: transformers refuses a directory holding only pickles.
        pretrained = HubertModel.from_pretrained(str(weights.path), use_safetensors=True)
        _copy_strict(pretrained, model.audio.hubert, weights.source)
        _adopt_feature_extractor_settings(model, weights.path)
    except _LOAD_ERRORS as e:
        raise GroupEmotionError("bad_weights", f"audio weights {weights.source}: {_one_line(e)}") from None


def _adopt_feature_extractor_settings(model: GroupEmotionModel, directory: Path) -> None:
    """Feed HuBERT the waveform the way its checkpoint was trained on, per its own preprocessor config.

    A checkpoint's preprocessor_config.json says whether its waveforms were normalised to zero
    mean and unit variance and whether it takes an attention mask; the settings are written into
    the model config too, so every fine-tuned checkpoint carries them. A source without that file
    keeps the config's settings.
    """
    if not (directory / "preprocessor_config.json").is_file():
        return
    from transformers import Wav2Vec2FeatureExtractor

    extractor = Wav2Vec2FeatureExtractor.from_pretrained(str(directory))
    audio_cfg = model.config.audio
    audio_cfg.do_normalize = model.audio.do_normalize = bool(extractor.do_normalize)
    audio_cfg.use_attention_mask = model.audio.use_attention_mask = bool(extractor.return_attention_mask)


def _copy_strict(source: nn.Module, target: nn.Module, name: str) -> None:
    """Copy every tensor, or refuse with a one-line summary of what does not fit."""
    theirs, ours = source.state_dict(), target.state_dict()
    missing = sorted(ours.keys() - theirs.keys())
    unexpected = sorted(theirs.keys() - ours.keys())
    reshaped = sorted(k for k in ours.keys() & theirs.keys() if ours[k].shape != theirs[k].shape)
    if missing or unexpected or reshaped:
        parts = [f"{len(keys)} {what} (e.g. {keys[0]})"
                 for what, keys in (("missing", missing), ("unexpected", unexpected), ("of another shape", reshaped))
                 if keys]
        raise GroupEmotionError("bad_weights", f"{name} does not fit this model's config: "
                                               f"tensors {', '.join(parts)}")
    target.load_state_dict(theirs, strict=True)


def _one_line(error: BaseException) -> str:
    """A library's message on one line: its first two lines (torch's load errors put the first
    mismatch on the second), and how many more there were."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    more = f" (+{len(lines) - 2} more)" if len(lines) > 2 else ""
    return " ".join(lines[:2]) + more

