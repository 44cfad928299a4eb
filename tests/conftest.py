"""Shared fixtures: a real S3 server on 127.0.0.1, one local Ray per session, generated clips.

The S3 server starts before Ray so that Ray's worker processes inherit the AWS_* variables that
point at it: the jobs under test read them exactly as they would on a cluster.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from groupemotion_core.media.synthetic import SyntheticClip, render_clip


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on an ephemeral loopback port; AWS_* variables point at it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in _AWS_VARS}
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_REGION="us-east-1",
    )
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        os.environ.pop(k, None)
    yield endpoint
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


_AWS_VARS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION",
             "AWS_PROFILE", "AWS_SESSION_TOKEN")


@pytest.fixture(scope="session")
def make_bucket(s3_server):
    """Make a new empty bucket and return its URI, e.g. `s3://test-1a2b3c`: for fixtures of a
    wider scope than `s3_bucket`'s."""
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server)

    def _make() -> str:
        name = f"test-{uuid.uuid4().hex[:12]}"
        client.create_bucket(Bucket=name)
        return f"s3://{name}"

    return _make


@pytest.fixture
def s3_bucket(make_bucket) -> str:
    """A new empty bucket for this test; returns its URI."""
    return make_bucket()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> tuple[str, str]:
    """The `tiny` model with seed-0 random weights, saved once for the session: (directory,
    model_id). Tests read it and never change it; one that needs another model saves its own."""
    import torch

    from groupemotion_core.model.classifier import GroupEmotionModel
    from groupemotion_core.model.config import preset
    from groupemotion_core.weights.checkpoint import save_checkpoint

    directory = tmp_path_factory.mktemp("tiny-checkpoint")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model_id = save_checkpoint(GroupEmotionModel(preset("tiny")), directory)
    return str(directory), model_id


@pytest.fixture
def flaky_s3(s3_server, monkeypatch):
    """The S3 server behind a fault-injecting proxy (tests/s3_faults.py): AWS_ENDPOINT_URL points
    at the proxy for this test, in this process and the subprocesses it starts (Ray's workers,
    started earlier, keep the plain server unless given the variable). Faults are off until the
    test sets `failure_rate` (and `faults`, `scope`, `deny`); `injected` counts those answered."""
    from tests.s3_faults import FaultyS3Proxy

    proxy = FaultyS3Proxy(s3_server, seed=0).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    yield proxy
    proxy.stop()


@pytest.fixture(scope="session")
def ray_session(s3_server):
    """One local Ray for the whole session, bound to loopback.

    Four logical CPUs on two cores: Ray Train workers each hold a CPU for the whole run, and the
    Ray Data tasks that feed them need CPUs of their own or the pipeline would wait forever.
    """
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",
            num_cpus=4,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            configure_logging=False,
            log_to_driver=True,
        )
    yield ray
    ray.shutdown()


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache, offline, for this process and the processes it starts
    (fill it with tests/hub.py's cached_snapshot)."""
    import huggingface_hub

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture
def make_clip(tmp_path: Path):
    """Render a generated clip to a file and return its path: make_clip("a.mp4", label=..., ...)."""

    def _make(name: str = "clip.mp4", **kwargs) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        container = path.suffix.lstrip(".") or "mp4"
        render_clip(SyntheticClip(container=container, **kwargs), path)
        return path

    return _make
