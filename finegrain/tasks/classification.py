"""The shared classification task: any network from the registry, losses, metrics, optimiser and schedule."""

from __future__ import annotations

import math
from typing import Literal

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from finegrain.data.cub import PART_REGIONS
from finegrain.errors import FinegrainError
from finegrain.evaluation.localization import LocalizationScore, box_statistics
from finegrain.evaluation.metrics import accuracy_metrics
from finegrain.models import RACNN, ModelOutput, network_config

STAGES = ("train", "val", "test")


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_factor: float = 0.01) -> float:
    """Learning-rate factor: linear warm-up from ~0 to 1, then cosine down to `min_factor`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * progress))


class ClassificationTask(pl.LightningModule):
    """Trains a registered network (`finegrain.models.NETWORKS`) with cross-entropy on its fused and branch logits.

    Args:
        network: the network to train, e.g. `finegrain.models.Classifier(num_classes=200, backbone="resnet50")`;
            in a recipe `model.network: {class_path: finegrain.models.Classifier, init_args: {...}}`, its
            num_classes linked from the data module.
        label_smoothing: cross-entropy label smoothing.
        optimizer: "sgd" (momentum, Nesterov) or "adamw".
        lr: learning rate of the head; other groups are scaled by `lr_scales`.
        lr_scales: learning-rate factor per parameter group of the network (e.g. {"backbone": 0.1}).
        weight_decay, momentum: optimiser settings.
        warmup_epochs: linear warm-up length (fractions allowed), then cosine decay to 1% over the run.
        lr_start_epochs: epochs a parameter group waits before it learns (then warms up on its own), e.g.
            {"localization": 3}: a part or zoom learns where to look once the classifier has something to say;
            from the first step, a random classifier's gradients push the boxes into their bounds.
        class_names, preprocessing: linked from the data module and stored in checkpoints for inference.
    """

    # True where some training steps give part of the parameters no gradient: DDP must then not wait for them
    # (`finegrain fit` turns a plain `ddp` strategy into `ddp_find_unused_parameters_true`).
    leaves_parameters_unused = False
    trains: tuple[type[nn.Module], ...] = (nn.Module,)  # the networks this task knows how to train
    # networks that need a task of their own: cross-entropy alone would skip their training phases
    leaves_to: dict[type[nn.Module], str] = {RACNN: "finegrain.tasks.racnn.RACNNTask"}

    def __init__(
        self,
        network: nn.Module,
        label_smoothing: float = 0.0,
        optimizer: Literal["sgd", "adamw"] = "sgd",
        lr: float = 0.01,
        lr_scales: dict[str, float] | None = None,
        weight_decay: float = 1e-4,
        momentum: float = 0.9,
        warmup_epochs: float = 1.0,
        lr_start_epochs: dict[str, float] | None = None,
        class_names: list[str] | None = None,
        preprocessing: dict | None = None,
    ):
        super().__init__()
        for cls, task in self.leaves_to.items():
            if isinstance(network, cls):
                raise FinegrainError(f"{type(network).__name__} trains with its own task: set model.class_path {task} "
                                     f"(it runs the network's training phases), not {type(self).__name__}")  # fmt: skip
        if not isinstance(network, self.trains):
            raise FinegrainError(f"{type(self).__name__} trains {' or '.join(c.__name__ for c in self.trains)} "
                                 f"networks, not {type(network).__name__}; use ClassificationTask for it")  # fmt: skip
        self.save_hyperparameters(ignore=["network"])
        self.hparams["network"] = network_config(network)  # what rebuilds it: checkpoints, the Predictor
        self.network = network
        num_classes = self.num_classes
        self.lr_scales = {"backbone": 0.1} if lr_scales is None else dict(lr_scales)
        # Keyed "<stage>_<branch>": a ModuleDict key may not shadow nn.Module attributes such as `train`.
        # The fused prediction logs as "<stage>/top1", each branch (scale, part) as "<stage>/<branch>/top1".
        branches = getattr(self.network, "branch_names", [])
        self.metrics = torch.nn.ModuleDict({
            f"{stage}_{branch}": accuracy_metrics(num_classes, f"{stage}/" + (f"{branch}/" if branch else ""))
            for stage in STAGES for branch in ("", *branches)
        })  # fmt: skip
        # Where each branch's boxes fall on the ground-truth bird box and part points, at validation and test; a box
        # named after a body region (an ST-CNN part called "head") is also asked whether it holds that region.
        box_names = getattr(self.network, "box_names", [])
        self.localization = torch.nn.ModuleDict({
            f"{stage}_{name}": LocalizationScore(region=PART_REGIONS.get(name))
            for stage in STAGES[1:] for name in box_names
        })  # fmt: skip

    @property
    def num_classes(self) -> int:
        return int(self.hparams.network["init_args"]["num_classes"])

    def forward(self, images: torch.Tensor) -> ModelOutput:
        return self.network(images)

    def loss(self, output: ModelOutput, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy on the fused logits plus on every branch's own logits."""
        ce = [F.cross_entropy(logits, labels, label_smoothing=self.hparams.label_smoothing)
              for logits in (output.logits, *output.branch_logits.values())]  # fmt: skip
        return torch.stack(ce).sum()

    def extra_loss(self, output: ModelOutput, batch: dict, stage: str) -> torch.Tensor | None:
        """A loss term beside the cross-entropy that needs more of the batch than labels; None here."""
        return None

    def _step(self, batch: dict, stage: str) -> torch.Tensor:
        output = self(batch["image"])
        loss = self.loss(output, batch["label"])
        extra = self.extra_loss(output, batch, stage)
        if extra is not None:
            loss = loss + extra
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True,
                 batch_size=len(batch["label"]), sync_dist=not on_step)  # fmt: skip
        self.log_results(output, batch, stage)
        return loss

    def log_results(self, output: ModelOutput, batch: dict, stage: str) -> None:
        """Accuracy of the fused and every branch prediction; box statistics; localisation (val and test)."""
        labels = batch["label"]
        for branch, logits in (("", output.logits), *output.branch_logits.items()):
            metrics = self.metrics[f"{stage}_{branch}"]
            metrics.update(logits.detach(), labels)
            self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=stage != "train" and not branch)
        for name, boxes in output.boxes.items():
            stats = {f"{stage}/boxes/{name}/{key}": value for key, value in box_statistics(boxes.detach()).items()}
            self.log_dict(stats, on_step=False, on_epoch=True, batch_size=len(labels), sync_dist=stage != "train")
            key = f"{stage}_{name}"
            if key in self.localization and "parts" in batch:
                self.localization[key].update(boxes.detach(), batch["box"], batch["parts"], batch["part_visible"])

    def _log_localization(self, stage: str) -> None:
        for key, score in self.localization.items():
            if key.startswith(f"{stage}_") and score.update_count:
                name = key.removeprefix(f"{stage}_")
                self.log_dict({f"{stage}/loc/{name}/{k}": v for k, v in score.compute().items()})
                score.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_localization("val")

    def on_test_epoch_end(self) -> None:
        self._log_localization("test")

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch, "test")

    def configure_optimizers(self):
        optimizer, schedule = self.optimizer_with_schedule(self.network.lr_groups())
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def optimizer_with_schedule(self, lr_groups: dict[str, list[torch.nn.Parameter]], start_step: int = 0,
                                kind: str | None = None):  # fmt: skip
        """An optimiser over these parameter groups, each at lr x its lr_scale, and its per-step warm-up + cosine
        schedule from global step `start_step` (where these parameters start learning) to the end of the run.
        `kind` is "sgd" or "adamw"; None for the configured `optimizer`."""
        groups = [
            {"params": params, "lr": self.hparams.lr * self.lr_scales.get(name, 1.0), "name": name}
            for name, params in lr_groups.items()
            if params
        ]
        if (kind or self.hparams.optimizer) == "sgd":
            optimizer = torch.optim.SGD(groups, momentum=self.hparams.momentum, nesterov=True,
                                        weight_decay=self.hparams.weight_decay)  # fmt: skip
        else:
            optimizer = torch.optim.AdamW(groups, weight_decay=self.hparams.weight_decay)
        total_steps = int(self.trainer.estimated_stepping_batches)
        if math.isinf(self.trainer.num_training_batches):  # max_steps given: Lightning has not sized the data yet
            self.trainer.fit_loop.setup_data()
        steps_per_epoch = self.trainer.num_training_batches / self.trainer.accumulate_grad_batches
        warmup_steps = max(1, int(self.hparams.warmup_epochs * steps_per_epoch))
        delays = self.hparams.lr_start_epochs or {}

        def factor(start: int):
            return lambda step: 0.0 if step < start else warmup_cosine(step - start, warmup_steps, total_steps - start)

        starts = [start_step + int(delays.get(group["name"], 0) * steps_per_epoch) for group in groups]
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, [factor(start) for start in starts])
        return optimizer, schedule
