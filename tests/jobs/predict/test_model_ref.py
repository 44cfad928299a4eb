"""`--model hf-hub:OWNER/REPO[@REVISION]`: a checkpoint on the Hugging Face hub, resolved to one
commit from a cache the test fills, offline (tests/hub.py); no Ray."""

from __future__ import annotations

import pytest
import torch

from groupemotion_core.errors import GroupEmotionError
from groupemotion_core.model.classifier import GroupEmotionModel
from groupemotion_core.model.config import preset
from groupemotion_core.weights.checkpoint import save_checkpoint
from ray_jobs.predict.model_ref import describe_model_ref, load_model_ref
from tests.hub import COMMIT, cached_snapshot


def _upload(cache, repo: str, revision: str, seed: int, commit: str = COMMIT) -> tuple[str, GroupEmotionModel]:
    """What `hf upload REPO OUTPUT/best` and a later `hf download REPO` leave in the cache."""
    torch.manual_seed(seed)
    model = GroupEmotionModel(preset("tiny"))
    return save_checkpoint(model, cached_snapshot(cache, repo, revision, commit)), model


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_a_hub_checkpoint_resolves_to_one_commit_and_loads_offline(hub_cache):
    model_id, uploaded = _upload(hub_cache, "me/tiny-emotion", "main", seed=1)

    cfg, info = describe_model_ref("hf-hub:me/tiny-emotion")
    assert cfg == uploaded.config and info["model_id"] == model_id
    assert info["pinned_ref"] == f"hf-hub:me/tiny-emotion@{COMMIT}"
    hub = info["hub"]
    assert (hub["repo"], hub["revision"], hub["commit"]) == ("me/tiny-emotion", "main", COMMIT)
    assert hub["sha256"].startswith(model_id)  # the model id is the prefix of the weights' sha256

    loaded, loaded_info = load_model_ref("hf-hub:me/tiny-emotion")
    assert loaded_info["model_id"] == model_id and _same_weights(loaded, uploaded)


def test_the_pinned_ref_keeps_the_commit_when_the_branch_moves(hub_cache):
    first_id, first = _upload(hub_cache, "me/tiny-emotion", "main", seed=1)
    pinned = describe_model_ref("hf-hub:me/tiny-emotion")[1]["pinned_ref"]
    second_id, second = _upload(hub_cache, "me/tiny-emotion", "main", seed=2, commit="f" * 40)  # a new upload

    assert describe_model_ref("hf-hub:me/tiny-emotion")[1]["model_id"] == second_id != first_id
    assert describe_model_ref(pinned)[1]["model_id"] == first_id
    assert _same_weights(load_model_ref(pinned)[0], first)
    assert _same_weights(load_model_ref("hf-hub:me/tiny-emotion@" + "f" * 40)[0], second)


def test_a_hub_checkpoint_without_safetensors_or_not_in_the_cache_is_refused_in_one_line(hub_cache):
    _, model = _upload(hub_cache, "me/pickled", "main", seed=1)
    snapshot = hub_cache / "models--me--pickled" / "snapshots" / COMMIT
    torch.save(model.state_dict(), snapshot / "pytorch_model.bin")
    (snapshot / "model.safetensors").unlink()
    for ref, says in [("hf-hub:me/pickled", f"no model.safetensors at revision main (commit {COMMIT})"),
                      ("hf-hub:me/elsewhere@v1", "not in the Hugging Face cache"),
                      ("hf-hub:me/tiny-emotion@", "empty revision")]:
        for resolve in (describe_model_ref, load_model_ref):
            with pytest.raises(GroupEmotionError) as e:
                resolve(ref)
            assert e.value.reason == "bad_weights" and says in e.value.detail and "\n" not in str(e.value)
    assert sorted(p.name for p in hub_cache.iterdir()) == ["models--me--pickled"], "nothing was downloaded"
