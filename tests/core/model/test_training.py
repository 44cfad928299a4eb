"""Training pieces: label-smoothed loss, the two optimizer groups, and the metrics."""

from __future__ import annotations

import math

import pytest
import torch

from groupemotion_core.model.config import preset
from groupemotion_core.model.classifier import GroupEmotionModel
from groupemotion_core.model.training import LABEL_SMOOTHING, build_optimizer, classification_metrics, loss_fn


def test_loss_is_label_smoothed_cross_entropy_over_known_labels():
    assert LABEL_SMOOTHING == 0.2
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0], [9.0, 9.0, 9.0]], requires_grad=True)
    labels = torch.tensor([0, 2, -1])  # the third clip's label is unknown
    log_p = torch.log_softmax(logits.detach(), dim=1)
    # smoothed target: (1 - eps) on the true class plus eps / K on every class
    per_clip = [-(0.8 * log_p[i, y] + 0.2 / 3 * log_p[i].sum()) for i, y in ((0, 0), (1, 2))]
    loss = loss_fn(logits, labels)
    assert loss.item() == pytest.approx(sum(per_clip).item() / 2, rel=1e-6)
    loss.backward()
    assert torch.equal(logits.grad[2], torch.zeros(3))


def test_batch_without_known_labels_gives_zero_loss_not_nan():
    logits = torch.randn(2, 3, requires_grad=True)
    loss = loss_fn(logits, torch.tensor([-1, -1]))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros(2, 3))


def test_optimizer_has_encoder_and_head_groups_covering_every_parameter_once():
    model = GroupEmotionModel(preset("tiny"))
    opt = build_optimizer(model)
    assert isinstance(opt, torch.optim.Adam)
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["encoders"]["lr"] == pytest.approx(1e-6)
    assert groups["head"]["lr"] == pytest.approx(1e-4)
    assert all(g["weight_decay"] == 1e-3 for g in opt.param_groups)

    encoders = {id(p) for p in groups["encoders"]["params"]}
    head = {id(p) for p in groups["head"]["params"]}
    everything = {id(p) for p in model.parameters()}
    assert encoders.isdisjoint(head) and encoders | head == everything
    assert encoders == {id(p) for m in (model.vision.backbone, model.audio.hubert) for p in m.parameters()}
    assert all(p.requires_grad for p in model.parameters())  # nothing frozen

    custom = build_optimizer(model, lr=1e-3, weight_decay=0.0, encoder_lr_scale=0.5)
    assert [g["lr"] for g in custom.param_groups] == [pytest.approx(5e-4), pytest.approx(1e-3)]


def test_metrics_on_a_hand_checked_example():
    # true:  0 0 0 | 1 1 | 2 2 2 2 | unknown
    # pred:  0 0 1 | 1 2 | 2 2 0 1 | 2
    y_true = [0, 0, 0, 1, 1, 2, 2, 2, 2, -1]
    y_pred = [0, 0, 1, 1, 2, 2, 2, 0, 1, 2]
    m = classification_metrics(y_true, y_pred)
    confusion = [[2, 1, 0], [0, 1, 1], [1, 1, 2]]
    assert m["confusion"] == confusion
    assert m["count"] == 9
    assert m["accuracy"] == pytest.approx(5 / 9)
    assert m["per_class_recall"] == pytest.approx({"Negative": 2 / 3, "Neutral": 1 / 2, "Positive": 2 / 4})
    # F1 = 2TP / (2TP + FP + FN), per class from the matrix: 4/6, 2/5, 4/7
    f1 = []
    for k in range(3):
        tp = confusion[k][k]
        fp = sum(confusion[r][k] for r in range(3)) - tp
        fn = sum(confusion[k]) - tp
        f1.append(2 * tp / (2 * tp + fp + fn))
    assert f1 == pytest.approx([2 / 3, 2 / 5, 4 / 7])
    assert m["macro_f1"] == pytest.approx(sum(f1) / 3)


def test_metrics_with_absent_classes_stay_plain_numbers():
    m = classification_metrics([0, 0], [0, 1], labels=("a", "b", "c"))
    assert m["per_class_recall"] == {"a": 0.5, "b": 0.0, "c": 0.0}
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0 + 0) / 3)
    empty = classification_metrics([], [])
    assert empty["count"] == 0 and empty["accuracy"] == 0.0
    assert all(math.isfinite(v) for v in (empty["macro_f1"], *empty["per_class_recall"].values()))
