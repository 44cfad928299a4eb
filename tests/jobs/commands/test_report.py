"""The report of a labels output: what it counts, which videos it shows, and a page that loads.

One output is written here row by row with the sink's own table functions (so every number the
report should give is known), in two units, with a user column the report must ignore, a shard
member and plain files on the contact sheet, and one video that is gone; its page is rendered in
headless Chromium, which must load every picture on it. Another comes from a real `groupemotion
infer` run (tiny model, local Ray), and its report must agree with its Parquet.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from groupemotion_core.errors import GroupEmotionError
from groupemotion_core.model.classifier import GroupEmotionModel
from groupemotion_core.model.config import preset
from groupemotion_core.schema import CLASSES, PROB_COLUMNS
from groupemotion_core.media.synthetic import SyntheticClip, render_clip
from groupemotion_core.weights.checkpoint import save_checkpoint
from ray_jobs.cli import main
from ray_jobs.commands.pack import pack
from ray_jobs.commands.report import report
from ray_jobs.inputs import storage
from ray_jobs.report.scan import TopK, check_output, scan
from ray_jobs.sinks import labels

SMALL = dict(width=64, height=48, fps=4.0)
MODEL = "tiny-test-model"


def _window(key, window, start, end, probs=None, error=None) -> dict:
    label = None if probs is None else CLASSES[max(range(3), key=lambda i: probs[i])]
    return {"key": key, "window": window, "start_s": start, "end_s": end, "label": label, "error": error,
            **dict(zip(PROB_COLUMNS, probs or (None,) * 3))}


def _video(key, probs=None, windows=0, seconds=0.0, error=None) -> dict:
    label = None if probs is None else CLASSES[max(range(3), key=lambda i: probs[i])]
    return {"key": key, "label": label, "windows": windows, "seconds": seconds, "error": error,
            **dict(zip(PROB_COLUMNS, probs or (None,) * 3))}


def _write_unit(output: Path, name: str, videos: list[dict], windows: list[dict]) -> None:
    """One committed unit, as the sink writes it, plus a user column carried from an input table."""
    for folder, table in (("windows", labels.window_table(windows, MODEL)), ("videos", labels.video_table(videos, MODEL))):
        table = table.append_column("campaign", pa.array(["spring"] * table.num_rows))
        (output / folder).mkdir(parents=True, exist_ok=True)
        pq.write_table(table, output / folder / name)


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    """A labels output of 9 videos in two units: plain files, two shard members, one gone video,
    two failed videos, and one failed window."""
    root = tmp_path_factory.mktemp("written")
    files = root / "videos"
    for name, label, seconds in (("n1", "Negative", 7.0), ("p3", "Positive", 12.0), ("p1", "Positive", 1.0),
                                 ("u1", "Neutral", 1.0)):
        (files / label).mkdir(parents=True, exist_ok=True)
        render_clip(SyntheticClip(label=label, seconds=seconds, seed=len(name) + int(seconds), **SMALL),
                    files / label / f"{name}.mp4")
    for name, label in (("p2", "Positive"), ("n2", "Negative")):
        (root / "packed" / label).mkdir(parents=True, exist_ok=True)
        render_clip(SyntheticClip(label=label, seconds=1.0, seed=3, **SMALL), root / "packed" / label / f"{name}.mp4")
    pack(str(root / "packed"), str(root / "shards"), shard_size=10)
    shard = str(root / "shards" / "shard-000000.tar")
    f = {name: str(files / label / f"{name}.mp4") for name, label in
         (("n1", "Negative"), ("p3", "Positive"), ("p1", "Positive"), ("u1", "Neutral"))}
    gone = str(files / "Neutral" / "gone.mp4")

    output = root / "labels"
    _write_unit(output, "part-0000000000000001.parquet", videos=[
        _video(f["n1"], (0.642857, 0.228571, 0.128571), 2, 7.0),
        _video(f["p3"], (0.15, 0.13, 0.72), 2, 10.0),
        _video(f["p1"], (0.05, 0.04, 0.91), 1, 1.0),
        _video(f["u1"], (0.2, 0.6, 0.2), 1, 1.0),
        _video(gone, (0.03, 0.95, 0.02), 1, 1.0),
        _video(str(files / "bad.mp4"), error="undecodable: invalid data found"),
        _video(str(files / "random.mp4"), error="not_media: not a video container"),
    ], windows=[
        _window(f["n1"], 0, 0.0, 5.0, (0.7, 0.2, 0.1)), _window(f["n1"], 1, 5.0, 7.0, (0.5, 0.3, 0.2)),
        _window(f["p3"], 0, 0.0, 5.0, (0.1, 0.1, 0.8)), _window(f["p3"], 1, 5.0, 10.0, (0.2, 0.2, 0.6)),
        _window(f["p3"], 2, 10.0, 12.0, error="undecodable: broken packet"),
        _window(f["p1"], 0, 0.0, 1.0, (0.05, 0.04, 0.91)), _window(f["u1"], 0, 0.0, 1.0, (0.2, 0.6, 0.2)),
        _window(gone, 0, 0.0, 1.0, (0.03, 0.95, 0.02)),
    ])
    _write_unit(output, "part-0000000000000002.parquet", videos=[
        _video(f"{shard}/Positive/p2", (0.02, 0.03, 0.95), 1, 1.0),
        _video(f"{shard}/Negative/n2", (0.8, 0.1, 0.1), 1, 1.0),
    ], windows=[
        _window(f"{shard}/Positive/p2", 0, 0.0, 1.0, (0.02, 0.03, 0.95)),
        _window(f"{shard}/Negative/n2", 0, 0.0, 1.0, (0.8, 0.1, 0.1)),
    ])
    job = {"model_id": MODEL, "model_ref": "ckpt/tiny", "inputs": [str(files), shard],
           "decode_spec": asdict(preset("tiny").decode_spec()), "window_plan": {"mode": "all"}, "options": {}}
    (output / labels.JOB_FILE).write_text(json.dumps(job))
    (output / labels.SUCCESS_FILE).write_text(json.dumps({"videos": 9}))
    return output


def test_report_counts_every_video_and_window_and_shows_the_most_confident_and_longest(written, tmp_path):
    out = tmp_path / "page"
    got = report(str(written), str(out), top=2, timelines=6, examples=3)

    files = written.parent / "videos"
    shard = str(written.parent / "shards" / "shard-000000.tar")
    assert (got["videos"], got["failed"], got["windows"], got["failed_windows"]) == (9, 2, 10, 1)
    assert got["labels"] == {"Negative": 2, "Neutral": 2, "Positive": 3}
    assert got["video_seconds"] == 22.0
    assert {c: sum(h) for c, h in got["confidence"]["histograms"].items()} == got["labels"]
    # 20 bins from 1/3 to 1: 0.72, 0.91 and 0.95 fall in bins 11, 17 and 18.
    assert {i: n for i, n in enumerate(got["confidence"]["histograms"]["Positive"]) if n} == {11: 1, 17: 1, 18: 1}
    assert got["confidence"]["mean"]["Neutral"] == pytest.approx((0.6 + 0.95) / 2)
    assert got["errors"] == {
        "not_media": {"videos": 1, "windows": 0, "examples": [
            {"key": str(files / "random.mp4"), "window": None, "error": "not_media: not a video container"}]},
        "undecodable": {"videos": 1, "windows": 1, "examples": [
            {"key": str(files / "bad.mp4"), "window": None, "error": "undecodable: invalid data found"},
            {"key": str(files / "Positive" / "p3.mp4"), "window": 2, "error": "undecodable: broken packet"}]},
    }
    confident = {c: [(e["key"], e["confidence"]) for e in entries] for c, entries in got["most_confident"].items()}
    assert confident == {
        "Negative": [(f"{shard}/Negative/n2", pytest.approx(0.8)), (str(files / "Negative" / "n1.mp4"), pytest.approx(0.642857))],
        "Neutral": [(str(files / "Neutral" / "gone.mp4"), pytest.approx(0.95)), (str(files / "Neutral" / "u1.mp4"), pytest.approx(0.6))],
        "Positive": [(f"{shard}/Positive/p2", pytest.approx(0.95)), (str(files / "Positive" / "p1.mp4"), pytest.approx(0.91))],
    }
    assert [(t["key"], t["seconds"], t["label"]) for t in got["timelines"]] == [
        (str(files / "Positive" / "p3.mp4"), 10.0, "Positive"), (str(files / "Negative" / "n1.mp4"), 7.0, "Negative")]
    # Every video on the sheets was decoded again (a shard member too), except the one that is gone.
    sheets = {e["key"]: e for entries in got["contact_sheets"].values() for e in entries}
    assert sheets.pop(str(files / "Neutral" / "gone.mp4"))["error"].startswith("not_found:")
    assert [e["error"] for e in sheets.values()] == [None] * 5
    assert sheets[str(files / "Negative" / "n1.mp4")]["window"]["window"] == 0  # its more Negative window
    assert sorted(p.name for p in out.iterdir()) == sorted([
        "index.html", "report.json", "labels.png", "confidence.png", "timelines.png",
        "contact-negative.jpg", "contact-neutral.jpg", "contact-positive.jpg"])
    assert json.loads((out / "report.json").read_text())["labels"] == got["labels"]
    page = (out / "index.html").read_text()
    assert "campaign" not in page and html.escape(str(files / "bad.mp4")) in page and MODEL in page


def test_the_counts_do_not_depend_on_how_the_rows_are_batched(written):
    whole = scan(str(written), top=2, timelines=1).to_dict()
    assert scan(str(written), top=2, timelines=1, batch_rows=1).to_dict() == whole
    assert scan(str(written), top=2, timelines=1, batch_rows=3).to_dict() == whole


def test_an_output_on_s3_reads_as_the_same_output(written, s3_bucket):
    storage.upload_dir(str(written), f"{s3_bucket}/labels")
    assert scan(f"{s3_bucket}/labels", top=2).to_dict() == scan(str(written), top=2).to_dict()
    with pytest.raises(GroupEmotionError, match="no videos/part-"):
        check_output(s3_bucket)


def test_top_k_keeps_the_best_and_breaks_ties_by_key_however_the_stream_is_cut():
    scores = np.array([5.0, 15.0, 15.0, 5.0, 15.0, 600.0, 15.0, np.nan])
    keys = pa.array(list("gfedcbah"))
    for order in (list(range(8)), list(range(7, -1, -1)), [3, 0, 6, 1, 7, 5, 2, 4]):
        for pieces in (1, 3, 8):
            top = TopK(3)
            for chunk in np.array_split(np.array(order), pieces):
                top.offer(scores[chunk], keys.take(pa.array(chunk, pa.int64())))
            assert top.items == [(600.0, "b"), (15.0, "a"), (15.0, "c")]


def test_a_folder_that_is_not_a_labels_output_is_refused_in_one_line(written, tmp_path, capsys):
    def error(path) -> str:
        assert main(["report", str(path), "--out", str(tmp_path / "page")]) == 2
        return capsys.readouterr().err.strip()

    assert error(tmp_path / "nothing") == f"error: not_found: {tmp_path / 'nothing'} does not exist"
    (tmp_path / "empty").mkdir()
    assert error(tmp_path / "empty").startswith("error: not_labels: ")
    assert error(written / "videos").endswith(f"give the output folder itself ({written}), not its videos/ folder")
    started = tmp_path / "started"
    started.mkdir()
    (started / labels.JOB_FILE).write_text("{}")
    assert error(started).startswith("error: no_labels: ")
    other = tmp_path / "other" / "videos"
    other.mkdir(parents=True)
    pq.write_table(pa.table({"key": ["a"], "score": [1.0]}), other / "part-0.parquet")
    assert error(other.parent).startswith(f"error: not_labels: {other} is not a labels dataset")
    (other / "part-0.parquet").write_bytes(b"not parquet at all")
    assert error(other.parent).startswith(f"error: bad_output: {other}: ")
    assert not (tmp_path / "page").exists()
    (tmp_path / "page").write_text("")
    assert main(["report", str(written), "--out", str(tmp_path / "page")]) == 2
    assert capsys.readouterr().err == f"error: bad_out: --out {tmp_path / 'page'} is a file, not a folder\n"


@pytest.fixture(scope="module")
def inferred(ray_session, tmp_path_factory) -> Path:
    """A real `groupemotion infer` output: shard members and plain files, a long video, a bad one."""
    from ray_jobs.commands import infer
    from ray_jobs.predict.pipeline import PredictOptions

    root = tmp_path_factory.mktemp("inferred")
    for i, label in enumerate([*CLASSES, *CLASSES]):
        (root / "videos" / label).mkdir(parents=True, exist_ok=True)
        render_clip(SyntheticClip(label=label, seconds=1.0 if i < 3 else 11.0, seed=i, **SMALL),
                    root / "videos" / label / f"c{i}.mp4")
    (root / "videos" / "Neutral" / "random.mp4").write_bytes(b"\x00" * 2000)
    pack(str(root / "videos"), str(root / "shards"), shard_size=4)
    torch.manual_seed(0)
    save_checkpoint(GroupEmotionModel(preset("tiny")), root / "ckpt")
    output = root / "labels"
    infer.infer([str(root / "shards"), str(root / "videos" / "Positive")], str(root / "ckpt"), str(output),
                PredictOptions(batch_size=4, actors=1, decode_cpus=1))
    return output


def _images_in_chromium(page: Path, profile: Path) -> list[dict]:
    """Open `page` in headless Chromium and return each <img>'s src and natural size once the page
    has loaded, written into the DOM by a script added to a copy of the page."""
    probe = page.with_name("probe.html")
    probe.write_text(page.read_text().replace("</body>", """<script>
