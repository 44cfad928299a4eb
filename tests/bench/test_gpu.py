"""bench/gpu.py and what it needs from the GPU machine: Python with torch, no Ray, PyAV or s3fs.

Each case runs in a fresh interpreter where importing av, ray or s3fs fails, as it does there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_WITHOUT = "import sys\nfor name in ('av', 'ray', 's3fs'):\n    sys.modules[name] = None\n"


def _python(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _WITHOUT + code], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, **(env or {})})


def _bench(*args: str, env: dict | None = None, first: str = "") -> subprocess.CompletedProcess:
    code = f"{first}\nimport runpy\nsys.argv = ['bench/gpu.py', *{list(args)!r}]\nrunpy.run_path('bench/gpu.py', run_name='__main__')"
    return _python(code, env)


def test_without_cuda_it_says_so_and_exits_0_and_the_core_imports_without_pyav_ray_or_s3fs():
    done = _bench(env={"CUDA_VISIBLE_DEVICES": ""},
                  first="import groupemotion_core.model.classifier, groupemotion_core.weights.checkpoint, groupemotion_core.model.training, "
                        "groupemotion_core.weights.pretrained, groupemotion_core.weights.convert")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["cuda"] is False and "no CUDA device" in result["reason"]


def test_its_measurements_run_end_to_end_on_the_cpu():
    """The GPU code path at tiny sizes on the CPU, for both poolings: the JSON it prints, and finite outputs."""
    done = _bench("--device", "cpu", "--preset", "tiny", "--train-batch", "2", "--infer-batch", "2",
                  "--warmup", "1", "--steps", "1")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["device"] == "cpu" and result["cuda"] is False
    for pool in ("frames", "features"):
        train, infer = result[pool]["train"], result[pool]["infer"]
        assert train["finite"] == {"logits": True, "no_audio_logits": True, "loss": True, "gradients": True}
        assert infer["finite"] == {"logits": True, "no_audio_logits": True}
        assert train["flops_per_step"] > 0 and train["clips_per_s"] > 0 and infer["clips_per_s"] > 0
        assert train["mfu"] is None  # no peak is known for a CPU
    # The backbone runs on one picture a clip instead of each of its frames.
    assert result["frames"]["train"]["flops_per_step"] < result["features"]["train"]["flops_per_step"]
