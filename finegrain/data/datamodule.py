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

from finegrain.data.cub import CUBMetadata, CUBRecord, check_cub, read_cub, split_train_val
from finegrain.data.images import load_rgb
from finegrain.data.transforms import Augment, apply_transform, build_transform
from finegrain.errors import FinegrainError
from finegrain.models.backbones import preprocessing_config

log = logging.getLogger(__name__)


def crop_region(image: np.ndarray, record: CUBRecord, x0: int, y0: int, x1: int,
                y1: int) -> tuple[np.ndarray, tuple, np.ndarray]:  # fmt: skip
    """Pixels [x0, x1) x [y0, y1) of the image, with the bird box and the parts moved into that frame (what
    falls outside is clipped, or marked invisible, by `apply_transform`)."""
    x, y, w, h = record.box
    parts = record.parts.copy()
    parts[:, 0] -= x0
    parts[:, 1] -= y0
    return image[y0:y1, x0:x1], (x - x0, y - y0, w, h), parts


def crop_to_box(image: np.ndarray, record: CUBRecord) -> tuple[np.ndarray, tuple, np.ndarray]:
    """The "with boxes" setting: the ground-truth box crop."""
    height, width = image.shape[:2]
    x, y, w, h = record.box
    x0, y0 = int(max(0, np.floor(x))), int(max(0, np.floor(y)))
    x1, y1 = int(min(width, np.ceil(x + w))), int(min(height, np.ceil(y + h)))
    return crop_region(image, record, x0, y0, x1, y1)


def square_on_bird(image: np.ndarray, record: CUBRecord, side: float) -> tuple[np.ndarray, tuple, np.ndarray]:
    """What a perfect zoom of this `side` (fraction of the shorter image side) sees: the pixel square centred on
    the ground-truth box centre, shifted inside the image where the box lies near an edge."""
    height, width = image.shape[:2]
    size = max(1, round(side * min(height, width)))
    x, y, w, h = record.box
    x0 = int(round(np.clip(x + w / 2 - size / 2, 0, width - size)))
    y0 = int(round(np.clip(y + h / 2 - size / 2, 0, height - size)))
    return crop_region(image, record, x0, y0, x0 + size, y0 + size)


MIN_IMG_SIZE = 32  # the backbones downsample 32 times


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
        self.region = region  # (image, record) -> (image, box, parts), e.g. crop_to_box; None: whole image

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
            image, box, parts = self.region(image, record)
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
        bird_square: train and evaluate on the square of this side (fraction of the shorter image side) centred
            on the ground-truth box: what a perfect RA-CNN zoom of that side sees, an upper bound for its scale.
        backbone: timm model name whose preprocessing (mean, std, size, crop_pct, interpolation) is used.
        img_size: input size; None keeps the backbone's default.
        crop_pct: eval resize = img_size / crop_pct before the centre crop; None keeps the backbone's default.
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
        bird_square: float | None = None,
        backbone: str = "resnet50",
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
        if synthesize is not None and not (self.root / "images.txt").is_file():
            synthesize_once(self.root, synthesize)
        self.classes = classes
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        if bird_square is not None and (use_boxes or not 0 < bird_square <= 1):
            raise FinegrainError(f"data.bird_square must lie in (0, 1] (a side as a fraction of the shorter image "
                                 f"side) and goes without data.use_boxes; got {bird_square!r}, "
                                 f"use_boxes={use_boxes}")  # fmt: skip
        self.region: Callable | None = None  # whole images
        if use_boxes:
            self.region = crop_to_box
        elif bird_square is not None:
            self.region = functools.partial(square_on_bird, side=bird_square)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.augment = augment or Augment()
        self.skip_broken = skip_broken
        self.metadata: CUBMetadata = read_cub(self.root, classes)
        if not self.metadata.records:
            raise FinegrainError(f"no images of classes {classes!r} are listed in {self.root / 'images.txt'}")
        preprocessing = preprocessing_config(backbone, img_size)
        if crop_pct is not None:
            preprocessing["crop_pct"] = crop_pct
        # Plain types only: this travels into checkpoints, which load with weights_only=True.
        self.preprocessing = preprocessing
        self.datasets: dict[str, CUBDataset] = {}
        self.resume_at: dict[str, int] = {}  # from a checkpoint: see state_dict

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
