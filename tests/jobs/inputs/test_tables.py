"""Tables of videos and the saved listing, without Ray: what a table's rows become, what is refused
before a job starts, and a listing that streams (an S3 prefix in pages, a folder, a glob)."""

from __future__ import annotations

import json

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from groupemotion_core.errors import GroupEmotionError
from groupemotion_core.schema import VideoRow
from ray_jobs.inputs import listing, storage, tables
from ray_jobs.inputs.sources import TableRead, _table_rows

RESERVED = tuple(VideoRow.SCHEMA.names)


def _write(path, fmt: str, rows: list[dict]) -> str:
    """`rows` as a table file of format `fmt`."""
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif fmt == "csv":
        names = list(rows[0])
        path.write_text("\n".join([",".join(names), *(",".join(str(r[n]) for n in names) for r in rows)]) + "\n")
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


ROWS = [{"id": 10 + i, "uri": f"clips/v{i}.mp4", "lang": "en" if i % 2 else "de"} for i in range(5)]


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_a_table_is_copied_into_units_of_consecutive_rows_with_its_columns_unchanged(tmp_path, fmt):
    table = _write(tmp_path / f"videos.{fmt}", fmt, ROWS)
    out = str(tmp_path / "out")

    listed = listing.plan(out, [table], reserved=RESERVED, unit_rows=2)

    assert (listed.videos, [p["rows"] for p in listed.parts], listed.shards) == (5, [5], [])
    part = pq.ParquetFile(listed.part_uri(out, 0))
    assert [part.metadata.row_group(g).num_rows for g in range(part.num_row_groups)] == [2, 2, 1]
    copied = part.read()
    assert copied.schema.field("id").type == pa.int64()  # an integer column stays int64, CSV and JSONL too
    assert copied.column("id").to_pylist() == [r["id"] for r in ROWS]
    assert copied.column("lang").to_pylist() == [r["lang"] for r in ROWS]
    # A relative path is taken from the table's folder.
    assert copied.column("uri").to_pylist() == [str(tmp_path / r["uri"]) for r in ROWS]


def test_a_rerun_reads_the_saved_listing_and_other_inputs_are_refused(tmp_path):
    first = _write(tmp_path / "a.parquet", "parquet", ROWS)
    out = str(tmp_path / "out")
    made = listing.plan(out, [first])
    _write(tmp_path / "a.parquet", "parquet", ROWS[:2])  # the table changed since

    again = listing.plan(out, [first])
    assert (made.fresh, again.fresh, again.videos, again.parts) == (True, False, 5, made.parts)
    with pytest.raises(GroupEmotionError, match="output_in_use: .* use --relist"):
        listing.plan(out, [first, first])
    forgotten: list[str] = []
    relisted = listing.plan(out, [first], relist=True, on_relist=lambda: forgotten.append("labels"))
    assert (relisted.fresh, relisted.videos, forgotten) == (True, 2, ["labels"])


def test_table_mistakes_are_one_clear_error_before_anything_runs(tmp_path):
    out = str(tmp_path / "out")
    no_uri = _write(tmp_path / "no_uri.csv", "csv", [{"url": "a.mp4", "id": 1}])
    with pytest.raises(GroupEmotionError, match="bad_table: .* has no `uri` column .*url, id.* --uri-column"):
        listing.plan(out, [no_uri])
    assert listing.plan(out, [no_uri], uri_column="url").videos == 1

    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not really")
    with pytest.raises(GroupEmotionError, match="bad_table: .*broken.parquet"):
        listing.plan(str(tmp_path / "out2"), [str(broken)])

    clash = _write(tmp_path / "clash.jsonl", "jsonl", [{"uri": "a.mp4", "label": "Positive", "id": 1}])
    with pytest.raises(GroupEmotionError, match="bad_table: .*column label would clash"):
        listing.plan(str(tmp_path / "out3"), [clash], reserved=RESERVED)
    chosen = listing.plan(str(tmp_path / "out4"), [clash], columns=["id"], reserved=RESERVED)
    assert pq.read_table(chosen.part_uri(str(tmp_path / "out4"), 0)).column_names == ["uri", "id"]
    with pytest.raises(GroupEmotionError, match="bad_table: .*has no column nope"):
        listing.plan(str(tmp_path / "out5"), [clash], columns=["nope"])


