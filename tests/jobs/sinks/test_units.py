"""The unit-commit mechanism the label sink and the clip cache share, on its own: which unit a row
belongs to, when a unit is whole in a stream of no order, and a unit closed once. No Ray."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from groupemotion_core.schema import ClipRow
from ray_jobs.sinks.units import UnitStream, describe, plan, write_parquet

SHARD = "s3://b/shards/shard-000000.tar"
OBJECTS = [f"s3://b/videos/v{i}.mp4" for i in range(5)]


def _row(key: str, window: int, windows: int) -> dict:
    return {ClipRow.KEY: key, ClipRow.WINDOW: window, ClipRow.WINDOWS: windows}


def test_units_are_each_shard_then_groups_of_consecutive_objects():
    assert plan([OBJECTS[0], SHARD, *OBJECTS[1:]], 2) == [
        ((SHARD,), True), (tuple(OBJECTS[:2]), False), (tuple(OBJECTS[2:4]), False), ((OBJECTS[4],), False)]
    assert describe([SHARD]) == SHARD and describe(OBJECTS[:2]) == f"2 objects from {OBJECTS[0]}"


def test_a_unit_is_whole_when_its_videos_are_complete_in_any_order_and_closes_once():
    stream = UnitStream([((SHARD,), None), (tuple(OBJECTS[:2]), 2)], "GROUPEMOTION_TEST_EXIT_AFTER_UNITS")
    # A member key may hold slashes; a shard's own row (its end marker) belongs to it too.
    assert stream.add(_row(f"{SHARD}/dir/a.mp4", 1, 2)) == (0, None)
    assert stream.add(_row(OBJECTS[1], ClipRow.WHOLE_VIDEO, 0))[1] is not None
    assert stream.add(_row(SHARD, ClipRow.SHARD_END, 1)) == (0, None)
    assert not stream.whole(0) and not stream.whole(1)
    index, video = stream.add(_row(f"{SHARD}/dir/a.mp4", 0, 2))
    assert index == 0 and [r[ClipRow.WINDOW] for r in video] == [0, 1] and stream.whole(0)

    assert stream.close(0, [None, "undecodable: no picture"]) is None  # the video's failure: commit
    with pytest.raises(RuntimeError, match="after its files were committed"):
        stream.add(_row(f"{SHARD}/dir/b.mp4", 0, 1))
    with pytest.raises(RuntimeError, match="1 units incomplete"):
        stream.finish()
    stream.add(_row(OBJECTS[0], 0, 1))
    assert stream.close(1, ["storage_unavailable: s3://b: 503"]) == "storage_unavailable: s3://b: 503"
    stream.finish()
    with pytest.raises(RuntimeError, match="belongs to no planned input"):
        stream.add(_row("s3://b/other.mp4", 0, 1))


def test_a_unit_file_is_written_whole_with_no_temporary_left(tmp_path):
    table = pa.table({"key": ["a", "b"]})
    written = write_parquet(str(tmp_path / "part.parquet"), table, compression="zstd")
    assert [p.name for p in tmp_path.iterdir()] == ["part.parquet"]
    assert written == (tmp_path / "part.parquet").stat().st_size
    assert pq.read_table(tmp_path / "part.parquet").equals(table)
