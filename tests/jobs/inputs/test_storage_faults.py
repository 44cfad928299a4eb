"""A flaky object store is normal: reads and writes ride through throttling, dropped connections
and truncated bodies (the `flaky_s3` proxy), and what outlasts the retries is a StorageError,
never a partial object. The jobs ride through it too, and a unit the store would not serve is
left for a rerun, never recorded as the videos' answer.

The jobs run as a user runs them, as their own process with the embedded Ray: Ray's workers must
see the proxy's AWS_ENDPOINT_URL, which the test session's Ray (started before the proxy) does
not.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import boto3
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from groupemotion_core.model.config import preset
from groupemotion_core.schema import PROB_COLUMNS, ClipRow
from groupemotion_core.media.synthetic import SyntheticClip, make_dataset, render_clip
from ray_jobs.inputs import storage
from ray_jobs.inputs.listing import Listing
from ray_jobs.sinks.labels import LabelWriter, Summary, plan_units
from ray_jobs.commands.pack import pack
from ray_jobs.inputs.sources import list_inputs, read_labels_csv
from ray_jobs.inputs.storage import StorageError

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def videos(tmp_path: Path) -> tuple[Path, Path]:
    """Six short clips in two folders and a labels CSV for them."""
    root = tmp_path / "src"
    lines = []
    for i, cls in enumerate(("Negative", "Neutral", "Positive") * 2):
        path = root / f"part{i % 2}" / f"clip_{i}.mp4"
        path.parent.mkdir(parents=True, exist_ok=True)
        render_clip(SyntheticClip(label=cls, width=48, height=32, seconds=0.5, seed=i, audio=i != 2), path)
        lines.append(f"clip_{i},{cls}")
    csv = tmp_path / "labels.csv"
    csv.write_text("\n".join(lines) + "\n")
    return root, csv


def test_pack_through_a_flaky_store_writes_the_same_shards_and_manifest(videos, tmp_path, s3_bucket, flaky_s3):
    root, csv = videos
    expected = pack(str(root), str(tmp_path / "local"), labels_csv=str(csv), shard_size=2, progress=io.StringIO())
    storage.upload_dir(str(root), f"{s3_bucket}/src")
    storage.write_bytes_atomic(f"{s3_bucket}/labels.csv", csv.read_bytes())

    flaky_s3.failure_rate = 0.1
    dest = f"{s3_bucket}/packed"
    manifest = pack(f"{s3_bucket}/src", dest, labels_csv=f"{s3_bucket}/labels.csv", shard_size=2,
                    progress=io.StringIO())

    # Read back through the same flaky store, with the functions the jobs use.
    assert manifest == expected
    assert json.loads(storage.read_bytes(f"{dest}/manifest.json")) == expected
    assert list_inputs(f"{dest}/manifest.json") == [f"{dest}/{s['name']}" for s in expected["shards"]]
    assert read_labels_csv(f"{s3_bucket}/labels.csv") == read_labels_csv(str(csv))
    for shard in expected["shards"]:
        with storage.open_read(f"{dest}/{shard['name']}") as f:
            assert f.read() == (tmp_path / "local" / shard["name"]).read_bytes(), shard["name"]
    assert sorted(uri for uri, _ in storage.find(dest)) == sorted(
        [f"{dest}/manifest.json"] + [f"{dest}/{s['name']}" for s in expected["shards"]]
    )
    assert min(flaky_s3.injected[kind] for kind in ("slowdown", "drop", "truncate")) >= 1, flaky_s3.injected


def test_every_storage_function_rides_through_a_flaky_store(tmp_path, s3_bucket, flaky_s3):
    flaky_s3.failure_rate = 0.2
    data = bytes(range(256)) * 4096  # 1 MiB

    storage.write_bytes_atomic(f"{s3_bucket}/a/one.bin", data)
    with storage.open_write_atomic(f"{s3_bucket}/a/two.bin") as f:
        for start in range(0, len(data), 64 << 10):
            f.write(data[start : start + (64 << 10)])
    assert storage.read_bytes(f"{s3_bucket}/a/one.bin", max_bytes=len(data)) == data
    with storage.open_read(f"{s3_bucket}/a/two.bin") as f:
        assert f.read() == data
    assert storage.exists(f"{s3_bucket}/a/one.bin") and not storage.exists(f"{s3_bucket}/a/none.bin")
    assert storage.find(f"{s3_bucket}/a") == [(f"{s3_bucket}/a/one.bin", len(data)), (f"{s3_bucket}/a/two.bin", len(data))]
    assert [u for u, _ in storage.find(f"{s3_bucket}/a/t*.bin")] == [f"{s3_bucket}/a/two.bin"]

    (tmp_path / "up" / "sub").mkdir(parents=True)
    (tmp_path / "up" / "sub" / "x.bin").write_bytes(data)
    (tmp_path / "up" / "config.json").write_text("{}")
    storage.upload_dir(str(tmp_path / "up"), f"{s3_bucket}/dir")
    down = Path(storage.download_dir(f"{s3_bucket}/dir", str(tmp_path / "down")))
    assert (down / "sub" / "x.bin").read_bytes() == data and (down / "config.json").read_text() == "{}"

    # The filesystem Ray Data and Ray Train get: a Parquet round trip.
    fs, path = storage.arrow_filesystem(f"{s3_bucket}/t.parquet")
    table = pa.table({"key": [f"k{i}" for i in range(1000)], "value": list(range(1000))})
    pq.write_table(table, path, filesystem=fs)
    assert pq.read_table(path, filesystem=fs).equals(table)

    storage.remove(f"{s3_bucket}/a/one.bin")
    assert not storage.exists(f"{s3_bucket}/a/one.bin")
    assert min(flaky_s3.injected[kind] for kind in ("slowdown", "drop", "truncate")) >= 2, flaky_s3.injected


@pytest.mark.parametrize("fault", ["slowdown", "drop"])
def test_a_store_that_keeps_failing_is_a_storage_error_and_nothing_is_written(s3_bucket, flaky_s3, monkeypatch, fault):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # the standard variable: s3fs's tries only, for speed
    storage.write_bytes_atomic(f"{s3_bucket}/there.bin", b"old")
    flaky_s3.faults, flaky_s3.failure_rate = (fault,), 1.0

    with pytest.raises(StorageError) as read:
        storage.read_bytes(f"{s3_bucket}/there.bin")
    assert read.value.reason == "storage_unavailable"
    assert read.value.detail.startswith(f"{s3_bucket}/there.bin: ")
    assert storage.is_storage_failure(str(read.value)) and not storage.is_storage_failure("undecodable: x")

    with pytest.raises(StorageError, match="storage_unavailable"):
        storage.write_bytes_atomic(f"{s3_bucket}/new.bin", b"new")
    flaky_s3.failure_rate = 0.0
    assert not storage.exists(f"{s3_bucket}/new.bin")
    assert storage.read_bytes(f"{s3_bucket}/there.bin") == b"old"


def test_a_multipart_upload_whose_part_fails_is_aborted_and_the_first_error_is_the_one_raised(
    s3_bucket, flaky_s3, monkeypatch
):
    """tarfile writes its end blocks while an error leaves its block: that write must raise the
    failed part's StorageError again, not bury it under `ValueError: File not in write mode`."""
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    flaky_s3.faults, flaky_s3.scope, flaky_s3.failure_rate = ("drop",), "partNumber=", 1.0
    uri = f"{s3_bucket}/out/shard-000000.tar"
    member = tarfile.TarInfo("big.mp4")
    member.size = storage.PART_BYTES + 1  # the first part goes up while the member is written

    with pytest.raises(StorageError) as failed:
        with storage.open_write_atomic(uri) as out, tarfile.open(fileobj=out, mode="w|") as tar:
            tar.addfile(member, io.BytesIO(b"\0" * member.size))
    assert failed.value.reason == "storage_unavailable" and uri in failed.value.detail
    assert flaky_s3.injected["drop"] >= 2

    flaky_s3.failure_rate = 0.0
    assert not storage.exists(uri)
    bucket = s3_bucket[len("s3://") :]
    assert "Uploads" not in boto3.client("s3").list_multipart_uploads(Bucket=bucket)


