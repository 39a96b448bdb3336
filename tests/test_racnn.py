"""RA-CNN: composed zooms sampled from the original image, bounded boxes, losses, pre-training targets, the
phase schedule (what learns and what stays frozen), and the recipes through the `finegrain` command."""

from __future__ import annotations

import math
import re

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from finegrain.cli import main
from finegrain.errors import FinegrainError
from finegrain.geometry import (
    bound_transform,
    box_to_transform,
    compose_transforms,
    crop,
    transform_to_box,
    transform_to_theta,
)
from finegrain.models.backbones import create_backbone
from finegrain.models.complexity import count_gflops
from finegrain.models.racnn import RACNN, apn_target, ranking_loss
from finegrain.tasks.racnn import RACNNTask, phase_at
from finegrain.training import CONFIGS
from tests.test_training import last_metrics

H, W = 48, 64  # non-square, so a swapped x/y cannot pass


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**kwargs) -> RACNN:
    args = {"num_classes": 5, "backbone": "test_resnet", "zoom_size": 12, "apn_grid": 2, "apn_hidden": 8} | kwargs
    return RACNN(**args)


def set_apn_output(apn: torch.nn.Module, raw: list[float]) -> None:
    """Make an APN give the same raw (tx, ty, tl) for every image."""
    with torch.no_grad():
        apn.fc2.weight.zero_()
        apn.fc2.bias.copy_(torch.tensor(raw))


def test_composed_crop_is_sampled_from_the_original_image():
    image = torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(0))
    # scale 2: the 32 px square x 16..48, y 8..40; scale 3: its bottom-right quarter, x 32..48, y 24..40
    outer = box_to_transform(torch.tensor([[16 / W, 8 / H, 48 / W, 40 / H]]))
    inner = box_to_transform(torch.tensor([[0.5, 0.5, 1.0, 1.0]]))
    composed = compose_transforms(outer, inner)
    torch.testing.assert_close(transform_to_box(composed), torch.tensor([[32 / W, 24 / H, 48 / W, 40 / H]]))
    homogeneous = torch.cat((transform_to_theta(inner), torch.tensor([[[0.0, 0.0, 1.0]]])), dim=1)
    torch.testing.assert_close(transform_to_theta(composed), transform_to_theta(outer) @ homogeneous)
    # one resampling of the original pixels at 1:1 is the slice itself
    torch.testing.assert_close(crop(image, composed, (16, 16)), image[:, :, 24:40, 32:48], atol=1e-5, rtol=0)


def test_network_zooms_into_pixel_squares_of_the_original_input():
    """Scale 2's box is the APN's square in the input; scale 3's is the square inside scale 2's crop, composed
    into input coordinates and sampled from the input itself (not from the 2x downsampled scale-2 crop)."""
    torch.manual_seed(0)
    model = tiny().eval()
    # scale 2: side 0.5 x 48 = 24 px; centre x = (1 - 0.375) * 0.2 -> pixel 36, y = (1 - 0.5) * -0.5 -> pixel 18
    set_apn_output(model.apns[0], [math.atanh(0.2), math.atanh(-0.5), 0.0])
    # scale 3: half of scale 2's side (12 px), a quarter of that side right of its centre: pixels x 33..45, y 12..24
    set_apn_output(model.apns[1], [math.atanh(0.5), 0.0, 0.0])
    inputs = []
    for net in model.backbones:
        net.forward_features = (lambda f: lambda x: inputs.append(x) or f(x))(net.forward_features)
    image = torch.rand(2, 3, H, W, generator=torch.Generator().manual_seed(1))
    out = model(image)
    pixels = torch.tensor([W, H, W, H])
    torch.testing.assert_close(out.boxes["scale2"] * pixels, torch.tensor([[24.0, 6, 48, 30]] * 2))
    torch.testing.assert_close(out.boxes["scale3"] * pixels, torch.tensor([[33.0, 12, 45, 24]] * 2))
    assert inputs[0] is image and [tuple(x.shape[-2:]) for x in inputs[1:]] == [(12, 12), (12, 12)]
    down = F.interpolate(image[:, :, 6:30, 24:48], size=(12, 12), mode="bilinear", align_corners=False)
    torch.testing.assert_close(inputs[1], down, atol=1e-5, rtol=0)
    torch.testing.assert_close(inputs[2], image[:, :, 12:24, 33:45], atol=1e-5, rtol=0)
    assert list(out.branch_logits) == ["scale1", "scale2", "scale3"] and out.logits.shape == (2, 5)
    assert model.branch_names == ["scale1", "scale2", "scale3"] and model.box_names == ["scale2", "scale3"]


