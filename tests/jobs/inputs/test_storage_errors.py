"""Storage mistakes are one line: no credentials, an unknown bucket, access denied and an endpoint
that nobody answers at give `error: <reason>: <what to check>` and exit 2, from every command,
before any job starts Ray. A store that is there but keeps failing is no mistake: exit 75."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from groupemotion_core.errors import GroupEmotionError
from groupemotion_core.media.synthetic import SyntheticClip, render_clip
from ray_jobs.inputs import storage
from ray_jobs.cli import main
from ray_jobs.commands.pack import pack
from ray_jobs.inputs.storage import StorageError

REPO = Path(__file__).resolve().parents[3]


def _closed_port() -> int:
    """A loopback port that nothing listens on: connecting to it is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def clip(tmp_path: Path) -> Path:
    path = tmp_path / "videos" / "Positive" / "a.mp4"
    path.parent.mkdir(parents=True)
    render_clip(SyntheticClip(label="Positive", width=48, height=32, seconds=0.5, seed=1), path)
    return path


@pytest.fixture
def data_bucket(s3_bucket: str, clip: Path) -> str:
    """A bucket with one video under videos/."""
    storage.write_bytes_atomic(f"{s3_bucket}/videos/Positive/a.mp4", clip.read_bytes())
    return s3_bucket


def test_each_storage_mistake_is_its_own_reason_naming_the_uri_and_the_variable(s3_server, data_bucket, flaky_s3,
                                                                                monkeypatch):
    flaky_s3.deny.add(data_bucket[len("s3://") :])
    denied = f"{data_bucket}/videos/Positive/a.mp4"
    with pytest.raises(StorageError) as e:
        storage.read_bytes(denied)
    assert (e.value.reason, e.value.detail.split(": ")[0]) == ("access_denied", denied)
    assert "AWS_ACCESS_KEY_ID" in e.value.detail and "reading" in e.value.detail
    with pytest.raises(StorageError, match="access_denied: .* writing it"):
        storage.check(f"{data_bucket}/out", write=True)

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    for call in (lambda uri: storage.read_bytes(uri), storage.exists, storage.find,
                 lambda uri: storage.write_bytes_atomic(uri, b"x"), storage.check):
        with pytest.raises(StorageError) as e:
            call("s3://no-such-bucket-here/x.mp4")
        assert e.value.reason == "no_such_bucket"
        assert e.value.detail.startswith("s3://no-such-bucket-here/x.mp4: ") and "AWS_ENDPOINT_URL" in e.value.detail
    with pytest.raises(GroupEmotionError) as e:  # a missing object is the caller's, not the store's
        storage.read_bytes(f"{data_bucket}/videos/missing.mp4")
    assert e.value.reason == "not_found" and not isinstance(e.value, StorageError)

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")
    with pytest.raises(StorageError) as e:
        storage.check(f"{data_bucket}/videos")
    assert e.value.reason == "unreachable" and "AWS_ENDPOINT_URL" in e.value.detail

    monkeypatch.setenv("AWS_ENDPOINT_URL", "localhost-9000")
    with pytest.raises(StorageError, match="bad_endpoint: .*AWS_ENDPOINT_URL='localhost-9000'"):
        storage.exists(f"{data_bucket}/videos")


