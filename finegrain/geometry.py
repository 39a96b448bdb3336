"""Boxes, points, attention transforms and the differentiable crop: every crop and box computation of finegrain.

The lowest layer: it imports torch, numpy and finegrain.errors only, so data, models, tasks and inference all
build on it. Three parts: the differentiable crop geometry (torch), box arithmetic on normalised boxes (torch),
and pixel boxes of photographs and their annotations, with the map between a photo and the network input (numpy).

Conventions of the torch part (leading batch dimensions allowed unless stated):
- box: normalised (x1, y1, x2, y2) in [0, 1] of the image, x = width (column), y = height (row), as in
  `ModelOutput.boxes`. Pixel box = box * (W, H, W, H).
- transform: (cx, cy, sx, sy) in the [-1, 1] frame of `grid_sample` with `align_corners=False`, where -1 and +1
  are the outer EDGES of the first and last pixel. (cx, cy) is the crop centre, (sx, sy) its half extents; a
  half extent is also the crop's side as a fraction of the image side, so s = 0.5 is half the image.
- theta: (B, 2, 3) affine matrix mapping OUTPUT (crop) coordinates to INPUT (image) coordinates in that frame,
  as `F.affine_grid` defines it; a transform is theta = [[sx, 0, cx], [0, sy, cy]].
A crop stays inside the image when |c| <= 1 - s on each axis.
Conventions of the numpy part: an annotation box is (x, y, w, h) in pixels, as CUB's bounding_boxes.txt;
parts are (P, 3) rows (x, y, visible); a pixel box of a photo is (x1, y1, x2, y2) with pixel EDGES as
coordinates, so (0, 0, W, H) is the whole W x H photo.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from finegrain.errors import FinegrainError

ALIGN_CORNERS = False  # pixel centres at (2i + 1) / n - 1: a box edge is a pixel edge, like slicing


# ---- Differentiable crops (torch): boxes <-> transforms <-> affine theta, bounded transforms, crop ----


def box_to_transform(boxes: Tensor) -> Tensor:
    """(..., 4) normalised xyxy boxes -> (..., 4) transforms (cx, cy, sx, sy)."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack((x1 + x2 - 1, y1 + y2 - 1, x2 - x1, y2 - y1), dim=-1)


def transform_to_box(transform: Tensor) -> Tensor:
    """(..., 4) transforms (cx, cy, sx, sy) -> (..., 4) normalised xyxy boxes."""
    cx, cy, sx, sy = transform.unbind(-1)
    return torch.stack(((cx - sx + 1) / 2, (cy - sy + 1) / 2, (cx + sx + 1) / 2, (cy + sy + 1) / 2), dim=-1)


def transform_to_theta(transform: Tensor) -> Tensor:
    """(..., 4) transforms -> (..., 2, 3) affine matrices (output -> input coordinates)."""
    cx, cy, sx, sy = transform.unbind(-1)
    zero = torch.zeros_like(cx)
    return torch.stack((sx, zero, cx, zero, sy, cy), dim=-1).unflatten(-1, (2, 3))


def theta_to_box(theta: Tensor) -> Tensor:
    """(..., 2, 3) affine matrices -> (..., 4) normalised xyxy boxes bounding the sampled region.

    For a transform's theta this is the crop itself; for a sheared theta, the box around its parallelogram.
    """
    half_extent = theta[..., :2].abs().sum(-1)  # (..., 2): |a| + |b| per output axis
    return transform_to_box(torch.cat((theta[..., 2], half_extent), dim=-1))


def check_scales(min_scale: float, max_scale: float = 1.0) -> None:
    """Raise FinegrainError unless 0 < min_scale <= max_scale <= 1 (a crop no larger than the image)."""
    if not 0 < min_scale <= max_scale <= 1:
        raise FinegrainError(
            f"min_scale {min_scale} and max_scale {max_scale} must satisfy 0 < min_scale <= max_scale <= 1 "
            "(crop side as a fraction of the image side); pick min_scale in (0, 1], e.g. 0.2"
        )


