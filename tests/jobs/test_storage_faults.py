"""A flaky object store is normal: reads and writes ride through throttling, dropped connections
and truncated bodies (the `flaky_s3` proxy), and what outlasts the retries is a StorageError,
never a partial object."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from groupemotion_core.synthetic import SyntheticClip, render_clip
from ray_jobs import storage
from ray_jobs.pack import pack
from ray_jobs.sources import list_inputs, read_labels_csv
from ray_jobs.storage import StorageError


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
