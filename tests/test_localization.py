import pytest
import torch

from finegrain.evaluation.localization import LocalizationScore, box_statistics, placement_chance


def test_placement_chance_by_hand():
    # A 0.5-wide box has centres in [0.25, 0.75]; the target [0.5, 1.0] overlaps that over 0.25 of 0.5.
    assert placement_chance(torch.tensor(0.5), torch.tensor(0.5), torch.tensor(1.0)).item() == pytest.approx(0.5)
    # A full-width box has one centre, 0.5: chance is 1 when the target holds it, 0 when not.
    assert placement_chance(torch.tensor(1.0), torch.tensor(0.4), torch.tensor(0.6)).item() == 1.0
    assert placement_chance(torch.tensor(1.0), torch.tensor(0.6), torch.tensor(0.9)).item() == 0.0


def test_scores_by_hand():
    score = LocalizationScore(part_names=("head", "tail"))
    boxes = torch.tensor([[0.1, 0.1, 0.3, 0.3], [0.6, 0.5, 1.0, 0.9]])  # x = width, y = height
    bird = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.5, 0.5]])
    parts = torch.tensor([[[0.2, 0.25], [0.9, 0.9]], [[0.7, 0.55], [0.2, 0.2]]])
    visible = torch.tensor([[True, True], [True, False]])
    score.update(boxes, bird, parts, visible)
    result = score.compute()
    assert result["centre_in_bird"].item() == pytest.approx(0.5)  # only the first centre (0.2, 0.2) is inside
    assert result["contains_bird_centre"].item() == pytest.approx(0.5)  # (0.25, 0.25) is in the first box only
    assert result["contains_head"].item() == pytest.approx(1.0)
    assert result["contains_tail"].item() == pytest.approx(0.0)  # one visible tail, missed
    # Chance of a 0.2 x 0.2 box (centres in [0.1, 0.9]^2) having its centre in [0, 0.5]^2: (0.4 / 0.8)^2;
    # of a 0.4 x 0.4 box (centres in [0.2, 0.8]^2): (0.3 / 0.6)^2. Both 0.25.
    assert result["centre_in_bird_chance"].item() == pytest.approx(0.25)
    # A 0.2 box contains (0.2, 0.25) when its centre is within 0.1: x in [0.1, 0.3] of [0.1, 0.9] -> 0.2 / 0.8,
    # y in [0.15, 0.35] -> 0.25; the 0.4 box contains (0.7, 0.55): x in [0.5, 0.8] -> 0.5, y in [0.35, 0.75] -> 2/3.
    assert result["contains_head_chance"].item() == pytest.approx((0.25 * 0.25 + 0.5 * 2 / 3) / 2)


def test_whole_image_boxes_always_contain_the_bird():
    score = LocalizationScore()
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).repeat(3, 1)
    bird = torch.rand(3, 2).mul(0.5).repeat(1, 2) + torch.tensor([0, 0, 0.3, 0.3])
    score.update(boxes, bird, torch.rand(3, 15, 2), torch.ones(3, 15, dtype=torch.bool))
    result = score.compute()
    assert result["contains_bird_centre"] == 1 and result["contains_bird_centre_chance"] == 1


def test_box_statistics_flag_a_collapsed_zoom():
    same = torch.tensor([[0.25, 0.25, 0.75, 0.75]]).repeat(4, 1)
    stats = box_statistics(same)
    assert stats["side"].item() == pytest.approx(0.5) and stats["centre_spread"].item() == 0
    spread = box_statistics(torch.tensor([[0.0, 0.0, 0.2, 0.2], [0.8, 0.8, 1.0, 1.0]]))
    assert spread["centre_spread"].item() == pytest.approx((2 * 0.4**2) ** 0.5)
