"""The LightningDataModule over a CUB-layout folder: the real dataset, a class subset, or synthetic birds."""

from __future__ import annotations

import functools
import logging
import math
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from finegrain.data.checks import check_cub
from finegrain.data.cub import CUBMetadata, CUBRecord, read_cub, split_train_val
from finegrain.data.images import load_rgb
from finegrain.data.transforms import Augment, apply_transform, build_transform
from finegrain.errors import FinegrainError
from finegrain.geometry import crop_to_box

log = logging.getLogger(__name__)


MIN_IMG_SIZE = 32  # the backbones downsample 32 times
# timm's default data config (ImageNet statistics), for a data module used without a network's own
DEFAULT_PREPROCESSING = {"img_size": 224, "crop_pct": 0.875, "interpolation": "bicubic",
                         "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}  # fmt: skip


def _check_settings(batch_size: int, eval_batch_size: int | None, num_workers: int, img_size: int | None,
                    crop_pct: float | None) -> None:  # fmt: skip
    """One line naming the first setting a run could not use, before any work."""
    wrong = []
    if batch_size < 1:
        wrong.append(f"data.batch_size must be 1 or more, got {batch_size}")
    if eval_batch_size is not None and eval_batch_size < 1:
        wrong.append(f"data.eval_batch_size must be 1 or more (or null: the batch size), got {eval_batch_size}")
    if num_workers < 0:
        wrong.append(f"data.num_workers must be 0 (load in the main process) or more, got {num_workers}")
    if img_size is not None and img_size < MIN_IMG_SIZE:
        wrong.append(f"data.img_size must be {MIN_IMG_SIZE} pixels or more (or null: the backbone's), got {img_size}")
    if crop_pct is not None and not 0 < crop_pct <= 1:
        wrong.append(f"data.crop_pct must lie in (0, 1] (or null: the backbone's), got {crop_pct}")
    if wrong:
        raise FinegrainError("; ".join(wrong))


class CUBDataset(Dataset):
    """Records -> dicts of image tensor, label, normalised box (x1, y1, x2, y2), parts and their visibility."""

    def __init__(self, records: list[CUBRecord], transform, region: Callable | None = None):
        self.records = records
        self.transform = transform
        self.region = region  # (image, box, parts) -> (image, box, parts), e.g. crop_to_box; None: whole image

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        """`key` is an index, or (index, seed) from EpochSampler: the seed fixes this sample's augmentation."""
        index, seed = key if isinstance(key, tuple) else (key, None)
        if seed is not None:
            # One shared stream for all steps (set_random_seed would give each step the same draws: flips
            # would always come with colour jitter).
            self.transform.set_random_state(np.random.default_rng(seed), random.Random(seed))
        record = self.records[index]
        image = load_rgb(record.path)
        box, parts = record.box, record.parts
        if self.region is not None:
            image, box, parts = self.region(image, box, parts)
        sample = apply_transform(self.transform, image, box, parts)
        sample["label"] = torch.tensor(record.label)
        sample["index"] = torch.tensor(index)
        return sample


class CUBDataModule(pl.LightningDataModule):
    """CUB-200-2011 (or any folder in its layout) with an optional class subset and a seeded validation split.

    Args:
        root: folder holding images.txt etc.
        classes: official class ids to use ("1-10", "1-10,15", a list); labels are renumbered from 0.
        val_fraction: share of each class's official train images held out for validation (seeded, stratified).
        split_seed: seed of that split.
        use_boxes: train and evaluate on the ground-truth box crop (the literature's "with boxes" setting).
        box_context: with use_boxes, grow the box by this fraction of its size on every side.
        box_square: with use_boxes, grow the box to a square (padding outside the photo): with crop_pct 1, the
            eval centre crop then cuts nothing of the bird.
        preprocessing: the network's own (mean, std, img_size, crop_pct, interpolation: timm's data config of
            its backbone); `finegrain fit` links it from model.network. None: ImageNet statistics at 224 px.
        img_size: input size; None keeps the network's.
        crop_pct: eval resize = img_size / crop_pct before the centre crop; None keeps the network's.
        augment: training augmentation.
        skip_broken: train without unusable images (missing, undecodable, a box with no area inside the photo;
            reporting how many) instead of stopping. Boxes that merely overrun their photo are clipped, never skipped.
        synthesize: if root has no dataset yet, write synthetic birds there first, with these arguments of
            `finegrain data synth` (e.g. {num_classes: 10, per_class: 40, seed: 0}).
    """

    def __init__(
        self,
        root: str = "data/CUB_200_2011",
        classes: str | list[int] | None = None,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        use_boxes: bool = False,
        box_context: float = 0.0,
        box_square: bool = False,
        preprocessing: dict | None = None,
        img_size: int | None = None,
        crop_pct: float | None = None,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 4,
        augment: Augment | None = None,
        skip_broken: bool = False,
        synthesize: dict | None = None,
    ):
        super().__init__()
        _check_settings(batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers,
                        img_size=img_size, crop_pct=crop_pct)  # fmt: skip
        self.root = Path(root).expanduser()
        self.classes = classes
        self.synthesize = synthesize
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        if box_context < 0:
            raise FinegrainError(f"data.box_context must be 0 or more (a fraction of the box), got {box_context}")
        if (box_context or box_square) and not use_boxes:
            raise FinegrainError("data.box_context and data.box_square shape the bird-box crop: set "
                                 "data.use_boxes true as well, or leave them out")  # fmt: skip
        # None: whole images
        self.region: Callable | None = (functools.partial(crop_to_box, context=box_context, square=box_square)
                                        if use_boxes else None)  # fmt: skip
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.augment = augment or Augment()
        self.skip_broken = skip_broken
        # Plain types only: this travels into checkpoints, which load with weights_only=True.
        self.preprocessing = {**DEFAULT_PREPROCESSING, **(preprocessing or {})}
        self.preprocessing.update({k: v for k, v in (("img_size", img_size), ("crop_pct", crop_pct)) if v is not None})
        self.datasets: dict[str, CUBDataset] = {}
        self.resume_at: dict[str, int] = {}  # from a checkpoint: see state_dict

    @functools.cached_property
    def metadata(self) -> CUBMetadata:
        """The dataset's lists, read once on first use (writing synthetic birds first when asked and absent)."""
        if self.synthesize is not None and not (self.root / "images.txt").is_file():
            synthesize_once(self.root, self.synthesize)
        metadata = read_cub(self.root, self.classes)
        if not metadata.records:
            raise FinegrainError(f"no images of classes {self.classes!r} are listed in {self.root / 'images.txt'}")
        return metadata

    @property
    def num_classes(self) -> int:
        return len(self.metadata.class_names)

    @property
    def class_names(self) -> list[str]:
        return list(self.metadata.class_names)

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        records = self._usable_records()
        train, val = split_train_val([r for r in records if r.is_train], self.val_fraction, self.split_seed)
        test = [r for r in records if not r.is_train]
        # Data order and every sample's augmentation follow from (seed, epoch) through EpochSampler, never
        # from RNG state, so a run resumed from a checkpoint sees exactly the batches an uninterrupted run sees.
        self.seed = torch.initial_seed() % 2**31
        train_tf = build_transform(self.preprocessing, train=True, augment=self.augment)
        eval_tf = build_transform(self.preprocessing, train=False)
        self.datasets = {
            "train": CUBDataset(train, train_tf, self.region),
            "val": CUBDataset(val, eval_tf, self.region),
            "test": CUBDataset(test, eval_tf, self.region),
        }
        log.info("CUB data: %d train / %d val / %d test images, %d classes",
                 len(train), len(val), len(test), self.num_classes)  # fmt: skip

    def _usable_records(self) -> list[CUBRecord]:
        """Stop before the first step if any selected image is missing or broken, unless told to skip them. Boxes
        that overrun their photograph come back clipped to it."""
        report = check_cub(self.metadata)
        if report.notes:
            log.warning("data notes (`finegrain data check %s` lists them): %s", self.root,
                        "; ".join(note for note in report.notes if not note.startswith(" ")))  # fmt: skip
        if not report.problems:
            return report.usable
        if not self.skip_broken:
            raise FinegrainError(
                f"{report.format()}\nFix these, choose classes whose images are present (data.classes), "
                "or pass --data.skip_broken true to train without the unusable images"
            )
        log.warning("skipping %d unusable images of %d (data.skip_broken)",
                    len(self.metadata.records) - len(report.usable), len(self.metadata.records))  # fmt: skip
        if not report.usable:
            raise FinegrainError(f"no usable images left in {self.root} after skipping the broken ones")
        return report.usable

    def _loader(self, split: str) -> DataLoader:
        dataset = self.datasets[split]
        train = split == "train"
        batch_size = self.batch_size if train else self.eval_batch_size
        trainer = self.trainer
        world_size, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler = EpochSampler(dataset, world_size, rank, self.seed, train=train)
        if train and self.resume_at:
            # Lightning may start the loader's workers before it restores and sets the epoch: start where the
            # checkpoint stopped.
            sampler.set_epoch(self.resume_at["epoch"])
            sampler.skip = self.resume_at["batches_done"] * batch_size
            self.resume_at = {}
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            drop_last=train and len(sampler) > batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def state_dict(self) -> dict[str, int]:
        """Where training stands (saved in checkpoints): the epoch to run next and its batches already trained."""
        trainer = self.trainer
        if trainer is None or trainer.state.fn != "fit":
            return {}
        progress = trainer.fit_loop.epoch_loop.batch_progress
        if progress.is_last_batch:
            return {"epoch": trainer.current_epoch + 1, "batches_done": 0}
        return {"epoch": trainer.current_epoch, "batches_done": progress.current.completed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.resume_at = dict(state)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")


class EpochSampler(DistributedSampler):
    """One rank's share of a split, a function of (seed, epoch) alone.

    Training: a seeded permutation per epoch, padded to equal shares (DDP needs the same number of steps on every
    rank), each index paired with a seed for its augmentation. Evaluation: the split in order, dealt out without
    padding, so that metrics summed over ranks count every sample exactly once (DistributedSampler's padding
    would count some twice). A DistributedSampler, so that Lightning keeps it instead of wrapping it.
    `skip`: samples of this rank's share to leave out of the next pass (those a resumed run already trained on).
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int, train: bool):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=train, seed=seed)
        size = len(dataset)
        self.num_samples = math.ceil(size / num_replicas) if train else len(range(rank, size, num_replicas))
        self.skip = 0

    def __iter__(self):
        size = len(self.dataset)
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        if not self.shuffle:
            yield from range(self.rank, size, self.num_replicas)
            return
        order = torch.randperm(size, generator=generator)
        sample_seeds = torch.randint(2**31, (size,), generator=generator)
        padded = self.num_samples * self.num_replicas
        order = order.repeat(math.ceil(padded / size))[:padded]
        share = order[self.rank :: self.num_replicas][self.skip :]
        self.skip = 0
        for index in share.tolist():
            yield index, int(sample_seeds[index])

    def __len__(self) -> int:
        return self.num_samples


def synthesize_once(root: Path, arguments: dict) -> None:
    """Write synthetic birds to a temporary sibling and rename it into place, so that concurrent processes
    (DDP ranks) never see a half-written folder."""
    from finegrain.data.synth import synthesize_birds

    if root.exists() and any(root.iterdir()):
        raise FinegrainError(f"{root} exists but holds no images.txt: empty it or point data.root elsewhere")
    log.warning("no dataset at %s yet: writing synthetic birds there (%s)", root, arguments)
    staging = root.parent / f".{root.name}.partial-{os.getpid()}"
    synthesize_birds(staging, overwrite=True, **arguments)
    try:
        if root.exists():
            root.rmdir()  # empty, checked above
        staging.rename(root)
    except OSError:
        if not (root / "images.txt").is_file():
            raise
        shutil.rmtree(staging)  # another process finished first
