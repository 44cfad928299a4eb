"""`Labeller`: one video labelled from Python, no Ray. That its numbers are the ones `groupemotion
infer` writes is tested beside infer (tests/jobs/commands/test_infer.py); here, what it returns
and the window options, on generated videos and a tiny random checkpoint."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from groupemotion_core import Labeller
from groupemotion_core.media.synthetic import SyntheticClip, render_clip
from groupemotion_core.model.classifier import GroupEmotionModel
from groupemotion_core.model.config import preset
from groupemotion_core.schema import CLASSES
from groupemotion_core.weights.checkpoint import save_checkpoint
from tests.hub import cached_snapshot

SMALL = dict(width=64, height=48, fps=4.0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[Path, str]:
    directory = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    return directory, save_checkpoint(GroupEmotionModel(preset("tiny")), directory)


@pytest.fixture(scope="module")
def labeller(checkpoint) -> Labeller:
    return Labeller.load(str(checkpoint[0]), device="cpu")


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    """12 s: windows [0, 5), [5, 10) and a short last one, [10, 12)."""
    path = tmp_path_factory.mktemp("videos") / "long.mp4"
    render_clip(SyntheticClip(label="Positive", seconds=12.0, seed=3, **SMALL), path)
    return path


def test_every_window_and_the_video_as_their_length_weighted_mean(labeller, checkpoint, video):
    result = labeller.label(video)

    assert [(w.index, w.start_s, w.end_s, w.error) for w in result.windows] == [
        (0, 0.0, 5.0, None), (1, 5.0, 10.0, None), (2, 10.0, 12.0, None)]
    probs = np.array([[w.probabilities[c] for c in CLASSES] for w in result.windows])
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-6)
    assert [w.label for w in result.windows] == [CLASSES[i] for i in probs.argmax(axis=1)]
    expected = np.array([5.0, 5.0, 2.0]) @ probs / 12.0
    np.testing.assert_allclose([result.probabilities[c] for c in CLASSES], expected, rtol=1e-9)
    assert not np.allclose(expected, probs.mean(axis=0), rtol=1e-7, atol=0)  # the weights matter here
    assert (result.label, result.seconds, result.error) == (CLASSES[int(np.argmax(expected))], 12.0, None)
    assert result.model_id == checkpoint[1] == labeller.model_id


def test_bytes_a_file_object_and_any_batch_size_give_the_same_numbers(checkpoint, labeller, video):
    by_path = labeller.label(video)
    by_bytes = Labeller.load(str(checkpoint[0]), device="cpu", batch_size=2).label(video.read_bytes())
    with open(video, "rb") as f:
        by_file = labeller.label(f)
    for other in (by_bytes, by_file):
        assert [(w.start_s, w.end_s, w.label) for w in other.windows] == [
            (w.start_s, w.end_s, w.label) for w in by_path.windows]
        np.testing.assert_allclose([[w.probabilities[c] for c in CLASSES] for w in other.windows],
                                   [[w.probabilities[c] for c in CLASSES] for w in by_path.windows], atol=1e-6)
    assert [w.probabilities for w in by_file.windows] == [w.probabilities for w in by_path.windows]  # one batch size


def test_window_options_are_infers(labeller, video):
    everything = {w.start_s: w for w in labeller.label(video).windows}
    first = labeller.label(video, windows="first")
    assert [(w.start_s, w.end_s) for w in first.windows] == [(0.0, 5.0)]
    assert first.probabilities == everything[0.0].probabilities and first.seconds == 5.0
    spread = labeller.label(video, max_windows=2)
    assert [(w.index, w.start_s) for w in spread.windows] == [(0, 0.0), (1, 10.0)]  # first to last
    np.testing.assert_allclose([spread.windows[1].probabilities[c] for c in CLASSES],
                               [everything[10.0].probabilities[c] for c in CLASSES], atol=1e-6)
    overlapping = labeller.label(video, stride_s=2.5)
    assert [w.start_s for w in overlapping.windows] == [0.0, 2.5, 5.0, 7.5]  # [7.5, 12) reaches the end
    assert overlapping.seconds == 12.0


def test_a_video_that_cannot_be_labelled_is_an_error_value_and_a_missing_file_raises(labeller, tmp_path):
    junk = np.random.default_rng(0).bytes(4000)
    result = labeller.label(junk)
    assert (result.label, result.probabilities, result.windows, result.seconds) == (None, None, [], 0.0)
    assert result.error.startswith("not_media: ")
    assert labeller.label(b"").error.startswith("empty: ")
    with pytest.raises(FileNotFoundError):
        labeller.label(tmp_path / "nowhere.mp4")


def test_a_checkpoint_on_the_hub_loads_offline(checkpoint, hub_cache, video, labeller):
    shutil.copytree(checkpoint[0], cached_snapshot(hub_cache, "me/tiny-emotion", "v1"), dirs_exist_ok=True)
    from_hub = Labeller.load("hf-hub:me/tiny-emotion@v1", device="cpu")
    assert from_hub.model_id == checkpoint[1]
    assert dataclasses.asdict(from_hub.label(video)) == dataclasses.asdict(labeller.label(video))
