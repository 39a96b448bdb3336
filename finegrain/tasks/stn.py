"""ST-CNN with a part-supervised start: each spatial transformer first learns to frame one body region from CUB's
keypoints, then the whole network trains from class labels alone, as in the paper, with the localisation free.

Label-only training left the parts where the localisation layer's bias put them (docs/benchmarks.md, "ST-CNN");
CUB annotates 15 part locations on every photograph, which the data layer carries through every augmentation.
The loss and the region split are explained in docs/methods.md ("ST-CNN").
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from finegrain.data.cub import PART_NAMES, PART_REGIONS
from finegrain.errors import FinegrainError
from finegrain.geometry import keypoint_square
from finegrain.models import STCNN, ModelOutput
from finegrain.tasks.classification import ClassificationTask

log = logging.getLogger(__name__)


def part_box_loss(boxes: Tensor, parts: Tensor, visible: Tensor, region: str, margin: float, min_side: float,
                  max_side: float, aspect: float = 1.0) -> tuple[Tensor, Tensor]:  # fmt: skip
    """L1 distance between predicted (B, 4) normalised xyxy boxes and the squares framing each image's visible
    keypoints of `region` (`keypoint_square`), averaged over the images where at least one is visible; with the
    count of those images. Images where the region is all invisible add nothing (and no gradient)."""
    index = [PART_NAMES.index(name) for name in PART_REGIONS[region]]
    target, seen = keypoint_square(parts[:, index], visible[:, index], margin, min_side, max_side, aspect)
    per_image = F.l1_loss(boxes.float(), target, reduction="none").sum(-1)
    count = seen.sum()
    return (per_image * seen).sum() / count.clamp(min=1), count


class STNTask(ClassificationTask):
    """ClassificationTask for an `STCNN`, with the part-supervised start.

    Args (besides ClassificationTask's):
        part_supervision: "cub-parts" (each part named after a region of `PART_REGIONS` through the network's
            `part_names` learns to frame that region's visible keypoints for `supervision_epochs`, beside the
            classification loss) or "none" (the paper's label-only training). A dataset without part annotations
            falls back to "none", with one line saying so.
        supervision_epochs: whole epochs of the supervised start, in which the box loss alone trains the
            localisation (the crops are sampled at detached boxes); then class labels alone train everything.
        localization_lr_after: factor on the localisation group's learning rate once the supervised start ends.
            The paper trains its localisation far slower than the rest; at the full rate here the class loss drove
            both supervised parts to their size bounds within one epoch (docs/benchmarks.md, "ST-CNN parts
            supervised by CUB keypoints").
        part_margin: margin around a region's keypoints, as a fraction of the image's shorter side.
        part_loss_weight: weight of the box loss beside the cross-entropy.
    """

    trains = (STCNN,)

    def __init__(self, *args, part_supervision: Literal["cub-parts", "none"] = "cub-parts",
                 supervision_epochs: int = 2, localization_lr_after: float = 0.01, part_margin: float = 0.05,
                 part_loss_weight: float = 1.0, **kwargs):  # fmt: skip
        super().__init__(*args, **kwargs)
        if part_supervision not in ("cub-parts", "none"):
            raise FinegrainError(f"part_supervision {part_supervision!r} is unknown; choose cub-parts or none")
        if part_supervision == "cub-parts":
            unknown = [name for name in self.network.box_names if name not in PART_REGIONS]
            if unknown:
                raise FinegrainError(
                    f"part_supervision cub-parts needs every ST-CNN part named after a body region; {unknown} "
                    f"are not regions: set model.network.init_args.part_names from {sorted(PART_REGIONS)}, e.g. "
                    "[head, body], or part_supervision none"
                )
        self.supervise = part_supervision == "cub-parts"
        self.localization_slowed = False

    def setup(self, stage: str) -> None:
        train = (getattr(self.trainer.datamodule, "datasets", None) or {}).get("train")
        if stage == "fit" and self.supervise and train is not None and not any(
                record.parts[:, 2].any() for record in train.records):  # fmt: skip
            log.warning("the training data has no part annotations (parts/part_locs.txt): ST-CNN trains from "
                        "class labels alone (part_supervision none)")  # fmt: skip
            self.supervise = False

    def supervised_now(self) -> bool:
        return self.supervise and self.current_epoch < self.hparams.supervision_epochs

    def on_train_epoch_start(self) -> None:
        # while supervised, the keypoints alone move the boxes: the class loss would pull them to their bounds
        self.network.localization_from_labels = not self.supervised_now()
        if self.supervise and self.current_epoch >= self.hparams.supervision_epochs and not self.localization_slowed:
            scheduler = self.lr_schedulers()
            for index, group in enumerate(scheduler.optimizer.param_groups):
                if group.get("name") == "localization":
                    scheduler.base_lrs[index] *= self.hparams.localization_lr_after
            self.localization_slowed = True

    # the slowed rate lives in the scheduler's state: a resumed run must not slow it twice
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["localization_slowed"] = self.localization_slowed

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.localization_slowed = bool(checkpoint.get("localization_slowed", False))

    def extra_loss(self, output: ModelOutput, batch: dict, stage: str) -> Tensor | None:
        """The box loss of every part against its region's keypoints, while the supervised start lasts."""
        if stage != "train" or not self.supervised_now():
            return None
        min_side, max_side = self.network.min_scale, self.network.max_scale
        aspect = batch["image"].shape[-1] / batch["image"].shape[-2]
        box_losses = []
        for name, boxes in output.boxes.items():
            part_loss, count = part_box_loss(boxes, batch["parts"], batch["part_visible"], name,
                                             self.hparams.part_margin, min_side, max_side, aspect)  # fmt: skip
            box_losses.append(part_loss)
            self.log(f"train/part_loss/{name}", part_loss, on_step=False, on_epoch=True, batch_size=max(1, int(count)))
        return self.hparams.part_loss_weight * torch.stack(box_losses).sum()
