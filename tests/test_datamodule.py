"""The data module over synthetic birds: samples, the "with boxes" crop, splits and reproducible augmentation."""

from __future__ import annotations

import pytorch_lightning as pl
import torch

from finegrain.data.datamodule import CUBDataModule


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