def bound_transform(raw: Tensor, min_scale: float, max_scale: float = 1.0, isotropic: bool = True,
                    aspect: float = 1.0) -> Tensor:  # fmt: skip
    """Map any network output to a transform whose crop lies inside the image, in float32.

    raw (..., 3) = (rx, ry, rs) when `isotropic`, else (..., 4) = (rx, ry, rsx, rsy). Scales are
    s = min_scale + (max_scale - min_scale) * sigmoid(rs) and centres c = (1 - s) * tanh(rc), so
    min_scale <= s <= max_scale and |c| <= 1 - s for every input, ±inf included; both are smooth with their
    steepest slope in the middle of the range. A zero output gives a centred crop of mid-range scale.

    Isotropic crops are SQUARE IN PIXELS of an image of width / height = `aspect`: s is the side as a fraction
    of the image's shorter side (so a square crop resized to a square output is not distorted). For a square
    image (aspect 1) this is sx == sy in normalised units. Non-isotropic scales are per axis.
    """
    check_scales(min_scale, max_scale)
    expected = 3 if isotropic else 4
    if raw.shape[-1] != expected:
        raise ValueError(f"raw must have {expected} values in its last dimension, got shape {tuple(raw.shape)}")
    raw = raw.float()
    scale = min_scale + (max_scale - min_scale) * torch.sigmoid(raw[..., 2:])
    if isotropic:  # half extents of a pixel square: the shorter side gets s, the longer one less
        scale = torch.cat((scale / max(aspect, 1.0), scale * min(aspect, 1.0)), dim=-1)
    centre = (1 - scale) * torch.tanh(raw[..., :2])
    return torch.cat((centre, scale), dim=-1)


def bound_affine(raw: Tensor, min_scale: float, max_scale: float = 1.0) -> Tensor:
    """Map any network output (..., 6) to a full affine theta (..., 2, 3) whose region lies inside the image.

    raw = (rx, ry, rsx, rsy, rkx, rky): per axis scales s in [min_scale, max_scale] as in `bound_transform`,
    shears k = s * (1 - s / max_scale) * tanh(rk), so the half extent s + |k| stays <= max_scale and
    det = sx * sy - kx * ky > 0 (never degenerate), and centres c = (1 - s - |k|) * tanh(rc) keep the whole
    parallelogram inside. Zero gives the centred mid-range crop of `bound_transform(isotropic=False)`.
    The |k| makes the centre bound piecewise smooth (a kink at zero shear, where the centre's own factor is 0).
    """
    check_scales(min_scale, max_scale)
    if raw.shape[-1] != 6:
        raise ValueError(f"raw must have 6 values in its last dimension, got shape {tuple(raw.shape)}")
    raw = raw.float()
    scale = min_scale + (max_scale - min_scale) * torch.sigmoid(raw[..., 2:4])
    shear = scale * (1 - scale / max_scale) * torch.tanh(raw[..., 4:6])
    centre = (1 - scale - shear.abs()) * torch.tanh(raw[..., :2])
    (cx, cy), (sx, sy), (kx, ky) = centre.unbind(-1), scale.unbind(-1), shear.unbind(-1)
    return torch.stack((sx, kx, cx, ky, sy, cy), dim=-1).unflatten(-1, (2, 3))


def sampling_grid(theta: Tensor, out_size: tuple[int, int]) -> Tensor:
    """`F.affine_grid(theta, (B, C, h, w), align_corners=False)` built as base grid @ theta^T.

    Built by hand because the TorchScript ONNX exporter has no AffineGrid; this leaves only GridSample
    (opset >= 16) in an exported graph.
    """
    h, w = out_size
    ys = (torch.arange(h, device=theta.device, dtype=theta.dtype) * 2 + 1) / h - 1
    xs = (torch.arange(w, device=theta.device, dtype=theta.dtype) * 2 + 1) / w - 1
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    base = torch.stack((grid_x, grid_y, torch.ones_like(grid_x)), dim=-1)  # (h, w, 3) homogeneous (x, y, 1)
    return (base.view(1, h * w, 3) @ theta.transpose(1, 2)).view(-1, h, w, 2)


def crop(images: Tensor, theta_or_transform: Tensor, out_size: tuple[int, int]) -> Tensor:
    """Bilinear crop of (B, C, H, W) `images` to (B, C, *out_size), differentiable in images and transform.

    Takes theta (B, 2, 3) or a transform (B, 4). Always samples the images passed in (pass the original
    full-resolution image, never an earlier crop) and always in float32, even under autocast: bf16 grid
    coordinates are off by up to half a pixel at 448 px. The result has the images' dtype.
    Out-of-image samples repeat the border pixel, so a zoom at the image edge does not fade to black.
    """
    theta = transform_to_theta(theta_or_transform) if theta_or_transform.shape[-1] == 4 else theta_or_transform
    if theta.dim() != 3 or theta.shape[-2:] != (2, 3) or theta.shape[0] != images.shape[0]:
        raise ValueError(
            f"crop needs theta (B, 2, 3) or a transform (B, 4) for {images.shape[0]} images, "
            f"got {tuple(theta_or_transform.shape)}"
        )
    device = images.device.type  # the meta device (`finegrain info` counts there) has no autocast to switch off
    no_autocast = torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device) else nullcontext()
    with no_autocast:
        grid = sampling_grid(theta.float(), out_size)
        out = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=ALIGN_CORNERS)
    return out.to(images.dtype)


