"""RA-CNN (Fu, Zheng, Mei, "Look Closer to See Better", CVPR 2017): recurrent attention that zooms in.

Scale 1 classifies the whole image; an Attention Proposal Network (APN) on its last conv map picks a square,
which scale 2 sees zoomed to `zoom_size`; scale 2's APN picks a square inside that crop for scale 3. Each scale
has its own backbone and classifier; a pairwise ranking loss asks every finer scale to be surer of the true class
than the scale before it. The training schedule (APN pre-training, then alternating classification and ranking
phases) lives in `finegrain.tasks.racnn`; see docs/racnn.md for the design choices.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from finegrain.errors import FinegrainError
from finegrain.geometry import (
    bound_transform,
    check_scales,
    compose_transforms,
    crop,
    square_copy,
    transform_to_box,
)
from finegrain.models.attention import attention_maps, backbone_groups
from finegrain.models.backbones import create_backbone
from finegrain.models.registry import register_network
from finegrain.models.result import ModelOutput

PRETRAIN_SCALE = 0.5  # the paper pre-trains each APN towards a square of half the previous scale's side
TARGET_SUBCELLS = 8  # apn_target searches 8 positions per map cell; its square is within 1/16 cell of the side asked
FUSED_SCALE = 10.0  # length of each scale's normalised descriptor in the fused one (see `fuse`)


def ranking_loss(scale_logits: Sequence[Tensor], labels: Tensor, margin: float = 0.05,
                 reduction: str = "mean") -> Tensor:  # fmt: skip
    """The inter-scale pairwise ranking loss: mean over images of sum_s max(0, p_t(s) - p_t(s+1) + margin).

    p_t(s) is the SOFTMAX probability of the true class at scale s (in float32), so the margin is a
    probability: a finer scale must be at least `margin` surer than the scale before it. `reduction="none"`
    gives each image's sum.
    """
    true_probs = [F.softmax(logits.float(), dim=1).gather(1, labels[:, None]).squeeze(1) for logits in scale_logits]
    pairs = [(coarse - fine + margin).clamp(min=0) for coarse, fine in zip(true_probs, true_probs[1:], strict=False)]
    per_image = torch.stack(pairs).sum(0)
    return per_image if reduction == "none" else per_image.mean()


def apn_target(feature_map: Tensor, aspect: float = 1.0, scale: float = PRETRAIN_SCALE) -> Tensor:
    """The box an APN is pre-trained towards, as a transform (B, 4) in the frame of the scale it looks at.

    The paper "searches a square with the highest response" in the previous scale's last conv map: here the
    pixel square of side `scale` x that scale's shorter side (the convention of `bound_transform`) whose window
    holds the largest total of the channel-summed `feature_map` (B, C, h, w), searched over every position inside
    the image on a grid of `TARGET_SUBCELLS` steps per map cell. Where several positions tie (a square larger than
    the responding region) it takes their mean, which centres the square on that region. A search over squares,
    not the square around the single strongest cell: on CUB a lone strong cell is often background (sea, branch),
    and the searched square held the bird's centre more often (docs/racnn.md). `aspect` is that scale's input
    width / height.
    """
    half = torch.tensor([scale / max(aspect, 1.0), scale * min(aspect, 1.0)], device=feature_map.device)
    response = feature_map.detach().float().sum(1, keepdim=True)
    # each cell split into sub-cells of its own value, so a window's sum is the response's integral over it
    response = F.interpolate(response, scale_factor=TARGET_SUBCELLS, mode="nearest")
    height, width = response.shape[-2:]
    window_w, window_h = (max(1, round(h * n)) for h, n in zip(half.tolist(), (width, height), strict=True))
    sums = F.avg_pool2d(response, (window_h, window_w), stride=1).flatten(1)  # (B, positions)
    top = sums.amax(1, keepdim=True)
    best = (sums >= top - 1e-6 * top.abs()).float()
    best = best / best.sum(1, keepdim=True)  # equal weights on the tied positions
    index = torch.arange(sums.shape[1], device=sums.device)
    positions = width - window_w + 1
    col, row = (best * (index % positions)).sum(1), (best * (index // positions)).sum(1)
    centre = torch.stack(((2 * col + window_w) / width - 1, (2 * row + window_h) / height - 1), dim=-1)
    centre = torch.maximum(torch.minimum(centre, 1 - half), half - 1)  # a window rounded up may reach past it
    return torch.cat((centre, half.expand(len(centre), 2)), dim=-1)


class AttentionProposal(nn.Module):
    """The APN: two fully connected layers on a scale's last conv map -> raw (tx, ty, tl).

    The map is average-pooled to a fixed `grid` x `grid` first, so one APN serves any input size, keeps where
    the responses are, and does not grow with the image. The pooled map is then layer-normalised (no learned
    affine): the box depends on the pattern of the responses, not on their magnitude. Without it the APN, a
    ReLU network with small biases, scales its raw output with the map; the map is 6x larger in eval mode right
    after a classification phase (batch-norm running statistics lag the backbone: docs/racnn.md), which pushed
    every box onto the bounds, where the sigmoid saturates and the ranking loss can no longer move it. The last
    layer starts at zero: every image starts with the centred square of mid-range side, which pre-training then
    moves.
    """

    def __init__(self, channels: int, grid: int = 7, hidden: int = 512):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(grid)
        self.fc1 = nn.Linear(channels * grid * grid, hidden)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(hidden, 3)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, feature_map: Tensor) -> Tensor:
        pooled = self.pool(feature_map).flatten(1)
        return self.fc2(self.act(self.fc1(F.layer_norm(pooled, pooled.shape[1:]))))


@dataclass
class ZoomPass:
    """One forward pass with what training needs besides the `ModelOutput`.

    feature_maps: each scale's last conv map; aspects: each scale's input width / height; relative: each APN's
    bounded box as a transform in the frame of the scale it looked at (absolute boxes are in `output.boxes`);
    raw: each APN's unbounded output (B, 3).
    """

    output: ModelOutput
    feature_maps: list[Tensor]
    aspects: list[float]
    relative: list[Tensor]
    raw: list[Tensor]


@register_network
class RACNN(nn.Module):
    """Scales of backbone + classifier, linked by APNs; each zoom is sampled from the original input.

    Args:
        num_classes: classes to predict.
        backbone: timm CNN name of every scale (the paper: VGG-19, timm `vgg19`).
        weights: weights of every backbone: "none", "timm", "embedded-lite0" or a file.
        drop_rate: dropout before every classifier.
        attention, attention_stages: attention gates in every backbone (see `create_backbone`).
        scales: 3 (the paper) or 2.
        zoom_size: side in pixels of every zoomed scale (224 in the paper, whose scale 1 sees 448).
        shared_backbone: one backbone for every scale instead of one each (the paper's are separate).
        min_scale, max_scale: bounds of each zoom's side as a fraction of the previous scale's shorter side. The
            defaults put the paper's pre-training target (half the side) in the middle, where the bounding
            sigmoid is steepest, and keep a zoom from fading to the whole view or collapsing to a few pixels.
        apn_grid: the APN pools the last conv map to apn_grid x apn_grid before its fully connected layers.
        apn_hidden: width of the APN's hidden layer.
        scale1_size: side in pixels of the square copy of the input that scale 1 sees; None (the paper) for the
            input itself. The zooms are always sampled from the full input, so with a smaller scale 1 (a CPU
            budget: 224 px of a 448 px input) a zoom to half the side sees twice scale 1's resolution, as the
            paper's 224 px zooms of its 448 px input see the region at full resolution.

    Output: `logits` from the fused descriptors (each scale's pooled descriptor L2-normalised, concatenated:
    the paper's "scale 1+2+3"); `branch_logits` {"scale1", "scale2", "scale3"} from each scale's classifier;
    `boxes` {"scale2", "scale3"} in normalised xyxy of the ORIGINAL input; `attention_maps` keyed
    "<scale>.<module>", each in its scale's own input.
    """

    def __init__(self, num_classes: int, backbone: str = "vgg19", weights: str | None = "none",
                 drop_rate: float = 0.0, attention: str = "none", attention_stages: list[int] | None = None,
                 scales: int = 3, zoom_size: int = 224, shared_backbone: bool = False, min_scale: float = 0.2,
                 max_scale: float = 0.8, apn_grid: int = 7, apn_hidden: int = 512,
                 scale1_size: int | None = None):  # fmt: skip
        super().__init__()
        if scales not in (2, 3):
            raise FinegrainError(f"RA-CNN scales must be 2 or 3, got {scales!r}")
        sizes = {"zoom_size": zoom_size, "apn_grid": apn_grid, "apn_hidden": apn_hidden}
        if scale1_size is not None:
            sizes["scale1_size"] = scale1_size
        for name, value in sizes.items():
            if not isinstance(value, int) or value < 1:
                raise FinegrainError(f"RA-CNN {name} must be a positive integer, got {value!r}")
        check_scales(min_scale, max_scale)
        self.num_scales, self.zoom_size, self.scale1_size = scales, zoom_size, scale1_size
        self.min_scale, self.max_scale = min_scale, max_scale

        def make_backbone() -> nn.Module:
            return create_backbone(backbone, weights=weights, num_classes=0, attention=attention,
                                   attention_stages=attention_stages)  # fmt: skip

        self.backbones = nn.ModuleList(make_backbone() for _ in range(1 if shared_backbone else scales))
        first = self.backbones[0]
        channels = first.num_features  # of forward_features' map; the pooled descriptor may differ (VGG: 4096)
        width = getattr(first, "head_hidden_size", channels)
        self.apns = nn.ModuleList(AttentionProposal(channels, apn_grid, apn_hidden) for _ in range(scales - 1))
        self.dropout = nn.Dropout(drop_rate)
        self.heads = nn.ModuleList(nn.Linear(width, num_classes) for _ in range(scales))
        self.fused_head = nn.Linear(width * scales, num_classes)
        self.branch_names = [f"scale{i + 1}" for i in range(scales)]
        self.box_names = self.branch_names[1:]

    def backbone_at(self, scale: int) -> nn.Module:
        """The backbone of scale index `scale` (0-based)."""
        return self.backbones[scale % len(self.backbones)]

    def classification_modules(self) -> list[nn.Module]:
        """What the classification phase trains: backbones, classifiers (and their dropout); not the APNs."""
        return [self.backbones, self.dropout, self.heads, self.fused_head]

    def lr_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by learning-rate group; "apn" is trained by its own optimiser in its own phases.

        Attention gates are new layers inside pretrained backbones: their own group, like the baseline's.
        """
        return {
            **backbone_groups(self.backbones),
            "apn": list(self.apns.parameters()),
            "head": [*self.heads.parameters(), *self.fused_head.parameters()],
        }

    def zoom_in(self, images: Tensor, detach_boxes: bool = False) -> ZoomPass:
        """Run every scale; the crop of scale s + 1 is composed into original-image coordinates and sampled from
        `images` itself, never from the previous (already resampled) crop.

        `detach_boxes` cuts the path from the crops back through the APNs into the coarser scales: in the
        classification phase a finer scale's loss must train that scale on the crop it was given, not move the
        crop by reshaping the coarser scale's features (the APN is frozen, but its input is not).
        """
        inputs, absolute = square_copy(images, self.scale1_size), None
        maps, aspects, relative, raws, descriptors, logits = [], [], [], [], [], []
        boxes, attention = {}, {}
        for scale in range(self.num_scales):
            net = self.backbone_at(scale)
            feature_map = net.forward_features(inputs)
            if feature_map.dim() != 4:
                raise FinegrainError(
                    f"RA-CNN needs a CNN backbone whose forward_features gives a (B, C, H, W) map; got shape "
                    f"{tuple(feature_map.shape)} from this backbone: use a timm CNN (vgg19, resnet50, ...)"
                )
            descriptor = net.forward_head(feature_map, pre_logits=True)
            name = self.branch_names[scale]
            # read now: a shared backbone keeps only its last call's maps
            attention.update({f"{name}.{key}": value for key, value in attention_maps(net).items()})
            maps.append(feature_map)
            # of the original image, not of scale 1's square copy; every zoom is a pixel square (aspect 1)
            aspects.append(images.shape[-1] / images.shape[-2] if scale == 0 else 1.0)
            descriptors.append(descriptor)
            logits.append(self.heads[scale](self.dropout(descriptor)))
            if scale + 1 < self.num_scales:
                raw = self.apns[scale](feature_map)
                raws.append(raw)
                box = bound_transform(raw, self.min_scale, self.max_scale, aspect=aspects[-1])
                relative.append(box)
                absolute = box if absolute is None else compose_transforms(absolute, box)
                boxes[self.branch_names[scale + 1]] = transform_to_box(absolute)
                sampled = absolute.detach() if detach_boxes else absolute
                inputs = crop(images, sampled, (self.zoom_size, self.zoom_size))
        output = ModelOutput(
            logits=self.fused_head(self.dropout(fuse(descriptors))),
            branch_logits=dict(zip(self.branch_names, logits, strict=True)),
            boxes=boxes,
            attention_maps=attention,
        )
        return ZoomPass(output=output, feature_maps=maps, aspects=aspects, relative=relative, raw=raws)

    def forward(self, images: Tensor) -> ModelOutput:
        return self.zoom_in(images).output


def fuse(descriptors: Sequence[Tensor]) -> Tensor:
    """Each descriptor L2-normalised (in float32) and concatenated, the paper's fused descriptor, times FUSED_SCALE.

    Unit-norm inputs make a linear layer's logits, and their steps, tiny: a fused head on them barely moved in
    a dozen steps at the per-scale heads' rate. The same fixed factor for every scale keeps the normalised
    geometry and gives the fused head steps like a head on raw features (a CNN's pooled features have squared
    norms of a few hundred: about 540 for EfficientNet-Lite0; 3 x 10^2 here).
    """
    return torch.cat([F.normalize(d.float(), dim=1).mul(FUSED_SCALE).to(d.dtype) for d in descriptors], dim=1)
