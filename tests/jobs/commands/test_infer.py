"""The inference job end to end: real S3 (moto on 127.0.0.1), real local Ray, a saved tiny model.

The clips are generated (some without audio, two that cannot be decoded), packed into tar
shards and also uploaded as plain objects, so both layouts and the error path run through the
same job. A long generated video checks the windows and the video-level average. The
interrupted-job test kills the job process itself (GROUPEMOTION_INFER_EXIT_AFTER_UNITS) and runs
it again on shards without a manifest, which is what exactly-once has to survive.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.dataset as pads
import pytest
import torch

from groupemotion_core import Labeller
from groupemotion_core.schema import CLASSES, PROB_COLUMNS, VideoRow, WindowRow
from groupemotion_core.media.spec import WindowPlan
from groupemotion_core.media.synthetic import SyntheticClip, render_clip
from ray_jobs.commands import infer
from ray_jobs.sinks import labels
from ray_jobs.inputs import storage
from ray_jobs.cli import main
from ray_jobs.predict.model_ref import describe_model_ref, load_model_ref
from ray_jobs.commands.pack import pack
from ray_jobs.predict.pipeline import PredictOptions
from tests.hub import COMMIT, cached_snapshot

# name -> (class folder, has audio, seconds); plus two files that are not decodable videos.
# The tiny model's windows are 5 s: the 7 s clips have two windows (5 s and 2 s).
CLIPS = {f"c{i}": (CLASSES[i % 3], i % 3 != 1, 7.0 if i in (2, 5) else 1.0) for i in range(7)}
BAD = ("random", "truncated")
SMALL = dict(width=64, height=48, fps=4.0)
FEW_CPUS = dict(batch_size=4, actors=1, decode_cpus=1)


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    """Class folders of generated clips, plus one random-bytes and one truncated 'video'."""
    root = tmp_path_factory.mktemp("videos")
    for i, (name, (label, audio, seconds)) in enumerate(CLIPS.items()):
        (root / label).mkdir(exist_ok=True)
        render_clip(SyntheticClip(label=label, audio=audio, seconds=seconds, seed=i, **SMALL), root / label / f"{name}.mp4")
    whole = render_clip(SyntheticClip(label="Neutral", seed=99, seconds=1.0, **SMALL))
    (root / "Neutral" / "truncated.mp4").write_bytes(whole[: len(whole) // 3])
    (root / "Neutral" / "random.mp4").write_bytes(np.random.default_rng(0).bytes(4000))
    return root


@pytest.fixture(scope="module")
def bucket(make_bucket) -> str:
    return make_bucket()


def _read(output: str, folder: str) -> pd.DataFrame:
    uri = storage.join(output, folder)
    table = pads.dataset(storage.filesystem(uri)[1], filesystem=storage.arrow_filesystem(uri)[0]).to_table()
    schema = WindowRow.SCHEMA if folder == "windows" else VideoRow.SCHEMA
    assert table.schema.equals(schema, check_metadata=False)
    return table.to_pandas()


def _etags(uris: list[str]) -> dict[str, str]:
    return {uri: storage.filesystem(uri)[0].info(storage.filesystem(uri)[1])["ETag"] for uri in uris}


def test_shards_and_objects_on_s3_give_every_window_and_video_once_then_rerun_and_overwrite(
    ray_session, videos, tiny_checkpoint, bucket
):
    ckpt_dir, model_id = tiny_checkpoint
    model_uri = f"{bucket}/models/tiny"
    storage.upload_dir(ckpt_dir, model_uri)
    manifest = pack(str(videos), f"{bucket}/shards", shard_size=4)
    storage.upload_dir(str(videos), f"{bucket}/videos")
    output = f"{bucket}/labels"
    inputs = [f"{bucket}/shards/manifest.json", f"{bucket}/videos/"]

    summary = infer.infer(inputs, model_uri, output, PredictOptions(**FEW_CPUS))

    vids, wins = _read(output, "videos"), _read(output, "windows")
    names = {f"{label}/{name}" for name, (label, _, _) in CLIPS.items()} | {f"Neutral/{b}" for b in BAD}
    name_of = {key: key.split(".tar/", 1)[1] if ".tar/" in key else key.split("/videos/", 1)[1].removesuffix(".mp4")
               for key in vids["key"]}
    assert len(vids) == summary.videos == 2 * len(names) and vids["key"].is_unique
    assert sorted(name_of.values()) == sorted([*names, *names])  # each clip once as a shard member, once as an object
    assert {k.split(".tar/", 1)[0] + ".tar" for k in vids["key"] if ".tar/" in k} == {
        f"{bucket}/shards/{s['name']}" for s in manifest["shards"]
    }
    # Failed videos: one videos/ row with the error, no window rows.
    failed = vids[vids["error"].notna()]
    assert sorted(name_of[k].rsplit("/", 1)[1] for k in failed["key"]) == sorted(BAD * 2)
    assert failed[["label", *PROB_COLUMNS]].isna().all().all() and (failed["windows"] == 0).all()
    assert not set(failed["key"]) & set(wins["key"])
    # Every other video: its windows, 5 s apart, and a label that is the argmax of its mean.
    assert not wins.duplicated(["key", "window"]).any() and wins["error"].isna().all()
    ok = vids[vids["error"].isna()].set_index("key")
    for key, video in ok.iterrows():
        seconds = CLIPS[name_of[key].rsplit("/", 1)[1]][2]
        mine = wins[wins["key"] == key].sort_values("window")
        expected = [(0, 0.0, 5.0), (1, 5.0, 7.0)] if seconds == 7.0 else [(0, 0.0, 1.0)]
        assert list(mine[["window", "start_s", "end_s"]].itertuples(index=False, name=None)) == expected
        assert (video["windows"], video["seconds"]) == (len(expected), seconds)
    probs = wins[list(PROB_COLUMNS)].to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert (wins["label"].to_numpy() == np.array(CLASSES)[probs.argmax(axis=1)]).all()
    assert (ok["label"].to_numpy() == np.array(CLASSES)[ok[list(PROB_COLUMNS)].to_numpy().argmax(axis=1)]).all()
    assert set(vids["model"]) == set(wins["model"]) == {model_id}
    # The same clip gets the same answer from a shard and as a plain object.
    spread = ok.groupby(ok.index.map(name_of))[list(PROB_COLUMNS)].agg(lambda p: p.max() - p.min())
    assert (spread.to_numpy() < 1e-4).all(), spread
    assert (summary.videos_labelled, summary.windows, summary.errors) == (14, 18, {"not_media": 2, "undecodable": 2})
    assert pd.read_parquet(f"{output}/videos").shape == vids.shape  # pandas reads the folders too (skips _ files)

    job = json.loads(storage.read_bytes(f"{output}/_job.json"))
    assert job["model_id"] == model_id and job["inputs"] == inputs
    assert job["window_plan"] == {"mode": "all", "stride_s": None, "max_windows": None}
    assert json.loads(storage.read_bytes(f"{output}/_SUCCESS"))["videos"] == len(vids)
    files = _etags(labels.part_files(output, "videos") + labels.part_files(output, "windows"))
    assert len(files) == 2 * (len(manifest["shards"]) + 1)  # one per shard and one for the 9 objects, of each

    again = infer.infer(inputs, model_uri, output, PredictOptions(**FEW_CPUS))
    assert (again.videos, again.units_committed, again.units_skipped) == (0, 0, len(files) // 2)
    assert _etags(list(files)) == files
    assert json.loads(storage.read_bytes(f"{output}/_SUCCESS"))["videos"] == len(vids)  # no-op run rewrote nothing

    redo = infer.infer(inputs, model_uri, output, PredictOptions(**FEW_CPUS), plan=WindowPlan("first"), overwrite=True)
    assert (redo.videos, redo.windows, redo.units_committed, redo.units_skipped) == (len(vids), 14, len(files) // 2, 0)
    assert sorted(_read(output, "videos")["key"]) == sorted(vids["key"])
    assert (_read(output, "windows")["window"] == 0).all()


def test_a_long_video_gives_every_window_and_their_weighted_mean_and_max_windows_spreads_them(
    ray_session, tiny_checkpoint, tmp_path
):
    ckpt_dir, _ = tiny_checkpoint
    render_clip(SyntheticClip(label="Positive", seconds=47.0, seed=5, **SMALL), tmp_path / "long.mp4")
    every, spread = tmp_path / "every", tmp_path / "spread"

    infer.infer([str(tmp_path / "long.mp4")], ckpt_dir, str(every), PredictOptions(**FEW_CPUS))
    infer.infer([str(tmp_path / "long.mp4")], ckpt_dir, str(spread), PredictOptions(**FEW_CPUS),
                plan=WindowPlan(max_windows=4))

    windows = pd.read_parquet(every / "windows").sort_values("window")
    starts = [5.0 * i for i in range(10)]
    assert windows["window"].tolist() == list(range(10))
    assert windows["start_s"].tolist() == starts
    assert windows["end_s"].tolist() == [s + 5.0 for s in starts[:-1]] + [47.0]  # the last one is 2 s
    [video] = pd.read_parquet(every / "videos").to_dict("records")
    weights = (windows["end_s"] - windows["start_s"]).to_numpy()
    mean = weights @ windows[list(PROB_COLUMNS)].to_numpy(np.float64) / weights.sum()
    np.testing.assert_allclose([video[c] for c in PROB_COLUMNS], mean, rtol=1e-5)
    assert not np.allclose(mean, windows[list(PROB_COLUMNS)].to_numpy().mean(axis=0), rtol=1e-7, atol=0)
    assert (video["windows"], video["seconds"], video["label"]) == (10, 47.0, CLASSES[int(np.argmax(mean))])

    picked = pd.read_parquet(spread / "windows").sort_values("window")
    assert picked["start_s"].tolist() == [0.0, 15.0, 30.0, 45.0]  # first to last, evenly
    assert picked["window"].tolist() == [0, 1, 2, 3]
    # A window is labelled the same whichever plan picked it.
    same = windows.set_index("start_s").loc[picked["start_s"], list(PROB_COLUMNS)].to_numpy()
    np.testing.assert_allclose(picked[list(PROB_COLUMNS)].to_numpy(), same, atol=1e-5)
    assert json.loads((spread / "_job.json").read_text())["window_plan"]["max_windows"] == 4


def test_the_labeller_gives_the_numbers_infer_writes(ray_session, videos, tiny_checkpoint, tmp_path):
    """The same videos and checkpoint through `infer` (Ray, the decode child, batches of windows
    from several videos) and through `Labeller` (no Ray): the same windows, probabilities, video
    answer and errors. Overlapping windows (stride 2.5 s) make the video-level weights matter."""
    ckpt_dir, model_id = tiny_checkpoint
    output = tmp_path / "labels"
    infer.infer([str(videos)], ckpt_dir, str(output), PredictOptions(**FEW_CPUS), plan=WindowPlan(stride_s=2.5))
    vids = pads.dataset(output / "videos").to_table().to_pylist()
    wins = pads.dataset(output / "windows").to_table().to_pylist()
    labeller = Labeller.load(ckpt_dir, device="cpu")

    assert len(vids) == len(CLIPS) + len(BAD) and sum(v["error"] is not None for v in vids) == len(BAD)
    assert {v["model"] for v in vids} == {model_id}
    for video in vids:
        result = labeller.label(Path(video["key"]), stride_s=2.5)
        rows = sorted((w for w in wins if w["key"] == video["key"]), key=lambda w: w["window"])
        assert [(w.index, w.start_s, w.end_s, w.label, w.error) for w in result.windows] == [
            (r["window"], r["start_s"], r["end_s"], r["label"], r["error"]) for r in rows]
        assert (result.label, result.error, result.seconds, result.model_id) == (
            video["label"], video["error"], video["seconds"], video["model"])
        if result.error is None:
            np.testing.assert_allclose([[w.probabilities[c] for c in CLASSES] for w in result.windows],
                                       [[r[c] for c in PROB_COLUMNS] for r in rows], atol=1e-5)
            np.testing.assert_allclose([result.probabilities[c] for c in CLASSES],
                                       [video[c] for c in PROB_COLUMNS], atol=1e-5)


@pytest.mark.slow
def test_killed_job_run_again_labels_every_video_and_window_exactly_once(ray_session, videos, tiny_checkpoint, tmp_path):
    ckpt_dir, _ = tiny_checkpoint
    shards = tmp_path / "shards"
    pack(str(videos), str(shards), shard_size=2)
    (shards / "manifest.json").unlink()  # foreign shards: only their readers can count them
    output = tmp_path / "labels"
    args = ["infer", str(shards), "--model", ckpt_dir, "--output", str(output),
            "--batch-size", "2", "--actors", "1", "--decode-cpus", "1"]
    # The real command with no RAY_ADDRESS: it starts its own local Ray (the embedded default).
    env = {**os.environ, labels.EXIT_AFTER_UNITS_ENV: "1"}
    env.pop("RAY_ADDRESS", None)
    killed = subprocess.run([sys.executable, "-m", "ray_jobs.cli", *args], env=env, capture_output=True,
                            text=True, timeout=300)

    assert killed.returncode == -9, killed.stderr[-3000:]
    [first] = labels.part_files(str(output), "videos")
    assert labels.part_files(str(output), "windows") == [first.replace("/videos/", "/windows/")]
    assert not (output / infer.SUCCESS_FILE).exists()
    assert not [p for p in output.rglob("*") if ".tmp-" in p.name]
    # A windows/ file whose videos/ file was never written (killed between the two) is redone.
    shutil.copy(first.replace("/videos/", "/windows/"), output / "windows" / "part-0000000000000000.parquet")

    assert main(args) == 0
    vids, wins = pd.read_parquet(output / "videos"), pd.read_parquet(output / "windows")
    assert len(vids) == len(CLIPS) + len(BAD) and vids["key"].is_unique
    assert not wins.duplicated(["key", "window"]).any()
    assert len(wins) == vids["windows"].sum() == sum(2 if s == 7.0 else 1 for _, _, s in CLIPS.values())
    assert len(labels.part_files(str(output), "videos")) == 5  # 9 clips in shards of 2
    assert len(labels.part_files(str(output), "windows")) == 5
    done = json.loads((output / infer.SUCCESS_FILE).read_text())
    assert (done["units_skipped"], done["units_committed"]) == (1, 4)
    assert done["videos"] == len(vids) - len(pd.read_parquet(first))


@pytest.mark.slow
def test_a_checkpoint_on_the_hub_labels_offline_and_the_job_names_its_commit(videos, tiny_checkpoint, hub_cache, tmp_path):
    """The folder `train` exports, uploaded as it is, then found in the HF cache by the real
    command with HF_HUB_OFFLINE=1: on its own local Ray, whose model actor resolves it too."""
    ckpt_dir, model_id = tiny_checkpoint
    shutil.copytree(ckpt_dir, cached_snapshot(hub_cache, "me/tiny-emotion", "main"), dirs_exist_ok=True)
    output = tmp_path / "labels"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-m", "ray_jobs.cli", "infer", str(videos / "Positive"), "--model",
                           "hf-hub:me/tiny-emotion", "--output", str(output), "--actors", "1", "--decode-cpus", "1"],
                          env=env, capture_output=True, text=True, timeout=300)

    assert done.returncode == 0, done.stderr[-3000:]
    job = json.loads((output / infer.JOB_FILE).read_text())
    assert (job["model_id"], job["model_ref"]) == (model_id, "hf-hub:me/tiny-emotion")
    assert (job["model_hub"]["repo"], job["model_hub"]["commit"]) == ("me/tiny-emotion", COMMIT)
    vids = pd.read_parquet(output / "videos")
    assert len(vids) == 2 and vids["error"].isna().all() and set(vids["model"]) == {model_id}


def test_pools_are_sized_from_the_cluster_unless_the_flags_say(ray_session):
    # The session's Ray has 4 CPUs: one model actor per GPU (or one on a CPU), one CPU for the
    # read tasks, and every other CPU decodes.
    gpus = ray_session.cluster_resources().get("GPU", 0)
    actors = int(gpus) if gpus else 1
    assert PredictOptions().resolved() == PredictOptions(16, actors, 1.0 if gpus else 0.0, max(1, 4 - actors - 1))
    assert PredictOptions(4, actors=2, gpus_per_actor=0.0, decode_cpus=3).resolved() == PredictOptions(4, 2, 0.0, 3)
    assert PredictOptions(actors=2, gpus_per_actor=0.0).resolved().decode_cpus == 1


def test_user_mistakes_exit_2_with_a_reason(videos, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "labels"
    assert main(["infer", str(videos), "--model", str(tmp_path / "nothing"), "--output", str(out)]) == 2
    assert "error: bad_checkpoint:" in capsys.readouterr().err
    assert main(["infer", str(videos), "--model", "preset:huge", "--output", str(out)]) == 2
    assert "error: bad_model_ref: preset:huge" in capsys.readouterr().err

    out.mkdir()
    (out / infer.JOB_FILE).write_text(json.dumps({"model_id": "someone-else"}))
    assert main(["infer", str(videos), "--model", tiny_checkpoint[0], "--output", str(out)]) == 2
    assert "error: output_in_use:" in capsys.readouterr().err
    plan = {"mode": "all", "stride_s": None, "max_windows": None}
    (out / infer.JOB_FILE).write_text(json.dumps({"model_id": tiny_checkpoint[1], "window_plan": plan}))
    assert main(["infer", str(videos), "--model", tiny_checkpoint[0], "--output", str(out), "--max-windows", "3"]) == 2
    err = capsys.readouterr().err
    assert "error: output_in_use:" in err and "'max_windows': 3" in err
    with pytest.raises(SystemExit):
        main(["infer", str(videos), "--model", tiny_checkpoint[0], "--output", str(out), "--stride", "0"])


def test_model_refs_name_their_weights(tiny_checkpoint, bucket, capsys):
    ckpt_dir, model_id = tiny_checkpoint
    storage.upload_dir(ckpt_dir, f"{bucket}/refs/tiny")
    local, info = load_model_ref(ckpt_dir)
    remote, remote_info = load_model_ref(f"{bucket}/refs/tiny")
    assert info["model_id"] == remote_info["model_id"] == describe_model_ref(f"{bucket}/refs/tiny")[1]["model_id"] == model_id
    assert all(torch.equal(a, b) for a, b in zip(local.state_dict().values(), remote.state_dict().values()))

    first, preset_info = load_model_ref("preset:tiny")
    assert "RANDOMLY INITIALISED" in capsys.readouterr().err
    second, _ = load_model_ref("preset:tiny", warn=False)
    assert preset_info["model_id"] == "preset:tiny-random"
    # Every actor of a pool builds the same random weights.
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
