"""The inference job submitted with `ray job submit` to a Ray head started by `ray start`, token auth on.

This is the cluster path of the product: RAY_ADDRESS is set by Ray for the job's driver, the
dashboard's job API and every Ray RPC require the token, and the job reads and writes S3 through
the AWS_* variables it inherits from the head. The package is installed in the virtual
environment, so the entrypoint is that environment's python with no working_dir upload. The head
is the tests' own (`tests/cluster_harness.py`): its own temp dir and loopback ports, and only its
processes are stopped.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest
import torch

from groupemotion_core.weights.checkpoint import save_checkpoint
from groupemotion_core.model.config import preset
from groupemotion_core.model.classifier import GroupEmotionModel
from groupemotion_core.schema import CLASSES, PROB_COLUMNS
from groupemotion_core.media.synthetic import SyntheticClip, render_clip
from ray_jobs.inputs import storage
from ray_jobs.commands.pack import pack
from tests.cluster_harness import RAY, loopback_cluster


@pytest.fixture
def ray_head(s3_server):
    """A token-protected Ray head on 127.0.0.1 with the job API: yields (its URL, env for Ray CLI calls).

    Four logical CPUs (as the test session's Ray): reading, decoding and the model each hold one
    while they stream, on a machine that may have only two cores. Started after the S3 server,
    so the head and the job's driver inherit the AWS_* variables that point at it.
    """
    with loopback_cluster() as cluster:
        cluster.start_head(cpus=4, dashboard=True)
        _wait_for_job_api(cluster.dashboard, cluster.env)
        yield cluster.dashboard, cluster.env


def _wait_for_job_api(url: str, env: dict, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        probe = subprocess.run([RAY, "job", "list", "--address", url], env=env, capture_output=True, timeout=60)
        if probe.returncode == 0:
            return
        time.sleep(2)
    raise TimeoutError(f"the Ray job API at {url} did not come up in {timeout_s} s")


@pytest.mark.slow
def test_infer_runs_through_ray_job_submit_with_token_auth(ray_head, tmp_path):
    url, env = ray_head
    for i, label in enumerate(CLASSES):
        (tmp_path / "videos" / label).mkdir(parents=True)
        render_clip(
            SyntheticClip(label=label, width=64, height=48, seconds=1.0, fps=8.0, audio=i != 1, seed=i),
            tmp_path / "videos" / label / f"v{i}.mp4",
        )
    pack(str(tmp_path / "videos"), str(tmp_path / "shards"), shard_size=2)
    torch.manual_seed(0)
    model_id = save_checkpoint(GroupEmotionModel(preset("tiny")), tmp_path / "ckpt")
    output = f"s3://submit-{uuid.uuid4().hex[:8]}/labels"
    storage.filesystem(output)[0].mkdir(output[len("s3://") :].split("/")[0])

    # Without the token the job API refuses the client.
    no_token = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"}
    refused = subprocess.run([RAY, "job", "list", "--address", url], env=no_token, capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0

    submitted = subprocess.run(
        [
            RAY, "job", "submit", "--address", url, "--",
            sys.executable, "-m", "ray_jobs.commands.infer", str(tmp_path / "shards"), "--model", str(tmp_path / "ckpt"),
            "--output", output, "--actors", "1", "--decode-cpus", "1", "--batch-size", "2",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert submitted.returncode == 0, submitted.stdout[-4000:] + submitted.stderr[-2000:]
    assert "infer: 3 videos (3 windows) in 2 units" in submitted.stdout

    fs, path = storage.arrow_filesystem(output)
    videos = pd.read_parquet(f"{path}/videos", filesystem=fs)
    windows = pd.read_parquet(f"{path}/windows", filesystem=fs)
    keys = sorted(f"{tmp_path / 'shards'}/shard-00000{i // 2}.tar/{label}/v{i}" for i, label in enumerate(CLASSES))
    assert sorted(videos["key"]) == sorted(windows["key"]) == keys
    for df in (videos, windows):
        assert df["error"].isna().all() and set(df["model"]) == {model_id}
        assert (df[list(PROB_COLUMNS)].sum(axis=1) - 1).abs().max() < 1e-5


    # A mistake (a model that is not there) fails the job and `ray job submit` exits 1 whatever
    # the reason; the line cluster/README.md gives a retry loop reads back the driver's own exit
    # status: 2, a mistake not to retry (75 would be a failure to submit again).
    job_id = f"mistake-{uuid.uuid4().hex[:8]}"
    failed = subprocess.run(
        [RAY, "job", "submit", "--address", url, "--submission-id", job_id, "--", sys.executable, "-m",
         "ray_jobs.commands.infer", str(tmp_path / "shards"), "--model", str(tmp_path / "nothing"),
         "--output", str(tmp_path / "labels")],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert failed.returncode == 1 and "error: bad_checkpoint: " in failed.stdout, failed.stdout[-3000:]
    readme = (Path(__file__).resolve().parents[2] / "cluster" / "README.md").read_text()
    read_back = next(line for line in readme.splitlines() if line.startswith("python -c") and "driver_exit_code" in line)
    path = f"{Path(sys.executable).parent}:{env['PATH']}"  # `python` is this environment's
    status = subprocess.run(["bash", "-c", f"id={job_id}; {read_back}"], env={**env, "RAY_ADDRESS": url, "PATH": path},
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 2, status.stderr[-2000:]
