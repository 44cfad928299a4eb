"""Evaluate a model on labelled clips: metrics JSON, a confusion-matrix picture and a per-class table.

    groupemotion eval DATA... --model REF --report DIR [--labels CSV] [--uri-column NAME] [--windows all|first]
                      [--stride S] [--max-windows K] [--batch-size N] [--actors N]
                      [--gpus-per-actor F] [--decode-cpus N] [--stall-timeout S] [--verbose]

DATA takes the inputs of `groupemotion infer` (tar shards carry their labels; plain videos take
them from --labels, a VGAF-style CSV, or from class-named folders; a table of videos takes them
from its `label` column, a class name or a VGAF number, and its URIs from `uri` or
--uri-column). The videos go through the very
prediction pipeline of `infer` (`ray_jobs.predict.pipeline`), windows and all, so a score describes the
job that labels production data, decoder included. Scores are per video: a video's prediction is
its `videos/` label in `infer`, the mean of its windows' probabilities weighted by window length
(`groupemotion_core.videos.video_row`). The window options are infer's (default: every window of the video; a
VGAF 5 s clip is one window). Only the small prediction rows come back to the driver, which holds
the rows of the videos in flight.

DIR (a local folder, or an s3:// prefix on a cluster, where the driver's disk is not where
anyone looks) receives three files, each written atomically, after every video was scored:

    metrics.json          `groupemotion_core.model.training.classification_metrics` over the videos with
                          a known label and at least one labelled window, plus precision/F1 per
                          class, the model id (and for a hub model its commit), the data, the window plan, and how many videos were
                          unlabelled or failed (errors by reason; failed windows apart)
    confusion_matrix.png  as the paper's Fig. 2: counts and row-normalised percentages, true class
                          on the rows, predicted class on the columns
    per_class.csv         class, support, recall, precision, f1

Failed videos are not scored (they are counted in metrics.json), since a video that cannot be
decoded has no prediction to be right or wrong about. A video the object store failed to serve
after its retries is another matter: a score without it would describe other data, so the
evaluation then writes no report and ends with `error: <reason>: ...` (exit status 75 for
`storage_unavailable`), to be run again. Like `infer`, it stops with `error: stalled: ...` after
`--stall-timeout` seconds without progress (a lost node the cluster does not replace).
"""

from __future__ import annotations

import argparse
import collections
import csv
import io
import json
import os
import time
from dataclasses import asdict

import numpy as np

from groupemotion_core.errors import GroupEmotionError, error_reason, split_error
from groupemotion_core.schema import CLASSES, UNKNOWN_LABEL, ClipRow, VideoRow, label_index
from groupemotion_core.media.spec import WindowPlan
from groupemotion_core.videos import TRUTH, VideoCollector, error_counts, video_row
from ray_jobs.predict import pipeline
from ray_jobs.inputs import storage
from ray_jobs.commands.args import add_prediction_arguments, add_stall_argument, prediction_options, window_plan
from ray_jobs.runtime.watchdog import DEFAULT_STALL_TIMEOUT_S, exit_in_bounded_time
from ray_jobs.inputs.tables import URI_COLUMN, check


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_prediction_arguments(parser)
    parser.add_argument("--report", required=True, metavar="DIR",
                        help="where the report goes: a local folder or an s3:// prefix")
    parser.add_argument("--labels", metavar="CSV", help="labels CSV for plain videos (VGAF layout)")
    add_stall_argument(parser)


def run(args: argparse.Namespace) -> int:
    with exit_in_bounded_time():
        metrics = evaluate(args.inputs, args.model, args.report, prediction_options(args),
                           plan=window_plan(args), labels_csv=args.labels, uri_column=args.uri_column,
                           verbose=args.verbose, stall_timeout_s=args.stall_timeout)
    print(format_table(metrics), flush=True)
    report = args.report if storage.is_remote(args.report) else os.path.abspath(args.report)
    print(f"report: {report}", flush=True)
    return 0


