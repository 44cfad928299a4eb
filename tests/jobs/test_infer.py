"""The inference job end to end: real S3 (moto on 127.0.0.1), real local Ray, a saved tiny model.

The clips are generated (some without audio, two that cannot be decoded), packed into tar
shards and also uploaded as plain objects, so both layouts and the error path run through the
same job. The interrupted-job test kills the job process itself (GROUPEMOTION_INFER_EXIT_AFTER_UNITS)
and runs it again, which is what exactly-once has to survive.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch

from groupemotion_core.checkpoint import save_checkpoint
from groupemotion_core.config import preset
from groupemotion_core.model import GroupEmotionModel
from groupemotion_core.schema import CLASSES, LabelRow
from groupemotion_core.synthetic import SyntheticClip, render_clip
from ray_jobs import infer, storage
from ray_jobs.cli import main
from ray_jobs.model_ref import describe_model_ref, load_model_ref
from ray_jobs.pack import pack

# name -> (class folder, has audio); plus two files that are not decodable videos.
CLIPS = {f"c{i}": (CLASSES[i % 3], i % 3 != 1) for i in range(7)}
BAD = ("random", "truncated")
SMALL = dict(width=64, height=48, seconds=1.0, fps=8.0)
FEW_CPUS = dict(batch_size=4, actors=1, decode_cpus=1)


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    """Class folders of generated clips, plus one random-bytes and one truncated 'video'."""
    root = tmp_path_factory.mktemp("videos")
    for i, (name, (label, audio)) in enumerate(CLIPS.items()):
        (root / label).mkdir(exist_ok=True)
        render_clip(SyntheticClip(label=label, audio=audio, seed=i, **SMALL), root / label / f"{name}.mp4")
    whole = render_clip(SyntheticClip(label="Neutral", seed=99, **SMALL))
    (root / "Neutral" / "truncated.mp4").write_bytes(whole[: len(whole) // 3])
    (root / "Neutral" / "random.mp4").write_bytes(np.random.default_rng(0).bytes(4000))
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[str, str]:
    """A tiny model saved by the core: (directory, model_id)."""
    directory = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    model_id = save_checkpoint(GroupEmotionModel(preset("tiny")), directory)
    return str(directory), model_id


@pytest.fixture(scope="module")
def bucket(s3_server) -> str:
    import boto3

    name = f"infer-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"


def _read(output: str) -> pd.DataFrame:
    table = pads.dataset(storage.filesystem(output)[1], filesystem=storage.arrow_filesystem(output)[0]).to_table()
    assert table.schema.equals(LabelRow.SCHEMA, check_metadata=False)
    return table.to_pandas()


def test_shards_and_objects_on_s3_give_one_row_per_clip_then_rerun_and_overwrite(
    ray_session, videos, checkpoint, bucket
):
    ckpt_dir, model_id = checkpoint
    model_uri = f"{bucket}/models/tiny"
    storage.upload_dir(ckpt_dir, model_uri)
    manifest = pack(str(videos), f"{bucket}/shards", shard_size=4)
    storage.upload_dir(str(videos), f"{bucket}/videos")
    output = f"{bucket}/labels"
    inputs = [f"{bucket}/shards/manifest.json", f"{bucket}/videos/"]

    summary = infer.infer(inputs, model_uri, output, infer.PredictOptions(**FEW_CPUS))

    df = _read(output)
    names = {f"{label}/{name}" for name, (label, _) in CLIPS.items()} | {f"Neutral/{b}" for b in BAD}
    shard_rows = df[df["key"].str.startswith(f"{bucket}/shards/")]
    object_rows = df[df["key"].str.startswith(f"{bucket}/videos/")]
    assert len(df) == summary.clips == 2 * len(names) and df["key"].is_unique
    assert {k.split(".tar/", 1)[1] for k in shard_rows["key"]} == names
    assert {k.split(".tar/", 1)[0] + ".tar" for k in shard_rows["key"]} == {
        f"{bucket}/shards/{s['name']}" for s in manifest["shards"]
    }
    assert set(object_rows["key"]) == {f"{bucket}/videos/{n}.mp4" for n in names}
    failed = df[df["error"].notna()]
    assert sorted(k.rsplit("/", 1)[1].split(".")[0] for k in failed["key"]) == sorted(BAD * 2)
    assert failed[["label", *LabelRow.PROB_COLUMNS]].isna().all().all()
    ok = df[df["error"].isna()]
    probs = ok[list(LabelRow.PROB_COLUMNS)].to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert (ok["label"].to_numpy() == np.array(CLASSES)[probs.argmax(axis=1)]).all()
    assert set(df["model"]) == {model_id}
    # The same clip gets the same answer from a shard and as a plain object.
    by_name = ok.assign(name=ok["key"].str.rsplit("/", n=1).str[1].str.replace(".mp4", "")).groupby("name")
    spread = by_name[list(LabelRow.PROB_COLUMNS)].agg(lambda p: p.max() - p.min())
    assert (spread.to_numpy() < 1e-4).all(), spread
    assert summary.labelled == 14 and sum(summary.errors.values()) == 4
    assert pd.read_parquet(output).shape == df.shape  # pandas reads the folder too (skips _ files)

    job = json.loads(storage.read_bytes(f"{output}/_job.json"))
    assert job["model_id"] == model_id and job["inputs"] == inputs
    assert json.loads(storage.read_bytes(f"{output}/_SUCCESS"))["clips"] == len(df)
    files = {uri: storage.filesystem(uri)[0].info(storage.filesystem(uri)[1])["ETag"] for uri in infer.committed_files(output)}
    assert len(files) == len(manifest["shards"]) + 1  # one per shard, one for the 9 plain objects

    again = infer.infer(inputs, model_uri, output, infer.PredictOptions(**FEW_CPUS))
    assert (again.clips, again.units_committed, again.units_skipped) == (0, 0, len(files))
    assert {u: storage.filesystem(u)[0].info(storage.filesystem(u)[1])["ETag"] for u in files} == files
    assert len(_read(output)) == len(df)
    assert json.loads(storage.read_bytes(f"{output}/_SUCCESS"))["clips"] == len(df)  # no-op run rewrote nothing

    redo = infer.infer(inputs, model_uri, output, infer.PredictOptions(**FEW_CPUS), overwrite=True)
    assert (redo.clips, redo.units_committed, redo.units_skipped) == (len(df), len(files), 0)
    assert sorted(_read(output)["key"]) == sorted(df["key"])


def test_killed_job_run_again_labels_every_clip_exactly_once(ray_session, videos, checkpoint, tmp_path):
    ckpt_dir, _ = checkpoint
    pack(str(videos), str(tmp_path / "shards"), shard_size=2)
    output = str(tmp_path / "labels")
    args = ["infer", str(tmp_path / "shards"), "--model", ckpt_dir, "--output", output,
            "--batch-size", "2", "--actors", "1", "--decode-cpus", "1"]
    # The real command with no RAY_ADDRESS: it starts its own local Ray (the embedded default).
    env = {**os.environ, infer.EXIT_AFTER_UNITS_ENV: "1"}
    env.pop("RAY_ADDRESS", None)
    killed = subprocess.run([sys.executable, "-m", "ray_jobs.cli", *args], env=env, capture_output=True,
                            text=True, timeout=300)

    assert killed.returncode == -9, killed.stderr[-3000:]
    first = infer.committed_files(output)
    assert len(first) == 1
    assert not os.path.exists(os.path.join(output, infer.SUCCESS_FILE))
    assert not [p for p in os.listdir(output) if ".tmp-" in p]

    assert main(args) == 0
    df = pd.read_parquet(output)
    assert len(df) == len(CLIPS) + len(BAD) and df["key"].is_unique
    assert len(infer.committed_files(output)) == 5  # 9 clips in shards of 2
    done = json.loads(Path(output, infer.SUCCESS_FILE).read_text())
    assert (done["units_skipped"], done["units_committed"]) == (1, 4)
    assert done["clips"] == len(df) - pq.read_metadata(first[0]).num_rows


def test_user_mistakes_exit_2_with_a_reason(videos, checkpoint, tmp_path, capsys):
    out = tmp_path / "labels"
    assert main(["infer", str(videos), "--model", str(tmp_path / "nothing"), "--output", str(out)]) == 2
    assert "error: bad_checkpoint:" in capsys.readouterr().err
    assert main(["infer", str(videos), "--model", "preset:huge", "--output", str(out)]) == 2
    assert "error: bad_model_ref: preset:huge" in capsys.readouterr().err

    out.mkdir()
    (out / infer.JOB_FILE).write_text(json.dumps({"model_id": "someone-else"}))
    assert main(["infer", str(videos), "--model", checkpoint[0], "--output", str(out)]) == 2
    assert "error: output_in_use:" in capsys.readouterr().err


def test_model_refs_name_their_weights(checkpoint, bucket, capsys):
    ckpt_dir, model_id = checkpoint
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
