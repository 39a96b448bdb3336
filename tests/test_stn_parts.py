"""ST-CNN's part-supervised start: the box loss against hand-placed keypoints, the invisible-keypoint rule, named
parts, the fallback without part annotations, and a run through `finegrain fit`."""

from __future__ import annotations

import csv
import logging
import shutil

import pytest
import torch

from finegrain.cli import main
from finegrain.data.cub import PART_NAMES, PART_REGIONS
from finegrain.errors import FinegrainError
from finegrain.evaluation.localization import LocalizationScore
from finegrain.geometry import keypoint_square
from finegrain.models import STCNN
from finegrain.tasks.stn import STNTask, part_box_loss
from tests.test_training import last_metrics


def keypoints(**placed: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, 15, 2) normalised points and (1, 15) visibility: the named CUB parts where given, the rest invisible."""
    points, visible = torch.zeros(1, len(PART_NAMES), 2), torch.zeros(1, len(PART_NAMES), dtype=torch.bool)
    for name, xy in placed.items():
        index = PART_NAMES.index(name.replace("_", " "))
        points[0, index], visible[0, index] = torch.tensor(xy), True
    return points, visible


def test_keypoint_square_hand_computed():
    points, visible = keypoints(beak=(0.2, 0.3), crown=(0.3, 0.35), tail=(0.9, 0.9))
    head = [PART_NAMES.index(n) for n in PART_REGIONS["head"]]
    # beak and crown: (0.2, 0.3)-(0.3, 0.35), widened by 0.05 -> 0.2 x 0.15, squared to 0.2 around (0.25, 0.325)
    square, seen = keypoint_square(points[:, head], visible[:, head], margin=0.05, min_side=0.1, max_side=0.6)
    torch.testing.assert_close(square, torch.tensor([[0.15, 0.225, 0.35, 0.425]]))
    assert seen.tolist() == [True]
    # one visible point: the square of min_side around it
    square, _ = keypoint_square(points[:, :1] * 0 + 0.5, torch.ones(1, 1), margin=0.0, min_side=0.2)
    torch.testing.assert_close(square, torch.tensor([[0.4, 0.4, 0.6, 0.6]]))
    # points spread over the whole image: capped at max_side, centred on them
    spread, _ = keypoint_square(torch.tensor([[[0.1, 0.1], [0.9, 0.8]]]), torch.ones(1, 2), 0.05, 0.2, 0.6)
    torch.testing.assert_close(spread, torch.tensor([[0.2, 0.15, 0.8, 0.75]]))


def test_part_box_loss_against_hand_placed_keypoints_and_the_invisible_rule():
    on_head, on_head_visible = keypoints(beak=(0.2, 0.3), crown=(0.3, 0.35))
    no_head, no_head_visible = keypoints(back=(0.5, 0.5), belly=(0.6, 0.7))  # the head hidden entirely
    parts, visible = torch.cat((on_head, no_head)), torch.cat((on_head_visible, no_head_visible))
    target = torch.tensor([0.15, 0.225, 0.35, 0.425])
    boxes = torch.stack((target + torch.tensor([0.1, 0.0, 0.1, 0.0]), torch.tensor([0.0, 0.0, 0.3, 0.3])))
    boxes.requires_grad_(True)
    loss, count = part_box_loss(boxes, parts, visible, "head", margin=0.05, min_side=0.1, max_side=0.6)
    assert count == 1 and loss.item() == pytest.approx(0.2)  # 0.1 off on x1 and on x2, one image counted
    loss.backward()
    assert boxes.grad[0].abs().sum() > 0 and boxes.grad[1].abs().sum() == 0  # the hidden head trains nothing
    body_loss, body_count = part_box_loss(boxes, parts, visible, "body", margin=0.05, min_side=0.1, max_side=0.6)
    assert body_count == 1 and body_loss.item() > 0  # only the second image shows body keypoints


def tiny_stn(**kwargs) -> STCNN:
    return STCNN(num_classes=4, backbone="test_resnet", num_parts=2, part_size=32, loc_size=32, **kwargs)


def test_parts_are_named_and_supervision_needs_region_names():
    network = tiny_stn(part_names=["head", "body"])
    assert network.box_names == ["head", "body"] and network.branch_names == ["head", "body"]
    assert set(network(torch.rand(2, 3, 64, 64)).boxes) == {"head", "body"}
    with pytest.raises(FinegrainError, match="part_names .* must be 2 distinct"):
        tiny_stn(part_names=["head"])
    with pytest.raises(FinegrainError, match=r"\['part1', 'part2'\] are not regions: set model.network"):
        STNTask(network=tiny_stn())
    STNTask(network=tiny_stn(), part_supervision="none")  # the paper's label-only training needs no names


def stn_args(root, *extra: str, epochs: int = 2) -> list[str]:
    """`finegrain fit` of a tiny STNTask on `root`: test_resnet parts named head and body, 1 supervised epoch."""
    return [
        "fit", "--run_name", "t", "--seed_everything", "0", "--model", "finegrain.tasks.stn.STNTask",
        "--model.network", "finegrain.models.STCNN", "--model.network.init_args.backbone", "test_resnet",
        "--model.network.init_args.num_parts", "2", "--model.network.init_args.part_size", "32",
        "--model.network.init_args.loc_size", "32", "--model.network.init_args.part_names", "[head, body]",
        "--model.supervision_epochs", "1", "--model.lr", "0.05",
        "--data.root", str(root), "--data.img_size", "64", "--data.batch_size", "8", "--data.num_workers", "0",
        "--data.val_fraction", "0.25", "--trainer.max_epochs", str(epochs), "--trainer.accelerator", "cpu",
        "--trainer.devices", "1", "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        *extra,
    ]  # fmt: skip


def test_fit_supervises_the_parts_first_then_trains_from_labels(synth_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(stn_args(synth_root)) == 0
    run = tmp_path / "checkpoints" / "t"
    metrics = last_metrics(run)
    for key in ("val/head/top1", "val/loc/head/contains_crown", "val/loc/body/contains_breast",
                "val/loc/head/holds_region", "val/loc/body/holds_region_chance"):  # fmt: skip
        assert key in metrics, key
    epochs = {}  # the part loss is logged in the supervised epoch only
    for path in run.glob("logs/version_*/metrics.csv"):
        with open(path) as f:
            for row in csv.DictReader(f):
                if row.get("train/part_loss/head"):
                    epochs.setdefault("head", set()).add(int(row["epoch"]))
    assert epochs == {"head": {0}}
    checkpoint = torch.load(run / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["hyper_parameters"]["part_supervision"] == "cub-parts" and checkpoint["localization_slowed"]
    # after the supervised epoch the localisation learns at localization_lr_after (0.01) of its rate
    groups = {g["name"]: g["lr"] for g in checkpoint["optimizer_states"][0]["param_groups"]}
    assert groups["localization"] / groups["head"] == pytest.approx(0.01)


def test_without_part_annotations_it_trains_from_labels_and_says_so(synth_root, tmp_path, monkeypatch, caplog):
    birds = tmp_path / "birds"
    shutil.copytree(synth_root, birds)
    (birds / "parts" / "part_locs.txt").unlink()
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.WARNING, logger="finegrain.tasks.stn"):
        assert main(stn_args(birds, "--trainer.logger", "false", epochs=1)) == 0
    assert ("the training data has no part annotations (parts/part_locs.txt): ST-CNN trains from class labels "
            "alone (part_supervision none)") in caplog.text  # fmt: skip


def test_a_box_named_after_a_region_is_scored_on_holding_any_of_its_keypoints_against_chance():
    score = LocalizationScore(region=PART_REGIONS["head"])
    on_beak, beak_visible = keypoints(beak=(0.1, 0.1), tail=(0.5, 0.5))
    hidden, hidden_visible = keypoints(tail=(0.5, 0.5))  # no head keypoint: not counted
    boxes = torch.tensor([[0.0, 0.0, 0.2, 0.2], [0.4, 0.4, 0.6, 0.6]])
    bird = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2)
    score.update(boxes, bird, torch.cat((on_beak, hidden)), torch.cat((beak_visible, hidden_visible)))
    result = score.compute()
    assert result["holds_region"].item() == 1.0
    # a 0.2 box holds (0.1, 0.1) when its centre is within 0.1 of it: centres over [0.1, 0.9] -> (0.1 / 0.8)^2
    assert result["holds_region_chance"].item() == pytest.approx((0.1 / 0.8) ** 2, abs=1e-3)
    assert "holds_region" not in LocalizationScore().compute()  # a box named after no region


def test_while_supervised_the_class_loss_does_not_move_the_boxes():
    torch.manual_seed(0)
    network = tiny_stn(part_names=["head", "body"])
    images = torch.rand(2, 3, 64, 64)
    network.localization_from_labels = False
    network(images).logits.sum().backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in network.loc_head.parameters())
    assert network.head.weight.grad.abs().sum() > 0
    network.zero_grad()
    network.localization_from_labels = True  # afterwards, as in the paper, the class loss moves them
    network(images).logits.sum().backward()
    assert network.loc_head.fc2.bias.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "recipe, names",
    [("stn_lite0_cub30", ["head", "body"]), ("stn_parts4_lite0_cub30", ["head", "front", "upperparts", "tail"])],
)
def test_the_cpu_recipes_supervise_named_parts(capsys, recipe, names):
    from finegrain.training import CONFIGS

    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", str(CONFIGS / f"{recipe}.yaml"), "--print_config"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert "finegrain.tasks.stn.STNTask" in out and "part_supervision: cub-parts" in out
    listed = out.split("part_names:")[1].split()[: 2 * len(names)]
    assert f"num_parts: {len(names)}" in out and listed == [x for name in names for x in ("-", name)]


def test_the_four_part_split_covers_every_cub_keypoint():
    four = ("head", "front", "upperparts", "tail")
    assert set().union(*(PART_REGIONS[r] for r in four)) == set(PART_NAMES)
    assert set().union(*(PART_REGIONS[r] for r in ("head", "body"))) == set(PART_NAMES) - {
        "tail",
        "left leg",
        "right leg",
    }
