"""Ray clusters of the tests' own on loopback: `ray start` heads and worker nodes, token auth on.

Every test that needs Ray as a cluster runs it (a job submitted to a head's job API, nodes lost
and replaced): the suite's in-process Ray (`ray_session`) cannot lose a node. Each node is its
own `ray start --block` in a session of its own (`start_new_session`), with its own --temp-dir
(short: Unix socket paths must fit in ~107 bytes) and its own loopback ports for everything that
has a fixed default, so two clusters, or another user's Ray, never meet.

A node's processes are its own `ray start`'s process tree, the processes of its session, and
any process whose command line names its temp dir (a worker reparented after its raylet died).
`lose` SIGKILLs all of them at once, as when a spot machine goes; `stop` does the same and then
checks that none survived. Neither uses `ray stop`, which stops every Ray on the machine.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))
ROOT = Path(__file__).resolve().parents[1]
# A busy 2-core machine starts a node slowly: its agents, and its raylet's registration with the
# GCS, take longer than Ray's defaults wait (seconds, 30 s).
_SLOW_START = {"RAY_agent_register_timeout_ms": "120000", "RAY_raylet_start_wait_time_s": "120"}
_START_TIMEOUT_S = 180.0


def free_ports(n: int) -> list[int]:
    """`n` distinct loopback ports free at the time of the call."""
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


class LoopbackCluster:
    """Ray nodes on this machine that the test owns (module docstring). Use `loopback_cluster()`."""

    def __init__(self, env: dict[str, str] | None = None):
        """`env`: more variables for every node, e.g. Ray's own settings (`RAY_<name>`)."""
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
                    **_SLOW_START, **(env or {})}
        self.env.pop("RAY_ADDRESS", None)
        self.nodes: dict[str, tuple[subprocess.Popen, str]] = {}
        self.address = ""  # the head's GCS, host:port
        self.dashboard = ""  # the head's job API URL, when it has one

    def start_head(self, cpus: int = 0, *, dashboard: bool = False) -> None:
        """The head; with `dashboard`, the job API of `ray job submit` too (self.dashboard)."""
        port, client, dashboard_port = free_ports(3)
        self.address = f"127.0.0.1:{port}"
        args = ["--head", f"--port={port}", f"--ray-client-server-port={client}", f"--num-cpus={cpus}"]
        if dashboard:
            self.dashboard = f"http://127.0.0.1:{dashboard_port}"
            args += ["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}"]
        else:
            args.append("--include-dashboard=false")
        self._start("head", args)

    def add_node(self, name: str, cpus: int = 2, gpus: int = 0) -> None:
        """A worker node joining the head, as an autoscaler or KubeRay would add one."""
        self._start(name, [f"--address={self.address}", f"--num-cpus={cpus}", f"--num-gpus={gpus}"])

    def lose(self, name: str) -> None:
        """The node is gone at once, as when its machine goes: every process of it is stopped
        (SIGSTOP) before any is killed, so none can tell the cluster (a raylet whose agent died
        first would unregister itself, and Ray would learn of the loss at once). Its temp dir
        stays until `stop` (what a lost machine's disk would hold does not matter here)."""
        node, temp = self.nodes[name]
        processes = _processes_of(node, temp)
        _kill(processes, signal.SIGSTOP)
        _kill(processes + _processes_of(node, temp))
        node.wait(timeout=30)

    def runs(self, name: str, text: str) -> bool:
        """Whether a process of node `name` has `text` in its command line (a Ray worker's is its
        title, e.g. `ray::RayTrainWorker`)."""
        node, temp = self.nodes[name]
        for pid in _processes_of(node, temp):
            with contextlib.suppress(OSError):
                if text.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return True
        return False

    def node_running(self, text: str) -> str:
        """The name of a live node that `runs` `text`."""
        for name, (node, _) in self.nodes.items():
            if node.poll() is None and self.runs(name, text):
                return name
        raise LookupError(f"no node runs {text}")

    def job(self, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        """`python -m ray_jobs.cli ARGV` as a user runs it against this cluster."""
        return self.python(["-m", "ray_jobs.cli", *argv], env)

    def python(self, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        """`python ARGS` in the repository with RAY_ADDRESS set to this cluster (and `env`),
        stdout and stderr together in `.stdout`, and `.stdin` a pipe the test may write to."""
        env = {**self.env, "RAY_ADDRESS": self.address, **(env or {})}
        return subprocess.Popen([sys.executable, *args], env=env, cwd=ROOT, text=True, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        """Every node's processes ended, its temp dir removed; raises if a process survived."""
        survivors = []
        for name in list(self.nodes):
            node, temp = self.nodes.pop(name)
            _kill(_processes_of(node, temp))
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.wait(timeout=30)
            time.sleep(0.5)  # a process forked while the first signals went out
            _kill(_processes_of(node, temp))
            survivors += [pid for pid in _processes_of(node, temp) if _alive(pid)]
            shutil.rmtree(temp, ignore_errors=True)
            Path(f"{temp}.out").unlink(missing_ok=True)
        if survivors:
            raise RuntimeError(f"processes of the test's Ray survived its teardown: {survivors}")

    def _start(self, name: str, args: list[str], tries: int = 3) -> None:
        for _ in range(tries):
            temp = tempfile.mkdtemp(prefix=f"rc-{name}-", dir="/tmp")  # short: socket paths
            ports = free_ports(6)
            with open(f"{temp}.out", "w") as log:
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
            if _started(node, f"{temp}.out"):
                return
            self.lose(name)  # a node that could not register in time (a busy machine): again
            self.nodes.pop(name)
            shutil.rmtree(temp, ignore_errors=True)
            log = Path(f"{temp}.out")
            last_words = log.read_text()[-2000:]
            log.unlink()
        raise RuntimeError(f"Ray node {name} did not start: {last_words}")


@contextlib.contextmanager
def loopback_cluster(env: dict[str, str] | None = None):
    """A LoopbackCluster that is stopped, whatever happens, when the block ends."""
    cluster = LoopbackCluster(env)
    try:
        yield cluster
    finally:
        cluster.stop()


class JobOutput:
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
        """Whether `condition()` came true while the job ran, within `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.process.poll() is None:
            if condition():
                return True
            time.sleep(0.2)
        return condition()

    def has(self, text: str) -> bool:
        return any(text in line for _, line in self.lines)

    def finish(self, timeout_s: float) -> tuple[int, str]:
        """The job's exit status and everything it printed."""
        code = self.process.wait(timeout=timeout_s)
        self._thread.join(10)
        return code, "\n".join(line for _, line in self.lines)


def _started(node: subprocess.Popen, log: str) -> bool:
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        if "Ray runtime started" in Path(log).read_text():
            return True
        if node.poll() is not None:
            return False
        time.sleep(0.5)
    return False


def _processes_of(node: subprocess.Popen, temp: str) -> list[int]:
    """The processes of the node whose `ray start` is `node` (module docstring), children first.

    Once `node` is reaped its pid may belong to a stranger: then neither it nor its tree counts,
    only the processes still in its session (they keep the session's id from being reused).
    """
    parents: dict[int, int] = {}
    sessions: dict[int, int] = {}
    named: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            parents[int(entry.name)], sessions[int(entry.name)] = int(fields[1]), int(fields[3])
            if temp.encode() in (entry / "cmdline").read_bytes():
                named.add(int(entry.name))
    tree, todo = [], [node.pid] if node.poll() is None else []
    while todo:
        p = todo.pop(0)
        tree.append(p)
        todo.extend(child for child, parent in parents.items() if parent == p)
    session = {p for p, sid in sessions.items() if sid == node.pid and p != node.pid}
    own = set(tree) | named | session
    return [p for p in reversed(tree)] + sorted(own - set(tree))


def _kill(pids: list[int], sig: signal.Signals = signal.SIGKILL) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting for its parent."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False
