"""The object zoom (AOLM): the region from hand-made activation maps, its box and square, the crop from the full
input, the fallback, fused logits, gradients, and a run through `finegrain fit` / `predict`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from finegrain.cli import main
from finegrain.errors import FinegrainError
from finegrain.geometry import mask_box, square_box
from finegrain.models import ObjectZoom
from finegrain.models.zoom import largest_region, object_region
from finegrain.predict import Predictor
from finegrain.training import CONFIGS
from tests.test_predict import PREPROCESSING, photo, write_checkpoint
from tests.test_training import fit_args, last_metrics

ZOOM = "finegrain.models.ObjectZoom"


def grid(rows: list[str]) -> torch.Tensor:
    """A (1, h, w) bool mask drawn as text: '#' inside."""
    return torch.tensor([[[c == "#" for c in row] for row in rows]])


def tiny(**kwargs) -> ObjectZoom:
    return ObjectZoom(num_classes=5, backbone="test_resnet", **{"zoom_size": 16, **kwargs})


def test_largest_region_joins_diagonal_neighbours_and_keeps_only_the_biggest():
    mask = grid([
        "##.....",
        "##...#.",
        ".....#.",
        "....#..",  # joins the two cells above through a corner (8-connected): a chain of 3
        ".......",
        "#......",
        ".......",
    ])  # fmt: skip
    region = largest_region(torch.cat((mask, torch.zeros_like(mask))))
    # the 2 x 2 block (4 cells) beats the diagonal chain (3 cells) and the lone cell
    assert torch.equal(region[0], grid(["##.....", "##.....", *["......."] * 5])[0])
    assert not region[1].any()  # an empty mask stays empty


def test_largest_region_follows_a_winding_region_to_its_end():
    """A snake through a 7 x 7 grid: the label of its last cell must travel all 17 cells, not a few steps."""
    mask = grid(["#####..", "....#..", "#####..", "#......", "#####..", ".......", "......."])
    lone = grid(["......#", *["......."] * 5, "......#"])
    region = largest_region(mask | lone)
    assert torch.equal(region, mask)


def test_mask_box_is_the_cells_bounding_box_and_empty_is_the_whole_image():
    mask = grid(["....", ".##.", "..#.", "...."])  # rows 1-2, columns 1-2 of a 4 x 4 grid
    torch.testing.assert_close(mask_box(mask), torch.tensor([[0.25, 0.25, 0.75, 0.75]]))
    wide = grid(["......", "..###.", "......"])  # rows 1, columns 2-4 of 3 x 6
    torch.testing.assert_close(mask_box(wide), torch.tensor([[2 / 6, 1 / 3, 5 / 6, 2 / 3]]))
    torch.testing.assert_close(mask_box(torch.zeros(2, 3, 3, dtype=torch.bool)), torch.tensor([[0.0, 0, 1, 1]] * 2))


def test_square_box_hand_computed():
    boxes = torch.tensor([
        [0.6, 0.6, 1.0, 0.8],  # 0.4 x 0.2: a 0.4 square around (0.8, 0.7)
        [0.45, 0.45, 0.55, 0.55],  # 0.1 square: raised to min_side 1/3, centred
        [0.0, 0.0, 0.2, 0.1],  # at the corner: 1/3 square shifted inside
        [0.0, 0.2, 1.0, 0.6],  # full width: side 1 (the shorter side), centre y clamped to 0.5
    ])  # fmt: skip
    third = 1 / 3
    expected = torch.tensor([[0.6, 0.5, 1.0, 0.9], [0.5 - third / 2, 0.5 - third / 2, 0.5 + third / 2, 0.5 + third / 2],
                             [0.0, 0.0, third, third], [0.0, 0.0, 1.0, 1.0]])  # fmt: skip
    torch.testing.assert_close(square_box(boxes, third), expected)
    # a 2:1 image: the box (0.1..0.3 of the width, 0.1..0.9 of the height) is 0.4 x 0.8 heights; its square of
    # side 0.8 heights is 0.4 of the width, centred at x 0.2 -> 0.0..0.4
    torch.testing.assert_close(square_box(torch.tensor([0.1, 0.1, 0.3, 0.9]), 0.0, aspect=2.0),
                               torch.tensor([0.0, 0.1, 0.4, 0.9]))  # fmt: skip


def test_object_region_of_a_hand_made_activation_map():
    """Two channels whose sum is high on a 3 x 4 blob and on one far cell: the blob, not the lone peak."""
    feature_map = torch.zeros(1, 2, 7, 7)
    feature_map[0, 0, 1:4, 2:6] = 1.0
    feature_map[0, 1, 1:4, 2:6] = 2.0
    feature_map[0, 0, 6, 0] = 9.0  # the single strongest cell: not the largest region
    region = object_region(feature_map)
    assert region.sum() == 12 and region[0, 1:4, 2:6].all()
    torch.testing.assert_close(mask_box(region), torch.tensor([[2 / 7, 1 / 7, 6 / 7, 4 / 7]]))
    # the network's box: that region widened to a square of side 4/7 around its centre (4/7, 5/14)
    box = tiny(min_side=0.2).object_box(feature_map, aspect=1.0)
    torch.testing.assert_close(box, torch.tensor([[2 / 7, 1 / 14, 6 / 7, 9 / 14]]))


def test_the_crop_is_sampled_from_the_full_input_and_logits_are_fused():
    """The whole view is a 64 px copy of the 128 px input; the object crop comes from the input itself."""
    torch.manual_seed(0)
    model = tiny(whole_size=64, zoom_size=32, min_side=0.25).eval()
    inputs = []
    features = model.backbone.forward_features
    model.backbone.forward_features = lambda x: inputs.append(x) or features(x)
    model.object_box = lambda feature_map, aspect: torch.tensor([[0.25, 0.5, 0.5, 0.75]] * len(feature_map))
    image = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    out = model(image)
    torch.testing.assert_close(inputs[0], F.interpolate(image, size=(64, 64), mode="bilinear", align_corners=False))
    torch.testing.assert_close(inputs[1], image[:, :, 64:96, 32:64], atol=1e-5, rtol=0)  # 32 px at 1:1
    assert list(out.branch_logits) == ["whole", "object"] and list(out.boxes) == ["object"]
    torch.testing.assert_close(out.logits, (out.branch_logits["whole"] + out.branch_logits["object"]) / 2)
    activation = out.attention_maps["whole.activation"]
    assert activation.shape[0] == 2 and activation.amin() == 0 and activation.amax() == 1


def test_a_flat_activation_map_falls_back_to_the_whole_image():
    model = tiny(zoom_size=64).eval()
    features = model.backbone.forward_features
    model.backbone.forward_features = lambda x: torch.ones_like(features(x))  # nothing above the mean
    out = model(torch.rand(3, 3, 64, 64))
    torch.testing.assert_close(out.boxes["object"], torch.tensor([[0.0, 0, 1, 1]] * 3))
    assert out.attention_maps["whole.activation"].eq(0).all()  # flat: no position stands out


def test_gradients_reach_backbone_and_head_but_not_the_box():
    torch.manual_seed(0)
    model = tiny(zoom_size=32)
    image = torch.rand(4, 3, 64, 64, requires_grad=True)
    out = model(image)
    assert not out.boxes["object"].requires_grad  # the AOLM box is chosen, not learned
    F.cross_entropy(out.branch_logits["object"], torch.tensor([0, 1, 2, 3])).backward()
    assert model.head.weight.grad.abs().sum() > 0
    # every backbone weight is on the object view's path (test_resnet zero-initialises each block's last
    # batch norm, so the convolutions before it start at zero gradient; the stem's does not)
    assert all(p.grad is not None for p in model.backbone.parameters())
    assert model.backbone.conv1[0].weight.grad.abs().sum() > 0
    assert image.grad.abs().sum() > 0  # through the crop's bilinear sampling, as any input gradient


@pytest.mark.parametrize("share_network", [True, False])
def test_lr_groups_cover_every_parameter_once(share_network):
    model = tiny(attention="cbam", share_network=share_network)
    groups = model.lr_groups()
    ids = [id(p) for params in groups.values() for p in params]
    assert len(ids) == len(set(ids)) == len(list(model.parameters())) and groups["attention"]


def test_an_own_object_network_starts_equal_and_learns_only_from_the_object_view():
    torch.manual_seed(0)
    shared, own = tiny(zoom_size=32), tiny(zoom_size=32, share_network=False)
    assert not any(key.startswith("object_") for key in shared.state_dict())  # older checkpoints still load
    assert sum(p.numel() for p in own.parameters()) == 2 * sum(p.numel() for p in shared.parameters())
    assert torch.equal(own.object_head.weight, own.head.weight)
    assert own.object_head.weight.data_ptr() != own.head.weight.data_ptr()
    out = own(torch.rand(4, 3, 64, 64))
    F.cross_entropy(out.branch_logits["object"], torch.tensor([0, 1, 2, 3])).backward()
    assert own.object_backbone.conv1[0].weight.grad.abs().sum() > 0 and own.object_head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in [*own.backbone.parameters(), *own.head.parameters()])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"min_side": 0}, "min_side must be in \\(0, 1\\]"), ({"zoom_size": 0}, "zoom_size must be a positive integer"),
     ({"whole_size": -3}, "whole_size must be a positive integer"),
     ({"whole_size": 0}, "whole_size must be a positive integer")],
)  # fmt: skip
def test_bad_settings_get_clear_errors(kwargs, message):
    with pytest.raises(FinegrainError, match=message):
        tiny(**kwargs)


def test_boxes_map_to_the_photograph(tmp_path):
    """A 200 x 100 photo, crop_pct 1: the 64 px input is its central 100 x 100; input box (0.25, 0.5, 0.5, 0.75)
    is photo pixels (75, 50, 100, 75)."""
    checkpoint = write_checkpoint(tmp_path / "zoom.ckpt", method=ZOOM, attention="none",
                                  preprocessing={**PREPROCESSING, "crop_pct": 1.0})  # fmt: skip
    predictor = Predictor.from_checkpoint(checkpoint, device="cpu")
    predictor.network.object_box = lambda feature_map, aspect: torch.tensor([[0.25, 0.5, 0.5, 0.75]])
    explanation = predictor.explain(photo(200, 100, 0))
    assert explanation.boxes["object"] == pytest.approx((75.0, 50.0, 100.0, 75.0), abs=0.5)
    assert explanation.crops["object"].size == (25, 25)


def test_fit_logs_both_views_and_where_the_box_falls_then_predict_draws_it(synth_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = fit_args(synth_root, "--model.network.init_args.zoom_size", "32", "--model.network.init_args.whole_size",
                    "32", network=ZOOM, epochs=1)  # fmt: skip
    assert main(args) == 0
    run = tmp_path / "checkpoints" / "t"
    assert main(["test", *args[1:], "--ckpt_path", str(run / "last.ckpt")]) == 0
    metrics = last_metrics(run)
    for key in ("val/whole/top1", "val/object/top1", "test/object/top1", "val/boxes/object/side",
                "test/loc/object/contains_bird_centre", "test/loc/object/contains_bird_centre_chance"):  # fmt: skip
        assert key in metrics, key
    photos = sorted((synth_root / "images").rglob("*.jpg"))[:2]
    assert main(["predict", *map(str, photos), "--checkpoint", str(run / "last.ckpt"), "--save-viz", "viz"]) == 0
    assert len(list((tmp_path / "viz").glob("*.png"))) == 2


@pytest.mark.parametrize(("recipe", "whole_size"), [("zoom_lite0_cub30", "224"), ("zoom_cub", "null")])
def test_recipes_parse(recipe, whole_size, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", str(CONFIGS / f"{recipe}.yaml"), "--print_config"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert "finegrain.models.ObjectZoom" in out and f"whole_size: {whole_size}" in out
    assert "attention: none" in out  # CBAM lost on validation measured on one VM (docs/benchmarks.md)
    assert "share_network: false" in out  # the object view's own network won on validation (docs/benchmarks.md)
