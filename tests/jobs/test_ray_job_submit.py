"""The inference job submitted with `ray job submit` to a Ray head started by `ray start`, token auth on.

This is the cluster path of the product: RAY_ADDRESS is set by Ray for the job's driver, the
dashboard's job API and every Ray RPC require the token, and the job reads and writes S3 through
the AWS_* variables it inherits from the head. The package is installed in the virtual
environment, so the entrypoint is that environment's python with no working_dir upload.

Stopping only this Ray: `ray stop` would stop every Ray on the machine (other tests, other users),
so the head runs as `ray start --block` in a new session with its own --temp-dir and a private
port for everything that has a fixed default. Teardown sends SIGTERM to that session's process
group (`ray start --block` then stops the processes it started), gives it a few seconds (its
graceful stop takes longer than the test needs), SIGKILLs the group, and
finally kills any process whose command line names the private temp dir (Ray's workers start
their own process groups but carry the session path). Nothing else is touched.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
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
from tests.processes import free_ports, pids_naming

RAY = str(Path(sys.executable).with_name("ray"))


@pytest.fixture
def ray_head(s3_server):
    """A token-protected Ray head on 127.0.0.1: yields (dashboard URL, env for Ray CLI calls)."""
    temp_dir = tempfile.mkdtemp(prefix="ray-submit-", dir="/tmp")  # short: Ray's socket paths must fit
    gcs, dashboard, client, agent, agent_grpc, env_agent, metrics = free_ports(7)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [
            RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--include-dashboard=true",
            f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
            f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={env_agent}",
            f"--metrics-export-port={metrics}", "--min-worker-port=0", "--max-worker-port=0",
            # Four logical CPUs (as the test session's Ray): reading, decoding and the model
            # each hold one while they stream, on a machine that may have only two cores.
            "--num-cpus=4", f"--temp-dir={temp_dir}", "--disable-usage-stats",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{dashboard}"
    try:
        _wait_for_job_api(url, env, head)
        yield url, env
    finally:
        _stop(head, temp_dir)


def _wait_for_job_api(url: str, env: dict, head: subprocess.Popen, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert head.poll() is None, "ray start exited early"
        probe = subprocess.run([RAY, "job", "list", "--address", url], env=env, capture_output=True, timeout=60)
        if probe.returncode == 0:
            return
        time.sleep(2)
    raise TimeoutError(f"the Ray job API at {url} did not come up in {timeout_s} s")


def _stop(head: subprocess.Popen, temp_dir: str) -> None:
    try:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=3)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(head.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    head.wait(timeout=10)
    for pid in pids_naming(temp_dir):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    time.sleep(1)
    shutil.rmtree(temp_dir, ignore_errors=True)
    assert not pids_naming(temp_dir), "a process of the test's Ray survived its teardown"


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