def test_scale1_size_shows_scale1_a_small_copy_and_zooms_into_the_full_input():
    """Scale 1 sees a 16 px square copy of the 48 x 64 input; the boxes are the same pixel squares of the input
    as without it (the aspect is the input's, not the copy's) and scale 2 samples the input at full resolution."""
    torch.manual_seed(0)
    model = tiny(scale1_size=16, zoom_size=24).eval()
    set_apn_output(model.apns[0], [math.atanh(0.2), math.atanh(-0.5), 0.0])  # the 24 px square x 24..48, y 6..30
    inputs = []
    for net in model.backbones:
        net.forward_features = (lambda f: lambda x: inputs.append(x) or f(x))(net.forward_features)
    image = torch.rand(2, 3, H, W, generator=torch.Generator().manual_seed(1))
    out = model(image)
    torch.testing.assert_close(out.boxes["scale2"] * torch.tensor([W, H, W, H]), torch.tensor([[24.0, 6, 48, 30]] * 2))
    copy = F.interpolate(image, size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(inputs[0], copy)
    torch.testing.assert_close(inputs[1], image[:, :, 6:30, 24:48], atol=1e-5, rtol=0)  # 1:1, not from the copy
    with pytest.raises(FinegrainError, match="scale1_size must be a positive integer"):
        tiny(scale1_size=0)


@pytest.mark.parametrize("bias", [None, [float("inf"), -float("inf"), float("inf")], [-1e30, 1e30, -float("inf")]])
def test_boxes_stay_inside_as_squares_of_minimum_size_for_any_apn_output(bias):
    torch.manual_seed(0)
    model = tiny(min_scale=0.3, max_scale=0.9).eval()
    for apn in model.apns:
        torch.nn.init.normal_(apn.fc2.weight, std=1e4)  # wild, saturating outputs that differ per image
        if bias is not None:
            set_apn_output(apn, bias)
    with torch.no_grad():
        boxes = model(torch.randn(6, 3, H, W) * 5).boxes
    for name, min_side in (("scale2", 0.3 * H), ("scale3", 0.3 * 0.3 * H)):
        box = boxes[name]
        assert torch.isfinite(box).all() and (box >= -1e-6).all() and (box <= 1 + 1e-6).all()
        width, height = (box[:, 2] - box[:, 0]) * W, (box[:, 3] - box[:, 1]) * H
        torch.testing.assert_close(width, height)  # squares in pixels
        assert (height >= min_side - 1e-3).all()
    assert boxes["scale3"][:, 0].ge(boxes["scale2"][:, 0] - 1e-6).all()  # scale 3 lies inside scale 2
    assert boxes["scale3"][:, 3].le(boxes["scale2"][:, 3] + 1e-6).all()


def test_apn_boxes_ignore_the_magnitude_of_the_feature_map():
    """Right after a classification phase the eval-mode maps were 6x larger (batch-norm running statistics lag
    the backbone); an APN on the raw map scaled its outputs with them and put every box on the min_scale bound,
    where the sigmoid saturates for good. The layer-normalised APN gives the same boxes for any scale and offset."""
    torch.manual_seed(0)
    apn = tiny().apns[0]
    torch.nn.init.normal_(apn.fc2.weight, std=0.5)  # a trained-looking APN whose boxes differ per image
    feature_map = torch.rand(4, apn.fc1.in_features // 4, 3, 3, generator=torch.Generator().manual_seed(0))
    raw = apn(feature_map)
    assert raw.abs().max() < 5 and raw[:, 2].std() > 0.05
    for scale, offset in ((6.0, 0.0), (1e4, 3.0), (0.5, -1.0)):
        torch.testing.assert_close(apn(feature_map * scale + offset), raw, atol=1e-3, rtol=1e-3)
    side = bound_transform(apn(feature_map * 1e4), 0.2, 0.8)[:, 2]
    assert side.gt(0.25).all() and side.lt(0.75).all()  # off both bounds, where the sigmoid still has slope


def test_ranking_loss_hand_computed():
    # true-class probabilities per scale: image 0 (class 0) 0.5, 0.6, 0.4; image 1 (class 1) 0.2, 0.1, 0.3
    probs = [torch.tensor([[0.5, 0.3, 0.2], [0.5, 0.2, 0.3]]), torch.tensor([[0.6, 0.2, 0.2], [0.6, 0.1, 0.3]]),
             torch.tensor([[0.4, 0.3, 0.3], [0.4, 0.3, 0.3]])]  # fmt: skip
    logits = [p.log() + 7.0 for p in probs]  # softmax ignores the shift; raw logits would not
    labels = torch.tensor([0, 1])
    # image 0: max(0, 0.5 - 0.6 + 0.05) + max(0, 0.6 - 0.4 + 0.05) = 0.25; image 1: 0.15 + 0 -> mean 0.2
    assert ranking_loss(logits, labels, margin=0.05).item() == pytest.approx(0.2, abs=1e-6)
    assert ranking_loss(logits[:2], labels, margin=0.0).item() == pytest.approx(0.05, abs=1e-6)  # (0 + 0.1) / 2
    per_image = ranking_loss(logits, labels, margin=0.05, reduction="none")
    torch.testing.assert_close(per_image, torch.tensor([0.25, 0.15]))


def test_pretraining_target_is_the_square_holding_the_most_response():
    feature_map = torch.zeros(3, 2, 4, 4)
    feature_map[0, 0, 1, 2], feature_map[0, 1, 1, 2] = 1.0, 2.0  # one responding cell (channel sum 3): row 1, col 2
    feature_map[1, :, 3, 3] = 1.0  # bottom-right corner
    feature_map[2, 0, 0, 0] = 3.0  # the strongest single cell, top-left ...
    feature_map[2, 0, 2:4, 1:3] = 2.0  # ... against a 2 x 2 block holding 8 in all: the square goes there
    # Half the side is 2 cells. Every square holding cell (1, 2) ties: their mean centres it on the cell, at x =
    # (2 * 2 + 1) / 4 - 1 = 0.25, y = (2 * 1 + 1) / 4 - 1 = -0.25. The corner cell: the corner square (0.5, 0.5).
    # The block covers cells 2-3 x 1-2 exactly: centre x = 0, y = 0.5.
    expected = torch.tensor([[0.25, -0.25, 0.5, 0.5], [0.5, 0.5, 0.5, 0.5], [0.0, 0.5, 0.5, 0.5]])
    torch.testing.assert_close(apn_target(feature_map), expected)
    # an image twice as wide as high: the half-height square is a quarter of the width (1 cell), on the cell
    wide = apn_target(feature_map, aspect=2.0)
    torch.testing.assert_close(wide[:2], torch.tensor([[0.25, -0.25, 0.25, 0.5], [0.75, 0.5, 0.25, 0.5]]))
    # a wider square (3 cells of 4): every position holds cell (1, 2), so the mean is the centre of the image;
    # only the squares at the bottom-right edge hold the corner cell
    wider = apn_target(feature_map, scale=0.75)
    torch.testing.assert_close(wider[:2], torch.tensor([[0.0, 0.0, 0.75, 0.75], [0.25, 0.25, 0.75, 0.75]]))


def test_ranking_loss_reaches_both_apns_and_classification_loss_does_not():
    torch.manual_seed(0)
    model = tiny()
    for apn in model.apns:  # apart from the centre, so the crops are not symmetric
        set_apn_output(apn, [0.3, -0.2, 0.1])
    out = model(torch.rand(4, 3, H, W))
    labels = torch.tensor([0, 1, 2, 3])
    ranking_loss(list(out.branch_logits.values()), labels, margin=0.5).backward(retain_graph=True)
    for apn in model.apns:
        assert apn.fc2.bias.grad is not None and apn.fc2.bias.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    F.cross_entropy(out.branch_logits["scale1"], labels).backward()
    assert all(p.grad is None for p in model.apns.parameters())


def test_classification_phase_loss_of_a_finer_scale_trains_only_that_scale():
    """Without the cut, scale 2's loss reaches scale 1's backbone through the frozen APN's input: in the
    classification phase it reshaped scale 1's features to move the crop (scale 1 then trailed the baseline,
    16.9 % against 65.0 % in the quick CUB 1-10 bench; 58.0 % with the cut)."""
    torch.manual_seed(0)
    model = tiny()
    for apn in model.apns:  # a trained APN: its zero-initialised last layer would block the path by itself
        torch.nn.init.normal_(apn.fc2.weight, std=0.1)
    images, labels = torch.rand(4, 3, H, W), torch.tensor([0, 1, 2, 3])
    first_layer = next(model.backbone_at(0).parameters())
    for detach, reaches_scale1 in ((False, True), (True, False)):
        model.zero_grad(set_to_none=True)
        out = model.zoom_in(images, detach_boxes=detach).output
        F.cross_entropy(out.branch_logits["scale2"], labels).backward()
        assert (first_layer.grad is not None and first_layer.grad.abs().sum() > 0) == reaches_scale1
        assert next(model.backbone_at(1).parameters()).grad.abs().sum() > 0  # scale 2 itself still learns
    boxes = model.zoom_in(images, detach_boxes=True).output.boxes
    torch.testing.assert_close(boxes, model.zoom_in(images).output.boxes)  # the same crops either way


def test_phase_schedule():
    phases = [phase_at(step, 2, 3, 1) for step in range(10)]
    assert phases == ["pretrain"] * 2 + ["classification"] * 3 + ["ranking"] + ["classification"] * 3 + ["ranking"]
    assert {phase_at(step, 0, 4, 0) for step in range(20)} == {"classification"}


def test_bad_settings_get_clear_errors():
    with pytest.raises(FinegrainError, match="scales must be 2 or 3"):
        tiny(scales=4)
    with pytest.raises(FinegrainError, match="pretrain_scale 0.5 of the previous side, outside min_scale 0.6"):
        RACNNTask(network=tiny(num_classes=3, min_scale=0.6), pretrain_steps=5)
    with pytest.raises(FinegrainError, match="pretrain_scale 0.9 .* max_scale 0.8"):
        RACNNTask(network=tiny(num_classes=3), pretrain_steps=5, pretrain_scale=0.9)
    with pytest.raises(FinegrainError, match="classification_steps >= 1"):
        RACNNTask(network=tiny(num_classes=3), classification_steps=0)


def test_lr_groups_cover_every_parameter_once_and_two_scales_work():
    model = tiny(scales=2, shared_backbone=True, attention="cbam", attention_stages=[3])
    groups = model.lr_groups()
    assert list(groups) == ["backbone", "attention", "apn", "head"] and groups["attention"]
    ids = [id(p) for params in groups.values() for p in params]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    out = model(torch.rand(2, 3, H, W))
    assert list(out.branch_logits) == ["scale1", "scale2"] and list(out.boxes) == ["scale2"]
    assert len(model.backbones) == 1 and len(model.apns) == 1


class PhaseRecorder(pl.Callback):
    """Per training step: the phase, the classification learning rate, which parameter groups got gradients and
    changed, and whether batch-norm running statistics changed."""

    def __init__(self):
        self.steps: list[dict] = []

    def groups(self, pl_module) -> dict[str, list[torch.Tensor]]:
        groups = pl_module.network.lr_groups()
        return {"classification": groups["backbone"] + groups["head"], "apn": groups["apn"]}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before = {k: [p.detach().clone() for p in v] for k, v in self.groups(pl_module).items()}
        self.stats = [b.clone() for n, b in pl_module.network.named_buffers() if "running_mean" in n]
        self.steps.append({"phase": pl_module.phase, "lr": trainer.optimizers[0].param_groups[0]["lr"]})

    def on_after_backward(self, trainer, pl_module):
        self.steps[-1]["grads"] = {
            k: any(p.grad is not None and p.grad.abs().sum() > 0 for p in v) for k, v in self.groups(pl_module).items()
        }

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now = self.groups(pl_module)
        self.steps[-1]["changed"] = {
            k: any(not torch.equal(a, b) for a, b in zip(self.before[k], now[k], strict=True)) for k in now
        }
        stats = [b for n, b in pl_module.network.named_buffers() if "running_mean" in n]
        self.steps[-1]["bn_changed"] = any(not torch.equal(a, b) for a, b in zip(self.stats, stats, strict=True))


def test_each_phase_trains_only_its_parameters_and_freezes_batch_norm_while_apns_learn():
    torch.manual_seed(0)
    images = torch.rand(16, 3, H, W, generator=torch.Generator().manual_seed(0))
    data = [{"image": image, "label": torch.tensor(i % 4)} for i, image in enumerate(images)]
    task = RACNNTask(network=tiny(num_classes=4, zoom_size=24), lr=0.1, lr_scales={"backbone": 1.0}, margin=0.9,
                     pretrain_steps=2, classification_steps=2, ranking_steps=2, apn_optimizer="adamw")  # fmt: skip
    recorder = PhaseRecorder()
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         callbacks=[recorder])  # fmt: skip
    trainer.fit(task, DataLoader(data, batch_size=4, shuffle=False))
    phases = [step["phase"] for step in recorder.steps]
    assert phases == ["pretrain"] * 2 + ["classification"] * 2 + ["ranking"] * 2 + ["classification"] * 2
    for step in recorder.steps:
        learns_apn = step["phase"] != "classification"
        assert step["grads"] == {"classification": not learns_apn, "apn": learns_apn}, step
        assert step["changed"] == {"classification": not learns_apn, "apn": learns_apn}, step
        assert step["bn_changed"] == (not learns_apn), step
    assert all(p.requires_grad for p in task.parameters())  # untoggled after every step
    assert [type(opt) for opt in trainer.optimizers] == [torch.optim.SGD, torch.optim.AdamW]
    # the classifiers' warm-up (1 epoch = 4 steps) starts with their first step, not during pre-training
    assert recorder.steps[2]["lr"] == pytest.approx(0.1 / 4) and recorder.steps[3]["lr"] == pytest.approx(0.1 / 2)


def test_fit_runs_every_phase_from_the_synthetic_recipe(synth_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [
        "fit", "--config", str(CONFIGS / "racnn_synth.yaml"), "--run_name", "r",
        "--data.root", str(synth_root), "--data.img_size", "64", "--data.batch_size", "8",
        "--data.num_workers", "0", "--data.val_fraction", "0.25",
        "--model.init_args.network.init_args.backbone", "test_resnet",
        "--model.init_args.network.init_args.weights", "none",
        "--model.init_args.network.init_args.zoom_size", "32", "--model.init_args.network.init_args.apn_grid", "2",
        "--model.init_args.network.init_args.apn_hidden", "8",
        "--model.init_args.pretrain_steps", "1", "--model.init_args.classification_steps", "2",
        "--model.init_args.ranking_steps", "1",
        "--trainer.max_epochs", "2", "--trainer.log_every_n_steps", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
    ]  # fmt: skip
    assert main(args) == 0
    run = tmp_path / "checkpoints" / "r"
    metrics = last_metrics(run)
    for phase in ("pretrain", "classification", "ranking"):
        assert metrics[f"train/steps_{phase}"] >= 1, phase
    for key in (
        "train/rank_loss_epoch",
        "train/apn_loss_epoch",
        "train/loss_epoch",
        "val/top1",
        "val/scale3/top1",
        "val/boxes/scale2/side",
        "val/boxes/scale3/centre_spread",
        "val/loc/scale3/contains_bird_centre",
    ):
        assert key in metrics, key
    checkpoint = torch.load(run / "last.ckpt", map_location="cpu", weights_only=True)
    network = checkpoint["hyper_parameters"]["network"]
    assert network["class_path"] == "finegrain.models.RACNN" and checkpoint["global_step"] == 4
    assert {k: network["init_args"][k] for k in ("backbone", "zoom_size", "apn_grid", "num_classes")} == {
        "backbone": "test_resnet", "zoom_size": 32, "apn_grid": 2, "num_classes": 4}  # fmt: skip
    assert main(["test", *args[1:], "--ckpt_path", str(run / "last.ckpt")]) == 0
    assert "test/scale2/top1" in last_metrics(run)


@pytest.mark.parametrize("recipe", ["racnn_cub", "racnn_resnet50_cub", "racnn_lite0_cub10", "racnn_synth"])
def test_recipes_parse(recipe, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", str(CONFIGS / f"{recipe}.yaml"), "--print_config"])
    assert stop.value.code == 0
    assert "finegrain.tasks.racnn.RACNNTask" in capsys.readouterr().out


def test_info_counts_three_vgg19_scales(capsys):
    assert main(["info", "--config", str(CONFIGS / "racnn_cub.yaml")]) == 0
    out = capsys.readouterr().out
    assert "network     RACNN: vgg19, 200 classes" in out and "input size  448x448" in out
    # three headless VGG-19s (143.67 M minus the 4096 x 1000 classifier), two APNs on the 14 x 14 pool5 map
    # pooled to 7 x 7, a classifier per scale and the fused one
    vgg = 143_667_240 - 4097 * 1000
    apn = 512 * 49 * 512 + 512 + 513 * 3
    expected = 3 * vgg + 2 * apn + 3 * 4097 * 200 + (3 * 4096 + 1) * 200
    assert float(re.search(r"parameters\s+([\d.]+) M", out).group(1)) == pytest.approx(expected / 1e6, abs=0.01)
    # the cost of one VGG-19 at 448 px and two at 224 px; the APNs and classifiers add 0.03 GMACs
    with torch.device("meta"):
        single = create_backbone("vgg19")
    scales = count_gflops(single, (448, 448)) + 2 * count_gflops(single, (224, 224))
    assert float(re.search(r"GFLOPs\s+([\d.]+)", out).group(1)) == pytest.approx(scales, abs=0.05)
