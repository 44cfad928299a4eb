"""The decode stage end to end (pack -> S3 -> read_sources -> decode_dataset) and its containment
of decoders that crash or hang, on real Ray and a real S3 server."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import ray

from groupemotion_core.errors import GroupEmotionError
from groupemotion_core.media import DecodeSpec
from groupemotion_core.schema import CLASSES, UNKNOWN_LABEL
from groupemotion_core.synthetic import SyntheticClip, render_clip
from ray_jobs.decode_stage import SupervisedDecoder, decode_dataset, parse_faults
from ray_jobs.pack import pack
from ray_jobs.sources import read_sources

SPEC = DecodeSpec(num_frames=4, frame_size=32, clip_seconds=1.0)


def _clip(label: str, seed: int, audio: bool = True) -> bytes:
    return render_clip(SyntheticClip(label=label, width=64, height=48, seconds=1.0, seed=seed, audio=audio))


def _rows(ds) -> dict[str, dict]:
    rows = ds.take_all()
    by_key = {r["key"]: r for r in rows}
    assert len(by_key) == len(rows), "a key came out twice"
    return by_key


def test_packed_clips_on_s3_decode_once_each_with_their_labels(ray_session, s3_bucket: str, tmp_path: Path):
    src = tmp_path / "src"
    expected: dict[str, str] = {}
    silent = set()
    for i in range(10):
        for cls in CLASSES:
            path = src / cls / f"{cls.lower()}_{i}.mp4"
            path.parent.mkdir(parents=True, exist_ok=True)
            audio = i % 4 != 3
            path.write_bytes(_clip(cls, i * 3 + CLASSES.index(cls), audio=audio))
            expected[f"{cls}/{path.stem}"] = cls
            if not audio:
                silent.add(f"{cls}/{path.stem}")
    corrupt = src / "Neutral" / "neutral_5.mp4"
    corrupt.write_bytes(corrupt.read_bytes()[:2000])  # truncated mid-file
    dest = f"{s3_bucket}/packed"
    manifest = pack(str(src), dest, shard_size=8, progress=io.StringIO())
    assert len(manifest["shards"]) == 4

    decoded = decode_dataset(read_sources(f"{dest}/manifest.json"), SPEC, concurrency=2).materialize()
    rows = _rows(decoded)

    # Typed columns in every block: no `null` error column from a batch without errors.
    for block in decoded.iter_batches(batch_size=None, batch_format="pyarrow"):
        assert block.schema.field("error").type == pa.string()

    shards = {f"{dest}/{shard['name']}" for shard in manifest["shards"]}
    by_clip = {}
    for key, row in rows.items():
        shard, _, clip = key.partition(".tar/")
        assert f"{shard}.tar" in shards
        by_clip[clip] = row
    assert len(by_clip) == len(rows) and sorted(by_clip) == sorted(expected)
    for key, cls in expected.items():
        row = by_clip[key]
        assert row["label"] == CLASSES.index(cls)
        assert row["frames"].shape == (4, 32, 32, 3) and row["frames"].dtype == np.uint8
        assert row["audio"].shape == (16000,) and row["audio"].dtype == np.float32
        if key == "Neutral/neutral_5":
            assert row["error"].startswith("undecodable: ")
            assert not row["frames"].any() and row["audio_len"] == 0
            continue
        assert row["error"] is None, (key, row["error"])
        assert row["frames"].any()
        assert (row["audio_len"] == 0) == (key in silent)


def test_crash_and_hang_each_cost_one_row_and_the_rest_decode(ray_session, tmp_path: Path):
    src = tmp_path / "videos"
    src.mkdir()
    for i in range(6):
        (src / f"clip_{i}.mp4").write_bytes(_clip(CLASSES[i % 3], i))
    sources = read_sources(str(src))
    # A label that is not a class is an error row too, never an exception.
    odd = ray.data.from_items([{"key": "odd", "video": _clip("Neutral", 9), "label": "Happy"}])

    decoded = decode_dataset(
        sources.union(odd), SPEC, concurrency=1, timeout_s=5.0, fault_inject="crash:clip_1,hang:clip_4"
    )
    rows = _rows(decoded)

    errors = {k.rsplit("/", 1)[-1]: r["error"] for k, r in rows.items() if r["error"] is not None}
    assert errors.keys() == {"clip_1.mp4", "clip_4.mp4", "odd"}
    assert errors["clip_1.mp4"].startswith("crashed: ")
    assert errors["clip_4.mp4"] == "timeout: decoding took longer than 5 s"
    assert errors["odd"].startswith("bad_label: ")
    assert rows["odd"]["label"] == UNKNOWN_LABEL
    assert sum(r["error"] is None and r["frames"].any() for r in rows.values()) == 4


def test_supervised_decoder_restarts_after_a_crash():
    decoder = SupervisedDecoder(SPEC, timeout_s=30.0, faults=parse_faults("crash:boom"))
    try:
        with pytest.raises(GroupEmotionError, match="crashed"):
            decoder.decode("boom", _clip("Positive", 1))
        clip = decoder.decode("fine", _clip("Positive", 1))
        assert clip.frames.shape == (4, 32, 32, 3) and clip.audio_len > 0
        with pytest.raises(GroupEmotionError, match="not_media"):
            decoder.decode("text", b"hello, not a video")
    finally:
        decoder.close()


def test_fault_switch_is_validated():
    assert parse_faults("") == ()
    assert parse_faults("crash:a, hang:b/c") == (("crash", "a"), ("hang", "b/c"))
    with pytest.raises(GroupEmotionError, match="bad_fault_inject"):
        parse_faults("explode:a")
