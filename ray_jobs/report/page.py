"""The report's HTML: one static page, no script, its pictures beside it by relative name.

Everything that comes from the run (keys, error texts, options) is escaped: a video's name is
untrusted text.
"""

from __future__ import annotations

import json
from html import escape

from groupemotion_core.schema import CLASSES
from ray_jobs.report.scan import Scan

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1320px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 1em 0; } td, th { border: 1px solid #ddd; padding: 4px 8px;
text-align: left; vertical-align: top; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
code, pre { font-family: ui-monospace, monospace; font-size: 14px; } pre { background: #f6f6f6; padding: 0.6em; overflow-x: auto; }
img { max-width: 100%; height: auto; display: block; margin: 0.5em 0; } .note { color: #666; }
"""


def _img(name: str, alt: str) -> str:
    return f'<img src="{escape(name)}" alt="{escape(alt)}">'


def _table(header: list[str], rows: list[list[str]], numeric: set[int] = frozenset()) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f'<td class="n">{c}</td>' if i in numeric else f"<td>{c}</td>" for i, c in enumerate(row))
        + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def render(output: str, scan: Scan, run: dict, pictures: dict[str, str], generated: str) -> str:
    """The page. `run`: `_job.json` and `_SUCCESS` as read (None where absent); `pictures`:
    section -> file name of those drawn (a class's contact sheet under `contact:<class>`)."""
    labelled = scan.videos - scan.failed
    parts = [
        f"<!doctype html><html lang=en><head><meta charset=utf-8><title>groupemotion report: {escape(output)}"
        f"</title><style>{STYLE}</style></head><body>",
        f"<h1>Labels of <code>{escape(output)}</code></h1>",
        f"<p>{scan.videos:,} videos: {labelled:,} labelled, {scan.failed:,} failed; {scan.windows:,} windows "
        f"({scan.failed_windows:,} failed) covering {scan.seconds / 3600:,.2f} hours of video. "
        f'<span class="note">Report written {escape(generated)}.</span></p>',
        "<h2>Labels</h2>",
        _img(pictures["labels"], "videos per label"),
        _labels_table(scan),
        "<h2>Confidence</h2>",
        "<p>A video's confidence is the probability of its label: the mean over its windows of the "
        "model's softmax, weighted by window length.</p>",
        _img(pictures["confidence"], "confidence histogram per class"),
        "<h2>Errors</h2>",
        _errors(scan),
        "<h2>Over time</h2>",
        _timelines(scan, pictures),
        "<h2>Most confident videos</h2>",
        _contacts(pictures),
        "<h2>The run</h2>",
        _run(run),
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def _labels_table(scan: Scan) -> str:
    rows = []
    for name in [*CLASSES, *sorted(set(scan.labels) - set(CLASSES))]:
        count = scan.labels.get(name, 0)
        mean = scan.mean_confidence(name) if name in CLASSES else None
        rows.append([escape(name), f"{count:,}", f"{count / scan.videos:.1%}" if scan.videos else "-",
                     f"{mean:.3f}" if mean is not None else "-"])
    rows.append(["failed", f"{scan.failed:,}", f"{scan.failed / scan.videos:.1%}" if scan.videos else "-", "-"])
    return _table(["label", "videos", "share", "mean confidence"], rows, numeric={1, 2, 3})


def _errors(scan: Scan) -> str:
    if not scan.errors:
        return "<p>No video or window failed.</p>"
    rows = []
    for reason, e in sorted(scan.errors.items(), key=lambda item: (-item[1].videos - item[1].windows, item[0])):
        examples = "<br>".join(
            f"<code>{escape(x['key'])}</code>" + (f" window {x['window']}" if x["window"] is not None else "")
            + f": {escape(x['error'])}"
            for x in e.examples
        )
        rows.append([f"<code>{escape(reason)}</code>", f"{e.videos:,}", f"{e.windows:,}", examples])
    return ("<p>Videos that got no label, and windows that failed (a video with at least one labelled window "
            "keeps its label), by reason, with the first examples met.</p>"
            + _table(["reason", "videos", "windows", "examples"], rows, numeric={1, 2}))


def _timelines(scan: Scan, pictures: dict[str, str]) -> str:
    if "timelines" not in pictures:
        return "<p>No video has two labelled windows or more: every video is one window long.</p>"
    return (f"<p>The {len(scan.longest)} longest videos, window by window: each bar spans a window, split into "
            "the three class probabilities.</p>" + _img(pictures["timelines"], "class probabilities over time"))


def _contacts(pictures: dict[str, str]) -> str:
    parts = ["<p>For each class, the videos it was given with the highest confidence: the frames of each "
             "video's most confident window, decoded again as the model saw them.</p>"]
    for cls in CLASSES:
        name = pictures.get(f"contact:{cls}")
        parts.append(f"<h3>{escape(cls)}</h3>")
        parts.append(_img(name, f"frames of the most confident {cls} videos") if name
                     else f"<p>No video was labelled {escape(cls)}.</p>")
    return "\n".join(parts)


def _run(run: dict) -> str:
    job, success = run.get("job"), run.get("success")
    parts = []
    if job is None:
        parts.append("<p>No <code>_job.json</code>: the run's model and options are not recorded.</p>")
    else:
        rows = [[escape(label), f"<code>{escape(_text(job.get(key)))}</code>"] for label, key in (
            ("model id", "model_id"), ("model", "model_ref"), ("inputs", "inputs"), ("window plan", "window_plan"),
            ("options", "options"), ("decode", "decode_spec"))]
        parts.append(_table(["", "recorded in _job.json"], rows))
    if success is None:
        parts.append("<p>No <code>_SUCCESS</code>: the run has not finished (or stopped), and this page shows "
                     "the units it had committed.</p>")
    else:
        parts.append("<p>The run finished; its summary (<code>_SUCCESS</code>):</p>")
        parts.append(f"<pre>{escape(json.dumps(success, indent=2))}</pre>")
    return "\n".join(parts)


def _text(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return " ".join(str(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    return str(value)
