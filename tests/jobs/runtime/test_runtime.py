"""The embedded Ray that `ensure_ray` starts: its workers are quiet without a job runtime_env."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile

SCRIPT = """
import json, logging, os
import ray
from ray._private.ray_constants import WORKER_PROCESS_SETUP_HOOK_ENV_VAR
from ray_jobs.runtime.session import _CLEANER_LOGGER, ensure_ray

ensure_ray(num_cpus=1)

@ray.remote
def worker():
    return logging.getLogger(_CLEANER_LOGGER).level, dict(ray.get_runtime_context().runtime_env)

level, runtime_env = ray.get(worker.remote())
print(json.dumps({"level": level, "runtime_env": runtime_env,
                  "driver_has_hook": WORKER_PROCESS_SETUP_HOOK_ENV_VAR in os.environ}))
"""


def test_the_worker_setup_hook_reaches_workers_without_a_runtime_env():
    # A job runtime_env would start every worker through Ray's setup_worker.py (one interpreter
    # more per worker) and leave the workers Ray prestarts unused.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with tempfile.TemporaryDirectory(dir="/tmp") as ray_tmp:  # short: Ray's socket paths have a limit
        run = subprocess.run([sys.executable, "-c", SCRIPT], env={**env, "RAY_TMPDIR": ray_tmp},
                             capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    assert seen == {"level": logging.ERROR, "runtime_env": {}, "driver_has_hook": False}
