"""Tables of videos through the real jobs: real local Ray, real S3 (moto on 127.0.0.1), generated clips.

`infer` on tables in every format, on S3 and locally (Parquet on S3 only), gives one videos/ row per
table row with the table's columns unchanged; a killed job run again commits every row once from
its saved listing, new objects wait for `--relist`; an S3 prefix of three pages (2,001 objects) is
listed in pages and labelled once; `eval` and `train` take their labels from a table's `label` column.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor

import boto3
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch

from groupemotion_core.media.synthetic import SyntheticClip, render_clip
from groupemotion_core.model.classifier import GroupEmotionModel
from groupemotion_core.model.config import preset
from groupemotion_core.schema import CLASSES, VideoRow
from groupemotion_core.weights.checkpoint import save_checkpoint
from ray_jobs.cli import main
from ray_jobs.commands import infer
from ray_jobs.inputs import listing, storage
from ray_jobs.predict.pipeline import PredictOptions
from ray_jobs.sinks import labels

SMALL = dict(width=64, height=48, fps=4.0, seconds=1.0)
FEW_CPUS = dict(batch_size=4, actors=1, decode_cpus=1)
CLI_FEW_CPUS = ["--batch-size", "4", "--actors", "1", "--decode-cpus", "1"]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Four generated clips, one per class and one more."""
    root = tmp_path_factory.mktemp("clips")
    for i in range(4):
        render_clip(SyntheticClip(label=CLASSES[i % 3], seed=i, **SMALL), root / f"c{i}.mp4")
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    directory = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    save_checkpoint(GroupEmotionModel(preset("tiny")), directory)
    return str(directory)


def _bucket(endpoint: str) -> tuple[str, object]:
    client = boto3.client("s3", endpoint_url=endpoint)
    name = f"tables-{uuid.uuid4().hex[:8]}"
    client.create_bucket(Bucket=name)
    return f"s3://{name}", client


def _videos(output: str) -> pd.DataFrame:
    fs, path = storage.arrow_filesystem(storage.join(output, "videos"))
    return pads.dataset(path, filesystem=fs).to_table().to_pandas()


def test_tables_in_each_format_local_and_on_s3_give_a_row_per_row_with_their_columns(
    ray_session, s3_server, clips, checkpoint, tmp_path
):
    bucket, client = _bucket(s3_server)
    for i in range(2):
        client.upload_file(str(clips / f"c{i}.mp4"), bucket[len("s3://") :], f"media/c{i}.mp4")
    # Parquet on S3 naming S3 objects; CSV with paths relative to its folder; JSONL with absolute paths.
    pq.write_table(pa.table({"video_id": pa.array([1, 2, 3], pa.int64()), "lang": ["de", "en", "fr"],
                             "uri": [f"{bucket}/media/c0.mp4", f"{bucket}/media/c1.mp4", f"{bucket}/media/gone.mp4"]}),
                   tmp_path / "s3.parquet")
    client.upload_file(str(tmp_path / "s3.parquet"), bucket[len("s3://") :], "tables/s3.parquet")
    # CSV and JSONL on S3 too, a relative path taken from the table's prefix.
    client.put_object(Bucket=bucket[len("s3://") :], Key="tables/s3.csv", Body=b"video_id,lang,uri\n9,ja,c9.mp4\n")
    client.put_object(Bucket=bucket[len("s3://") :], Key="tables/s3.jsonl",
                      Body=json.dumps({"video_id": 10, "lang": "ko", "uri": f"{bucket}/media/c1.mp4"}).encode() + b"\n")
    (clips / "local.csv").write_text("video_id,lang,uri\n4,it,c2.mp4\n5,es,\n6,pt,ftp://host/c.mp4\n")
    (tmp_path / "local.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"video_id": 7, "lang": "nl", "uri": str(clips / "c3.mp4")},
        {"video_id": 8, "lang": "sv", "uri": str(clips / "missing.mp4")}]))
    output = f"{bucket}/labels"
    inputs = [f"{bucket}/tables/s3.parquet", str(clips / "local.csv"), str(tmp_path / "local.jsonl"),
              f"{bucket}/tables/s3.csv", f"{bucket}/tables/s3.jsonl"]

    summary = infer.infer(inputs, checkpoint, output, PredictOptions(**FEW_CPUS), unit_videos=2)

    videos = _videos(output).set_index("video_id").sort_index()
    assert videos.index.tolist() == list(range(1, 11)) and summary.videos == 10
    assert str(videos.index.dtype) == "int64"
    assert videos["lang"].tolist() == ["de", "en", "fr", "it", "es", "pt", "nl", "sv", "ja", "ko"]
    for name in labels.part_files(output, "videos"):
        with storage.open_read(name) as f:
            schema = pq.read_schema(f)
        assert schema.names == [*VideoRow.SCHEMA.names, "video_id", "lang"] and schema.field("video_id").type == pa.int64()
    keys = videos["key"].tolist()
    assert keys[:3] == [f"{bucket}/media/c0.mp4", f"{bucket}/media/c1.mp4", f"{bucket}/media/gone.mp4"]
    assert keys[3] == str(clips / "c2.mp4") and keys[6:8] == [str(clips / "c3.mp4"), str(clips / "missing.mp4")]
    assert keys[8:] == [f"{bucket}/tables/c9.mp4", f"{bucket}/media/c1.mp4"]
    labelled = videos[videos["error"].isna()]
    assert labelled.index.tolist() == [1, 2, 4, 7, 10] and labelled["label"].isin(CLASSES).all()
    reasons = videos["error"].dropna().str.split(":").str[0].to_dict()
    assert reasons == {3: "not_found", 5: "bad_uri", 6: "bad_uri", 8: "not_found", 9: "not_found"}
    # Units: consecutive rows of one table (2 a unit): 3 + 3 + 2 + 1 + 1 rows -> 2 + 2 + 1 + 1 + 1 units.
    assert summary.units_committed == 7 and len(labels.part_files(output, "windows")) == 7


