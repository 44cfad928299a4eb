"""The exactly-once writer on a stream in no order: each unit commits the moment its last video is
complete (a shard once its reader's count has come too), videos/ after windows/, nothing twice.
No Ray: the rows are built here as the prediction stage gives them."""

from __future__ import annotations

import math

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from groupemotion_core.schema import PROB_COLUMNS, ClipRow, VideoRow, WindowRow
from ray_jobs.inputs import listing, tables
from ray_jobs.inputs.listing import Listing
from ray_jobs.sinks import labels
from ray_jobs.sinks.labels import LabelWriter, Summary, plan_units

SHARD = "s3://b/shards/shard-000000.tar"
OBJECTS = ["s3://b/videos/x.mp4", "s3://b/videos/y.mp4"]


def _batch(*rows: dict) -> pa.Table:
    return pa.Table.from_pylist(list(rows))


def _window(key: str, window: int, windows: int, error: str | None = None) -> dict:
    probs = [math.nan] * 3 if error else [0.2, 0.3, 0.5]
    start = 5.0 * window
    return {"key": key, "window": window, "windows": windows, "start_s": start, "end_s": start + 5.0,
            "label": None if error else "Positive", "error": error, "truth": -1, **dict(zip(PROB_COLUMNS, probs))}


def _listed(tmp_path, out: str) -> Listing:
    """A saved listing of one table naming OBJECTS (with a carried int64 column), and SHARD."""
    table = tmp_path / "videos.parquet"
    pq.write_table(pa.table({"id": pa.array([7, 8], pa.int64()), "uri": OBJECTS}), table)
    listed = listing.plan(out, [str(table)])
    listed.shards.append(SHARD)
    return listed


def test_units_commit_as_they_complete_in_any_order(tmp_path):
    out = str(tmp_path / "labels")
    listed = _listed(tmp_path, out)
    units = plan_units(listed, out)
    assert [u.videos for u in units] == [None, 2]  # a shard's count comes from its reader
    summary = Summary(units=2)
    commits: list[str] = []
    writer = LabelWriter(units, out, "m1", summary, on_commit=commits.append, parts=[listed.part_uri(out, 0)],
                         unit_rows=listed.unit_rows)
    x, y = (tables.row_key(uri, 0, row) for row, uri in enumerate(OBJECTS))

    writer.add(_batch(_window(f"{SHARD}/a", 1, 2), _window(y, 0, 1)))
    writer.add(_batch(
        _window(f"{SHARD}/b", ClipRow.WHOLE_VIDEO, 0, error="not_media: no"),
        _window(SHARD, ClipRow.SHARD_END, 2),  # the shard gave 2 videos
        _window(x, 1, 2, error="undecodable: no picture"),
    ))
    assert commits == []  # the shard still lacks a's window 0, the row group x's window 0
    writer.add(_batch(_window(x, 0, 2)))
    assert len(commits) == 1 and "_inputs/part-00000.parquet#0" in commits[0]  # the row group completed first
    writer.add(_batch(_window(f"{SHARD}/a", 0, 2)))
    assert len(commits) == 2 and SHARD in commits[1]
    writer.finish()

    shard_unit, group_unit = units
    assert pq.read_table(f"{out}/videos/{shard_unit.name}").schema.equals(VideoRow.SCHEMA, check_metadata=False)
    # The row group's rows: keyed by their URIs, in the table's order, its column carried as it was.
    carried = pq.read_table(f"{out}/videos/{group_unit.name}")
    assert carried.schema.equals(pa.schema([*VideoRow.SCHEMA, pa.field("id", pa.int64())]), check_metadata=False)
    assert carried.column("key").to_pylist() == OBJECTS and carried.column("id").to_pylist() == [7, 8]
    for unit in units:
        windows = pq.read_table(f"{out}/windows/{unit.name}")
        assert windows.schema.equals(WindowRow.SCHEMA, check_metadata=False)
    assert labels.committed_inputs(out) == {SHARD, "_inputs/part-00000.parquet#0"}
    videos = pd.concat([pd.read_parquet(f"{out}/videos/{u.name}") for u in units]).set_index("key")
    windows = pd.read_parquet(f"{out}/windows")
    assert sorted(videos.index) == sorted([f"{SHARD}/a", f"{SHARD}/b", *OBJECTS])
    assert videos.loc[f"{SHARD}/b", "error"] == "not_media: no" and f"{SHARD}/b" not in set(windows["key"])
    assert videos.loc[OBJECTS[0], "windows"] == 1 and pd.isna(videos.loc[OBJECTS[0], "error"])
    assert list(windows.loc[windows["key"] == f"{SHARD}/a", "window"]) == [0, 1]  # in window order
    assert (summary.videos, summary.windows, summary.windows_labelled) == (4, 5, 4)
    assert summary.errors == {"not_media": 1, "undecodable": 1}

    with pytest.raises(RuntimeError, match="after its files were committed"):
        writer.add(_batch(_window(y, 0, 1)))


def test_a_stream_that_ends_short_commits_nothing_more_and_says_so(tmp_path):
    out = str(tmp_path / "labels")
    units = plan_units(Listing([], "uri", None, 256, shards=[SHARD]), out)
    writer = LabelWriter(units, out, "m1", Summary(units=1))
    writer.add(_batch(_window(f"{SHARD}/a", 0, 2), _window(SHARD, ClipRow.SHARD_END, 1)))
    with pytest.raises(RuntimeError, match="1 units incomplete"):
        writer.finish()
    assert labels.part_files(out, "videos") == labels.part_files(out, "windows") == []


def test_a_windows_file_without_its_videos_file_is_removed(tmp_path):
    out = tmp_path / "labels"
    (out / "windows").mkdir(parents=True)
    (out / "videos").mkdir()
    for name in ("part-a.parquet", "part-b.parquet"):
        (out / "windows" / name).write_bytes(b"x")
    (out / "videos" / "part-a.parquet").write_bytes(b"x")
    labels.remove_uncommitted(str(out))
    assert sorted(p.name for p in (out / "windows").iterdir()) == ["part-a.parquet"]
