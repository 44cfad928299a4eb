"""`groupemotion pack`: shards and manifest on S3 and local disk, determinism, labels, mistakes."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from groupemotion_core.errors import GroupEmotionError
from groupemotion_core.media.synthetic import SyntheticClip, render_clip
from ray_jobs.inputs import storage
from ray_jobs.cli import main
from ray_jobs.commands.pack import pack


def _write(path: Path, label: str, seed: int, audio: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    spec = SyntheticClip(label=label, width=64, height=48, seconds=1.0, seed=seed, audio=audio,
                         container=path.suffix.lstrip("."))
    render_clip(spec, path)


@pytest.fixture
def class_folders(tmp_path: Path) -> Path:
    """12 clips in class-named folders (one nested deeper, one with a dotted name, one mkv) and
    one video outside any class folder."""
    root = tmp_path / "src"
    for i in range(4):
        for j, cls in enumerate(("Negative", "Neutral", "Positive")):
            _write(root / cls / f"{cls.lower()}_{i}.mp4", cls, seed=i * 3 + j, audio=i != 1)
    _write(root / "extra" / "Positive" / "clip.v2.mkv", "Positive", seed=99)
    _write(root / "unsorted" / "mystery.mp4", "Neutral", seed=98)
    return root


def _members(data: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        return tar.getmembers()


def test_pack_to_s3_writes_shards_members_and_manifest(class_folders: Path, s3_bucket: str):
    dest = f"{s3_bucket}/packed"
    progress = io.StringIO()
    manifest = pack(str(class_folders), dest, shard_size=5, progress=progress)

    assert [s["name"] for s in manifest["shards"]] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert [s["clips"] for s in manifest["shards"]] == [5, 5, 4]
    assert manifest["clips"] == 14
    assert manifest["classes"] == {"Negative": 4, "Neutral": 4, "Positive": 5}
    assert manifest["unlabelled"] == 1
    assert json.loads(storage.read_bytes(f"{dest}/manifest.json")) == manifest
    assert len(progress.getvalue().splitlines()) == 3 and "(14/14 clips)" in progress.getvalue()

    labels = {}
    for shard in manifest["shards"]:
        data = storage.read_bytes(f"{dest}/{shard['name']}")
        assert len(data) == shard["bytes"]
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for m in tar.getmembers():
                assert (m.mtime, m.uid, m.gid, m.uname, m.mode) == (0, 0, 0, "", 0o644)
                if m.name.endswith(".json"):
                    labels[m.name[: -len(".json")]] = json.loads(tar.extractfile(m).read())["label"]
    assert labels["Negative/negative_0"] == "Negative"
    assert labels["extra/Positive/clip_v2"] == "Positive"  # dots end a WebDataset key: replaced
    assert labels["unsorted/mystery"] is None
    last = _members(storage.read_bytes(f"{dest}/shard-000002.tar"))  # keys in code point order
    assert [m.name for m in last] == [
        "Positive/positive_2.mp4", "Positive/positive_2.json",
        "Positive/positive_3.mp4", "Positive/positive_3.json",
        "extra/Positive/clip_v2.mkv", "extra/Positive/clip_v2.json",
        "unsorted/mystery.mp4", "unsorted/mystery.json",
    ]


def test_pack_is_byte_identical_and_replaces_stale_shards(class_folders: Path, tmp_path: Path):
    first, second = tmp_path / "a", tmp_path / "b"
    pack(str(class_folders), str(first), shard_size=2, progress=io.StringIO())
    pack(str(class_folders), str(second), shard_size=2, progress=io.StringIO())
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir()) and len(names) == 8
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name

    # A smaller pack into the same place leaves only its own shards behind.
    pack(str(class_folders), str(first), shard_size=5, progress=io.StringIO())
    assert sorted(p.name for p in first.iterdir()) == [
        "manifest.json", "shard-000000.tar", "shard-000001.tar", "shard-000002.tar",
    ]


@pytest.fixture
def flat_folder(tmp_path: Path) -> Path:
    root = tmp_path / "flat"
    for i, cls in enumerate(("Negative", "Neutral", "Positive", "Positive")):
        _write(root / f"{i}_1.mp4", cls, seed=i)
    return root


def test_pack_labels_from_csv_with_names_and_vgaf_numbers(flat_folder: Path, tmp_path: Path):
    csv = tmp_path / "labels.csv"
    # Header, names with and without extension, any case, and VGAF numbers (1=Pos, 2=Neu, 3=Neg).
    csv.write_text("Vid_name,Label\n0_1.mp4,3\n1_1,neutral\n2_1.mp4,Positive\n3_1,1\n")
    dest = tmp_path / "out"
    assert main(["pack", str(flat_folder), str(dest), "--labels", str(csv), "--shard-size", "3"]) == 0
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["classes"] == {"Negative": 1, "Neutral": 1, "Positive": 2}
    with tarfile.open(dest / "shard-000000.tar") as tar:
        assert json.loads(tar.extractfile("0_1.json").read()) == {"label": "Negative"}


def test_pack_reads_vgaf_whitespace_label_files(flat_folder: Path, tmp_path: Path):
    txt = tmp_path / "Train_labels.txt"
    txt.write_text("Vid_name Label\n0_1 3\n1_1 2\n2_1 1\n3_1 1\n")
    manifest = pack(str(flat_folder), str(tmp_path / "out"), labels_csv=str(txt), progress=io.StringIO())
    assert manifest["classes"] == {"Negative": 1, "Neutral": 1, "Positive": 2}


@pytest.mark.parametrize(
    "csv_text, reason",
    [
        ("0_1,Negative\n1_1,Neutral\n2_1,Positive\n3_1,Positive\n9_9,Positive\n", "missing_video"),
        ("0_1,Negative\n1_1,Neutral\n2_1,Positive\n3_1,Happy\n", "bad_label"),
        ("0_1,Negative\n1_1,Neutral\n2_1,Positive\n3_1,7\n", "bad_label"),
        ("0_1,Negative\n1_1,Neutral\n2_1,Positive\n", "unlabelled"),
        ("0_1,Negative\n0_1.mp4,Neutral\n", "bad_labels"),
    ],
)
def test_pack_label_mistakes_are_clear_errors_and_write_nothing(
    flat_folder: Path, tmp_path: Path, capsys, csv_text: str, reason: str
):
    csv = tmp_path / "labels.csv"
    csv.write_text(csv_text)
    dest = tmp_path / "out"
    assert main(["pack", str(flat_folder), str(dest), "--labels", str(csv)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {reason}: ")
    assert not dest.exists()


def test_pack_refuses_an_empty_source_and_a_bad_shard_size(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(GroupEmotionError, match="not_found"):
        pack(str(tmp_path / "empty"), str(tmp_path / "out"))
    with pytest.raises(GroupEmotionError, match="bad_argument"):
        pack(str(tmp_path / "empty"), str(tmp_path / "out"), shard_size=0)


def test_a_shard_that_fails_midway_never_appears_on_s3(s3_bucket: str):
    """Pack streams each shard through storage.open_write_atomic: on S3 a multipart upload that
    is aborted, not completed, when writing fails."""
    import boto3

    uri = f"{s3_bucket}/out/shard-000000.tar"
    with pytest.raises(RuntimeError):
        with storage.open_write_atomic(uri) as f:
            f.write(b"x" * (1 << 20))
            raise RuntimeError("source vanished")
    assert not storage.exists(uri)
    bucket = s3_bucket[len("s3://") :]
    assert "Uploads" not in boto3.client("s3").list_multipart_uploads(Bucket=bucket)


def test_pack_reads_many_objects_at_once_within_its_memory_bound(class_folders: Path, tmp_path: Path, monkeypatch):
    import threading
    import time

    from ray_jobs.commands import pack as pack_module

    reading, most, held, most_held = [0], [0], [0], [0]
    lock = threading.Lock()
    read_bytes = storage.read_bytes

    def counted(uri: str, max_bytes=None) -> bytes:
        size = Path(uri).stat().st_size
        with lock:
            reading[0] += 1
            held[0] += size
            most[0], most_held[0] = max(most[0], reading[0]), max(most_held[0], held[0])
        time.sleep(0.05)  # a store's latency: reads overlap when they can
        try:
            return read_bytes(uri, max_bytes)
        finally:
            with lock:
                reading[0] -= 1
                held[0] -= size

    monkeypatch.setattr(storage, "read_bytes", counted)
    pack(str(class_folders), str(tmp_path / "many"), shard_size=20, progress=io.StringIO())
    assert 1 < most[0] <= pack_module.READERS

    largest = max(p.stat().st_size for p in class_folders.rglob("*.mp4"))
    monkeypatch.setattr(pack_module, "READ_AHEAD_BYTES", 2 * largest)
    most[0] = most_held[0] = 0
    pack(str(class_folders), str(tmp_path / "bounded"), shard_size=20, progress=io.StringIO())
    assert most[0] > 1 and most_held[0] <= 2 * largest  # still at once, within the bytes allowed
    assert (tmp_path / "many" / "shard-000000.tar").read_bytes() == (tmp_path / "bounded" / "shard-000000.tar").read_bytes()
