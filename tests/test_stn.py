"""ST-CNN: outputs, bounded parts, gradients, weight sharing and a tiny end-to-end training."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from finegrain.errors import FinegrainError
from finegrain.models.attention import SpatialAttention
from finegrain.models.stn import STCNN

H, W = 96, 128  # non-square input: parts must still be pixel squares


def tiny(**kwargs) -> STCNN:
    args = {"num_classes": 5, "backbone": "test_resnet", "part_size": 32, "loc_size": 64} | kwargs
    return STCNN(**args)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_outputs_name_every_branch():
    torch.manual_seed(0)
    out = tiny(num_parts=3, global_branch=True)(torch.rand(2, 3, H, W))
    assert out.logits.shape == (2, 5)
    assert list(out.branch_logits) == ["global", "part1", "part2", "part3"]
    assert all(logits.shape == (2, 5) for logits in out.branch_logits.values())
    assert list(out.boxes) == ["part1", "part2", "part3"]
    assert all(box.shape == (2, 4) and box.dtype == torch.float32 for box in out.boxes.values())


def test_starting_parts_are_distinct_mid_scale_squares():
    torch.manual_seed(0)
    boxes = tiny(num_parts=4)(torch.rand(3, 3, H, W)).boxes
    pixels = torch.stack(list(boxes.values())) * torch.tensor([W, H, W, H])  # (parts, B, 4)
    assert torch.allclose(pixels, pixels[:, :1].expand_as(pixels))  # zero last layer: the same for every image
    centres = (pixels[:, 0, :2] + pixels[:, 0, 2:]) / 2
    assert torch.cdist(centres, centres).add(torch.eye(4) * 1e3).min() > 5  # distinct, a few pixels apart at least
    torch.testing.assert_close(pixels[..., 2] - pixels[..., 0], torch.full((4, 3), 0.6 * H))  # mid of [0.2, 1]
    torch.testing.assert_close(pixels[..., 3] - pixels[..., 1], torch.full((4, 3), 0.6 * H))


@pytest.mark.parametrize("transform", ["attention", "affine"])
def test_parts_stay_inside_with_min_size_whatever_the_localisation(transform):
    torch.manual_seed(0)
    model = tiny(transform=transform, num_parts=3, min_scale=0.25)
    torch.nn.init.normal_(model.loc_head.fc2.weight, std=100.0)  # wild, saturating localisation outputs
    torch.nn.init.normal_(model.loc_head.fc2.bias, std=100.0)
    with torch.no_grad():
        boxes = torch.stack(list(model(torch.randn(8, 3, H, W) * 5).boxes.values()))
    assert torch.isfinite(boxes).all() and (boxes >= -1e-6).all() and (boxes <= 1 + 1e-6).all()
    width, height = (boxes[..., 2] - boxes[..., 0]) * W, (boxes[..., 3] - boxes[..., 1]) * H
    if transform == "attention":
        torch.testing.assert_close(width, height)  # square in pixels
        assert (height >= 0.25 * H - 1e-3).all()  # min_scale of the shorter side
        assert len(boxes.flatten(0, 1).unique(dim=0)) > 1  # the outputs did vary
    else:
        assert (width >= 0.25 * W - 1e-3).all() and (height >= 0.25 * H - 1e-3).all()  # min_scale per axis


def test_classification_loss_reaches_localisation_and_probes_do_not():
    torch.manual_seed(0)
    model = tiny()
    out = model(torch.rand(4, 3, H, W))
    labels = torch.tensor([0, 1, 2, 3])
    F.cross_entropy(out.logits, labels).backward(retain_graph=True)
    last = model.loc_head.fc2
    for grad in (last.weight.grad, last.bias.grad):
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    sum(F.cross_entropy(logits, labels) for logits in out.branch_logits.values()).backward()
    assert all(p.grad is None for p in [*model.loc_net.parameters(), *model.loc_head.parameters()])
    assert all(p.grad is None for p in model.part_nets.parameters())
    assert all(p.grad is not None for p in model.branch_heads.parameters())


def test_shared_parts_hold_one_part_network():
    separate, shared = tiny(num_parts=3), tiny(num_parts=3, shared_parts=True)
    one_net = sum(p.numel() for p in shared.part_nets.parameters())
    assert sum(p.numel() for p in separate.part_nets.parameters()) == 3 * one_net
    count = sum(p.numel() for p in separate.parameters()) - sum(p.numel() for p in shared.parameters())
    assert count == 2 * one_net


@pytest.mark.parametrize("shared_parts", [False, True])
def test_lr_groups_cover_every_parameter_once(shared_parts):
    model = tiny(global_branch=True, shared_parts=shared_parts, attention="cbam")
    groups = model.lr_groups()
    assert list(groups) == ["backbone", "attention", "localization", "head"]
    ids = [id(p) for params in groups.values() for p in params]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert {id(p) for p in model.loc_head.parameters()} <= {id(p) for p in groups["localization"]}
    assert {id(p) for p in model.global_net.parameters()} <= {id(p) for p in groups["backbone"] + groups["attention"]}
    assert groups["attention"] and not any("attention" in type(m).__module__ for m in model.loc_net.modules())


def test_attention_maps_per_branch_even_with_a_shared_part_network():
    torch.manual_seed(0)
    model = tiny(shared_parts=True, attention="cbam")
    torch.nn.init.normal_(model.loc_head.fc2.bias, std=2.0)  # parts on different crops
    for module in model.modules():  # identity-initialised gates and timm's zeroed last norms give flat 0.5 maps
        if isinstance(module, SpatialAttention):
            torch.nn.init.normal_(module.conv.weight)
        elif isinstance(module, torch.nn.BatchNorm2d):
            torch.nn.init.normal_(module.weight)
    maps = model(torch.rand(2, 3, H, W)).attention_maps
    by_branch = {branch: [v for k, v in maps.items() if k.startswith(f"{branch}.")] for branch in ("part1", "part2")}
    assert len(by_branch["part1"]) == len(by_branch["part2"]) > 0 and len(maps) == 2 * len(by_branch["part1"])
    assert not torch.equal(by_branch["part1"][0], by_branch["part2"][0])  # each part's own map, not the last one


def test_runs_under_bf16_autocast():
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tiny()(torch.rand(2, 3, H, W))
    assert torch.isfinite(out.logits.float()).all()
    assert all(box.dtype == torch.float32 for box in out.boxes.values())  # geometry stays in float32


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"transform": "perspective"}, "transform"), ({"num_parts": 0}, "num_parts"), ({"min_scale": 0}, "min_scale")],
)
def test_bad_config_raises(kwargs, match):
    with pytest.raises(FinegrainError, match=match):
        tiny(**kwargs)


BLOCK = 24  # side of the blue block; its bottom-left quadrant carries the class colour


def evidence_batch(n: int, gen: torch.Generator, corner_x: int, corner_y: int,
                   jitter: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Grey images, each with the blue block at (corner_x, corner_y) ± jitter px; its bottom-left quadrant is red
    (class 0) or green (class 1). Returns images, labels and the quadrants' pixel boxes (x1, y1, x2, y2)."""
    quadrant = BLOCK // 2
    labels = torch.randint(0, 2, (n,), generator=gen)
    images = torch.full((n, 3, H, W), 0.5)
    xs = corner_x + torch.randint(-jitter, jitter + 1, (n,), generator=gen)
    ys = corner_y + torch.randint(-jitter, jitter + 1, (n,), generator=gen)
    cue = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])[labels]
    for image, x, y, colour in zip(images, xs.tolist(), ys.tolist(), cue, strict=True):
        image[:, y : y + BLOCK, x : x + BLOCK] = torch.tensor([0.0, 0.0, 1.0])[:, None, None]
        image[:, y + BLOCK - quadrant : y + BLOCK, x : x + quadrant] = colour[:, None, None]
    quadrants = torch.stack((xs, ys + BLOCK - quadrant, xs + quadrant, ys + BLOCK), dim=1).float()
    return images, labels, quadrants


