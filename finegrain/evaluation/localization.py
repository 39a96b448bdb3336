"""Localisation against the ground truth: do a branch's boxes sit on the bird, and on which part?

Every figure comes with its chance level: the same score for a box of the same size placed uniformly at random
inside the image (computed exactly, not sampled), so "part 1 contains the crown 80% of the time" can be read
against what a box that size gets by luck.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from finegrain.data.cub import PART_NAMES
from finegrain.geometry import box_centres, box_extents, boxes_contain


def placement_chance(extent: Tensor, low: Tensor, high: Tensor) -> Tensor:
    """Probability that a box of `extent` (one axis, normalised), placed uniformly inside [0, 1], has its centre
    in [low, high]. A full-width box has one placement (centre 0.5): 1 or 0."""
    start, end = extent / 2, 1 - extent / 2
    overlap = (torch.minimum(end, high) - torch.maximum(start, low)).clamp(min=0)
    fixed = ((low <= 0.5) & (high >= 0.5)).float()
    room = end - start
    return torch.where(room > 1e-6, overlap / room.clamp(min=1e-6), fixed)


def box_statistics(boxes: Tensor) -> dict[str, Tensor]:
    """Collapse guard for (B, 4) normalised xyxy boxes: mean side (sqrt of area; 1 = the whole image, a zoom
    fading away) and the spread of centres over the batch (0 = the same box for every image)."""
    sides = box_extents(boxes).prod(dim=-1).clamp(min=0).sqrt()
    centres = box_centres(boxes)
    spread = centres.var(dim=0, unbiased=False).sum().sqrt() if len(boxes) > 1 else boxes.new_zeros(())
    return {"side": sides.mean(), "centre_spread": spread}


def holds_any_chance(extent: Tensor, points: Tensor, seen: Tensor, grid: int = 64) -> Tensor:
    """Probability that a box of `extent` (B, 2), placed uniformly inside the image, holds at least one of the
    seen points (B, K, 2): the share of a grid x grid lattice of the box's possible centres (a quadrature, exact to
    about 1 / grid) whose box holds one."""
    steps = (torch.arange(grid, device=extent.device, dtype=extent.dtype) + 0.5) / grid  # (G,)
    low, room = extent / 2, (1 - extent).clamp(min=0)  # centres run over [e/2, 1 - e/2] on each axis
    centres = low[:, None, :] + room[:, None, :] * steps[None, :, None]  # (B, G, 2): per-axis lattice
    near = (points[:, None, :, :] - centres[:, :, None, :]).abs() <= extent[:, None, None, :] / 2  # (B, G, K, 2)
    near = near & seen[:, None, :, None]
    holds = (near[..., 0][:, :, None, :] & near[..., 1][:, None, :, :]).any(-1)  # (B, Gx, Gy)
    return holds.float().mean((1, 2))


class LocalizationScore(Metric):
    """Scores of one branch's boxes against the bird box and the 15 CUB part points, with chance levels.

    update(boxes, bird_boxes, parts, visible): (B, 4) predicted and ground-truth normalised xyxy boxes, (B, P, 2)
    normalised part points and (B, P) their visibility. compute() gives:
      centre_in_bird: share of boxes whose centre lies inside the bird box (a part box should);
      contains_bird_centre: share of boxes that contain the bird box's centre (a zoom on the bird should);
      contains_<part>: share of boxes containing that part's point, over the images where it is visible;
      holds_region (with `region`, the CUB parts of a body region such as the head): share of boxes holding at
        least one visible point of the region, over the images where one is visible;
    and each with a `_chance` twin.
    """

    full_state_update = False

    def __init__(self, part_names: tuple[str, ...] = PART_NAMES, region: tuple[str, ...] | None = None):
        super().__init__()
        self.part_names = part_names
        self.region = [part_names.index(name) for name in region] if region else []
        self.add_state("region_hits", torch.zeros(2), dist_reduce_fx="sum")  # (hits, chance) summed over images
        self.add_state("region_count", torch.zeros(()), dist_reduce_fx="sum")
        for name in ("centre_in_bird", "contains_bird_centre"):
            self.add_state(name, torch.zeros(2), dist_reduce_fx="sum")  # (hits, chance) summed over images
        self.add_state("count", torch.zeros(()), dist_reduce_fx="sum")
        self.add_state("part_hits", torch.zeros(2, len(part_names)), dist_reduce_fx="sum")
        self.add_state("part_count", torch.zeros(len(part_names)), dist_reduce_fx="sum")

    def update(self, boxes: Tensor, bird_boxes: Tensor, parts: Tensor, visible: Tensor) -> None:
        boxes, bird_boxes, parts = boxes.float(), bird_boxes.float(), parts.float()
        extent = box_extents(boxes)  # (B, 2) width, height
        centre, bird_centre = box_centres(boxes), box_centres(bird_boxes)

        inside = boxes_contain(bird_boxes, centre).float()
        chance = placement_chance(extent, bird_boxes[:, :2], bird_boxes[:, 2:]).prod(dim=1)
        self.centre_in_bird += torch.stack((inside.sum(), chance.sum()))

        contains = boxes_contain(boxes, bird_centre).float()
        chance = placement_chance(extent, bird_centre - extent / 2, bird_centre + extent / 2).prod(dim=1)
        self.contains_bird_centre += torch.stack((contains.sum(), chance.sum()))
        self.count += len(boxes)

        seen = visible.float()  # (B, P)
        hits = boxes_contain(boxes[:, None], parts).float()
        half = extent[:, None] / 2
        chance = placement_chance(extent[:, None].expand_as(parts), parts - half, parts + half).prod(dim=-1)
        self.part_hits += torch.stack(((hits * seen).sum(0), (chance * seen).sum(0)))
        self.part_count += seen.sum(0)

        if self.region:
            seen_in_region = visible[:, self.region].bool()
            counted = seen_in_region.any(1)
            holds = (hits[:, self.region].bool() & seen_in_region).any(1)
            chance = holds_any_chance(extent, parts[:, self.region], seen_in_region)
            self.region_hits += torch.stack((holds.float().sum(), (chance * counted).sum()))  # holds implies counted
            self.region_count += counted.sum()

    def compute(self) -> dict[str, Tensor]:
        scores = {}
        for name in ("centre_in_bird", "contains_bird_centre"):
            hits, chance = getattr(self, name) / self.count.clamp(min=1)
            scores[name], scores[f"{name}_chance"] = hits, chance
        per_part = self.part_hits / self.part_count.clamp(min=1)
        for i, part in enumerate(self.part_names):
            if self.part_count[i] > 0:
                key = "contains_" + part.replace(" ", "_")
                scores[key], scores[f"{key}_chance"] = per_part[0, i], per_part[1, i]
        if self.region:
            scores["holds_region"], scores["holds_region_chance"] = self.region_hits / self.region_count.clamp(min=1)
        return scores