def test_pack_to_an_unreachable_store_is_a_storage_error_not_a_file_mode_error(clip, monkeypatch):
    """The library path, below the CLI's check: pack stops at its first request with the store's
    error (it used to end in `ValueError: File not in write mode`)."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(StorageError, match="unreachable: s3://bucket/packed/"):
        pack(str(clip.parent.parent), "s3://bucket/packed", progress=io.StringIO())


def test_decode_reads_an_s3_object(data_bucket, capsys):
    assert main(["decode", f"{data_bucket}/videos/Positive/a.mp4", "--frames", "2", "--size", "32"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["frames_shape"] == [2, 32, 32, 3] and out["file"] == f"{data_bucket}/videos/Positive/a.mp4"
    assert main(["decode", f"{data_bucket}/videos/none.mp4"]) == 2
    assert capsys.readouterr().err.startswith(f"error: not_found: {data_bucket}/videos/none.mp4")


def _env(**changes: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(AWS_EC2_METADATA_DISABLED="true")  # no credential lookups outside the machine
    for k, v in changes.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


def _no_credentials(tmp_path: Path) -> dict[str, str | None]:
    missing = str(tmp_path / "no-such-aws-file")
    return dict(AWS_ACCESS_KEY_ID=None, AWS_SECRET_ACCESS_KEY=None, AWS_SESSION_TOKEN=None, AWS_PROFILE=None,
                AWS_SHARED_CREDENTIALS_FILE=missing, AWS_CONFIG_FILE=missing)


@pytest.mark.parametrize(
    "command, mistake",
    [
        ("pack", "unreachable"),
        ("infer", "no_credentials"),
        ("infer", "unreachable"),
        ("eval", "no_such_bucket"),
        ("train", "access_denied"),
        ("decode", "no_credentials"),
    ],
)
def test_a_storage_mistake_is_one_line_and_exit_2_from_every_command(
    command, mistake, tmp_path, clip, data_bucket, flaky_s3
):
    """As a user meets it: the command in a process of its own, the mistake in its environment."""
    output = f"{data_bucket}-denied/out" if mistake == "access_denied" else f"{data_bucket}/out"
    if mistake == "no_such_bucket":
        inputs = "s3://no-such-bucket-here/videos/"
    else:
        inputs = f"{data_bucket}/videos/"
    args = {
        "pack": ["pack", str(clip.parent.parent), output],
        "infer": ["infer", inputs, "--model", "preset:tiny", "--output", output],
        "eval": ["eval", inputs, "--model", "preset:tiny", "--report", str(tmp_path / "report")],
        "train": ["train", "--preset", "tiny", "--train", inputs, "--val", inputs, "--output", output],
        "decode": ["decode", f"{data_bucket}/videos/Positive/a.mp4"],
    }[command]
    env = {
        "unreachable": dict(AWS_ENDPOINT_URL=f"http://127.0.0.1:{_closed_port()}"),
        "no_credentials": _no_credentials(tmp_path),
        "no_such_bucket": {},
        "access_denied": {},
    }[mistake]
    flaky_s3.deny.add(f"{data_bucket}-denied"[len("s3://") :])
    variable = {"unreachable": "AWS_ENDPOINT_URL", "no_credentials": "AWS_ACCESS_KEY_ID",
                "no_such_bucket": "AWS_ENDPOINT_URL", "access_denied": "AWS_ACCESS_KEY_ID"}[mistake]

    done = subprocess.run([sys.executable, "-m", "ray_jobs.cli", *args], cwd=REPO, env=_env(**env),
                          capture_output=True, text=True, timeout=90)

    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and lines[0].startswith(f"error: {mistake}: s3://"), done.stderr
    assert variable in lines[0] and done.stdout == ""


def test_a_store_that_keeps_failing_exits_75_and_the_same_command_later_succeeds(tmp_path, data_bucket, flaky_s3):
    """Not a mistake: the store answers, throttling every request past the retries. Exit status 75
    (EX_TEMPFAIL) tells a retry loop to run the command again, which 2 tells it not to."""
    argv = [sys.executable, "-m", "ray_jobs.cli", "decode", f"{data_bucket}/videos/Positive/a.mp4", "--size", "32"]
    flaky_s3.faults, flaky_s3.failure_rate = ("slowdown",), 1.0

    done = subprocess.run(argv, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)

    lines = done.stderr.strip().splitlines()
    assert done.returncode == 75, done.stderr
    assert len(lines) == 1 and lines[0].startswith(f"error: storage_unavailable: {data_bucket}/videos/"), done.stderr
    assert flaky_s3.injected["slowdown"] >= 2  # the retries met the fault too

    flaky_s3.failure_rate = 0.0
    again = subprocess.run(argv, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["frames_shape"][1:] == [32, 32, 3]