window.addEventListener("load", () => {
  const seen = [...document.images].map(i => ({src: i.getAttribute("src"), width: i.naturalWidth,
                                              height: i.naturalHeight}));
  const out = document.createElement("pre"); out.id = "images"; out.textContent = JSON.stringify(seen);
  document.body.appendChild(out);
});
</script></body>"""))
    dom = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
         "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    found = re.search(r'<pre id="images">(.*?)</pre>', dom.stdout, re.S)
    assert found, dom.stderr[-2000:]
    return json.loads(html.unescape(found.group(1)))


def test_the_report_of_a_real_infer_run_agrees_with_its_parquet(inferred, tmp_path, capsys):
    out = tmp_path / "page"
    assert main(["report", str(inferred), "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith("report: 9 videos (")
    got = json.loads((out / "report.json").read_text())
    videos = pd.read_parquet(inferred / "videos")
    assert got["labels"] == videos["label"].value_counts().to_dict()
    assert (got["videos"], got["failed"]) == (9, 1)  # 7 shard members (random.mp4 fails), 2 plain files
    assert got["windows"] == len(pd.read_parquet(inferred / "windows"))
    assert [t["seconds"] for t in got["timelines"]] == [11.0] * 4  # c3-c5 in the shards, c5 as a plain file too
    sheets = [e for entries in got["contact_sheets"].values() for e in entries]
    assert sheets and all(e["error"] is None for e in sheets)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Chromium: apt-get install chromium")
def test_the_page_loads_every_picture_in_a_browser(written, tmp_path):
    out = tmp_path / "page"
    report(str(written), str(out), top=2)

    images = _images_in_chromium(out / "index.html", tmp_path / "chromium")
    assert [i["src"] for i in images] == ["labels.png", "confidence.png", "timelines.png", "contact-negative.jpg",
                                          "contact-neutral.jpg", "contact-positive.jpg"]
    assert all(i["width"] > 0 and i["height"] > 0 for i in images), images
    # The check sees a picture that does not load.
    (out / "timelines.png").unlink()
    broken = {i["src"]: i["width"] for i in _images_in_chromium(out / "index.html", tmp_path / "chromium")}
    assert broken["timelines.png"] == 0 and broken["labels.png"] > 0
