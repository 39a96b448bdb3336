"""The baseline: a timm backbone and a linear classifier on its pooled features."""

from __future__ import annotations

import torch
from torch import nn

from finegrain.models.attention import attention_maps, backbone_groups
from finegrain.models.backbones import create_backbone
from finegrain.models.registry import register_network
from finegrain.models.result import ModelOutput


@register_network
class Classifier(nn.Module):
    """Any timm backbone + dropout + linear head; the head is separate so it can take a higher learning rate."""

    branch_names: tuple[str, ...] = ()  # one prediction, no branches
    box_names: tuple[str, ...] = ()  # looks at the whole image

    def __init__(self, num_classes: int, backbone: str = "resnet50", weights: str | None = "none",
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0, attention: str = "none",
                 attention_stages: list[int] | None = None):  # fmt: skip
        super().__init__()
        timm_kwargs = {"drop_path_rate": drop_path_rate} if drop_path_rate else {}
        self.backbone = create_backbone(backbone, weights=weights, num_classes=0, attention=attention,
                                        attention_stages=attention_stages, **timm_kwargs)  # fmt: skip
        self.dropout = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.backbone.num_features, num_classes)

    def lr_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by learning-rate group; the task scales each group's rate from the config.

        Attention gates are new layers inside a pretrained backbone: they get their own group ("attention"),
        which learns at the head's rate unless `lr_scales` says otherwise.
        """
        return {**backbone_groups(self.backbone), "head": list(self.head.parameters())}

    def forward(self, images: torch.Tensor) -> ModelOutput:
        logits = self.head(self.dropout(self.backbone(images)))
        return ModelOutput(logits=logits, attention_maps=attention_maps(self.backbone))
