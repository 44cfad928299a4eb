"""A lost node costs work, not the job: infer and train on a real multi-node Ray cluster on loopback
whose nodes the test kills; a job without progress stops in one line; the watchdog's parts.

The cluster (`tests/cluster_harness.py`, token auth on): a head with no CPUs (drivers only), a
node with a logical GPU and one CPU, which the model actor holds, and a 2-CPU node, so that every
decode actor and read task of an infer job runs on the 2-CPU node. Each fault test forces one
outcome: the node goes at a moment chosen so that the job can only finish by recovering (nothing
committed yet, or a checkpoint to resume from), and a replacement node is started the way an
autoscaler or KubeRay would, under a new name. Times are recorded as test properties, never
asserted. The cluster tests are slow (minutes); the watchdog's own tests at the end are not.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from groupemotion_core.errors import GroupEmotionError
from groupemotion_core.media.synthetic import make_dataset
from groupemotion_core.model.config import preset
from ray_jobs.runtime import watchdog
from ray_jobs.decode.stage import FAULT_INJECT_ENV
from ray_jobs.commands.pack import pack
from ray_jobs.inputs.storage import StorageError
from tests.cluster_harness import ROOT, JobOutput, loopback_cluster
from tests.jobs.conftest import INFER_LONG_CLIPS

# The jobs' --stall-timeout: above the longest quiet spell of a recovery (Ray notices the loss,
# a replacement node starts, actors start on it) on a loaded 2-core machine. A job that hangs
# fails its test either way; the timeout only ends it in one line.
STALL_S = 300
# A decode actor is on a node once its PyAV child process runs there (`ray_jobs/decode/stage.py` starts
# it with the actor); the actor's own process title is Ray's to choose and was not seen on every run.
DECODER = "ray_jobs.decode.child"


@pytest.fixture(scope="module")
def cluster():
    with loopback_cluster() as cluster:
        cluster.start_head()
        cluster.add_node("gpu", cpus=1, gpus=1)
        cluster.add_node("cpu", cpus=2)
        yield cluster


@pytest.mark.slow
def test_infer_losing_its_decode_node_before_any_commit_recovers_on_a_replacement_and_labels_everything_once(
    cluster, infer_data, tmp_path, record_property
):
    output = tmp_path / "labels"
    job = JobOutput(cluster.job(["infer", infer_data["shards"], "--model", infer_data["model"], "--output",
                                 str(output), "--batch-size", "2", "--stall-timeout", str(STALL_S)]))
    # The model actor holds the "gpu" node's one CPU, so the decode actor and the reads run on "cpu".
    # That node goes as soon as the decode actor exists, before any unit is committed: the decoding
    # left can only run on the replacement, and Ray Data must restart the pool's actor there.
    # Its decoder child is looked for on the whole machine (only this job runs now): it was not always
    # found among the processes the harness counts as the node's.
    assert job.wait_for(lambda: _running(DECODER), timeout_s=600), job.lines[-20:]
    cluster.lose("cpu")
    lost_at = time.monotonic()
    assert not job.has("committed part-") and not list(output.glob("videos/*")), job.lines[-20:]
    cluster.add_node("cpu-replacement", cpus=2)  # as the autoscaler would
    code, printed = job.finish(timeout_s=900)
    record_property("infer_decode_node_lost_to_exit_s", round(time.monotonic() - lost_at, 1))

    assert code == 0, printed[-3000:]
    assert "infer: 12 videos in 6 units (0 already committed); 1 decode actors, 1 model actors on GPUs" in printed
    assert printed.count("committed part-") == 6, printed[-3000:]
    videos, windows = pd.read_parquet(output / "videos"), pd.read_parquet(output / "windows")
    assert len(videos) == 12 and videos["key"].is_unique and videos["error"].isna().all()
    assert not windows.duplicated(["key", "window"]).any()
    assert len(windows) == videos["windows"].sum() == 12 + len(INFER_LONG_CLIPS)
    assert (output / "_SUCCESS").exists()


def _running(text: str) -> bool:
    """Whether a process of this machine has `text` in its command line."""
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if entry.name.isdigit() and text.encode() in (entry / "cmdline").read_bytes():
                return True
    return False


@pytest.mark.slow
def test_a_job_without_progress_stops_with_one_line_and_its_process_exits(cluster, infer_data, tmp_path,
                                                                          record_property):
    # Every decoder hangs (for its 60 s window timeout): no batch reaches the driver.
    job = JobOutput(cluster.job(["infer", infer_data["shards"], "--model", infer_data["model"],
                                 "--output", str(tmp_path / "labels"), "--stall-timeout", "10"],
                                env={FAULT_INJECT_ENV: "hang:.tar/"}))
    code, printed = job.finish(timeout_s=300)
    record_property("infer_every_decoder_hangs_s", round(time.monotonic() - job.started, 1))

    assert code == 75, printed[-3000:]
    assert printed.splitlines()[-1] == (
        "error: stalled: no progress for 10 s (no labelled window reached the driver); a lost node the cluster "
        "has not replaced, or an object store that stopped answering; run the same command again to finish the work")
    assert "Traceback" not in printed
    assert not list((tmp_path / "labels").glob("videos/*"))


@pytest.fixture(scope="module")
def train_data(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("train-data")
    clip = dict(width=64, height=48, fps=8.0, seconds=1.0)
    make_dataset(root / "videos" / "train", 4, seed=0, **clip)
    make_dataset(root / "videos" / "val", 2, seed=1, **clip)
    for split in ("train", "val"):
        pack(str(root / "videos" / split), str(root / "shards" / split), shard_size=4, progress=open(os.devnull, "w"))
    (root / "tiny-1s.json").write_text(json.dumps(preset("tiny").to_dict() | {"clip_seconds": 1.0, "num_frames": 4}))
    return {"train": str(root / "shards" / "train"), "val": str(root / "shards" / "val"),
            "config": str(root / "tiny-1s.json")}


@pytest.mark.slow
def test_train_losing_a_worker_node_resumes_from_its_last_checkpoint_and_finishes(
    cluster, train_data, tmp_path, record_property
):
    epochs = 3
    output = tmp_path / "run"
    argv = ["train", "--train", train_data["train"], "--val", train_data["val"], "--output", str(output),
            "--config", train_data["config"], "--workers", "2", "--batch-size", "4", "--epochs", str(epochs),
            "--cache", str(tmp_path / "cache"), "--stall-timeout", str(STALL_S)]
    job = JobOutput(cluster.job(argv))
    # Once Ray Train holds a checkpoint (its snapshot lists one), the node of a worker goes while
    # epochs are left: the run can only finish by resuming from a checkpoint.
    snapshot = output / "checkpoints" / "checkpoint_manager_snapshot.json"
    assert job.wait_for(lambda: snapshot.exists() and "epoch_0001" in snapshot.read_text(), timeout_s=400), \
        job.lines[-20:]
    victim = cluster.node_running("ray::RayTrainWorker")
    cluster.lose(victim)
    lost_at = time.monotonic()
    assert not job.has(f"[train] epoch {epochs}/{epochs}: "), job.lines[-20:]
    cluster.add_node(f"{victim}-replacement", cpus=2)  # started while the run waits: in the recorded time
    code, printed = job.finish(timeout_s=600)
    record_property("train_worker_node_lost_to_exit_s", round(time.monotonic() - lost_at, 1))

    assert code == 0, printed[-3000:]
    resumed = [line for line in printed.splitlines() if "worker group resumes from the checkpoint of epoch" in line]
    assert len(resumed) == 1 and int(resumed[0].split("epoch ")[1].split(":")[0]) >= 1, printed[-3000:]
    history = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in history] == list(range(1, epochs + 1))
    assert all(m["train_clips"] == 12 for m in history)
    assert (output / "best" / "model.safetensors").exists()


# --- the watchdog's parts, without a cluster -------------------------------------------------------


def test_watched_raises_stalled_when_no_item_comes_in_time_and_closes_the_stream():
    release, closed = threading.Event(), threading.Event()

    def stream():
        try:
            yield "first"
            release.wait()  # like Ray's iterator waiting on a lost node
            yield "late"
        finally:
            closed.set()

    items = watchdog.watched(stream(), 0.5, "test stream")
    assert next(items) == "first"
    time.sleep(1.0)  # time the caller spends on an item does not count
    started = time.monotonic()
    with pytest.raises(watchdog.Stalled) as stalled:
        next(items)
    assert time.monotonic() - started > 0.4  # it waited for the timeout, not less
    assert str(stalled.value).startswith("stalled: no progress for 0.5 s (test stream); ")
    release.set()  # the thread gets its item, sees the caller gone, and closes the stream
    assert closed.wait(5)


def test_watched_hands_over_the_streams_own_failure_in_one_line():
    def stream():
        yield 1
        raise StorageError("storage_unavailable", "s3://b/x: kept failing")

    with pytest.raises(StorageError, match="storage_unavailable: s3://b/x"):
        list(watchdog.watched(stream(), 5, "test stream"))


def test_one_line_finds_the_reason_inside_rays_wrappers():
    from botocore.exceptions import EndpointConnectionError
    from ray.exceptions import ActorDiedError, RayTaskError
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback
    from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError

    failed = StorageError("storage_unavailable", "s3://b/run/metrics.jsonl: kept failing")
    in_worker = WorkerGroupError("worker 1 failed", {0: RuntimeError("collateral"),
                                                     1: UserExceptionWithTraceback(failed, "Traceback ...")})
    assert watchdog.one_line(in_worker) is failed
    task = RayTaskError("read", "Traceback ...", GroupEmotionError("bad_shard", "x"))
    assert str(watchdog.one_line(task)) == "bad_shard: x"
    # Ray Train's own checkpoint upload, failing in botocore: the store's reason for --output.
    upload = ControllerError(OSError("upload failed"))
    upload.controller_failure.__cause__ = EndpointConnectionError(endpoint_url="http://127.0.0.1:1")
    error = watchdog.one_line(upload, "s3://b/run", "writing")
    assert (error.reason, error.detail.split(":")[0]) == ("unreachable", "s3")
    assert watchdog.one_line(upload) is None  # without the URI nothing says it was the store
    assert watchdog.one_line(ActorDiedError()).reason == "worker_lost"
    assert watchdog.one_line(ValueError("a bug")) is None


def test_a_stalled_command_ends_even_when_a_thread_would_keep_it_alive(record_property):
    script = (
        "import threading, time\n"
        "from ray_jobs.runtime import watchdog\n"
        "threading.Thread(target=time.sleep, args=(3600,)).start()  # not a daemon: exit would wait on it\n"
        "try:\n"
        "    with watchdog.exit_in_bounded_time(grace_s=1.0):\n"
        "        raise watchdog.Stalled('stalled', 'no progress')\n"
        "except watchdog.Stalled as e:\n"
        "    print('error:', e, flush=True)\n"
    )
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    record_property("exit_s", round(time.monotonic() - started, 1))
    assert (done.returncode, done.stdout) == (75, "error: stalled: no progress\n")
