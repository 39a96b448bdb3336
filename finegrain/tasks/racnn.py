"""RA-CNN training: APN pre-training, then alternating classification and ranking phases (manual optimisation).

Two optimisers: one over the classification parameters (backbones, attention gates, classifiers), one over the
APNs. Every training step runs exactly one of them, chosen by the global step:
  pretrain        APNs regress towards the square of highest response in the previous scale (`apn_target`);
  classification  backbones + classifiers learn from cross-entropy at every scale and on the fused logits;
  ranking         APNs learn from the pairwise ranking loss alone.
In pretrain and ranking the classification networks are frozen and in eval mode, so their batch-norm statistics
and dropout stay fixed too. Under DDP the parameters of the idle optimiser get no gradient, so multi-device
recipes use strategy ddp_find_unused_parameters_true (docs/racnn.md).
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch

from finegrain.errors import FinegrainError
from finegrain.models.racnn import PRETRAIN_SCALE, RACNN, ZoomPass, apn_target, ranking_loss
from finegrain.tasks.classification import ClassificationTask

PHASES = ("pretrain", "classification", "ranking")


def phase_at(step: int, pretrain_steps: int, classification_steps: int, ranking_steps: int) -> str:
    """The phase of training step `step` (0-based): `pretrain_steps` of APN pre-training, then cycles of
    `classification_steps` classification steps followed by `ranking_steps` ranking steps."""
    if step < pretrain_steps:
        return "pretrain"
    cycle = (step - pretrain_steps) % (classification_steps + ranking_steps)
    return "classification" if cycle < classification_steps else "ranking"


def pretrain_loss(zoom: ZoomPass, scale: float = PRETRAIN_SCALE) -> torch.Tensor:
    """Squared distance of each APN's box (centre and half extents, in the frame it looked at) to its target of
    side `scale`, summed over the box's numbers and the APNs, averaged over the images."""
    distances = [
        (box - apn_target(feature_map, aspect, scale)).square().sum(-1).mean()
        for box, feature_map, aspect in zip(zoom.relative, zoom.feature_maps, zoom.aspects, strict=False)
    ]
    return torch.stack(distances).sum()


class RACNNTask(ClassificationTask):
    """An RA-CNN network (`finegrain.models.RACNN`) with the paper's alternating training.

    Args (besides those of `ClassificationTask`, to which other keyword arguments go):
        margin: of the ranking loss, in softmax probability (0.05 in the paper).
        pretrain_steps: APN pre-training steps before the first classification phase; 0 skips it.
        pretrain_scale: side of the pre-training target square, as a fraction of the previous scale's shorter
            side: the paper's 0.5 by default. CUB photographs frame the bird closely (on classes 1-10 the square
            around the bird box is 0.83 of the shorter side, median), and half the side cuts much of it off.
        classification_steps, ranking_steps: lengths of the alternating phases, in training steps; ranking_steps 0
            never trains the APNs after pre-training.
        apn_optimizer: the APNs' optimiser, "sgd" or "adamw"; None for `optimizer`. AdamW's steps do not grow
            with the gradient: a crop's gradient with respect to its box comes from image edges and spikes, and
            SGD steps on it threw the zooms from one bound to the other within a ranking phase (docs/racnn.md).
    The other optimiser settings apply to both optimisers; the APNs' learning rate is lr x lr_scales["apn"]
    (default 1).
    Both follow the warm-up + cosine schedule of the global step, the classification one from the end of
    pre-training (so its warm-up is not spent while it is idle).
    """

    leaves_parameters_unused = True  # each phase steps one optimiser; the other's parameters get no gradient
    trains = (RACNN,)
    leaves_to = {}

    def __init__(
        self,
        network: RACNN,
        margin: float = 0.05,
        pretrain_steps: int = 0,
        pretrain_scale: float = PRETRAIN_SCALE,
        classification_steps: int = 100,
        ranking_steps: int = 20,
        apn_optimizer: Literal["sgd", "adamw"] | None = None,
        **kwargs,
    ):
        super().__init__(network, **kwargs)
        self.automatic_optimization = False
        if not 0 <= margin < 1:
            raise FinegrainError(f"RA-CNN margin {margin} is a probability difference: pick it in [0, 1), e.g. 0.05")
        if pretrain_steps < 0 or ranking_steps < 0 or classification_steps < 1:
            raise FinegrainError(
                f"RA-CNN phase lengths pretrain_steps {pretrain_steps}, classification_steps {classification_steps}, "
                f"ranking_steps {ranking_steps}: need pretrain_steps >= 0, classification_steps >= 1, "
                "ranking_steps >= 0"
            )
        if pretrain_steps and not self.network.min_scale <= pretrain_scale <= self.network.max_scale:
            raise FinegrainError(
                f"APN pre-training aims at pretrain_scale {pretrain_scale} of the previous side, outside min_scale "
                f"{self.network.min_scale} .. max_scale {self.network.max_scale}: move it inside, widen them or set "
                "pretrain_steps 0"
            )

    @property
    def phase(self) -> str:
        """The phase of the next training step."""
        h = self.hparams
        return phase_at(self.global_step, h.pretrain_steps, h.classification_steps, h.ranking_steps)

    def set_phase_modes(self, phase: str) -> None:
        """Train mode for what the phase trains; eval mode (fixed batch-norm statistics, no dropout) for the
        classification networks while the APNs learn."""
        self.network.train()
        if phase != "classification":
            for module in self.network.classification_modules():
                module.eval()

    def training_step(self, batch: dict, batch_idx: int) -> None:
        phase = self.phase
        classification_opt, apn_opt = self.optimizers()
        optimizer = classification_opt if phase == "classification" else apn_opt
        for opt in (classification_opt, apn_opt):  # no stale gradients from the other phase
            opt.zero_grad(set_to_none=True)
        self.toggle_optimizer(optimizer)  # requires_grad only for the parameters this phase trains
        self.set_phase_modes(phase)

        zoom = self.network.zoom_in(batch["image"], detach_boxes=phase == "classification")
        labels = batch["label"]
        losses = {
            "classification": self.loss(zoom.output, labels),
            "ranking": ranking_loss(list(zoom.output.branch_logits.values()), labels, self.hparams.margin),
            "pretrain": pretrain_loss(zoom, self.hparams.pretrain_scale),
        }
        self.manual_backward(losses[phase])
        optimizer.step()
        self.untoggle_optimizer(optimizer)
        with warnings.catch_warnings():  # the idle optimiser may not have stepped yet; its schedule still follows
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step\\(\\)` before")  # the global step
            for schedule in self.lr_schedulers():
                schedule.step()

        size = len(labels)
        for name, key in (("classification", "loss"), ("ranking", "rank_loss"), ("pretrain", "apn_loss")):
            self.log(f"train/{key}", losses[name].detach(), on_step=True, on_epoch=True, batch_size=size,
                     prog_bar=True)  # fmt: skip
        self.log("train/phase", float(PHASES.index(phase)), on_step=True, on_epoch=False, batch_size=size)
        self.log(f"train/steps_{phase}", 1.0, on_step=False, on_epoch=True, reduce_fx="sum", batch_size=size)
        self.log_results(zoom.output, batch, "train")

    def configure_optimizers(self):
        groups = self.network.lr_groups()
        apn = {"apn": groups.pop("apn")}
        # the classifiers' warm-up starts when they start learning, after APN pre-training
        pairs = (self.optimizer_with_schedule(groups, start_step=self.hparams.pretrain_steps),
                 self.optimizer_with_schedule(apn, kind=self.hparams.apn_optimizer))  # fmt: skip
        return [{"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}} for opt, sched in pairs]