@pytest.mark.slow  # the killed run is a job process with its own Ray
def test_a_killed_job_run_again_commits_every_row_once_from_its_saved_listing(
    ray_session, clips, checkpoint, tmp_path
):
    folder = tmp_path / "videos"
    folder.mkdir()
    for i in range(5):
        os.link(clips / f"c{i % 4}.mp4", folder / f"v{i}.mp4")
    output = tmp_path / "labels"
    args = ["infer", str(folder), "--model", checkpoint, "--output", str(output), "--unit-videos", "2",
            "--windows", "first", *CLI_FEW_CPUS]
    env = {**os.environ, labels.EXIT_AFTER_UNITS_ENV: "1"}
    env.pop("RAY_ADDRESS", None)
    killed = subprocess.run([sys.executable, "-m", "ray_jobs.cli", *args], env=env, capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert len(labels.part_files(str(output), "videos")) == 1
    saved = json.loads((output / listing.INPUTS_DIR / listing.LISTED_FILE).read_text())
    assert (saved["videos"], saved["unit_rows"]) == (5, 2)
    os.link(clips / "c0.mp4", folder / "added.mp4")  # after the listing: not this job's

    assert main(args) == 0
    videos = pd.read_parquet(output / "videos")
    assert sorted(videos["key"]) == sorted(str(folder / f"v{i}.mp4") for i in range(5))
    done = json.loads((output / infer.SUCCESS_FILE).read_text())
    assert (done["units"], done["units_skipped"], done["units_committed"]) == (3, 1, 2)

    assert main([*args, "--relist"]) == 0  # the added object: listed again, everything labelled again, once
    videos = pd.read_parquet(output / "videos")
    assert sorted(videos["key"]) == sorted([*(str(folder / f"v{i}.mp4") for i in range(5)), str(folder / "added.mp4")])
    assert len(labels.part_files(str(output), "videos")) == len(labels.part_files(str(output), "windows")) == 3


# S3 answers at most 1,000 keys a list request: one more key than two full pages makes three
# requests, the middle one from a continuation token and the last with one key; units of 256
# rows cross the pages' edges. More objects would only cost a write, a read and a decode each.
PREFIX_OBJECTS, PREFIX_PAGES = 2001, 3


@pytest.mark.slow  # about 2 minutes on two busy cores; tests/jobs/inputs/test_tables.py lists in pages without Ray
def test_an_s3_prefix_of_three_pages_is_listed_in_pages_and_labelled_once(ray_session, s3_server, checkpoint):
    bucket, client = _bucket(s3_server)
    name = bucket[len("s3://") :]
    with ThreadPoolExecutor(16) as pool:  # not videos: each fails to decode at once, and still gets its row
        list(pool.map(lambda i: client.put_object(Bucket=name, Key=f"v/{i:05d}.mp4", Body=b"not a video"),
                      range(PREFIX_OBJECTS)))
    output = f"{bucket}/labels"

    summary = infer.infer([f"{bucket}/v/"], checkpoint, output, PredictOptions(**FEW_CPUS), plan=infer.WindowPlan("first"))

    saved = json.loads(storage.read_bytes(f"{output}/_inputs/_LISTED.json"))
    assert saved["pages"] == PREFIX_PAGES and saved["videos"] == PREFIX_OBJECTS
    videos = _videos(output)
    assert len(videos) == PREFIX_OBJECTS and videos["key"].is_unique
    assert set(videos["key"]) == {f"{bucket}/v/{i:05d}.mp4" for i in range(PREFIX_OBJECTS)}
    assert videos["error"].str.startswith("not_media").all()
    assert (summary.videos, summary.units_committed) == (PREFIX_OBJECTS, 8)  # 256 rows a unit, the last 209


def test_eval_reads_labels_from_a_tables_label_column(ray_session, clips, checkpoint, tmp_path):
    table = tmp_path / "eval.csv"
    # Class names in any case, a VGAF number (1 = Positive), and a row without a video.
    table.write_text("clip,label\n" + "".join(f"{clips / f'c{i}.mp4'},{lab}\n" for i, lab in
                                              enumerate(["negative", "Neutral", "1", "NEGATIVE"])) + ",Positive\n")
    report = tmp_path / "report"

    assert main(["eval", str(table), "--uri-column", "clip", "--model", checkpoint, "--report", str(report),
                 "--windows", "first", *CLI_FEW_CPUS]) == 0

    metrics = json.loads((report / "metrics.json").read_text())
    assert (metrics["count"], metrics["videos"], metrics["errors"]) == (4, 5, {"bad_uri": 1})
    assert [row["support"] for row in metrics["per_class"]] == [2, 1, 1]  # Negative, Neutral, Positive


def test_table_mistakes_stop_a_job_before_it_starts(clips, checkpoint, tmp_path, capsys):
    (tmp_path / "t.csv").write_text("url,key\nc0.mp4,1\n")
    assert main(["infer", str(tmp_path / "t.csv"), "--model", checkpoint, "--output", str(tmp_path / "o")]) == 2
    assert "error: bad_table: " in capsys.readouterr().err
    assert main(["infer", str(tmp_path / "t.csv"), "--uri-column", "url", "--model", checkpoint,
                 "--output", str(tmp_path / "o")]) == 2
    assert "error: bad_table: " in (err := capsys.readouterr().err) and "column key would clash" in err
    (tmp_path / "nolabel.csv").write_text("uri\nc0.mp4\n")
    assert main(["train", "--train", str(tmp_path / "nolabel.csv"), "--val", str(tmp_path / "nolabel.csv"),
                 "--output", str(tmp_path / "run"), "--preset", "tiny"]) == 2
    assert "error: bad_table: " in capsys.readouterr().err


@pytest.mark.slow
def test_train_reads_a_table_with_a_label_column(ray_session, clips, tmp_path, capsys):
    table = tmp_path / "train.parquet"
    pq.write_table(pa.table({"uri": [str(clips / f"c{i}.mp4") for i in range(4)],
                             "label": [CLASSES[i % 3] for i in range(4)]}), table)
    config = preset("tiny").to_dict() | {"clip_seconds": 1.0, "num_frames": 4}
    (tmp_path / "tiny-1s.json").write_text(json.dumps(config))

    assert main(["train", "--train", str(table), "--val", str(table), "--output", str(tmp_path / "run"),
                 "--config", str(tmp_path / "tiny-1s.json"), "--workers", "1", "--epochs", "1",
                 "--batch-size", "2"]) == 0

    [epoch] = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert epoch["epoch"] == 1 and sum(sum(row) for row in epoch["val_confusion"]) == 4
