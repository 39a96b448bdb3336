"""albumentations pipelines built from a model's preprocessing config, carrying the bird box and part points.

The box rides through the pipeline as its two corners, among the keypoints: albumentations' own box handling
drops boxes that leave the crop, and a dataset must never lose a sample's annotation silently. Corners also
tell us whether the image was flipped, so left/right parts can be swapped back to the bird's own left/right.
"""

from __future__ import annotations

from dataclasses import dataclass

# finegrain/__init__.py has set NO_ALBUMENTATIONS_UPDATE before this import can run.
import albumentations as A
import cv2
import numpy as np
import torch
from PIL import Image

from finegrain.data.cub import PART_NAMES
from finegrain.geometry import (
    InputFrame,
    box_corners,
    corners_to_box,
    frame_from_corners,
    inside_unit_square,
    photo_corners,
)

INTERPOLATIONS = {"bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC, "nearest": cv2.INTER_NEAREST,
                  "area": cv2.INTER_AREA}  # fmt: skip
# Pillow's antialiased filters of the same names: a large photo is reduced with them before the eval transform
PIL_FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
               "nearest": Image.Resampling.NEAREST, "area": Image.Resampling.BOX}  # fmt: skip
# 0-based part indices swapped by a horizontal flip: (left eye, right eye), (left leg, ...), (left wing, ...)
MIRRORED_PARTS = [(PART_NAMES.index(f"left {p}"), PART_NAMES.index(f"right {p}")) for p in ("eye", "leg", "wing")]


@dataclass
class Augment:
    """Training augmentation; the defaults keep a small bird inside most crops."""

    scale: tuple[float, float] = (0.35, 1.0)  # RandomResizedCrop area range
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    color_jitter: float = 0.2  # brightness/contrast/saturation strength; 0 disables


class NormalizeToTensor(A.ImageOnlyTransform):
    """albumentations' Normalize then ToTensorV2 in one OpenCV call: (pixel - 255 mean) / (255 std) as a
    contiguous CHW float32 tensor, at about half the cost of the two steps (docs/benchmarks.md, data pipeline)."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], p: float = 1.0):
        super().__init__(p=p)
        self.mean, self.std = tuple(mean), tuple(std)

    def apply(self, img: np.ndarray, **params) -> torch.Tensor:
        # built per call (about a microsecond): OpenCV's parameter object cannot be pickled to spawned workers
        blob_params = cv2.dnn.Image2BlobParams(scalefactor=tuple(1.0 / (255.0 * s) for s in self.std),
                                               mean=tuple(255.0 * m for m in self.mean))  # fmt: skip
        return torch.from_numpy(cv2.dnn.blobFromImageWithParams(img, blob_params)[0])

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("mean", "std")


def interpolation_name(preprocessing: dict) -> str:
    """The resize filter a checkpoint's preprocessing names (a key of INTERPOLATIONS and PIL_FILTERS)."""
    return preprocessing.get("interpolation", "bilinear")


def eval_resize_side(preprocessing: dict) -> int:
    """The shorter side a photo is resized to before the eval centre crop (img_size / crop_pct)."""
    return int(round(int(preprocessing["img_size"]) / float(preprocessing.get("crop_pct", 1.0))))


def build_transform(preprocessing: dict, train: bool, augment: Augment | None = None,
                    seed: int | None = None) -> A.Compose:  # fmt: skip
    """Train: random resized crop, flip, mild colour jitter. Eval: resize by crop_pct, then centre crop.

    albumentations keeps its own RNG, which global seeds do not reach: `seed` seeds it.
    """
    size = int(preprocessing["img_size"])
    interpolation = INTERPOLATIONS[interpolation_name(preprocessing)]
    if train:
        augment = augment or Augment()
        steps = [A.RandomResizedCrop(size=(size, size), scale=tuple(augment.scale), ratio=tuple(augment.ratio),
                                     interpolation=interpolation, p=1.0)]  # fmt: skip
        if augment.hflip > 0:
            steps.append(A.HorizontalFlip(p=augment.hflip))
        if augment.color_jitter > 0:
            c = augment.color_jitter
            steps.append(A.ColorJitter(brightness=c, contrast=c, saturation=c, hue=0.0, p=0.8))
    else:
        steps = [A.SmallestMaxSize(max_size=eval_resize_side(preprocessing), interpolation=interpolation, p=1.0),
                 A.CenterCrop(height=size, width=size, p=1.0)]  # fmt: skip
    steps.append(NormalizeToTensor(mean=preprocessing["mean"], std=preprocessing["std"]))
    return A.Compose(
        steps,
        keypoint_params=A.KeypointParams(format="xy", remove_invisible=False, check_each_transform=False),
        seed=seed,
    )


def apply_transform(transform: A.Compose, image: np.ndarray, box: tuple[float, float, float, float],
                    parts: np.ndarray) -> dict[str, torch.Tensor]:  # fmt: skip
    """Transform an image with its box (x, y, w, h pixels) and parts ((P, 3): x, y, visible).

    Returns the image tensor, the box as normalised (x1, y1, x2, y2) in [0, 1] of the output, the parts as
    normalised (x, y) and their visibility (visible in the annotation and inside the output).
    """
    keypoints = np.concatenate([box_corners(box), parts[:, :2]]).astype(np.float32)
    out = transform(image=image, keypoints=keypoints)
    tensor = out["image"]
    height, width = tensor.shape[-2:]
    points = np.asarray(out["keypoints"], dtype=np.float32).reshape(-1, 2) / np.array([width, height], np.float32)
    corners, part_xy = points[:2], points[2:].copy()
    visible = parts[:, 2] > 0
    if corners[0, 0] > corners[1, 0]:  # the corners crossed: the image was mirrored
        for left, right in MIRRORED_PARTS:
            part_xy[[left, right]] = part_xy[[right, left]]
            visible[[left, right]] = visible[[right, left]]
    inside = inside_unit_square(part_xy)
    norm_box = np.clip(corners_to_box(corners), 0.0, 1.0)
    return {
        "image": tensor,
        "box": torch.from_numpy(norm_box),
        "parts": torch.from_numpy(part_xy),
        "part_visible": torch.from_numpy(visible & inside),
    }


def input_frame(transform: A.Compose, width: int, height: int) -> InputFrame:
    """Where the input an eval `transform` makes of a width x height photo lies in that photo.

    The photo's corners go through `transform` itself as keypoints, on a blank photo of that size (an eval
    transform draws nothing at random, so the map depends on the size alone), and the frame is read off where
    they land: no copy of the resize and crop arithmetic to keep in step with albumentations. Costs about one
    preprocessing of a photo that size; the Predictor keeps the frame per size.
    """
    out = transform(image=np.zeros((height, width, 3), np.uint8), keypoints=photo_corners(width, height))
    input_height, input_width = out["image"].shape[-2:]
    corners = np.asarray(out["keypoints"], np.float64)[:, :2]
    return frame_from_corners(corners, (width, height), (input_width, input_height))
