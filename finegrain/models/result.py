"""The one result type every network returns, whatever the method."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ModelOutput:
    """What a forward pass produced.

    logits: the fused prediction, (B, num_classes).
    branch_logits: per-branch predictions in a fixed order per method (per scale for RA-CNN, per part for
        ST-CNN); empty for a single-branch network.
    boxes: the regions each branch attended to, (B, 4) as normalised (x1, y1, x2, y2) in [0, 1] of the input
        image (x = width, y = height), keyed by branch name.
    attention_maps: spatial attention maps (B, h, w) in [0, 1], keyed by where they were taken.
    """

    logits: torch.Tensor
    branch_logits: dict[str, torch.Tensor] = field(default_factory=dict)
    boxes: dict[str, torch.Tensor] = field(default_factory=dict)
    attention_maps: dict[str, torch.Tensor] = field(default_factory=dict)
