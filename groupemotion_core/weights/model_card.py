"""The model card (`README.md`) that `groupemotion train` writes beside the exported checkpoint.

With it the exported folder is a Hugging Face model repository as it stands (`hf upload REPO
DIR`): the card's YAML header is the hub's metadata (tags, the encoders it started from as
`base_model`, the validation scores as a `model-index`), and its text says what a reader needs to
trust or reuse the weights: the model and where it comes from (the paper), the data it was trained
and validated on, the training settings and pretrained sources (hub commits included), the scores
of the exported epoch, and how to label videos with it. huggingface_hub's ModelCard writes the
header, so it is the YAML the hub reads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from groupemotion_core.schema import CLASSES

CARD_NAME = "README.md"
PAPER = ("Lev Evtodienko, *Multimodal end-to-end group emotion recognition using cross-modal attention*, "
         "[arXiv:2111.05890](https://arxiv.org/abs/2111.05890) (2021)")
BIBTEX = """@article{evtodienko2021multimodal,
  title   = {Multimodal End-to-End Group Emotion Recognition using Cross-Modal Attention},
  author  = {Evtodienko, Lev},
  journal = {arXiv preprint arXiv:2111.05890},
  year    = {2021}
}"""


def write_model_card(directory: str | os.PathLike, run_config: dict[str, Any], metrics: dict[str, Any]) -> Path:
    """Write DIRECTORY/README.md for the checkpoint in DIRECTORY (its config.json names the model).

    `run_config` is train's run_config.json (model, data, training, pretrained, versions);
    `metrics` is the exported epoch's line of metrics.jsonl.
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    from groupemotion_core.weights.checkpoint import CONFIG_NAME, MAX_CONFIG_BYTES

    directory = Path(directory)
    with open(directory / CONFIG_NAME, "rb") as f:
        model_id = json.loads(f.read(MAX_CONFIG_BYTES))["model_id"]
    validation = ", ".join(run_config["data"]["val"])
    scores = [("accuracy", "Accuracy", metrics["val_accuracy"]), ("f1", "Macro F1", metrics["val_macro_f1"])]
    card_data = ModelCardData(
        model_name=f"groupemotion-{model_id}",
        library_name="groupemotion",
        pipeline_tag="video-classification",
        tags=["group-emotion-recognition", "audio-visual", "emotion-recognition", "hubert", "timm", "groupemotion"],
        base_model=[p["repo"] for p in run_config["pretrained"].values() if p and p.get("repo")] or None,
        metrics=[metric for metric, _, _ in scores],
        eval_results=[
            EvalResult(task_type="video-classification", task_name="Group emotion recognition",
                       dataset_type="custom", dataset_name=validation, dataset_split="validation",
                       metric_type=metric, metric_name=name, metric_value=round(float(value), 4))
            for metric, name, value in scores
        ],
    )
    card = ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{_body(model_id, run_config, metrics)}")
    path = directory / CARD_NAME
    tmp = directory / (CARD_NAME + ".tmp")
    card.save(tmp)
    os.replace(tmp, path)
    return path