def test_training_moves_a_part_onto_the_evidence():
    """20 SGD steps: part 1 moves onto the small patch that tells the classes apart.

    Every image holds a blue 24 px block on plain grey; its bottom-left 12 px quadrant is red or green (the
    class). The block sits on part 1's starting bottom-left corner so that only a sliver (about 13%) of the
    coloured quadrant is inside part 1, and nothing is inside part 2. The loss can only drop by seeing more of
    the quadrant, so part 1 must move left and down or grow.

    Weaker than per-image tracking on purpose: the block jitters by only ±2 px, so that 20 steps of a random
    tiny CNN suffice. This pins that the classification gradient moves a crop
    toward the evidence, on both axes, at a localisation learning rate 100x below the rest (the paper's
    advice). Seed 0 reaches 0.67; in a sweep of 12 seeds 11 reached 0.3-1.0 and one moved away during its
    first steps, while the random classifier still pushed it at random.
    """
    torch.manual_seed(0)
    model = STCNN(2, backbone="test_resnet", num_parts=2, part_size=32, loc_size=64)
    block, quadrant = BLOCK, BLOCK // 2
    start = model(torch.zeros(2, 3, H, W)).boxes  # the same for every image at the start
    x1, y2 = (start["part1"][0, [0, 3]] * torch.tensor([W, H])).tolist()
    corner_x, corner_y = round(x1) + 4 - quadrant, round(y2) - 4 - (block - quadrant)  # 4x4 px of it inside

    def batch(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return evidence_batch(n, gen, corner_x, corner_y, jitter=2)

    eval_images, _, eval_quadrants = batch(32, torch.Generator().manual_seed(1))

    def part_boxes() -> torch.Tensor:
        with torch.no_grad():
            return torch.stack(list(model(eval_images).boxes.values())) * torch.tensor([W, H, W, H])

    def coverage(part: torch.Tensor) -> float:
        """Mean fraction of the coloured quadrant inside the part."""
        overlap = torch.minimum(part[:, 2:], eval_quadrants[:, 2:]) - torch.maximum(part[:, :2], eval_quadrants[:, :2])
        return (overlap.clamp(min=0).prod(dim=1) / quadrant**2).mean().item()

    before = part_boxes()
    groups = model.lr_groups()
    optimizer = torch.optim.SGD(
        [{"params": groups["backbone"] + groups["head"], "lr": 0.1}, {"params": groups["localization"], "lr": 1e-3}],
        momentum=0.9,
    )
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        images, labels, _ = batch(16, gen)
        out = model(images)
        loss = sum(F.cross_entropy(logits, labels) for logits in (out.logits, *out.branch_logits.values()))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = part_boxes()

    assert coverage(before[0]) < 0.15
    assert coverage(after[0]) > 3 * coverage(before[0])
    assert after[0, :, 0].mean() < before[0, :, 0].mean() - 3  # left edge moved left by pixels
    assert after[0, :, 3].mean() > before[0, :, 3].mean() + 2  # bottom edge moved down
    torch.testing.assert_close(after[1], before[1])  # part 2 saw only flat grey: no gradient, no move
