"""Object zoom: the network's own activation map finds the bird, and a network looks again, closer.

The AOLM step of MMAL-Net (Zhang et al., "Multi-branch and Multi-scale Attention Learning for Fine-Grained
Visual Categorization", MMM 2021): sum the channels of the last stage's activation map, keep the positions above
its mean, take the largest connected region; its bounding box is the object. No box regressor, one extra forward
pass: a backbone and classifier see the whole image; the same ones (MMAL-Net) or a copy of their own
(`share_network=False`, the recipes' choice) see the object crop; both views are trained and their logits fused.
The crop is sampled from the full-resolution input, never from the downscaled whole view. docs/methods.md
("Object zoom") has the design choices, docs/benchmarks.md the figures.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from finegrain.errors import FinegrainError
from finegrain.geometry import box_to_transform, crop, mask_box, square_box, square_copy
from finegrain.models.attention import attention_maps, backbone_groups
from finegrain.models.backbones import create_backbone
from finegrain.models.registry import register_network
from finegrain.models.result import ModelOutput


def activation_sum(feature_map: Tensor) -> Tensor:
    """(B, C, h, w) -> (B, h, w): the channel sum of a last-stage map, in float32 (the AOLM's activation map)."""
    return feature_map.detach().float().sum(1)


def largest_region(mask: Tensor) -> Tensor:
    """(B, h, w) bool -> (B, h, w) bool: the largest 8-connected region of each mask (empty stays empty).

    Labels spread by 3x3 max-pooling inside the mask until every region carries its largest position index; a
    fixed h * w - 1 rounds (the longest path a region of h * w cells can have), so the graph has no
    data-dependent loop and exports to ONNX. Of regions of equal size, the one holding the later position wins.
    """
    batch, height, width = mask.shape
    inside = mask.float()[:, None]
    labels = torch.arange(1, height * width + 1, device=mask.device, dtype=torch.float32).view(1, 1, height, width)
    labels = labels * inside
    for _ in range(height * width - 1):
        labels = F.max_pool2d(labels, 3, stride=1, padding=1) * inside
    labels = labels.flatten(1)  # (B, h * w), 0 outside the mask
    sizes = ((labels[:, :, None] == labels[:, None, :]) & (labels[:, None, :] > 0)).sum(-1)
    best = labels.gather(1, (sizes * (height * width + 1) + labels).argmax(1, keepdim=True))
    return ((labels == best) & (labels > 0)).view(batch, height, width)


def object_region(feature_map: Tensor) -> Tensor:
    """(B, C, h, w) -> (B, h, w) bool: the largest connected region of the channel sum above its own mean."""
    response = activation_sum(feature_map)
    return largest_region(response > response.mean((1, 2), keepdim=True))


@register_network
class ObjectZoom(nn.Module):
    """A timm CNN and classifier on the whole image, and on the object it finds in its own activation map.

    Args:
        num_classes: classes to predict.
        backbone: timm CNN name (its forward_features must give a (B, C, h, w) map).
        weights: backbone weights: "none", "timm", "embedded-lite0" or a file.
        drop_rate: dropout before the classifier.
        attention, attention_stages: attention gates in the backbone (see `create_backbone`).
        whole_size: side in pixels of the square copy of the input that the whole view sees; None for the input
            itself. With a larger input (448 px on a CPU recipe, whole view 224 px) the object crop sees the bird
            at up to the input's resolution, not an upsampled 224 px view.
        zoom_size: side in pixels of the object crop.
        min_side: the object box's smallest side, as a fraction of the input's shorter side: published zooms
            lose accuracy on crops smaller than about a third of the image (../shared/docs/methods.md).
        share_network: one backbone and classifier for both views (MMAL-Net); False gives the object view its own
            copy of both, started from the same weights, so the two views' predictions differ more when fused.

    The object box is the region's bounding box widened to a square (in pixels) around its centre and shifted
    inside the image: a crop resized to a square input is not distorted and keeps the bird's ends. Where the
    region is empty (a flat map) the box is the whole image.

    Output: `logits` the mean of both views' logits; `branch_logits` {"whole", "object"}; `boxes` {"object"} in
    normalised xyxy of the input; `attention_maps` {"whole.activation": the channel sum the box came from, scaled
    to [0, 1] per image, in the whole view} plus any attention gates' maps keyed "<view>.<module>".
    """

    branch_names = ("whole", "object")
    box_names = ("object",)

    def __init__(self, num_classes: int, backbone: str = "resnet50", weights: str | None = "none",
                 drop_rate: float = 0.0, attention: str = "none", attention_stages: list[int] | None = None,
                 whole_size: int | None = None, zoom_size: int = 224, min_side: float = 1 / 3,
                 share_network: bool = True):  # fmt: skip
        super().__init__()
        sizes = {"zoom_size": zoom_size} if whole_size is None else {"zoom_size": zoom_size, "whole_size": whole_size}
        for name, value in sizes.items():
            if not isinstance(value, int) or value < 1:
                raise FinegrainError(f"ObjectZoom {name} must be a positive integer, got {value!r}")
        if not 0 < min_side <= 1:
            raise FinegrainError(f"ObjectZoom min_side must be in (0, 1] (a fraction of the image side), got "
                                 f"{min_side!r}; the default is 1/3")  # fmt: skip
        self.whole_size, self.zoom_size, self.min_side = whole_size, zoom_size, min_side
        self.backbone = create_backbone(backbone, weights=weights, num_classes=0, attention=attention,
                                        attention_stages=attention_stages)  # fmt: skip
        self.dropout = nn.Dropout(drop_rate)
        self.head = nn.Linear(getattr(self.backbone, "head_hidden_size", self.backbone.num_features), num_classes)
        self.share_network = share_network
        if not share_network:
            self.object_backbone, self.object_head = copy.deepcopy(self.backbone), copy.deepcopy(self.head)

    def lr_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by learning-rate group, as the baseline's: trunk, attention gates, head."""
        groups = {**backbone_groups(self.backbone), "head": list(self.head.parameters())}
        if not self.share_network:
            for key, params in backbone_groups(self.object_backbone).items():
                groups[key] += params
            groups["head"] += self.object_head.parameters()
        return groups

    def classify_view(self, images: Tensor, name: str, maps: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """The last-stage map and logits of one view; its attention gates' maps into `maps` as "<name>.<key>".

        `name` "object" runs the object view's own network where it has one; any other name runs the whole view's.
        """
        own = name == "object" and not self.share_network
        backbone, head = (self.object_backbone, self.object_head) if own else (self.backbone, self.head)
        feature_map = backbone.forward_features(images)
        if feature_map.dim() != 4:
            raise FinegrainError(
                f"ObjectZoom needs a CNN backbone whose forward_features gives a (B, C, H, W) map; got shape "
                f"{tuple(feature_map.shape)}: use a timm CNN (efficientnet_lite0, resnet50, ...)"
            )
        maps.update({f"{name}.{key}": value for key, value in attention_maps(backbone).items()})
        logits = head(self.dropout(backbone.forward_head(feature_map, pre_logits=True)))
        return feature_map, logits

    def object_box(self, feature_map: Tensor, aspect: float) -> Tensor:
        """(B, 4) normalised xyxy box of the object in an input of width / height `aspect` (whole image when none)."""
        return square_box(mask_box(object_region(feature_map)), self.min_side, aspect)

    def forward(self, images: Tensor) -> ModelOutput:
        maps: dict[str, Tensor] = {}
        feature_map, whole_logits = self.classify_view(square_copy(images, self.whole_size), "whole", maps)
        box = self.object_box(feature_map, images.shape[-1] / images.shape[-2])
        zoom = crop(images, box_to_transform(box), (self.zoom_size, self.zoom_size))
        _, object_logits = self.classify_view(zoom, "object", maps)
        response = activation_sum(feature_map)
        low, high = response.amin((1, 2), keepdim=True), response.amax((1, 2), keepdim=True)
        maps["whole.activation"] = (response - low) / (high - low).clamp(min=1e-12)
        return ModelOutput(
            logits=(whole_logits + object_logits) / 2,
            branch_logits={"whole": whole_logits, "object": object_logits},
            boxes={"object": box},
            attention_maps=maps,
        )