def test_a_unit_whose_rows_the_store_failed_is_left_for_a_rerun_and_the_others_commit(tmp_path):
    shards = ["s3://b/shards/shard-000000.tar", "s3://b/shards/shard-000001.tar"]
    units = plan_units(Listing([], "uri", None, 256, shards=shards), str(tmp_path / "labels"))
    summary = Summary(units=2)
    notes: list[str] = []
    writer = LabelWriter(units, str(tmp_path / "labels"), "m1", summary, on_commit=notes.append)
    failed = "storage_unavailable: s3://b/shards/shard-000001.tar: the store kept failing after retries (SlowDown)"

    def row(key: str, window: int, windows: int, error: str | None = None) -> dict:
        probs = [None] * 3 if error else [0.2, 0.3, 0.5]
        return {"key": key, "window": window, "windows": windows, "start_s": 0.0, "end_s": 1.0,
                "label": None if error else "Positive", "error": error, "truth": -1, **dict(zip(PROB_COLUMNS, probs))}

    writer.add(pa.Table.from_pylist([
        row(f"{shards[0]}/a", 0, 1), row(shards[0], ClipRow.SHARD_END, 1),
        # The second shard gave one clip, then the store failed: its reader's own error row.
        row(f"{shards[1]}/b", 0, 1), row(shards[1], ClipRow.WHOLE_VIDEO, 0, failed), row(shards[1], ClipRow.SHARD_END, 2),
    ]))
    writer.finish()  # a unit left for a rerun is accounted for

    assert (summary.units_committed, summary.units_left, summary.left_error) == (1, 1, failed)
    assert [n.split(":")[0] for n in notes] == [f"committed {units[0].name}", "left for a rerun"]
    assert sorted(p.name for p in (tmp_path / "labels" / "videos").iterdir()) == [units[0].name]
    assert sorted(p.name for p in (tmp_path / "labels" / "windows").iterdir()) == [units[0].name]
    assert "1 units left for a rerun (storage_unavailable: " in summary.line()


