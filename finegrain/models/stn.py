"""ST-CNN (Jaderberg et al., "Spatial Transformer Networks", NeurIPS 2015): parallel spatial transformers pick
parts of the image, each part is sampled from the full-resolution input and goes through its own network, and
the part features are classified together. Trained end to end from class labels alone.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from finegrain.errors import FinegrainError
from finegrain.geometry import (
    bound_affine,
    bound_transform,
    check_scales,
    crop,
    square_copy,
    theta_to_box,
    transform_to_theta,
)
from finegrain.models.attention import attention_maps, backbone_groups
from finegrain.models.backbones import create_backbone
from finegrain.models.registry import register_network
from finegrain.models.result import ModelOutput

# raw localisation outputs per part: attention = (x, y, scale), affine = (x, y, x scale, y scale, 2 shears)
TRANSFORM_PARAMS = {"attention": 3, "affine": 6}


def start_bias(num_parts: int, num_params: int) -> Tensor:
    """Raw outputs putting the parts at mid scale on distinct points of the image diagonal, top-left first.

    Part i's centre sits at (2i + 1) / N - 1 of its allowed offset on both axes (±0.5 for two parts); the
    geometry maps a raw r to offset tanh(r), so the raw value is atanh of that fraction. Other values are 0:
    mid-range scale, no shear.
    """
    bias = torch.zeros(num_parts, num_params)
    fractions = torch.tensor([(2 * i + 1) / num_parts - 1 for i in range(num_parts)])
    bias[:, :2] = torch.atanh(fractions)[:, None]
    return bias


class LocalizationHead(nn.Module):
    """Feature MAP (B, C, h, w) -> raw transforms (B, num_parts, num_params), keeping where things are.

    1x1 conv -> ReLU -> average pool to a fixed grid x grid -> flatten -> Linear -> ReLU -> Linear. A head on
    globally pooled features cannot say where the bird is (pooling discards position; it only learns to grow the
    crops); the flattened grid keeps position at any input size. The last layer starts with zero weights and
    `start_bias`, as in the paper: every image starts with the same distinct part crops, and the crops move
    only as the classification loss asks.
    """

    def __init__(self, in_channels: int, num_parts: int, num_params: int, reduced: int = 64, grid: int = 7,
                 hidden: int = 256):  # fmt: skip
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(in_channels, reduced, 1), nn.ReLU(inplace=True),
                                    nn.AdaptiveAvgPool2d(grid), nn.Flatten())  # fmt: skip
        self.fc1 = nn.Linear(reduced * grid * grid, hidden)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(hidden, num_parts * num_params)
        self.out_shape = (num_parts, num_params)
        nn.init.zeros_(self.fc2.weight)
        with torch.no_grad():
            self.fc2.bias.copy_(start_bias(num_parts, num_params).flatten())

    def forward(self, feature_map: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(self.reduce(feature_map)))).unflatten(-1, self.out_shape)


@register_network
class STCNN(nn.Module):
    """N spatial transformers -> N part networks -> concatenated features -> dropout -> one linear classifier.

    Args:
        num_classes: classes to predict.
        backbone: timm name of the part (and global) networks.
        weights: weights of every backbone, localisation included: "none", "timm", "embedded-lite0" or a file
            (which must then fit `loc_backbone` too).
        drop_rate: dropout before the classifiers.
        num_parts: parallel transformers (the paper used 2 or 4).
        transform: "attention" (square crop: scale + translation, the paper's choice for CUB) or "affine"
            (6 parameters: per-axis scale, shear, translation), both bounded to stay inside the image.
        part_size: side in pixels of each part sample, taken from the full-resolution input.
        min_scale: smallest part side as a fraction of the image's shorter side (of each side for "affine").
        max_scale: largest part side, likewise; below 1 it keeps a part from growing to the whole image, where
            the scale's sigmoid saturates and the part stops localising.
        loc_backbone: timm name of the localisation network; default `backbone`.
        loc_size: side in pixels of the downsampled copy the localisation network sees, to keep it cheap.
        shared_parts: one part network for all parts instead of one each.
        global_branch: also classify the whole image with its own network.
        attention, attention_stages: attention gates in the part and global networks (see
            `create_backbone`); the localisation network stays plain.
        part_names: what each part is called in outputs, logs and pictures (e.g. ["head", "body"] when
            `finegrain.tasks.stn.STNTask` supervises them with CUB's keypoints); default part1 ... partN.

    Output: fused `logits`; `branch_logits` {"global" (if on), "part1", ..., "partN" (or `part_names`)} from
    linear probes on each branch's DETACHED features; `boxes` {"part1", ...} as normalised xyxy (the box around
    the parallelogram for "affine"). The probes' losses train only the probes: the paper trains the fused
    softmax alone, and a loss per part would pull every part toward the same most discriminative region;
    detached, they still measure what each branch knows. `attention_maps` are keyed "<branch>.<module>" and lie
    in that branch's input (a part's maps cover its crop, not the whole image).
    """

    def __init__(self, num_classes: int, backbone: str = "resnet50", weights: str | None = "none",
                 drop_rate: float = 0.0, num_parts: int = 2, transform: str = "attention", part_size: int = 224,
                 min_scale: float = 0.2, max_scale: float = 1.0, loc_backbone: str | None = None, loc_size: int = 224,
                 shared_parts: bool = False, global_branch: bool = False, attention: str = "none",
                 attention_stages: list[int] | None = None, part_names: list[str] | None = None):  # fmt: skip
        super().__init__()
        if transform not in TRANSFORM_PARAMS:
            raise FinegrainError(f"ST-CNN transform {transform!r} is unknown; choose one of {list(TRANSFORM_PARAMS)}")
        for name, value in (("num_parts", num_parts), ("part_size", part_size), ("loc_size", loc_size)):
            if not isinstance(value, int) or value < 1:
                raise FinegrainError(f"ST-CNN {name} must be a positive integer, got {value!r}")
        check_scales(min_scale, max_scale)
        names = list(part_names) if part_names is not None else [f"part{i + 1}" for i in range(num_parts)]
        if len(names) != num_parts or len(set(names)) != num_parts or "global" in names or not all(names):
            raise FinegrainError(f"ST-CNN part_names {part_names!r} must be {num_parts} distinct, non-empty names "
                                 "(one per part, not 'global'), e.g. [head, body]")  # fmt: skip
        self.transform, self.min_scale, self.max_scale, self.num_parts = transform, min_scale, max_scale, num_parts
        self.part_size, self.loc_size = part_size, loc_size

        self.loc_net = create_backbone(loc_backbone or backbone, weights=weights, num_classes=0)
        self.loc_head = LocalizationHead(self.loc_net.num_features, num_parts, TRANSFORM_PARAMS[transform])
        branch_net = functools.partial(create_backbone, backbone, weights=weights, num_classes=0,
                                       attention=attention, attention_stages=attention_stages)  # fmt: skip
        self.part_nets = nn.ModuleList(branch_net() for _ in range(1 if shared_parts else num_parts))
        self.global_net = branch_net() if global_branch else None

        width = self.part_nets[0].num_features
        self.box_names = names
        self.branch_names = (["global"] if global_branch else []) + self.box_names
        self.dropout = nn.Dropout(drop_rate)
        self.head = nn.Linear(width * len(self.branch_names), num_classes)
        self.branch_heads = nn.ModuleDict({name: nn.Linear(width, num_classes) for name in self.branch_names})

    def lr_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by learning-rate group; give "localization" a lower rate than the rest, as the paper did.

        Attention gates in the branch networks are new layers: their own group, like the baseline's.
        """
        branches = nn.ModuleList(self.branch_nets())  # parameters() lists a shared network once
        return {
            **backbone_groups(branches),
            "localization": [*self.loc_net.parameters(), *self.loc_head.parameters()],
            "head": [*self.head.parameters(), *self.branch_heads.parameters()],
        }

    def branch_nets(self) -> list[nn.Module]:
        """The network of each branch, in `branch_names` order."""
        parts = [self.part_nets[i % len(self.part_nets)] for i in range(self.num_parts)]
        return ([self.global_net] if self.global_net is not None else []) + parts

    def localize_raw(self, images: Tensor) -> Tensor:
        """Unbounded localisation outputs (B, num_parts, num_params) from a loc_size copy of `images`."""
        return self.loc_head(self.loc_net.forward_features(square_copy(images, self.loc_size)))

    def raw_to_theta(self, raw: Tensor, images: Tensor) -> Tensor:
        """Raw outputs -> per-part theta (B, num_parts, 2, 3), inside the image."""
        if self.transform == "affine":
            return bound_affine(raw, self.min_scale, self.max_scale)
        aspect = images.shape[-1] / images.shape[-2]  # parts are pixel squares of the original image
        return transform_to_theta(bound_transform(raw, self.min_scale, self.max_scale, aspect=aspect))

    def _part_features(self, index: int, images: Tensor, theta: Tensor) -> Tensor:
        net = self.part_nets[index % len(self.part_nets)]
        return net(crop(images, theta, (self.part_size, self.part_size)))

    # False while a task trains the localisation from another signal (STNTask's keypoints): the crops are then
    # sampled at detached boxes, so the classification loss trains the part networks, not where they look
    localization_from_labels = True

    def forward(self, images: Tensor) -> ModelOutput:
        theta = self.raw_to_theta(self.localize_raw(images), images)
        sampled = theta if self.localization_from_labels else theta.detach()
        features, maps = [], {}
        if self.global_net is not None:
            features.append(self.global_net(images))
            maps.update({f"global.{key}": value for key, value in attention_maps(self.global_net).items()})
        for i, name in enumerate(self.box_names):
            features.append(self._part_features(i, images, sampled[:, i]))
            # read now: a shared part network keeps only its last call's maps
            net = self.part_nets[i % len(self.part_nets)]
            maps.update({f"{name}.{key}": value for key, value in attention_maps(net).items()})
        fused = self.dropout(torch.cat(features, dim=1))
        probes = fused.detach().chunk(len(self.branch_names), dim=1)
        return ModelOutput(
            logits=self.head(fused),
            branch_logits={name: self.branch_heads[name](x) for name, x in zip(self.branch_names, probes, strict=True)},
            boxes={name: theta_to_box(theta[:, i]) for i, name in enumerate(self.box_names)},
            attention_maps=maps,
        )