def square_copy(images: Tensor, side: int | None) -> Tensor:
    """`images` (B, C, H, W) resized bilinearly to side x side: the cheap overview a localisation network or a
    coarse scale looks at, while crops are still sampled from the full-resolution `images`. None or the same
    size returns `images` itself."""
    if side is None or images.shape[-2:] == (side, side):
        return images
    return F.interpolate(images, size=(side, side), mode="bilinear", align_corners=False)


def compose_transforms(outer: Tensor, inner: Tensor) -> Tensor:
    """The crop `inner`, given in the frame of the crop `outer`, as a transform of outer's own image.

    A point u of inner's output lands at c_i + s_i * u in outer's output frame, and outer maps that to
    c_o + s_o * (c_i + s_i * u) in the image: centre c_o + s_o * c_i, half extent s_o * s_i, per axis (the
    product of the two thetas). A crop inside outer's crop stays inside the image, so a zoom into a zoom can be
    sampled once from the original image instead of resampling the resampled crop.
    """
    centre_o, scale_o = outer[..., :2], outer[..., 2:]
    centre_i, scale_i = inner[..., :2], inner[..., 2:]
    return torch.cat((centre_o + scale_o * centre_i, scale_o * scale_i), dim=-1)


# ---- Box arithmetic on normalised xyxy boxes (torch) ----


def box_centres(boxes: Tensor) -> Tensor:
    """(..., 4) xyxy boxes -> (..., 2) centres (x, y)."""
    return (boxes[..., :2] + boxes[..., 2:]) / 2


def box_extents(boxes: Tensor) -> Tensor:
    """(..., 4) xyxy boxes -> (..., 2) sides (width, height)."""
    return boxes[..., 2:] - boxes[..., :2]


def boxes_contain(boxes: Tensor, points: Tensor) -> Tensor:
    """Whether each (..., 4) xyxy box holds its (..., 2) point, edges included; the two broadcast."""
    return ((points >= boxes[..., :2]) & (points <= boxes[..., 2:])).all(dim=-1)


def mask_box(mask: Tensor) -> Tensor:
    """(B, h, w) bool masks on a grid of cells -> (B, 4) normalised xyxy boxes around each mask's cells (cell
    edges, so one cell (i, j) is (j / w, i / h, (j + 1) / w, (i + 1) / h)); an empty mask gives the whole image."""
    _, height, width = mask.shape

    def span(hit: Tensor, cells: int) -> tuple[Tensor, Tensor]:
        index = torch.arange(cells, device=mask.device)
        first = torch.where(hit, index, cells).amin(1)
        last = torch.where(hit, index, -1).amax(1)
        return first.float() / cells, (last + 1).float() / cells

    (y1, y2), (x1, x2) = span(mask.any(2), height), span(mask.any(1), width)
    boxes = torch.stack((x1, y1, x2, y2), dim=-1)
    whole = torch.tensor([0.0, 0.0, 1.0, 1.0], device=mask.device)
    return torch.where(mask.flatten(1).any(1, keepdim=True), boxes, whole)


def square_box(boxes: Tensor, min_side: float = 0.0, aspect: float = 1.0, max_side: float = 1.0) -> Tensor:
    """(..., 4) normalised xyxy boxes of an image of width / height `aspect` -> the squares (in pixels) around
    them: side the box's longer pixel side, within [min_side, max_side] of the image's shorter side, centred on
    the box and shifted to lie inside the image."""
    short = min(aspect, 1.0)  # the shorter side in units of the image height
    width, height = box_extents(boxes).unbind(-1)
    side = torch.maximum(torch.maximum(width * aspect, height), torch.full_like(height, min_side * short))
    side = side.clamp(max=max_side * short)
    half = torch.stack((side / aspect, side), dim=-1) / 2
    centre = box_centres(boxes).clamp(min=half, max=1 - half)
    return torch.cat((centre - half, centre + half), dim=-1)


