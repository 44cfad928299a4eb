"""read_sources and list_inputs: both layouts, labels, limits and hostile tar shards, on real Ray."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from groupemotion_core.errors import GroupEmotionError
from groupemotion_core.media.synthetic import SyntheticClip, render_clip
from ray_jobs.inputs import storage
from ray_jobs.commands.pack import pack
from ray_jobs.inputs.sources import list_inputs, read_labels_csv, read_sources, shard_videos


def _clip(label: str, seed: int, container: str = "mp4") -> bytes:
    spec = SyntheticClip(label=label, width=64, height=48, seconds=1.0, seed=seed, container=container)
    return render_clip(spec)


def _rows(ds) -> dict[str, dict]:
    rows = ds.take_all()
    by_key = {r["key"]: r for r in rows}
    assert len(by_key) == len(rows), "a key came out twice"
    return by_key


def test_list_inputs_expands_folders_globs_manifests_in_a_stable_order(tmp_path: Path):
    (tmp_path / "b").mkdir()
    (tmp_path / "a.mp4").write_bytes(b"1")
    (tmp_path / "b" / "c.MKV").write_bytes(b"2")
    (tmp_path / "b" / "notes.txt").write_bytes(b"3")
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "shard-000001.tar").write_bytes(b"4")
    (tmp_path / "s" / "shard-000000.tar").write_bytes(b"5")
    (tmp_path / "s" / "manifest.json").write_text(
        '{"shards": [{"name": "shard-000001.tar", "bytes": 1}, {"name": "shard-000000.tar", "bytes": 1}]}'
    )
    root = str(tmp_path)
    assert list_inputs(f"{root}/b") == [f"{root}/b/c.MKV"]
    assert list_inputs([f"{root}/*.mp4", root]) == [
        f"{root}/a.mp4", f"{root}/b/c.MKV", f"{root}/s/shard-000000.tar", f"{root}/s/shard-000001.tar",
    ]
    assert list_inputs(f"{root}/s/manifest.json") == [f"{root}/s/shard-000001.tar", f"{root}/s/shard-000000.tar"]
    with pytest.raises(GroupEmotionError, match="not_found"):
        list_inputs(f"{root}/missing")
    with pytest.raises(GroupEmotionError, match="bad_input"):
        list_inputs(f"{root}/b/notes.txt")
    (tmp_path / "evil").mkdir()
    (tmp_path / "evil" / "manifest.json").write_text('{"shards": [{"name": "../s/shard-000000.tar", "bytes": 1}]}')
    with pytest.raises(GroupEmotionError, match="bad_manifest"):
        list_inputs(f"{root}/evil/manifest.json")


def test_labels_csv_reader_accepts_vgaf_files_and_refuses_contradictions(tmp_path: Path):
    good = tmp_path / "labels.csv"
    good.write_text("\ufeffVid_name,Label\nclips/10_1.mp4,1\n10_2 ,neutral\n\n")
    assert read_labels_csv(str(good)) == {"10_1": "1", "10_2": "neutral"}
    bad = tmp_path / "bad.csv"
    bad.write_text("10_1,Positive\n10_1.mp4,Negative\n")
    with pytest.raises(GroupEmotionError, match="bad_labels"):
        read_labels_csv(str(bad))


def _hostile_tar() -> bytes:
    """Members that would write outside any folder if extracted, links, and special files,
    around two honest clips."""
    buf = io.BytesIO()
    video = _clip("Positive", 1)
    with tarfile.open(fileobj=buf, mode="w") as tar:

        def add(name: str, data: bytes = b"", **attrs) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            for k, v in attrs.items():
                setattr(info, k, v)
            tar.addfile(info, io.BytesIO(data) if data else None)

        add("good.mp4", video)
        add("good.json", b'{"label": "positive"}')
        add("../evil.mp4", video)
        add("../evil.json", b'{"label": "Negative"}')
        add("/abs.mp4", video)
        add("link.mp4", type=tarfile.SYMTYPE, linkname="/etc/passwd")
        add("link.json", b'{"label": "Neutral"}')
        add("hard.mp4", type=tarfile.LNKTYPE, linkname="good.mp4")
        add("dev.mp4", type=tarfile.CHRTYPE, devmajor=1, devminor=3)
        add("dir.mp4", type=tarfile.DIRTYPE)
        add("sub/../../up.mp4", video)
        add("vgaf.mp4", video)
        add("vgaf.json", b'{"label": 3}')
    return buf.getvalue()


def test_hostile_tar_members_are_never_files_and_never_rows(ray_session, tmp_path: Path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # where a careless extractor would write `../evil.mp4`
    shard = work / "shards" / "hostile.tar"
    shard.parent.mkdir()
    shard.write_bytes(_hostile_tar())
    before = sorted(str(p) for p in tmp_path.rglob("*"))

    rows = _rows(read_sources(str(shard)))

    assert sorted(rows) == [f"{shard}/good", f"{shard}/link", f"{shard}/vgaf"]
    assert rows[f"{shard}/good"]["label"] == "Positive"
    assert rows[f"{shard}/good"]["video"] == _clip("Positive", 1)
    assert rows[f"{shard}/vgaf"]["label"] == "Negative"  # VGAF number 3
    # The symlink is skipped; its label member alone makes a clean error row.
    assert rows[f"{shard}/link"]["video"] is None
    assert rows[f"{shard}/link"]["error"].startswith("no_video: ")
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before
    assert not os.path.exists("/abs.mp4")


def test_plain_objects_on_s3_with_labels_csv(ray_session, s3_bucket: str):
    names = {"1_1.mp4": ("Positive", "1"), "1_2.mkv": ("Negative", "3"), "2_1.webm": ("Neutral", "Neutral"),
             "2_2.mp4": ("Positive", "Happy"), "3_1.mp4": ("Neutral", None)}
    for i, (name, (cls, _)) in enumerate(names.items()):
        storage.write_bytes_atomic(f"{s3_bucket}/videos/{name}", _clip(cls, i, name.rsplit(".", 1)[1]))
    csv = "Vid_name,Label\n" + "".join(f"{n},{v}\n" for n, (_, v) in names.items() if v is not None)
    storage.write_bytes_atomic(f"{s3_bucket}/labels.csv", csv.encode())

    rows = _rows(read_sources(f"{s3_bucket}/videos/", f"{s3_bucket}/labels.csv"))

    assert sorted(rows) == sorted(f"{s3_bucket}/videos/{n}" for n in names)
    labels = {k.rsplit("/", 1)[1]: r["label"] for k, r in rows.items()}
    # Valid labels are canonical; "Happy" is passed on for the decode stage to report.
    assert labels == {"1_1.mp4": "Positive", "1_2.mkv": "Negative", "2_1.webm": "Neutral",
                      "2_2.mp4": "Happy", "3_1.mp4": None}
    assert rows[f"{s3_bucket}/videos/1_1.mp4"]["video"] == _clip("Positive", 0)
    assert all(r["error"] is None for r in rows.values())


def test_limits_and_truncated_shards_become_error_rows(ray_session, tmp_path: Path):
    src = tmp_path / "src" / "Neutral"
    src.mkdir(parents=True)
    sizes = {}
    for i in range(3):
        data = _clip("Neutral", i)
        (src / f"n{i}.mp4").write_bytes(data)
        sizes[f"n{i}"] = len(data)
    pack(str(tmp_path / "src"), str(tmp_path / "packed"), progress=io.StringIO())
    shard = tmp_path / "packed" / "shard-000000.tar"
    whole = shard.read_bytes()
    cut = tmp_path / "cut" / "shard-000000.tar"
    cut.parent.mkdir()
    cut.write_bytes(whole[: len(whole) // 2])  # ends inside the second clip
    limit = sorted(sizes.values())[1]  # one clip is over the limit

    rows = _rows(read_sources([str(shard), str(src), str(cut)], max_video_bytes=limit))

    for name, size in sizes.items():
        for key in (f"{shard}/Neutral/{name}", f"{src}/{name}.mp4"):
            if size > limit:
                assert rows[key]["error"] == f"too_large: {size} bytes > {limit}" and rows[key]["video"] is None
            else:
                assert rows[key]["error"] is None and len(rows[key]["video"]) == size
            assert rows[key]["label"] == "Neutral"
    cut_rows = sorted(k for k in rows if k.startswith(str(cut)))
    assert cut_rows[0] == str(cut) and rows[str(cut)]["error"].startswith("bad_shard: ")
    assert len(cut_rows) <= 2  # the clip before the cut, if any, and the error


def test_every_container_the_decoder_opens_is_an_input(tmp_path: Path):
    names = ["a.flv", "b.ts", "c.WMV", "d.3gp", "e.m4v", "f.mpg", "g.ogv", "h.asf", "i.mp4"]
    for name in [*names, "notes.txt", "cover.jpg"]:
        (tmp_path / name).write_bytes(b"1")
    assert list_inputs(str(tmp_path)) == [f"{tmp_path}/{n}" for n in names]


def test_shard_ends_count_what_each_shard_gave_and_manifests_count_what_pack_wrote(ray_session, tmp_path: Path):
    src = tmp_path / "src" / "Positive"
    src.mkdir(parents=True)
    for i in range(3):
        (src / f"p{i}.mp4").write_bytes(_clip("Positive", i))
    pack(str(tmp_path / "src"), str(tmp_path / "packed"), shard_size=2, progress=io.StringIO())
    full, last = tmp_path / "packed" / "shard-000000.tar", tmp_path / "packed" / "shard-000001.tar"
    cut = tmp_path / "cut" / "shard-000000.tar"
    cut.parent.mkdir()
    cut.write_bytes(full.read_bytes()[: len(full.read_bytes()) * 3 // 4])  # ends inside the second clip

    rows = read_sources([str(full), str(last), str(cut)], shard_ends=True).take_all()

    ends = {r["key"]: r["shard_end"] for r in rows if r["shard_end"] is not None}
    others = [r for r in rows if r["shard_end"] is None]
    assert all(r["video"] is None and r["error"] is None for r in rows if r["shard_end"] is not None)
    assert ends == {str(full): 2, str(last): 1, str(cut): sum(r["key"].startswith(str(cut)) for r in others)}
    assert any(r["key"] == str(cut) and r["error"].startswith("bad_shard: ") for r in others)
    assert all(r["shard_end"] is None for r in read_sources(str(full)).take_all())  # only when asked
    # pack's manifest knows the counts of its own shards, not of shards it did not write.
    assert shard_videos([str(full), str(last), str(cut)]) == {str(full): 2, str(last): 1}