def _run(argv: list[str], record=None, name: str = "", **env: str) -> tuple[int, str]:
    """`groupemotion ARGV` as its own process, with its own embedded Ray, and the test's AWS_*
    variables (the proxy's endpoint) plus `env`. With `record` (pytest's record_property), the
    exit status and seconds to end go into the test report as `name` (the fault matrix's figures)."""
    environ = {**os.environ, **env}
    environ.pop("RAY_ADDRESS", None)
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "ray_jobs.cli", *argv], env=environ, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    if record is not None:
        record(name, f"exit {done.returncode} after {time.monotonic() - started:.1f} s")
    return done.returncode, done.stdout + done.stderr


def _read(uri: str) -> pd.DataFrame:
    storage.filesystem(uri)[0].invalidate_cache()  # listed here before the job wrote more
    fs, path = storage.arrow_filesystem(uri)
    return pd.read_parquet(path, filesystem=fs)


@pytest.mark.slow
def test_infer_through_a_flaky_store_leaves_what_it_cannot_read_then_labels_every_video_once(
    videos, tiny_checkpoint, s3_bucket, flaky_s3, record_property
):
    root, csv = videos
    storage.upload_dir(tiny_checkpoint[0], f"{s3_bucket}/model")
    manifest = pack(str(root), f"{s3_bucket}/shards", labels_csv=str(csv), shard_size=2, progress=io.StringIO())
    output = f"{s3_bucket}/labels"
    argv = ["infer", f"{s3_bucket}/shards", "--model", f"{s3_bucket}/model", "--output", output,
            "--batch-size", "4", "--actors", "1", "--decode-cpus", "1"]

    # One shard the store will not serve: every GET of it fails, past the retries.
    bucket = s3_bucket[len("s3://") :]
    flaky_s3.faults, flaky_s3.scope, flaky_s3.failure_rate = ("slowdown",), f"GET /{bucket}/shards/shard-000001.tar", 1.0
    code, printed = _run(argv, record_property, "infer_one_shard_unreadable",
                         AWS_MAX_ATTEMPTS="1")  # the standard variable: s3fs's own tries only, for speed

    assert code == 75, printed[-3000:]
    assert printed.rstrip().splitlines()[-1].startswith(
        f"error: storage_unavailable: 1 of 3 units were left for a rerun: the object store failed reading them "
        f"after retries (first: {s3_bucket}/shards/shard-000001.tar: "), printed[-2000:]
    assert "4 videos and 4 windows labelled, errors: none" in printed and "1 units left for a rerun" in printed
    assert "Traceback" not in printed
    shards = sorted(key.split(".tar/")[0].rsplit("/", 1)[1] for key in _read(f"{output}/videos")["key"])
    assert shards == ["shard-000000", "shard-000000", "shard-000002", "shard-000002"]
    assert not storage.exists(f"{output}/_SUCCESS")

    # The rerun, through a store that fails one request in ten, every way it can.
    flaky_s3.faults, flaky_s3.scope, flaky_s3.failure_rate = ("slowdown", "drop", "truncate"), "", 0.1
    flaky_s3.injected.clear()
    code, printed = _run(argv, record_property, "infer_rerun_10pc_faults")

    assert code == 0, printed[-3000:]
    assert "2 of 3 units already committed" in printed
    vids, wins = _read(f"{output}/videos"), _read(f"{output}/windows")
    assert len(vids) == sum(s["clips"] for s in manifest["shards"]) == 6 and vids["key"].is_unique
    assert vids["error"].isna().all() and not wins.duplicated(["key", "window"]).any() and len(wins) == 6
    assert json.loads(storage.read_bytes(f"{output}/_SUCCESS"))["videos"] == 2
    assert min(flaky_s3.injected[kind] for kind in ("slowdown", "drop", "truncate")) >= 1, flaky_s3.injected


