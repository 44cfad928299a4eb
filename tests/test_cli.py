"""The `groupemotion` command as a user runs it: a real process, its stdout, stderr, exit code."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ray_jobs.cli import COMMANDS

CONSOLE_SCRIPT = Path(sys.executable).with_name("groupemotion")


def run_cli(*args: str, script: bool = False) -> subprocess.CompletedProcess:
    command = [str(CONSOLE_SCRIPT)] if script else [sys.executable, "-m", "ray_jobs.cli"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=60)


def test_help_lists_every_subcommand():
    result = run_cli("--help", script=True)
    assert result.returncode == 0
    for name in COMMANDS:
        assert name in result.stdout


def test_version_is_the_installed_distribution():
    result = run_cli("--version", script=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"groupemotion {importlib.metadata.version('groupemotion')}\n"


def test_decode_prints_the_clip_summary(make_clip):
    path = make_clip("clip.mp4", label="Negative", seconds=2.0, fps=10)
    result = run_cli("decode", str(path), "--frames", "4", "--size", "32", script=True)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["frames_shape"] == [4, 32, 32, 3]
    assert summary["seconds"] == 2.0 and summary["errors"] == 0
    [window] = summary["windows"]  # a 2 s video is one window of its own length
    assert (window["start_s"], window["end_s"], window["error"]) == (0.0, 2.0, None)
    assert window["audio_len"] == 32000
    assert window["frame_times"] == pytest.approx([0.2, 0.7, 1.2, 1.7])
    red, green, blue = window["frame_mean_rgb"]
    assert red > 2 * green and red > 2 * blue  # the Negative class colour, not BGR


def test_decode_window_options(make_clip):
    path = make_clip("long.mkv", seconds=4.0, fps=10)
    result = run_cli("decode", str(path), "--start", "1", "--seconds", "2", "--frames", "2")
    assert result.returncode == 0, result.stderr
    [window] = json.loads(result.stdout)["windows"]
    assert window["frame_times"] == pytest.approx([1.5, 2.5])
    assert window["audio_len"] == 2 * 16000


@pytest.mark.parametrize(
    "options, spans",
    [
        ([], [(0, 1), (1, 2), (2, 3), (3, 4)]),
        (["--stride", "1.5"], [(0, 1), (1.5, 2.5), (3, 4)]),
        (["--max-windows", "2"], [(0, 1), (3, 4)]),
        (["--windows", "first"], [(0, 1)]),
    ],
)
def test_decode_plans_windows_over_the_whole_video(make_clip, options, spans):
    path = make_clip("long.mkv", seconds=4.0, fps=10)
    result = run_cli("decode", str(path), "--seconds", "1", "--frames", "2", "--size", "16", *options)
    assert result.returncode == 0, result.stderr
    windows = json.loads(result.stdout)["windows"]
    assert [(w["start_s"], w["end_s"]) for w in windows] == spans
    assert [w["frame_times"] for w in windows] == [pytest.approx([a + 0.2, a + 0.7]) for a, _ in spans]


def test_decode_start_is_one_window_only(make_clip):
    result = run_cli("decode", str(make_clip(seconds=1.0)), "--start", "0.5", "--stride", "2")
    assert result.returncode == 2 and result.stderr.startswith("error: bad_arguments: ")


def test_module_entrypoint_runs_the_same_command(make_clip):
    path = make_clip("clip.webm", seconds=1.0)
    result = subprocess.run(
        [sys.executable, "-m", "ray_jobs.commands.decode", str(path), "--size", "16"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["frames_shape"] == [8, 16, 16, 3]


@pytest.mark.parametrize(
    "content, reason",
    [(b"not a video at all" * 50, "not_media"), (b"", "empty"), (None, "not_found")],
)
def test_decode_bad_input_is_a_clean_error(tmp_path, content, reason):
    path = tmp_path / "bad.mp4"
    if content is not None:
        path.write_bytes(content)
    result = run_cli("decode", str(path))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith(f"error: {reason}: ")
    assert "Traceback" not in result.stderr
