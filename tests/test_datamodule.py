"""The data module over synthetic birds: samples, the "with boxes" crop, the network's preprocessing, splits and
reproducible augmentation."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from finegrain.data.datamodule import DEFAULT_PREPROCESSING, CUBDataModule
from finegrain.errors import FinegrainError
from finegrain.models.backbones import preprocessing_config


def make(root, **kwargs) -> CUBDataModule:
    kwargs = {"preprocessing": preprocessing_config("test_resnet"), "img_size": 64} | kwargs  # as `finegrain fit` links
    module = CUBDataModule(root=str(root), batch_size=4, num_workers=0, val_fraction=0.25, **kwargs)
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


def test_preprocessing_is_the_networks_unless_img_size_or_crop_pct_say_otherwise(synth_root):
    network = preprocessing_config("test_resnet")  # 160 px, crop 0.95, mean 0.5
    assert make(synth_root, img_size=None).preprocessing == network
    assert make(synth_root, crop_pct=1.0).preprocessing == {**network, "img_size": 64, "crop_pct": 1.0}
    # without a network's: ImageNet statistics at 224 px, and the same overrides
    plain = make(synth_root, preprocessing=None, img_size=None)
    assert plain.preprocessing == DEFAULT_PREPROCESSING
    assert make(synth_root, preprocessing=None).preprocessing == {**DEFAULT_PREPROCESSING, "img_size": 64}
    batch = next(iter(plain.val_dataloader()))
    assert batch["image"].shape == (4, 3, 224, 224)


def test_the_dataset_is_read_on_first_use_not_when_the_module_is_built(synth_root, tmp_path):
    module = CUBDataModule(root=str(tmp_path / "nowhere"), num_workers=0)  # a recipe's settings, parsed and built
    assert "metadata" not in vars(module)
    with pytest.raises(FinegrainError, match="nowhere"):
        _ = module.num_classes
    module = CUBDataModule(root=str(synth_root), classes="2-3", num_workers=0)
    assert "metadata" not in vars(module)
    assert module.num_classes == 2 and "Plain_Finch" not in module.class_names  # class 1 left out
    assert module.metadata is module.metadata  # read once
    with pytest.raises(FinegrainError, match="data.batch_size must be 1 or more"):  # settings: still checked at once
        CUBDataModule(root=str(tmp_path / "nowhere"), batch_size=0)


@pytest.mark.parametrize("options", [{"box_context": 0.15}, {"box_square": True}])
def test_box_shaping_without_use_boxes_is_refused(options):
    with pytest.raises(FinegrainError, match="set data.use_boxes true as well"):
        CUBDataModule(root="anywhere", **options)
    with pytest.raises(FinegrainError, match="box_context must be 0 or more"):
        CUBDataModule(root="anywhere", use_boxes=True, box_context=-0.1)
