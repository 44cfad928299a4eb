"""The embedded Ray that `ensure_ray` starts: a quiet console, and workers quiet without a job
runtime_env; and the Ray release whose internals `ray_jobs/runtime/session.py` relies on."""

from __future__ import annotations

import inspect
import json
import logging
import os
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import pytest
import ray
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[3]

SCRIPT = """
import json, logging, os
import ray
from ray._private.ray_constants import WORKER_PROCESS_SETUP_HOOK_ENV_VAR
from ray_jobs.runtime.session import _CLEANER_LOGGER, ensure_ray

ensure_ray(num_cpus=1)

@ray.remote
def worker():
    print("a worker's own line")
    logging.getLogger("ray").warning("a warning from Ray inside a worker")
    return logging.getLogger(_CLEANER_LOGGER).level, dict(ray.get_runtime_context().runtime_env)

level, runtime_env = ray.get(worker.remote())
print(json.dumps({"level": level, "runtime_env": runtime_env,
                  "driver_has_hook": WORKER_PROCESS_SETUP_HOOK_ENV_VAR in os.environ}))
"""


@pytest.mark.slow  # a job's own Ray
def test_the_console_shows_only_the_jobs_lines_and_the_setup_hook_reaches_workers_without_a_runtime_env():
    # A job runtime_env would start every worker through Ray's setup_worker.py (one interpreter
    # more per worker) and leave the workers Ray prestarts unused.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with tempfile.TemporaryDirectory(dir="/tmp") as ray_tmp:  # short: Ray's socket paths have a limit
        run = subprocess.run([sys.executable, "-c", SCRIPT], env={**env, "RAY_TMPDIR": ray_tmp},
                             capture_output=True, text=True, timeout=300)
        logs = next(Path(ray_tmp).glob("ray/session_*/logs"))
        driver_log = (logs / f"groupemotion-driver-{_pid_of(logs)}.log").read_text()
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stderr == ""
    assert len(run.stdout.splitlines()) == 1, run.stdout
    seen = json.loads(run.stdout)
    assert seen == {"level": logging.ERROR, "runtime_env": {}, "driver_has_hook": False}
    assert "Started a local Ray instance" in driver_log  # ray.init's own lines: routed, not dropped


def _pid_of(logs: Path) -> str:
    (driver_log,) = logs.glob("groupemotion-driver-*.log")
    return driver_log.stem.rsplit("-", 1)[1]


def test_installed_ray_is_inside_the_range_pyproject_pins():
    """The pin exists because session.py reaches into two of Ray's internals (next test)."""
    requirements = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (pin,) = [Requirement(r).specifier for r in requirements if Requirement(r).name == "ray"]
    assert Version(ray.__version__) in pin, (
        f"Ray {ray.__version__} is outside {pin}, the releases ray_jobs/runtime/session.py's console "
        "routing was written for: check the two internals in the next test on this Ray, then move the pin")


def test_the_two_ray_internals_the_quiet_console_needs_are_where_session_py_expects_them():
    from ray._private import ray_constants, worker
    from ray._private.workers import default_worker

    assert "print_to_stdstream(" in inspect.getsource(worker.listen_error_messages), (
        f"Ray {ray.__version__}: the driver's error listener no longer calls "
        "ray._private.worker.print_to_stdstream, so session._route_error_messages would let the "
        "raylet's messages reach the console")
    assert "WORKER_PROCESS_SETUP_HOOK_ENV_VAR" in inspect.getsource(default_worker), (
        f"Ray {ray.__version__}: workers no longer read ray_constants.WORKER_PROCESS_SETUP_HOOK_ENV_VAR "
        f"(was {getattr(ray_constants, 'WORKER_PROCESS_SETUP_HOOK_ENV_VAR', None)!r}), so the embedded "
        "Ray's worker setup hook (session.quiet_worker) would never run")
