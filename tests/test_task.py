"""The classification task: network registry, loss, parameter groups, schedule and metrics."""

from __future__ import annotations

import math

import pytest
import torch

from finegrain.errors import FinegrainError
from finegrain.models import ModelOutput, build_network
from finegrain.tasks.classification import ClassificationTask, accuracy_metrics, warmup_cosine


def make_task(**kwargs) -> ClassificationTask:
    return ClassificationTask(num_classes=6, backbone="test_resnet", **kwargs)


def test_warmup_cosine_hand_computed():
    assert warmup_cosine(0, 4, 20) == pytest.approx(0.25)
    assert warmup_cosine(3, 4, 20) == pytest.approx(1.0)
    assert warmup_cosine(4, 4, 20) == pytest.approx(1.0)
    assert warmup_cosine(12, 4, 20) == pytest.approx(0.01 + 0.99 * 0.5)  # half-way through the cosine
    assert warmup_cosine(20, 4, 20) == pytest.approx(0.01)
    assert warmup_cosine(99, 4, 20) == pytest.approx(0.01)


def test_network_registry_rejects_unknown_methods_and_arguments():
    with pytest.raises(FinegrainError, match="model.method 'racnn9'"):
        build_network("racnn9", num_classes=3, backbone="test_resnet")
    with pytest.raises(FinegrainError, match=r"\['zoom'\] do not belong to method 'baseline'"):
        build_network("baseline", num_classes=3, backbone="test_resnet", zoom=2)


def test_method_args_given_on_the_command_line_are_read_as_yaml():
    """`--model.method_args.min_scale 0.4` arrives as the string "0.4"; arguments that take strings stay strings."""
    net = build_network("stn", num_classes=3, backbone="test_resnet", min_scale="0.4", num_parts="3",
                        global_branch="true", box_gradient="finite-difference", loc_backbone="test_resnet")  # fmt: skip
    assert (net.min_scale, net.num_parts, net.box_gradient) == (0.4, 3, "finite-difference")
    assert net.global_net is not None
    with pytest.raises(FinegrainError, match=r"method_args.min_scale must be a number, got 'small'"):
        build_network("stn", num_classes=3, backbone="test_resnet", min_scale="small")


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
    assert all(isinstance(v, allowed) for v in task.hparams.values())


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
