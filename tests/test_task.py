"""The classification task: network registry, loss, parameter groups, schedule and metrics."""

from __future__ import annotations

import math

import pytest
import torch

from finegrain.errors import FinegrainError
from finegrain.evaluation.metrics import accuracy_metrics
from finegrain.models import Classifier, ModelOutput, create_network
from finegrain.tasks.classification import ClassificationTask, warmup_cosine


def make_task(attention: str = "none", **kwargs) -> ClassificationTask:
    return ClassificationTask(network=Classifier(num_classes=6, backbone="test_resnet", attention=attention), **kwargs)


def test_warmup_cosine_hand_computed():
    assert warmup_cosine(0, 4, 20) == pytest.approx(0.25)
    assert warmup_cosine(3, 4, 20) == pytest.approx(1.0)
    assert warmup_cosine(4, 4, 20) == pytest.approx(1.0)
    assert warmup_cosine(12, 4, 20) == pytest.approx(0.01 + 0.99 * 0.5)  # half-way through the cosine
    assert warmup_cosine(20, 4, 20) == pytest.approx(0.01)
    assert warmup_cosine(99, 4, 20) == pytest.approx(0.01)


def test_network_registry_rejects_unknown_networks_and_arguments():
    with pytest.raises(FinegrainError, match="racnn9 is not a registered network; choose one of .*Classifier"):
        create_network("racnn9", num_classes=3, backbone="test_resnet")
    with pytest.raises(FinegrainError, match="finegrain.models.Nope is not a registered network"):
        create_network("finegrain.models.Nope", num_classes=3)
    with pytest.raises(FinegrainError, match="network nowhere.Net cannot be imported"):
        create_network("nowhere.Net", num_classes=3)
    with pytest.raises(FinegrainError, match=r"\['zoom'\] are not arguments of network finegrain.models.Classifier"):
        create_network("baseline", num_classes=3, backbone="test_resnet", zoom=2)


def test_the_task_stores_what_rebuilds_its_network():
    """hparams["network"] is the network's class path and every constructor argument, defaults included, and
    create_network builds the same network from it (same parameter names and shapes)."""
    task = ClassificationTask(network=create_network("stn", num_classes=3, backbone="test_resnet", part_size=32,
                                                     loc_size=64, num_parts=3))  # fmt: skip
    spec = task.hparams["network"]
    assert spec["class_path"] == "finegrain.models.STCNN"
    assert {k: spec["init_args"][k] for k in ("num_classes", "backbone", "part_size", "num_parts", "min_scale")} == {
        "num_classes": 3, "backbone": "test_resnet", "part_size": 32, "num_parts": 3, "min_scale": 0.2}  # fmt: skip
    assert task.num_classes == 3
    again = create_network(spec["class_path"], **spec["init_args"])
    assert {k: v.shape for k, v in again.state_dict().items()} == {
        k: v.shape for k, v in task.network.state_dict().items()}  # fmt: skip


def test_forward_returns_the_shared_result_and_gradients_reach_backbone_and_head():
    task = make_task()
    output = task(torch.randn(2, 3, 64, 80))
    assert isinstance(output, ModelOutput) and output.logits.shape == (2, 6)
    assert output.boxes == {} and output.branch_logits == {}
    task.loss(output, torch.tensor([0, 5])).backward()
    groups = task.network.lr_groups()
    assert groups["attention"] == []  # no attention configured
    for name, params in groups.items():
        if not params:
            continue
        assert all(p.grad is not None for p in params), name
        # timm zero-initialises each block's last norm, so some single tensors may get zero gradient at first
        assert sum(p.grad.abs().sum() for p in params) > 0, name


def test_loss_adds_every_branch():
    task = make_task(label_smoothing=0.0)
    logits = torch.zeros(1, 6)
    output = ModelOutput(logits=logits, branch_logits={"a": logits, "b": logits})
    assert task.loss(output, torch.tensor([2])).item() == pytest.approx(3 * math.log(6))


