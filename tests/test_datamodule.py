"""The data module over synthetic birds: samples, the "with boxes" crop and the bird square, splits and reproducible
augmentation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from finegrain.data.cub import CUBRecord
from finegrain.data.datamodule import CUBDataModule, square_on_bird
from finegrain.errors import FinegrainError


def make(root, **kwargs) -> CUBDataModule:
    module = CUBDataModule(root=str(root), backbone="test_resnet", img_size=64, batch_size=4, num_workers=0,
                           val_fraction=0.25, **kwargs)  # fmt: skip
    module.setup("fit")
    return module


def test_samples_carry_image_label_box_and_parts(synth_root):
    module = make(synth_root)
    assert module.num_classes == 4 and module.class_names[0] == "Plain_Finch"
    assert module.preprocessing["img_size"] == 64 and module.preprocessing["mean"] == [0.5, 0.5, 0.5]
    sizes = {split: len(ds) for split, ds in module.datasets.items()}
    # 12 per class, half of them test; round(6 * 0.25) = 2 of each class's 6 train images held out
    assert sizes == {"train": 16, "val": 8, "test": 24}
    batch = next(iter(module.val_dataloader()))
    assert batch["image"].shape == (4, 3, 64, 64) and batch["label"].shape == (4,)
    assert batch["box"].shape == (4, 4) and batch["parts"].shape == (4, 15, 2)
    assert batch["part_visible"].dtype == torch.bool and batch["part_visible"].any()
    x1, y1, x2, y2 = batch["box"].unbind(1)
    assert (x2 > x1).all() and (y2 > y1).all()


def test_with_boxes_the_bird_fills_the_input(synth_root):
    module = make(synth_root, use_boxes=True, crop_pct=1.0)
    boxes = torch.stack([module.datasets["test"][i]["box"] for i in range(8)])
    # the box crop is resized so its shorter side fills the input: the box spans the full width or height
    spans = torch.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    assert torch.allclose(spans, torch.ones(8), atol=0.02)


def test_augmentation_is_reproducible_under_a_global_seed(synth_root):
    batches = []
    for _ in range(2):
        pl.seed_everything(3)
        module = make(synth_root)
        batches.append(next(iter(module.train_dataloader())))
    torch.testing.assert_close(batches[0]["image"], batches[1]["image"])
    pl.seed_everything(4)
    other = next(iter(make(synth_root).train_dataloader()))
    assert not torch.equal(other["image"], batches[0]["image"])


def test_bird_square_is_the_square_on_the_bird_box_centre_kept_inside():
    """Hand-computed on a 60 x 40 (width x height) image: side 0.5 -> 20 px. The box centre (54, 10) puts the
    square at x 44-64, past the right edge, so it shifts to x 40-60; y 0-20 (its top would be at 0 anyway)."""
    image = np.arange(40 * 60 * 3, dtype=np.uint8).reshape(40, 60, 3)
    parts = np.zeros((15, 3), np.float32)
    parts[0] = (52, 8, 1)
    record = CUBRecord(1, Path("bird.jpg"), 0, 1, True, (50.0, 5.0, 8.0, 10.0), parts)
    region, box, moved = square_on_bird(image, record, side=0.5)
    np.testing.assert_array_equal(region, image[0:20, 40:60])
    assert box == (10.0, 5.0, 8.0, 10.0)
    np.testing.assert_array_equal(moved[0], (12, 8, 1))
    assert moved is not parts and parts[0, 0] == 52  # the record keeps its own parts


def test_bird_square_through_the_data_module(synth_root):
    module = make(synth_root, bird_square=0.5, crop_pct=1.0)
    sample = module.datasets["test"][0]
    record = module.datasets["test"].records[0]
    x, y, w, h = record.box
    box = sample["box"]
    # the square is half the shorter side (128 px of 256) around the bird: the bird's centre is in it
    centre = torch.tensor([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])
    assert ((centre > 0) & (centre < 1)).all() and sample["image"].shape[-2:] == (64, 64)
    assert max(w, h) < 128 and torch.allclose(box[2:] - box[:2], torch.tensor([w, h]) / 128, atol=0.02)


@pytest.mark.parametrize("kwargs", [{"bird_square": 0.0}, {"bird_square": 1.5},
                                    {"bird_square": 0.5, "use_boxes": True}])  # fmt: skip
def test_bad_bird_square_raises(synth_root, kwargs):
    with pytest.raises(FinegrainError, match="bird_square"):
        make(synth_root, **kwargs)