def test_a_rows_own_mistake_is_its_error_and_labels_are_read_as_classes(tmp_path):
    rows = [{"uri": "", "label": "positive"}, {"uri": "http://example.com/a.mp4", "label": "2"},
            {"uri": "s3:///a.mp4", "label": "Negative"}, {"uri": "s3://b/a.mp4", "label": "happy"},
            {"uri": "/data/a.mp4", "label": None}]
    table = _write(tmp_path / "t.parquet", "parquet", rows)

    got = list(_table_rows(3, TableRead(table), "uri"))

    assert [r["label"] for r in got] == ["Positive", "Neutral", "Negative", "happy", None]
    errors = [r["error"] for r in got]
    assert errors[0] == "bad_uri: the row's uri is empty"
    assert errors[1].startswith("bad_uri: http://example.com/a.mp4 has a scheme this job does not read")
    assert errors[2] == "bad_uri: s3:///a.mp4 names no bucket"
    assert errors[3:] == [None, None]
    assert [tables.row_of(r["key"]) for r in got[3:]] == [("s3://b/a.mp4", 3, 3), ("/data/a.mp4", 3, 4)]


def test_an_s3_prefix_is_listed_in_pages_and_a_folder_and_a_glob_locally(s3_bucket, tmp_path):
    client = boto3.client("s3")
    bucket = s3_bucket[len("s3://") :]
    for i in range(25):
        client.put_object(Bucket=bucket, Key=f"videos/{i:03d}.mp4", Body=b"x" * i)
    client.put_object(Bucket=bucket, Key="videos/shards/shard-000000.tar", Body=b"")
    client.put_object(Bucket=bucket, Key="videos/notes.txt", Body=b"")
    out = str(tmp_path / "out")

    listed = listing.plan(out, [f"{s3_bucket}/videos/"], unit_rows=4, page_keys=10)

    assert listed.pages == 3  # 27 keys, 10 a request
    assert (listed.videos, listed.shards) == (25, [f"{s3_bucket}/videos/shards/shard-000000.tar"])
    uris = pq.read_table(listed.part_uri(out, 0)).column("uri").to_pylist()
    assert uris == [f"{s3_bucket}/videos/{i:03d}.mp4" for i in range(25)]  # S3 lists in key order
    assert json.loads(storage.read_bytes(f"{out}/_inputs/_LISTED.json"))["pages"] == 3

    (tmp_path / "v" / "a").mkdir(parents=True)
    for name in ("a/1.mp4", "a/2.webm", "3.mp4", "a/x.txt"):
        (tmp_path / "v" / name).write_bytes(b"x")
    folder = listing.plan(str(tmp_path / "o1"), [str(tmp_path / "v")])
    names = pq.read_table(folder.part_uri(str(tmp_path / "o1"), 0)).column("uri").to_pylist()
    assert sorted(names) == sorted(str(tmp_path / "v" / n) for n in ("a/1.mp4", "a/2.webm", "3.mp4"))
    globbed = listing.plan(str(tmp_path / "o2"), [str(tmp_path / "v" / "*" / "*.mp4")])
    assert pq.read_table(globbed.part_uri(str(tmp_path / "o2"), 0)).column("uri").to_pylist() == [
        str(tmp_path / "v" / "a" / "1.mp4")]
    with pytest.raises(GroupEmotionError, match="not_found: no videos"):
        listing.plan(str(tmp_path / "o3"), [str(tmp_path / "v" / "*.txt")])


def test_a_long_listing_is_cut_into_parts_of_whole_units(tmp_path, monkeypatch):
    monkeypatch.setattr(listing, "UNITS_PER_PART", 2)
    for i in range(9):
        (tmp_path / f"{i}.mp4").write_bytes(b"x")
    out = str(tmp_path / "out")

    listed = listing.plan(out, [str(tmp_path)], unit_rows=2)

    assert [p["rows"] for p in listed.parts] == [4, 4, 1] and listed.videos == 9
    uris = [u for i in range(3) for u in pq.read_table(listed.part_uri(out, i)).column("uri").to_pylist()]
    assert sorted(uris) == sorted(str(tmp_path / f"{i}.mp4") for i in range(9))