def _body(model_id: str, run_config: dict[str, Any], metrics: dict[str, Any]) -> str:
    model, data, training = run_config["model"], run_config["data"], run_config["training"]
    vision, audio = model["vision"], model["audio"]
    recall = metrics["val_per_class_recall"]
    confusion = metrics["val_confusion"]
    lines = [
        f"# groupemotion model `{model_id}`",
        "",
        "Recognises the emotion of a group of people in a video, Negative, Neutral or Positive, from its "
        f"pictures and its sound together: the end-to-end audio-visual network of {PAPER}. HuBERT "
        f"({audio['hidden_size']} wide, {audio['num_hidden_layers']} layers) reads the raw 16 kHz waveform, a timm "
        f"`{vision['backbone']}` reads {model['num_frames']} frames of each {model['clip_seconds']:g} s window, "
        "and self- and cross-modal attention fuse the two; every layer was fine-tuned end to end by "
        "`groupemotion train`.",
        "",
        f"The model id `{model_id}` is the start of the sha256 of `model.safetensors`; every label it writes "
        "carries it.",
        "",
        "## Use",
        "",
        f"Label videos (every {model['clip_seconds']:g} s window, and each video as a whole) into Parquet "
        "on a Ray cluster, or on this machine:",
        "",
        "```bash",
        "groupemotion infer VIDEOS... --model hf-hub:OWNER/REPO@REVISION --output OUT",
        "```",
        "",
        "or one video from Python:",
        "",
        "```python",
        "from groupemotion_core import Labeller",
        "labeller = Labeller.load(\"hf-hub:OWNER/REPO@REVISION\")  # or the folder this card is in",
        "result = labeller.label(\"video.mp4\")",
        "print(result.label, result.probabilities)",
        "```",
        "",
        "## Validation results",
        "",
        f"The exported epoch, {metrics['epoch']} of {training['epochs']}, was the best by validation "
        f"accuracy, on {metrics['val_count']} labelled clips (the first window of each):",
        "",
        "| metric | value |",
        "| --- | --- |",
        f"| accuracy | {metrics['val_accuracy']:.4f} |",
        f"| macro F1 | {metrics['val_macro_f1']:.4f} |",
        *[f"| recall {name} | {recall[name]:.4f} |" for name in CLASSES if name in recall],
        "",
        "Confusion matrix (rows: true class, columns: predicted):",
        "",
        "| | " + " | ".join(CLASSES) + " |",
        "| --- |" + " --- |" * len(CLASSES),
        *[f"| {name} | " + " | ".join(str(c) for c in row) + " |" for name, row in zip(CLASSES, confusion)],
        "",
        "## Training",
        "",
        f"- training data: {', '.join(f'`{uri}`' for uri in data['train'])}",
        f"- validation data: {', '.join(f'`{uri}`' for uri in data['val'])}",
        f"- pretrained encoders: {_pretrained(run_config['pretrained'])}",
        f"- {training['epochs']} epochs, Adam at lr {training['lr']:g} ({_encoder_lr(run_config['pretrained'])}), label "
        f"smoothing 0.2, effective batch {training['effective_batch_size']} ({training['workers']} "
        f"workers x {training['batch_size_per_worker']} x {training['grad_accum']} accumulated), seed "
        f"{training['seed']}, {'GPUs with bf16 autocast' if training['gpu'] else 'CPUs'}",
        f"- versions: {', '.join(f'{k} {v}' for k, v in sorted(run_config.get('versions', {}).items()))}",
        "",
        "## Model configuration",
        "",
        "As in `config.json` (`model`); the labels are the logits' order: " + ", ".join(CLASSES) + ".",
        "",
        "```json",
        json.dumps(model, indent=2, sort_keys=True),
        "```",
        "",
        "## Citation",
        "",
        "```bibtex",
        BIBTEX,
        "```",
        "",
    ]
    return "\n".join(lines)


def _encoder_lr(pretrained: dict[str, Any]) -> str:
    """The rule of `model.training.encoder_lr_scale`, said here without importing it (that module
    imports timm and transformers, which the train driver never loads)."""
    return "encoders at lr x 1e-2" if any(pretrained.values()) else "random encoders at the same lr"


def _pretrained(pretrained: dict[str, Any]) -> str:
    parts = []
    for kind in ("vision", "audio"):
        source = pretrained.get(kind)
        if source is None:
            parts.append(f"{kind}: none (random initialisation)")
        elif source.get("commit"):
            parts.append(f"{kind}: `{source['repo']}` at commit `{source['commit']}`")
        else:
            parts.append(f"{kind}: `{source['source']}` (sha256 `{source['sha256'][:12]}`)")
    return "; ".join(parts)
