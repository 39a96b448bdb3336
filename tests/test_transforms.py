"""Transforms carry the box and the parts correctly (hand-computed), through crops and flips."""

from __future__ import annotations

import albumentations as A
import numpy as np
import pytest
import torch
from albumentations.pytorch import ToTensorV2

from finegrain.data.cub import PART_NAMES
from finegrain.data.transforms import Augment, NormalizeToTensor, apply_transform, build_transform

PRE = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "img_size": 100, "crop_pct": 1.0,
       "interpolation": "bilinear"}  # fmt: skip
BEAK, LEFT_EYE, RIGHT_EYE = PART_NAMES.index("beak"), PART_NAMES.index("left eye"), PART_NAMES.index("right eye")


def parts_with(**points: tuple[float, float]) -> np.ndarray:
    parts = np.zeros((15, 3), np.float32)
    for name, (x, y) in points.items():
        parts[PART_NAMES.index(name.replace("_", " "))] = [x, y, 1]
    return parts


def test_eval_transform_on_a_non_square_image():
    # 400 wide x 200 high -> shorter side 100 -> 200x100 -> centre crop 100x100 keeps x in [100, 300) of the original
    image = np.full((200, 400, 3), 128, np.uint8)
    parts = parts_with(beak=(300, 100), left_eye=(150, 60), tail=(20, 100))
    out = apply_transform(build_transform(PRE, train=False), image, (100, 50, 200, 100), parts)
    assert out["image"].shape == (3, 100, 100)
    torch.testing.assert_close(out["image"], torch.zeros(3, 100, 100), atol=0.01, rtol=0)  # (128/255-.5)/.25
    torch.testing.assert_close(out["box"], torch.tensor([0.0, 0.25, 1.0, 0.75]))
    torch.testing.assert_close(out["parts"][[BEAK, LEFT_EYE]], torch.tensor([[1.0, 0.5], [0.25, 0.3]]))
    visible = out["part_visible"].nonzero().flatten().tolist()
    assert visible == [BEAK, LEFT_EYE]  # the tail was cropped away; unannotated parts stay invisible


def test_crop_pct_resizes_before_the_centre_crop():
    image = np.zeros((200, 200, 3), np.uint8)
    out = apply_transform(build_transform({**PRE, "crop_pct": 0.5}, train=False), image, (50, 50, 100, 100),
                          parts_with(beak=(100, 100)))  # fmt: skip
    # 200 -> 200 (=100/0.5), centre 100 crop covers [50, 150): the box fills the whole output
    torch.testing.assert_close(out["box"], torch.tensor([0.0, 0.0, 1.0, 1.0]))
    torch.testing.assert_close(out["parts"][BEAK], torch.tensor([0.5, 0.5]))


def test_flip_mirrors_box_and_swaps_left_right_parts():
    keypoints = A.KeypointParams(format="xy", remove_invisible=False)
    flip = A.Compose([A.HorizontalFlip(p=1.0), ToTensorV2()], keypoint_params=keypoints)
    image = np.zeros((100, 200, 3), np.uint8)
    out = apply_transform(flip, image, (20, 10, 60, 40), parts_with(left_eye=(70, 20), beak=(79, 25)))
    x1, y1, x2, y2 = out["box"].tolist()
    assert x1 < x2 and (y1, y2) == pytest.approx((0.1, 0.5))
    assert x1 == pytest.approx(1 - 80 / 200, abs=0.01) and x2 == pytest.approx(1 - 20 / 200, abs=0.01)
    # The visible eye is the bird's left eye; mirrored, the bird shows its right side.
    assert out["part_visible"][RIGHT_EYE] and not out["part_visible"][LEFT_EYE]
    assert out["parts"][RIGHT_EYE].tolist() == pytest.approx([1 - 70 / 200, 0.2], abs=0.01)


def test_train_transform_is_seeded_and_keeps_annotations_in_range():
    image = np.random.default_rng(0).integers(0, 255, (120, 180, 3), dtype=np.uint8)
    parts = parts_with(beak=(90, 60), crown=(80, 50))
    runs = []
    for _ in range(2):
        transform = build_transform(PRE, train=True, augment=Augment(), seed=7)
        runs.append([apply_transform(transform, image, (60, 40, 50, 40), parts) for _ in range(5)])
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(a["image"], b["image"])
        torch.testing.assert_close(a["box"], b["box"])
    for out in runs[0]:
        assert out["image"].shape == (3, 100, 100)
        assert (out["box"] >= 0).all() and (out["box"] <= 1).all()
        assert len(out["parts"]) == 15 and len(out["part_visible"]) == 15  # never dropped


def test_normalize_to_tensor_matches_albumentations_normalize_then_to_tensor():
    image = np.random.default_rng(1).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    expected = A.Compose([A.Normalize(mean=mean, std=std, max_pixel_value=255.0), ToTensorV2()])(image=image)["image"]
    out = NormalizeToTensor(mean, std)(image=image)["image"]
    assert out.dtype == torch.float32 and out.shape == (3, 37, 53) and out.is_contiguous()
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    # by hand: pixel (0, 0) of the red channel
    assert out[0, 0, 0].item() == pytest.approx((image[0, 0, 0] / 255 - 0.485) / 0.229, abs=1e-5)


def test_train_pipeline_gives_the_same_tensors_as_with_albumentations_normalize():
    image = np.random.default_rng(2).integers(0, 256, (120, 180, 3), dtype=np.uint8)
    parts, box = parts_with(beak=(90, 60)), (60, 40, 50, 40)
    for seed in range(4):  # a fresh pair per seed: the two pipelines draw their random numbers alike
        ours = build_transform(PRE, train=True, augment=Augment(), seed=seed)
        random_steps = build_transform(PRE, train=True, augment=Augment(), seed=seed).transforms[:-1]
        keypoints = A.KeypointParams(format="xy", remove_invisible=False)
        steps = [*random_steps, A.Normalize(mean=PRE["mean"], std=PRE["std"]), ToTensorV2()]
        theirs = A.Compose(steps, keypoint_params=keypoints, seed=seed)
        a, b = apply_transform(ours, image, box, parts), apply_transform(theirs, image, box, parts)
        torch.testing.assert_close(a["image"], b["image"], atol=1e-6, rtol=0)
        torch.testing.assert_close(a["parts"], b["parts"])