def evaluate(
    data: list[str],
    model_ref: str,
    report_dir: str,
    options: pipeline.PredictOptions = pipeline.PredictOptions(),
    *,
    plan: WindowPlan = WindowPlan(),
    labels_csv: str | None = None,
    uri_column: str = URI_COLUMN,
    verbose: bool = False,
    stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S,
) -> dict:
    """Predict every video of `data`, score the labelled ones, write the report; return metrics.json."""
    from groupemotion_core.model.training import classification_metrics
    from ray_jobs.runtime.console import Progress
    from ray_jobs.predict.model_ref import describe_model_ref, warn_random_weights
    from ray_jobs.runtime.session import ensure_ray
    from ray_jobs.inputs.sources import list_inputs

    started = time.monotonic()
    cfg, info = describe_model_ref(model_ref)
    if model_ref.startswith("preset:"):
        warn_random_weights(model_ref)
    uris = list_inputs(data)
    check(uris, uri_column)  # a table's mistakes show before Ray starts
    ensure_ray(verbose=verbose)
    predictions = pipeline.predict(uris, info["pinned_ref"], cfg.decode_spec(), plan, options.resolved(),
                                   labels_csv=labels_csv, uri_column=uri_column)

    y_true, y_pred = [], []
    errors, window_errors = collections.Counter(), collections.Counter()
    videos = windows = 0
    unread: list[str] = []  # videos the object store failed to serve
    collector = VideoCollector()
    progress = Progress("eval", pipeline.video_count(uris), "videos")
    try:
        for batch in pipeline.driver_batches(predictions, stall_timeout_s):
            for row in batch.to_pylist():
                rows = collector.add(row)
                if rows is None:
                    continue
                video = video_row(rows)
                if storage.is_storage_failure(video[VideoRow.ERROR]):
                    unread.append(video[VideoRow.ERROR])
                videos += 1
                windows += video[VideoRow.WINDOWS]
                window_errors.update(error_counts(r for r in rows if ClipRow.is_window(r[ClipRow.WINDOW])))
                if video[VideoRow.ERROR] is not None:
                    errors[error_reason(video[VideoRow.ERROR])] += 1
                elif video[TRUTH] != UNKNOWN_LABEL:
                    y_true.append(int(video[TRUTH]))
                    y_pred.append(label_index(video[VideoRow.LABEL]))
                progress.advance(1, windows=video[VideoRow.WINDOWS], errors=int(video[VideoRow.ERROR] is not None))
    finally:
        progress.close()
    pipeline.log_stats(predictions)
    if unread:
        reason, detail = split_error(unread[0])
        raise GroupEmotionError(reason, f"{len(unread)} of {videos} videos could not be read from the object "
                                f"store after retries (first: {detail}); no report written; run it again")
    if not y_true:
        raise GroupEmotionError(
            "no_labels",
            f"none of the {videos} videos has a known label and a labelled window; pass --labels CSV for plain videos",
        )
    metrics = classification_metrics(y_true, y_pred, labels=CLASSES)
    confusion = np.array(metrics["confusion"])
    metrics.update(
        per_class=per_class(confusion),
        model_id=info["model_id"],
        model_ref=model_ref,
        model_hub=info["hub"],
        data=list(data),
        labels_csv=labels_csv,
        window_plan=asdict(plan),
        videos=videos,
        windows=windows,
        unlabelled=videos - len(y_true) - sum(errors.values()),
        errors=dict(errors),
        window_errors=dict(window_errors),
        seconds=round(time.monotonic() - started, 3),
    )
    files = {
        "metrics.json": (json.dumps(metrics, indent=2) + "\n").encode(),
        "per_class.csv": per_class_csv(metrics["per_class"]),
        "confusion_matrix.png": plot_confusion(confusion, metrics),
    }
    for name, data in files.items():
        storage.write_bytes_atomic(storage.join(report_dir, name), data)
    return metrics


def per_class(confusion: np.ndarray) -> list[dict]:
    """Support, recall, precision and F1 of each class from a confusion matrix (rows = true)."""
    hits = np.diag(confusion).astype(float)
    support, predicted = confusion.sum(axis=1), confusion.sum(axis=0)
    recall = np.divide(hits, support, out=np.zeros(len(hits)), where=support > 0)
    precision = np.divide(hits, predicted, out=np.zeros(len(hits)), where=predicted > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(len(hits)), where=precision + recall > 0)
    return [
        {"class": c, "support": int(s), "recall": float(r), "precision": float(p), "f1": float(f)}
        for c, s, r, p, f in zip(CLASSES, support, recall, precision, f1)
    ]


def per_class_csv(rows: list[dict]) -> bytes:
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=["class", "support", "recall", "precision", "f1"])
    writer.writeheader()
    writer.writerows({**r, **{k: f"{r[k]:.4f}" for k in ("recall", "precision", "f1")}} for r in rows)
    return text.getvalue().encode()


def plot_confusion(confusion: np.ndarray, metrics: dict) -> bytes:
    """The paper's Fig. 2 as PNG bytes: each cell shows its count and its share of the true
    class's clips."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    support = confusion.sum(axis=1, keepdims=True)
    shares = np.divide(confusion, support, out=np.zeros(confusion.shape), where=support > 0)
    fig, ax = plt.subplots(figsize=(5.5, 4.8), dpi=120, layout="constrained")
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    for i in range(confusion.shape[0]):
        for j in range(confusion.shape[1]):
            colour = "white" if shares[i, j] > 0.5 else "black"
            ax.text(j, i, f"{confusion[i, j]}\n{100 * shares[i, j]:.1f}%", ha="center", va="center", color=colour)
    ax.set_xticks(range(len(CLASSES)), CLASSES)
    ax.set_yticks(range(len(CLASSES)), CLASSES)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"accuracy {100 * metrics['accuracy']:.1f}%, macro-F1 {metrics['macro_f1']:.3f}, n={metrics['count']}")
    png = io.BytesIO()
    fig.savefig(png, format="png")
    plt.close(fig)
    return png.getvalue()


def format_table(metrics: dict) -> str:
    lines = [f"{'class':<10} {'support':>8} {'recall':>8} {'precision':>10} {'f1':>8}"]
    for r in metrics["per_class"]:
        lines.append(f"{r['class']:<10} {r['support']:>8} {r['recall']:>8.3f} {r['precision']:>10.3f} {r['f1']:>8.3f}")
    lines.append(
        f"accuracy {metrics['accuracy']:.3f}  macro-F1 {metrics['macro_f1']:.3f}  scored {metrics['count']} of "
        f"{metrics['videos']} videos ({metrics['unlabelled']} unlabelled, {sum(metrics['errors'].values())} failed)"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    from ray_jobs.cli import entrypoint

    entrypoint("eval")