def test_parameter_groups_take_their_scaled_learning_rate():
    task = make_task(lr=0.2, lr_scales={"backbone": 0.05}, optimizer="adamw")
    task.trainer = type("T", (), {"estimated_stepping_batches": 50, "num_training_batches": 10,
                                  "accumulate_grad_batches": 1})()  # fmt: skip
    config = task.configure_optimizers()
    optimizer = config["optimizer"]
    assert isinstance(optimizer, torch.optim.AdamW)
    rates = {g["name"]: g["initial_lr"] for g in optimizer.param_groups}
    assert rates == pytest.approx({"backbone": 0.01, "head": 0.2})
    n_backbone = sum(p.numel() for p in task.network.backbone.parameters())
    assert sum(p.numel() for p in optimizer.param_groups[0]["params"]) == n_backbone


def test_metrics_are_micro_top1_top5_and_mean_per_class():
    metrics = accuracy_metrics(7, "val/")
    logits = torch.eye(7)[[0, 0, 0, 0, 1, 2, 2]] + torch.arange(7).flip(0) * 0.01  # ties broken towards low ids
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 6])
    result = metrics(logits, labels)
    assert result["val/top1"] == pytest.approx(5 / 7)  # micro: 5 of 7 images
    assert result["val/mean_class"] == pytest.approx((1 + 0.5 + 0) / 3)  # mean over the classes present
    assert result["val/top5"] == pytest.approx(6 / 7)  # class 6 ranks last for the last image


def test_hyperparameters_are_plain_types_for_weights_only_loading():
    task = make_task(class_names=["a"] * 6, preprocessing={"img_size": 64, "mean": [0.5] * 3})
    allowed = (int, float, str, bool, type(None), list, dict)

    def plain(value) -> bool:  # the network's init_args are nested inside hparams["network"]
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else []
        return isinstance(value, allowed) and all(plain(child) for child in children)

    assert all(plain(v) for v in task.hparams.values()) and isinstance(task.hparams["network"]["init_args"], dict)


def test_attention_gates_form_their_own_group_at_the_head_rate():
    task = make_task(attention="cbam", lr=0.1)
    groups = task.network.lr_groups()
    assert groups["attention"] and all(p.requires_grad for p in groups["attention"])
    ids = [id(p) for ps in groups.values() for p in ps]
    assert len(ids) == len(set(ids)) == len(list(task.network.parameters()))  # a partition
    task.trainer = type("T", (), {"estimated_stepping_batches": 10, "num_training_batches": 10,
                                  "accumulate_grad_batches": 1})()  # fmt: skip
    rates = {g["name"]: g["initial_lr"] for g in task.configure_optimizers()["optimizer"].param_groups}
    assert rates == pytest.approx({"backbone": 0.01, "attention": 0.1, "head": 0.1})
    output = task(torch.randn(1, 3, 64, 64))
    assert output.attention_maps and all(m.shape[0] == 1 for m in output.attention_maps.values())


def test_a_group_with_a_start_epoch_waits_then_warms_up_on_its_own():
    task = make_task(lr=0.1, lr_scales={"backbone": 1.0}, warmup_epochs=1, lr_start_epochs={"head": 2})
    task.trainer = type("T", (), {"estimated_stepping_batches": 50, "num_training_batches": 10,
                                  "accumulate_grad_batches": 1})()  # fmt: skip
    config = task.configure_optimizers()
    optimizer, schedule = config["optimizer"], config["lr_scheduler"]["scheduler"]
    rates = []
    for _ in range(22):
        rates.append({g["name"]: g["lr"] for g in optimizer.param_groups})
        optimizer.step()
        schedule.step()
    assert rates[0] == pytest.approx({"backbone": 0.01, "head": 0.0})  # step 0: warm-up 1/10; head waits
    assert rates[19]["head"] == 0.0 and rates[19]["backbone"] == pytest.approx(0.1 * warmup_cosine(19, 10, 50))
    assert rates[20]["head"] == pytest.approx(0.01) and rates[21]["head"] == pytest.approx(0.02)  # its own warm-up