def keypoint_square(points: Tensor, visible: Tensor, margin: float, min_side: float = 0.0, max_side: float = 1.0,
                    aspect: float = 1.0) -> tuple[Tensor, Tensor]:  # fmt: skip
    """The pixel square that frames each image's visible keypoints: (B, K, 2) normalised (x, y) points and (B, K)
    visibility -> ((B, 4) normalised xyxy squares, (B,) whether any point was visible).

    The visible points' bounding box, widened by `margin` (a fraction of the image's shorter side) on every side,
    made a square by `square_box` (side within [min_side, max_side] of the shorter side, inside the image). An
    image with no visible point gets the centred square of the whole image and False.
    """
    seen = visible.bool()[..., None]
    low = torch.where(seen, points, torch.ones_like(points)).amin(1)
    high = torch.where(seen, points, torch.zeros_like(points)).amax(1)
    short = min(aspect, 1.0)
    pad = torch.tensor([margin * short / aspect, margin * short], device=points.device, dtype=points.dtype)
    any_seen = seen.any(1).squeeze(-1)
    whole = torch.tensor([0.0, 0.0, 1.0, 1.0], device=points.device, dtype=points.dtype)
    boxes = torch.where(any_seen[:, None], torch.cat((low - pad, high + pad), dim=-1), whole)
    return square_box(boxes, min_side, aspect, max_side), any_seen


# ---- Pixel boxes of photographs and their annotations (numpy) ----


def box_corners(box: tuple[float, float, float, float]) -> np.ndarray:
    """An (x, y, w, h) box -> its top-left and bottom-right corners (2, 2): what rides through a transform as
    keypoints, since a transform's own box handling may drop a box that leaves the crop."""
    x, y, w, h = box
    return np.array([[x, y], [x + w, y + h]], np.float64)


def corners_to_box(corners: np.ndarray) -> np.ndarray:
    """Corner points (N, 2) -> the xyxy box they span, in whatever order they came (a mirror swaps them)."""
    return np.concatenate([corners.min(axis=0), corners.max(axis=0)])


def inside_unit_square(points: np.ndarray) -> np.ndarray:
    """(N, 2) normalised points -> (N,) whether each lies in [0, 1] x [0, 1], edges included."""
    return (points >= 0).all(axis=1) & (points <= 1).all(axis=1)


def clip_to_image(box: tuple[float, float, float, float], parts: np.ndarray, width: int,
                  height: int) -> tuple[tuple[float, float, float, float], np.ndarray, float]:  # fmt: skip
    """An (x, y, w, h) box and its visible parts clipped to a width x height photograph (the parts as a copy),
    and how far the box reached outside it in pixels (0 when inside). A box left without area keeps w or h at 0."""
    x, y, w, h = box
    x0, y0 = min(max(x, 0.0), width), min(max(y, 0.0), height)
    x1, y1 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
    overrun = max(0.0, -x, -y, x + w - width, y + h - height)
    parts = parts.copy()
    visible = parts[:, 2] > 0
    parts[visible, 0] = parts[visible, 0].clip(0, width)
    parts[visible, 1] = parts[visible, 1].clip(0, height)
    return (x0, y0, x1 - x0, y1 - y0), parts, overrun


def crop_region(image: np.ndarray, box: tuple[float, float, float, float], parts: np.ndarray, x0: int, y0: int,
                x1: int, y1: int) -> tuple[np.ndarray, tuple, np.ndarray]:  # fmt: skip
    """Pixels [x0, x1) x [y0, y1) of the image, with the (x, y, w, h) box and the parts moved into that frame
    (what falls outside is clipped, or marked invisible, by `finegrain.data.transforms.apply_transform`)."""
    x, y, w, h = box
    parts = parts.copy()
    parts[:, 0] -= x0
    parts[:, 1] -= y0
    return image[y0:y1, x0:x1], (x - x0, y - y0, w, h), parts


PAD_COLOUR = (124, 116, 104)  # ImageNet's mean colour: padding that normalises to about zero


