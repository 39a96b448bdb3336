"""Boxes, attention transforms and the differentiable crop: the one implementation every crop in finegrain uses.

Conventions (all tensors, leading batch dimensions allowed unless stated):
- box: normalised (x1, y1, x2, y2) in [0, 1] of the image, x = width (column), y = height (row), as in
  `ModelOutput.boxes`. Pixel box = box * (W, H, W, H).
- transform: (cx, cy, sx, sy) in the [-1, 1] frame of `grid_sample` with `align_corners=False`, where -1 and +1
  are the outer EDGES of the first and last pixel. (cx, cy) is the crop centre, (sx, sy) its half extents; a
  half extent is also the crop's side as a fraction of the image side, so s = 0.5 is half the image.
- theta: (B, 2, 3) affine matrix mapping OUTPUT (crop) coordinates to INPUT (image) coordinates in that frame,
  as `F.affine_grid` defines it; a transform is theta = [[sx, 0, cx], [0, sy, cy]].
A crop stays inside the image when |c| <= 1 - s on each axis.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor

from finegrain.errors import FinegrainError

ALIGN_CORNERS = False  # pixel centres at (2i + 1) / n - 1: a box edge is a pixel edge, like slicing


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


BOX_GRADIENTS = ("autograd", "finite-difference")


def check_box_gradient(method: str, box_gradient: str, box_step: float) -> None:
    """Raise FinegrainError unless `box_gradient` is one of BOX_GRADIENTS and `box_step` is positive."""
    if box_gradient not in BOX_GRADIENTS:
        raise FinegrainError(f"{method} box_gradient {box_gradient!r} is unknown; choose one of {BOX_GRADIENTS}")
    if not box_step > 0:
        raise FinegrainError(f"{method} box_step must be positive (a raw step, e.g. 0.3), got {box_step}")


def finite_difference_term(raw: Tensor, step: float, loss_at: Callable[[Tensor], Tensor]) -> Tensor:
    """A term whose gradient gives `raw` (B, P), per image, the central differences of a per-image loss.

    `loss_at(moved)` -> (B,) is that loss with the raw box parameters at `moved` (B, P); it is called 2P times,
    without gradient, with one parameter at a time moved by ± `step` (in float32: a bf16 raw + step is off by
    up to 1 %). d = (loss(r + step) - loss(r - step)) / (2 step); the term is sum(d * (raw - raw.detach())) / B:
    zero in value, and its gradient reaches whatever produced `raw` as d. This is `box_gradient:
    finite-difference`: the autograd box gradient of a CNN classifier points toward the bird no more often
    than a coin flip, these differences do in 65-71 % of images (docs/benchmarks.md, "Which way is the bird?").
    """
    raw = raw.float()
    slopes = torch.zeros_like(raw)
    with torch.no_grad():
        for param in range(raw.shape[-1]):
            offset = torch.zeros_like(raw)
            offset[:, param] = step
            slopes[:, param] = (loss_at(raw + offset) - loss_at(raw - offset)) / (2 * step)
    return (slopes * (raw - raw.detach())).sum() / len(raw)


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
