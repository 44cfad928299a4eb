"""Write a page about a labelling run: what the job found, how confident it was, what failed.

    groupemotion report LABELS --out DIR [--top K] [--timelines N] [--examples N]

LABELS is the OUTPUT of `groupemotion infer` (a local folder or an s3:// prefix), finished or
not: the page shows the units committed so far. DIR (a local folder) receives:

    index.html        open it in a browser; the pictures below sit beside it
    labels.png        videos per label, and failed videos
    confidence.png    per class, a histogram of the confidence of the videos given that label
    timelines.png     the N longest videos window by window: each window's three class
                      probabilities across its time span (absent when every video is one window)
    contact-<class>.jpg  the K most confident videos of each class: the frames of each one's most
                      confident window, decoded again from the inputs with the run's settings
    report.json       the same figures for a program: counts, histograms, errors, videos shown

The page also lists the error reasons (videos that got no label, windows that failed) with their
counts and the first examples, and the run's model and options (`_job.json`) and its summary
(`_SUCCESS`; without one, the run had not finished).

It reads the Parquet in streaming batches, only the columns it shows, and keeps fixed-size
results (counts, histograms, the top K): a million videos take seconds and a few hundred MiB,
whatever the output's size. It needs no Ray cluster. The videos on the contact sheet are read from
where the job read them; one that is gone shows its reason in place of its frames.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from groupemotion_core.errors import GroupEmotionError
from groupemotion_core.schema import CLASSES
from ray_jobs.commands.args import int_between
from ray_jobs.inputs import storage
from ray_jobs.report import figures, frames, page
from ray_jobs.report.scan import Scan, check_output, scan
from ray_jobs.sinks import labels

MAX_RUN_FILE_BYTES = 16 << 20  # _job.json and _SUCCESS are small; anything larger is not ours


def report(output: str, out_dir: str, *, top: int = 4, timelines: int = 6, examples: int = 3,
           on_rows=lambda n: None) -> dict:
    """Write the report of labels `output` into `out_dir`; return report.json's content."""
    started = time.monotonic()
    check_output(output)
    run = {"job": _read_json(storage.join(output, labels.JOB_FILE)),
           "success": _read_json(storage.join(output, labels.SUCCESS_FILE))}
    result = scan(output, top=top, timelines=timelines, examples=examples, on_rows=on_rows)
    os.makedirs(out_dir, exist_ok=True)
    for name in ("timelines.png", *(_contact_name(c) for c in CLASSES)):  # an earlier report's, maybe not drawn now
        if os.path.exists(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))
    pictures = {"labels": "labels.png", "confidence": "confidence.png"}
    figures.label_counts(result, os.path.join(out_dir, pictures["labels"]))
    figures.confidence_histograms(result, os.path.join(out_dir, pictures["confidence"]))
    if result.longest:
        pictures["timelines"] = "timelines.png"
        figures.timelines(result, os.path.join(out_dir, pictures["timelines"]))
    contacts = _contact_sheets(result, run, out_dir, pictures)
    generated = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    with open(os.path.join(out_dir, "index.html"), "w", encoding="utf-8") as f:
        f.write(page.render(output, result, run, pictures, generated))
    summary = {"output": output, **result.to_dict(), "contact_sheets": contacts, "run": run,
               "pictures": pictures, "elapsed_s": round(time.monotonic() - started, 3)}
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")
    return summary


def _contact_sheets(result: Scan, run: dict, out_dir: str, pictures: dict[str, str]) -> dict[str, list[dict]]:
    """Decode the most confident videos again and draw a sheet per class; return what each row shows."""
    spec = frames.page_spec((run["job"] or {}).get("decode_spec"))
    starts = {key: result.best_windows.get(key, {}).get("start_s", 0.0)
              for items in result.most_confident.values() for _, key in items}
    decoded = frames.decode_frames(starts, spec) if starts else {}
    shown = {}
    for cls in CLASSES:
        entries = [{"key": key, "confidence": confidence, "window": result.best_windows.get(key),
                    "frames": decoded[key]} for confidence, key in result.most_confident.get(cls, [])]
        if not entries:
            continue
        name = _contact_name(cls)
        figures.contact_sheet(cls, entries, os.path.join(out_dir, name), spec.frame_size)
        pictures[f"contact:{cls}"] = name
        shown[cls] = [{"key": e["key"], "confidence": e["confidence"], "window": e["window"],
                       "error": e["frames"] if isinstance(e["frames"], str) else None} for e in entries]
    return shown


def _contact_name(cls: str) -> str:
    return f"contact-{cls.lower()}.jpg"


def _read_json(uri: str) -> dict | None:
    if not storage.exists(uri):
        return None
    try:
        return json.loads(storage.read_bytes(uri, max_bytes=MAX_RUN_FILE_BYTES))
    except ValueError as e:
        raise GroupEmotionError("bad_output", f"{uri} is not JSON: {e}") from None


# --- command line ----------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    count = int_between(0, 100)
    parser.add_argument("labels", metavar="LABELS", help="the OUTPUT folder or s3:// prefix of `groupemotion infer`")
    parser.add_argument("--out", required=True, metavar="DIR", help="local folder for index.html and its pictures")
    parser.add_argument("--top", type=count, default=4, metavar="K",
                        help="videos per class on the contact sheets (default: 4)")
    parser.add_argument("--timelines", type=count, default=6, metavar="N",
                        help="longest videos shown window by window (default: 6)")
    parser.add_argument("--examples", type=count, default=3, metavar="N",
                        help="examples shown per error reason (default: 3)")


def run(args: argparse.Namespace) -> int:
    if storage.is_remote(args.out):
        raise GroupEmotionError("bad_uri", f"--out {args.out}: the report is written to a local folder")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise GroupEmotionError("bad_out", f"--out {args.out} is a file, not a folder")
    from ray_jobs.runtime.console import Progress

    progress: list[Progress] = []  # started with the first rows: a refused LABELS prints only its error

    def on_rows(n: int) -> None:
        progress[:] = progress or [Progress("report", None, "rows")]
        progress[0].advance(n)

    try:
        summary = report(args.labels, args.out, top=args.top, timelines=args.timelines, examples=args.examples,
                         on_rows=on_rows)
    finally:
        for p in progress:
            p.close()
    counts = ", ".join(f"{name} {count:,}" for name, count in summary["labels"].items())
    print(f"report: {summary['videos']:,} videos ({counts}, failed {summary['failed']:,}) in "
          f"{summary['elapsed_s']:.1f} s: {os.path.abspath(os.path.join(args.out, 'index.html'))}", flush=True)
    return 0


if __name__ == "__main__":
    from ray_jobs.cli import entrypoint

    entrypoint("report")