def crop_to_box(image: np.ndarray, box: tuple[float, float, float, float], parts: np.ndarray,
                context: float = 0.0, square: bool = False) -> tuple[np.ndarray, tuple, np.ndarray]:  # fmt: skip
    """The "with boxes" setting: the whole pixels covering the (x, y, w, h) box, inside the image.

    context: grow the box by this fraction of its width and height on every side (the bird's surroundings).
    square: grow the shorter side to the longer around the box centre, padding with PAD_COLOUR where that leaves
        the image, so that an eval centre crop (with crop_pct 1) cuts nothing of the bird: its aspect is kept.
    """
    height, width = image.shape[:2]
    x, y, w, h = box
    grown_w, grown_h = w * (1 + 2 * context), h * (1 + 2 * context)
    if square:
        grown_w = grown_h = max(grown_w, grown_h)
    cx, cy = x + w / 2, y + h / 2
    x0, y0 = int(np.floor(cx - grown_w / 2)), int(np.floor(cy - grown_h / 2))
    x1, y1 = int(np.ceil(cx + grown_w / 2)), int(np.ceil(cy + grown_h / 2))
    if not square:
        return crop_region(image, box, parts, max(0, x0), max(0, y0), min(width, x1), min(height, y1))
    pad = ((max(0, -y0), max(0, y1 - height)), (max(0, -x0), max(0, x1 - width)))
    if any(p for side in pad for p in side):
        image = np.stack([np.pad(image[..., c], pad, constant_values=PAD_COLOUR[c]) for c in range(3)], axis=-1)
        (top, _), (left, _) = pad
        box, parts = (x + left, y + top, w, h), parts.copy()
        parts[:, 0] += left
        parts[:, 1] += top
        x0, x1, y0, y1 = x0 + left, x1 + left, y0 + top, y1 + top
    return crop_region(image, box, parts, x0, y0, x1, y1)


def round_box(box: tuple[float, float, float, float]) -> tuple[int, int, int, int]:
    """An xyxy pixel box with each edge at the nearest pixel edge: the pixels a crop of it takes."""
    x1, y1, x2, y2 = (round(v) for v in box)
    return x1, y1, x2, y2


# ---- Network input <-> photograph (numpy) ----


@dataclass(frozen=True)
class InputFrame:
    """Where a network input lies in a photograph: input pixel = photo pixel * scale + shift, per axis (x, y).

    Read off where the eval transform carries the photo's corners (`frame_from_corners`), so it is that
    transform's own map of points, the one training annotations take.
    """

    scale: tuple[float, float]
    shift: tuple[float, float]
    size: tuple[int, int]  # the input's (width, height) in pixels
    photo_size: tuple[int, int]  # the photograph's (width, height)


def photo_corners(width: int, height: int) -> np.ndarray:
    """The corners (0, 0), (w, 0), (0, h), (w, h) of a width x height photograph, (4, 2)."""
    return np.array([[0, 0], [width, 0], [0, height], [width, height]], np.float64)


def frame_from_corners(corners: np.ndarray, photo_size: tuple[int, int], input_size: tuple[int, int],
                       atol: float = 1e-3) -> InputFrame:  # fmt: skip
    """The InputFrame of a photo whose `photo_corners` land at `corners` (4, 2) in input pixels.

    Raises ValueError unless the four make an upright rectangle in their own order, within `atol` input pixels
    (a transform that mirrors, rotates or shears has no frame of this kind).
    """
    corners = np.asarray(corners, np.float64).reshape(4, 2)
    size = np.asarray(photo_size, np.float64)
    scale = (corners[3] - corners[0]) / size
    if not (scale > 0).all() or not np.allclose(corners, corners[0] + photo_corners(*photo_size) * scale, atol=atol):
        raise ValueError(f"the photo's corners land at {corners.tolist()}: not the upright rectangle of a resize "
                         "and crop, so no input frame maps boxes back")  # fmt: skip
    return InputFrame(scale=(float(scale[0]), float(scale[1])), shift=(float(corners[0, 0]), float(corners[0, 1])),
                      size=(int(input_size[0]), int(input_size[1])),
                      photo_size=(int(photo_size[0]), int(photo_size[1])))  # fmt: skip


def input_box_to_photo(box: np.ndarray, frame: InputFrame) -> np.ndarray:
    """A normalised xyxy box of the network input -> xyxy pixels of the photo, clipped to the photo."""
    size, scale, shift = (np.tile(np.asarray(v, np.float64), 2) for v in (frame.size, frame.scale, frame.shift))
    pixels = (np.asarray(box, np.float64) * size - shift) / scale
    return np.clip(pixels, 0.0, np.tile(np.asarray(frame.photo_size, np.float64), 2))
