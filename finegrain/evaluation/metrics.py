"""Classification metrics: micro top-1/top-5 as CUB papers report them, and mean per-class accuracy."""

from __future__ import annotations

import torch
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy


class MeanClassAccuracy(Metric):
    """Top-1 accuracy of each class, averaged over the classes that occur in the targets.

    torchmetrics' macro average also counts classes that were only predicted, as zeros, which understates the
    figure on any split that lacks some classes.
    """

    full_state_update = False

    def __init__(self, num_classes: int):
        super().__init__()
        self.add_state("correct", torch.zeros(num_classes), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(num_classes), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        hits = (logits.argmax(dim=1) == labels).float()
        self.correct.index_add_(0, labels, hits)
        self.total.index_add_(0, labels, torch.ones_like(hits))

    def compute(self) -> torch.Tensor:
        present = self.total > 0
        return (self.correct[present] / self.total[present]).mean()


def accuracy_metrics(num_classes: int, prefix: str) -> MetricCollection:
    """Micro top-1 and top-5 (what CUB papers report) and mean per-class accuracy."""
    return MetricCollection(
        {
            "top1": MulticlassAccuracy(num_classes, top_k=1, average="micro"),
            "top5": MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro"),
            "mean_class": MeanClassAccuracy(num_classes),
        },
        prefix=prefix,
    )