@pytest.mark.slow
def test_train_through_a_flaky_store_stops_when_it_reads_no_clip_then_trains_two_epochs(
    tmp_path, s3_bucket, flaky_s3, record_property
):
    clip = dict(width=64, height=48, fps=8.0, seconds=1.0)
    make_dataset(tmp_path / "train", 2, seed=0, **clip)
    make_dataset(tmp_path / "val", 1, seed=1, **clip)
    for split, size in (("train", 2), ("val", 3)):
        pack(str(tmp_path / split), f"{s3_bucket}/{split}", shard_size=size, progress=io.StringIO())
    config = tmp_path / "tiny-1s.json"
    config.write_text(json.dumps(preset("tiny").to_dict() | {"clip_seconds": 1.0, "num_frames": 4}))
    output = f"{s3_bucket}/run"
    argv = ["train", "--train", f"{s3_bucket}/train", "--val", f"{s3_bucket}/val", "--output", output,
            "--config", str(config), "--workers", "1", "--batch-size", "4", "--epochs", "2"]

    # No training shard can be read: the run stops with the store's reason and exports nothing.
    bucket = s3_bucket[len("s3://") :]
    flaky_s3.faults, flaky_s3.scope, flaky_s3.failure_rate = ("slowdown",), f"GET /{bucket}/train/shard-", 1.0
    code, printed = _run(argv, record_property, "train_no_shard_readable", AWS_MAX_ATTEMPTS="1")

    assert code == 75, printed[-3000:]
    last = printed.rstrip().splitlines()[-1]
    assert last.startswith("error: storage_unavailable: no training clip could be used (failed: "
                           "storage_unavailable: 3); first: "), printed[-2000:]
    assert "train_loss=nan" not in printed and "Traceback" not in printed
    assert not storage.exists(f"{output}/best") and not storage.exists(f"{output}/metrics.jsonl")

    # Through a store that fails one request in ten: two epochs, every clip in each, once.
    flaky_s3.faults, flaky_s3.scope, flaky_s3.failure_rate = ("slowdown", "drop", "truncate"), "", 0.1
    flaky_s3.injected.clear()
    code, printed = _run(argv, record_property, "train_2_epochs_10pc_faults")

    assert code == 0, printed[-3000:]
    history = [json.loads(line) for line in storage.read_bytes(f"{output}/metrics.jsonl").decode().splitlines()]
    assert [m["epoch"] for m in history] == [1, 2]
    assert [(m["train_clips"], m["train_skipped_errors"], m["val_count"]) for m in history] == [(6, 0, 3)] * 2
    assert [printed.count(f"[train] epoch {e}/2: ") for e in (1, 2)] == [1, 1]
    assert storage.exists(f"{output}/best/model.safetensors")
    assert sum(flaky_s3.injected.values()) >= 3, flaky_s3.injected
