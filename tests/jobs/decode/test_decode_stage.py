"""The decode stage end to end (pack -> S3 -> read_sources -> decode_dataset) and its containment
of decoders that crash or hang, before a video or between two of its windows, on real Ray and a
real S3 server."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import ray

from groupemotion_core.errors import GroupEmotionError
from groupemotion_core.media.decode import DecodeSpec
from groupemotion_core.schema import CLASSES, UNKNOWN_LABEL, ClipRow
from groupemotion_core.media.spec import FIRST_WINDOW, WindowPlan
from groupemotion_core.media.synthetic import SyntheticClip, render_clip
from ray_jobs.decode.stage import SupervisedDecoder, decode_dataset, parse_faults
from ray_jobs.commands.pack import pack
from ray_jobs.inputs.sources import read_sources

SPEC = DecodeSpec(num_frames=4, frame_size=32, clip_seconds=1.0)


def _clip(label: str, seed: int, audio: bool = True, seconds: float = 1.0) -> bytes:
    return render_clip(SyntheticClip(label=label, width=64, height=48, seconds=seconds, fps=8.0, seed=seed, audio=audio))


def _rows(ds) -> dict[tuple[str, int], dict]:
    rows = ds.take_all()
    by_window = {(r["key"], r["window"]): r for r in rows}
    assert len(by_window) == len(rows), "a window came out twice"
    return by_window


def test_packed_clips_on_s3_decode_every_window_once_with_their_labels(ray_session, s3_bucket: str, tmp_path: Path):
    src = tmp_path / "src"
    expected: dict[str, tuple[str, int]] = {}  # clip -> (class, windows)
    silent = set()
    for i in range(4):
        for cls in CLASSES:
            path = src / cls / f"{cls.lower()}_{i}.mp4"
            path.parent.mkdir(parents=True, exist_ok=True)
            audio = i % 4 != 3
            seconds = 1.0 + i  # 1 to 4 one-second windows
            path.write_bytes(_clip(cls, i * 3 + CLASSES.index(cls), audio=audio, seconds=seconds))
            expected[f"{cls}/{path.stem}"] = (cls, i + 1)
            if not audio:
                silent.add(f"{cls}/{path.stem}")
    corrupt = src / "Neutral" / "neutral_2.mp4"
    corrupt.write_bytes(corrupt.read_bytes()[:2000])  # truncated mid-file
    dest = f"{s3_bucket}/packed"
    manifest = pack(str(src), dest, shard_size=5, progress=io.StringIO())
    assert len(manifest["shards"]) == 3

    decoded = decode_dataset(read_sources(f"{dest}/manifest.json", shard_ends=True), SPEC, WindowPlan(), actors=2)
    decoded = decoded.materialize()
    rows = _rows(decoded)

    # Typed columns in every block: no `null` error column from a batch without errors.
    for block in decoded.iter_batches(batch_size=None, batch_format="pyarrow"):
        assert block.schema.field("error").type == pa.string()

    shards = {f"{dest}/{shard['name']}": shard["clips"] for shard in manifest["shards"]}
    ends = {key: r["windows"] for (key, window), r in rows.items() if window == ClipRow.SHARD_END}
    assert ends == shards  # each shard's marker counts its videos
    by_clip: dict[str, list[dict]] = {}
    for (key, window), row in rows.items():
        if window == ClipRow.SHARD_END:
            continue
        shard, _, clip = key.partition(".tar/")
        assert f"{shard}.tar" in shards
        by_clip.setdefault(clip, []).append(row)
    assert sorted(by_clip) == sorted(expected)
    for clip, (cls, count) in expected.items():
        windows = sorted(by_clip[clip], key=lambda r: r["window"])
        if clip == "Neutral/neutral_2":
            [row] = windows
            assert (row["window"], row["windows"]) == (ClipRow.WHOLE_VIDEO, 0)
            assert row["error"].startswith("undecodable: ") and row["label"] == CLASSES.index(cls)
            assert not row["frames"].any() and row["audio_len"] == 0
            continue
        assert [(r["window"], r["windows"], r["start_s"], r["end_s"]) for r in windows] == [
            (i, count, float(i), float(i + 1)) for i in range(count)
        ]
        for row in windows:
            assert row["error"] is None, (clip, row["error"])
            assert row["label"] == CLASSES.index(cls)
            assert row["frames"].shape == (4, 32, 32, 3) and row["frames"].dtype == np.uint8 and row["frames"].any()
            assert row["audio"].shape == (16000,) and row["audio"].dtype == np.float32
            assert (row["audio_len"] == 0) == (clip in silent)


def test_crash_and_hang_each_cost_one_video_and_the_rest_decode(ray_session, tmp_path: Path):
    src = tmp_path / "videos"
    src.mkdir()
    for i in range(6):
        (src / f"clip_{i}.mp4").write_bytes(_clip(CLASSES[i % 3], i, seconds=2.0))
    sources = read_sources(str(src))
    # A label that is not a class is an error row too, never an exception.
    odd = ray.data.from_items([{"key": "odd", "video": _clip("Neutral", 9), "label": "Happy"}])

    decoded = decode_dataset(
        sources.union(odd), SPEC, FIRST_WINDOW, actors=1, timeout_s=5.0, fault_inject="crash:clip_1,hang:clip_4"
    )
    rows = _rows(decoded)

    assert len(rows) == 7 and all(r["windows"] == (0 if r["error"] else 1) for r in rows.values())
    errors = {k.rsplit("/", 1)[-1]: r["error"] for (k, _), r in rows.items() if r["error"] is not None}
    assert errors.keys() == {"clip_1.mp4", "clip_4.mp4", "odd"}
    assert errors["clip_1.mp4"].startswith("crashed: ")
    assert errors["clip_4.mp4"] == "timeout: no window decoded in 5 s"
    assert errors["odd"].startswith("bad_label: ")
    assert rows[("odd", ClipRow.WHOLE_VIDEO)]["label"] == UNKNOWN_LABEL
    ok = [r for r in rows.values() if r["error"] is None]
    assert len(ok) == 4 and all(r["frames"].any() and (r["start_s"], r["end_s"]) == (0.0, 1.0) for r in ok)


def test_a_decoder_that_dies_mid_video_fails_only_the_windows_it_did_not_reach():
    decoder = SupervisedDecoder(SPEC, WindowPlan(), timeout_s=3.0, faults=parse_faults("hang@2:slow,crash@1:boom"))
    try:
        slow = list(decoder.windows("slow", _clip("Positive", 1, seconds=4.0)))
        assert [(w.index, w.count, w.error is None) for w in slow] == [(0, 4, True), (1, 4, True), (2, 4, False), (3, 4, False)]
        assert [(w.start_s, w.end_s) for w in slow[:2]] == [(0.0, 1.0), (1.0, 2.0)]
        assert all(w.error.reason == "timeout" and math.isnan(w.start_s) and w.clip is None for w in slow[2:])
        boom = list(decoder.windows("boom", _clip("Positive", 1, seconds=3.0)))
        assert [w.error and w.error.reason for w in boom] == [None, "crashed", "crashed"]
        # The child is started again and the next video decodes whole.
        fine = list(decoder.windows("fine", _clip("Negative", 2, seconds=2.0)))
        assert [w.error for w in fine] == [None, None] and all(w.clip.frames.any() for w in fine)
    finally:
        decoder.close()


def test_supervised_decoder_restarts_after_a_crash_and_reports_bad_media():
    decoder = SupervisedDecoder(SPEC, FIRST_WINDOW, timeout_s=30.0, faults=parse_faults("crash:boom"))
    try:
        with pytest.raises(GroupEmotionError, match="crashed"):
            list(decoder.windows("boom", _clip("Positive", 1)))
        [window] = decoder.windows("fine", _clip("Positive", 1))
        assert window.clip.frames.shape == (4, 32, 32, 3) and window.clip.audio_len > 0
        with pytest.raises(GroupEmotionError, match="not_media"):
            list(decoder.windows("text", b"hello, not a video"))
    finally:
        decoder.close()


def test_fault_switch_is_validated():
    assert parse_faults("") == ()
    assert parse_faults("crash:a, hang@3:b/c") == (("crash", "a", None), ("hang", "b/c", 3))
    for bad in ("explode:a", "hang@x:a", "crash:"):
        with pytest.raises(GroupEmotionError, match="bad_fault_inject"):
            parse_faults(bad)
