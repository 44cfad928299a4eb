"""A lost node costs work, not the job: infer and train on a real multi-node Ray cluster on loopback
whose nodes the test kills; a job without progress stops in one line; the watchdog's parts.

The cluster is the issue's: a head with no CPUs (drivers only), a worker node with 2 CPUs and a
logical GPU (the model actor's), and a 2-CPU worker node; the token auth of Ray 2.60 is on. Each
node is its own `ray start --block` in a session of its own, with its own --temp-dir (short:
Unix socket paths must fit in ~107 bytes) and its own ports, so a node is lost by SIGKILLing its
raylet and every other process of that node at once, as when a spot machine goes, and the test
stops only processes it started: the process trees of its `ray start` commands and anything
naming their temp dirs (never `ray stop`, which would stop other people's Rays). A replacement
node is started the way an autoscaler or KubeRay would, under a new name.

The jobs run as a user runs them: `python -m ray_jobs.cli ...` with RAY_ADDRESS set. The cluster
tests are slow (minutes: a cluster of three nodes, and what a lost node costs); the watchdog's
own tests at the end are not.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from groupemotion_core.weights.checkpoint import save_checkpoint
from groupemotion_core.model.config import preset
from groupemotion_core.errors import GroupEmotionError
from groupemotion_core.model.classifier import GroupEmotionModel
from groupemotion_core.schema import CLASSES
from groupemotion_core.media.synthetic import SyntheticClip, make_dataset, render_clip
from ray_jobs.runtime import watchdog
from ray_jobs.decode.stage import FAULT_INJECT_ENV
from ray_jobs.commands.pack import pack
from ray_jobs.inputs.storage import StorageError
from tests.processes import free_ports, pids_naming

ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))
STALL_S = 60  # above a normal gap between batches on a busy 2-core machine, for the tests' runs
# A run that has lost a node either goes on within this (its lost actors restarted elsewhere) or
# is stopped by the watchdog: the test accepts both, and a shorter wait ends the second sooner.
LOST_NODE_STALL_S = 30
LONG = {0, 5}  # of the 12 infer clips, these are 7 s long: two windows each


def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    return children


def _tree(pid: int) -> list[int]:
    """`pid` and its descendants, parents first (Linux /proc)."""
    children, out, todo = _children(), [], [pid]
    while todo:
        p = todo.pop(0)
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class LoopbackCluster:
    """Ray nodes on this machine, each a `ray start --block` the test owns (module docstring)."""

    def __init__(self, base: Path):
        self.base = base
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
                    # A busy 2-core machine starts a node's agents slowly; Ray's default gives up.
                    "RAY_agent_register_timeout_ms": "120000"}
        self.env.pop("RAY_ADDRESS", None)
        self.nodes: dict[str, tuple[subprocess.Popen, str]] = {}
        self.address = ""

    def start_head(self) -> None:
        port, client = free_ports(2)
        self.address = f"127.0.0.1:{port}"
        self._start("head", ["--head", f"--port={port}", f"--ray-client-server-port={client}",
                             "--include-dashboard=false", "--num-cpus=0"])

    def add_node(self, name: str, cpus: int = 2, gpus: int = 0) -> None:
        self._start(name, [f"--address={self.address}", f"--num-cpus={cpus}", f"--num-gpus={gpus}"])

    def _start(self, name: str, args: list[str], tries: int = 2) -> None:
        for attempt in range(tries):
            temp = tempfile.mkdtemp(prefix=f"rc-{name}-", dir="/tmp")  # short: socket paths
            ports = free_ports(6)
            log = open(f"{temp}.out", "w")
            node = subprocess.Popen(
                [RAY, "start", "--block", "--node-ip-address=127.0.0.1", f"--temp-dir={temp}",
                 f"--node-manager-port={ports[0]}", f"--object-manager-port={ports[1]}",
                 f"--metrics-export-port={ports[2]}", f"--dashboard-agent-listen-port={ports[3]}",
                 f"--dashboard-agent-grpc-port={ports[4]}", f"--runtime-env-agent-port={ports[5]}",
                 "--min-worker-port=0", "--max-worker-port=0", "--object-store-memory=150000000",
                 "--disable-usage-stats", *args],
                env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
            self.nodes[name] = (node, temp)
            if self._started(node, f"{temp}.out"):
                return
            self._stop(name)  # a node that could not register in time (a busy machine): once more
        raise RuntimeError(f"Ray node {name} did not start: {Path(f'{temp}.out').read_text()[-2000:]}")

    @staticmethod
    def _started(node: subprocess.Popen, log: str, timeout_s: float = 180.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if "Ray runtime started" in Path(log).read_text():
                return True
            if node.poll() is not None:
                return False
            time.sleep(0.5)
        return False

    def lose(self, name: str) -> None:
        """The node is gone at once: its raylet and every process of it, SIGKILL."""
        node, _ = self.nodes[name]
        _kill(list(reversed(_tree(node.pid))))

    def node_running(self, process_title: str) -> str:
        """The name of a node that runs a Ray worker process titled `process_title...`."""
        for name, (node, _) in self.nodes.items():
            for pid in _tree(node.pid):
                try:
                    if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(process_title.encode()):
                        return name
                except OSError:
                    pass
        raise LookupError(f"no node runs {process_title}")

    def _stop(self, name: str) -> None:
        node, temp = self.nodes.pop(name)
        _kill(list(reversed(_tree(node.pid))))
        node.wait(timeout=30)
        _kill(pids_naming(temp))
        shutil.rmtree(temp, ignore_errors=True)
        Path(f"{temp}.out").unlink(missing_ok=True)

    def stop(self) -> None:
        for name in list(self.nodes):
            self._stop(name)

    def job(self, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        env = env or {**self.env, "RAY_ADDRESS": self.address}
        return subprocess.Popen([sys.executable, "-m", "ray_jobs.cli", *argv], env=env, cwd=ROOT, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = LoopbackCluster(tmp_path_factory.mktemp("cluster"))
    try:
        cluster.start_head()
        cluster.add_node("gpu", cpus=2, gpus=1)
        cluster.add_node("cpu", cpus=2)
        yield cluster
    finally:
        cluster.stop()


class Output:
    """A job's output lines as they come (a thread reads them), with the time each came."""

    def __init__(self, process: subprocess.Popen):
        self.process = process
        self.lines: list[tuple[float, str]] = []
        self.started = time.monotonic()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def wait_for(self, condition, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.process.poll() is None:
            if condition():
                return True
            time.sleep(0.2)
        return condition()

    def has(self, text: str) -> bool:
        return any(text in line for _, line in self.lines)

    def finish(self, timeout_s: float) -> tuple[int, str]:
        code = self.process.wait(timeout=timeout_s)
        self._thread.join(10)
        return code, "\n".join(line for _, line in self.lines)


@pytest.fixture(scope="module")
def infer_data(tmp_path_factory) -> dict[str, str]:
    """12 clips in 6 shards of 2 (two of the clips 7 s long), and a tiny model."""
    root = tmp_path_factory.mktemp("infer-data")
    for i in range(12):
        label = CLASSES[i % 3]
        (root / "videos" / label).mkdir(parents=True, exist_ok=True)
        render_clip(SyntheticClip(label=label, width=64, height=48, fps=4.0, seconds=7.0 if i in LONG else 2.0,
                                  seed=i), root / "videos" / label / f"v{i:02d}.mp4")
    pack(str(root / "videos"), str(root / "shards"), shard_size=2, progress=open(os.devnull, "w"))
    torch.manual_seed(0)
    save_checkpoint(GroupEmotionModel(preset("tiny")), root / "model")
    return {"shards": str(root / "shards"), "model": str(root / "model")}


@pytest.mark.slow
def test_a_job_without_progress_stops_with_one_line_and_its_process_exits(cluster, infer_data, tmp_path,
                                                                          record_property):
    # Every decoder hangs (for its 60 s window timeout): no batch reaches the driver.
    started = time.monotonic()
    job = Output(cluster.job(["infer", infer_data["shards"], "--model", infer_data["model"],
                              "--output", str(tmp_path / "labels"), "--stall-timeout", "10"],
                             env={**cluster.env, "RAY_ADDRESS": cluster.address, FAULT_INJECT_ENV: "hang:.tar/"}))
    code, printed = job.finish(timeout_s=300)
    record_property("infer_every_decoder_hangs", f"exit {code} after {time.monotonic() - started:.1f} s")

    assert code == 2, printed[-3000:]
    assert printed.splitlines()[-1] == (
        "error: stalled: no progress for 10 s (no labelled window reached the driver); a lost node the cluster "
        "has not replaced, or an object store that stopped answering; run the same command again to finish the work")
    assert "Traceback" not in printed
    assert time.monotonic() - started < 120  # Ray's start, 10 s, and an exit
    assert not list((tmp_path / "labels").glob("videos/*"))


@pytest.mark.slow
def test_infer_losing_a_decode_node_ends_by_itself_and_the_rerun_labels_everything_once(
    cluster, infer_data, tmp_path, record_property
):
    output = tmp_path / "labels"
    argv = ["infer", infer_data["shards"], "--model", infer_data["model"], "--output", str(output),
            "--batch-size", "2", "--stall-timeout"]
    job = Output(cluster.job([*argv, str(LOST_NODE_STALL_S)]))
    assert job.wait_for(lambda: job.has("committed part-"), timeout_s=300), job.lines[-20:]
    committed_before_loss = sum("committed part-" in line for _, line in job.lines)
    cluster.lose("cpu")  # a decode actor and the read tasks' CPUs; the model's node stays
    lost_at = time.monotonic()
    code, printed = job.finish(timeout_s=LOST_NODE_STALL_S + 240)
    record_property("infer_decode_node_lost", f"exit {code} {time.monotonic() - lost_at:.1f} s after the loss")

    # It ends by itself: finished, or stopped by the watchdog with one line, never a traceback.
    assert time.monotonic() - lost_at < LOST_NODE_STALL_S + 180
    assert "Traceback" not in printed, printed[-3000:]
    if code != 0:
        assert code == 2, printed[-3000:]
        assert printed.splitlines()[-1].startswith(
            (f"error: stalled: no progress for {LOST_NODE_STALL_S} s", "error: worker_lost: ")), printed[-1000:]
        assert not (output / "_SUCCESS").exists()

    cluster.add_node("cpu-replacement", cpus=2)  # as the autoscaler would
    rerun = Output(cluster.job([*argv, str(STALL_S)]))
    code, printed = rerun.finish(timeout_s=600)
    record_property("infer_rerun_after_node_loss", f"exit {code} after {time.monotonic() - rerun.started:.1f} s")
    assert code == 0, printed[-3000:]
    videos, windows = pd.read_parquet(output / "videos"), pd.read_parquet(output / "windows")
    assert len(videos) == 12 and videos["key"].is_unique and videos["error"].isna().all()
    assert not windows.duplicated(["key", "window"]).any()
    assert len(windows) == videos["windows"].sum() == 12 + len(LONG)
    # The rerun redid none of the units committed before the loss. (The first run may also have
    # finished on the node that stayed: then the rerun has nothing to do at all.)
    skipped = re.search(r"\((\d+) of \d+ units already committed", printed).group(1)
    assert int(skipped) >= committed_before_loss >= 1, printed[-3000:]
    assert (output / "_SUCCESS").exists()


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
            "--cache", str(tmp_path / "cache"), "--stall-timeout", str(3 * STALL_S)]
    job = Output(cluster.job(argv))
    # Once Ray Train holds a checkpoint (its snapshot lists one), the node of a worker goes.
    snapshot = output / "checkpoints" / "checkpoint_manager_snapshot.json"
    assert job.wait_for(lambda: snapshot.exists() and "epoch_0001" in snapshot.read_text(), timeout_s=400), \
        job.lines[-20:]
    victim = cluster.node_running("ray::RayTrainWorker")
    cluster.lose(victim)
    lost_at = time.monotonic()
    cluster.add_node(f"{victim}-replacement", cpus=2)
    code, printed = job.finish(timeout_s=600)
    record_property("train_worker_node_lost", f"exit {code} {time.monotonic() - lost_at:.1f} s after the loss "
                                              f"(a replacement node started in that time)")

    assert code == 0, printed[-3000:]
    resumed = [line for line in printed.splitlines() if "worker group resumes from the checkpoint of epoch" in line]
    assert resumed and int(resumed[-1].split("epoch ")[1].split(":")[0]) >= 1, printed[-3000:]
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
    assert 0.4 < time.monotonic() - started < 5
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


def test_a_stalled_command_ends_even_when_a_thread_would_keep_it_alive():
    script = (
        "import threading, time\n"
        "from ray_jobs import watchdog\n"
        "threading.Thread(target=time.sleep, args=(3600,)).start()  # not a daemon: exit would wait on it\n"
        "try:\n"
        "    with watchdog.exit_in_bounded_time(grace_s=1.0):\n"
        "        raise watchdog.Stalled('stalled', 'no progress')\n"
        "except watchdog.Stalled as e:\n"
        "    print('error:', e, flush=True)\n"
    )
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (2, "error: stalled: no progress\n")
    assert time.monotonic() - started < 30
