"""The one geometry module: crop conventions, bounds, gradients and precision; pixel boxes and the input frame."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from finegrain.errors import FinegrainError
from finegrain.geometry import (
    PAD_COLOUR,
    bound_affine,
    bound_transform,
    box_to_transform,
    boxes_contain,
    clip_to_image,
    crop,
    crop_to_box,
    frame_from_corners,
    input_box_to_photo,
    photo_corners,
    sampling_grid,
    theta_to_box,
    transform_to_box,
    transform_to_theta,
)

H, W = 40, 64  # non-square, so a swapped x/y cannot pass


@pytest.fixture
def image() -> torch.Tensor:
    return torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    ("pixel_box", "out_size"),
    [
        ((16, 8, 48, 28), (10, 16)),  # 2x down on both axes
        ((16, 8, 48, 28), (8, 12)),  # non-integer factors, different per axis
        ((0, 0, W, H), (H, W)),  # identity
        ((0, 0, W, H), (2 * H + 3, 2 * W - 5)),  # up-sampling reaches past pixel centres: border clamp
    ],
)
def test_crop_equals_slice_and_resize(image, pixel_box, out_size):
    # With align_corners=False both sample output pixel j at x1 + (j + 0.5) * n / out - 0.5 input pixels. When
    # down-sampling those points lie inside the slice, so the two agree up to float32 rounding of the coordinates
    # (1e-5 of the unit pixel range). Up-sampling the whole image samples past the outer pixel centres, where
    # grid_sample's border padding and interpolate's clamp both repeat the edge pixel.
    px1, py1, px2, py2 = pixel_box
    box = torch.tensor([[px1 / W, py1 / H, px2 / W, py2 / H]])
    expected = F.interpolate(image[:, :, py1:py2, px1:px2], size=out_size, mode="bilinear", align_corners=False)
    torch.testing.assert_close(crop(image, box_to_transform(box), out_size), expected, atol=1e-5, rtol=0)


def test_conversions_round_trip():
    gen = torch.Generator().manual_seed(1)
    corners = torch.rand(50, 2, 2, generator=gen).sort(dim=1).values  # (x1, y1) <= (x2, y2)
    boxes = corners.flatten(1)
    transform = box_to_transform(boxes)
    torch.testing.assert_close(transform_to_box(transform), boxes)
    torch.testing.assert_close(theta_to_box(transform_to_theta(transform)), boxes)
    torch.testing.assert_close(box_to_transform(torch.tensor([0.0, 0.0, 1.0, 1.0])), torch.tensor([0.0, 0, 1, 1]))
    theta = transform_to_theta(torch.tensor([[0.1, -0.2, 0.3, 0.4]]))
    torch.testing.assert_close(theta, torch.tensor([[[0.3, 0.0, 0.1], [0.0, 0.4, -0.2]]]))


def _wild_raw(n: int, width: int) -> torch.Tensor:
    """Network outputs of every magnitude from 1e-3 to 1e30, both signs, plus ±inf."""
    gen = torch.Generator().manual_seed(2)
    magnitude = 10.0 ** torch.randint(-3, 31, (n, width), generator=gen)
    raw = torch.randn(n, width, generator=gen) * magnitude
    return torch.cat((raw, torch.full((1, width), float("inf")), torch.full((1, width), -float("inf"))))


def _assert_inside(boxes: torch.Tensor):
    # 1e-6: (1 - s) + s may round one float32 ulp past 1
    assert torch.isfinite(boxes).all()
    assert (boxes >= -1e-6).all() and (boxes <= 1 + 1e-6).all()


@pytest.mark.parametrize("aspect", [1.0, W / H, H / W])
def test_bound_transform_isotropic_is_a_pixel_square_inside_the_image(aspect):
    transform = bound_transform(_wild_raw(500, 3), min_scale=0.2, max_scale=0.9, aspect=aspect)
    boxes = transform_to_box(transform)
    _assert_inside(boxes)
    width, height = transform[:, 2] * aspect, transform[:, 3]  # sides in units of the image height
    torch.testing.assert_close(width, height)
    shorter_side_fraction = torch.minimum(transform[:, 2], transform[:, 3]) * max(aspect, 1 / aspect)
    assert (shorter_side_fraction >= 0.2 - 1e-6).all() and (shorter_side_fraction <= 0.9 + 1e-6).all()


def test_bound_transform_per_axis_bounds():
    transform = bound_transform(_wild_raw(500, 4), min_scale=0.3, isotropic=False)
    _assert_inside(transform_to_box(transform))
    assert (transform[:, 2:] >= 0.3 - 1e-6).all() and (transform[:, 2:] <= 1 + 1e-6).all()
    assert (transform[:, 2] != transform[:, 3]).any()  # the axes are free


def test_bound_transform_zero_is_centred_mid_scale():
    transform = bound_transform(torch.zeros(2, 3), min_scale=0.2)
    torch.testing.assert_close(transform, torch.tensor([[0.0, 0.0, 0.6, 0.6]] * 2))


def test_bound_affine_keeps_the_parallelogram_inside():
    theta = bound_affine(_wild_raw(500, 6), min_scale=0.2)
    _assert_inside(theta_to_box(theta))
    corners = torch.tensor([[-1.0, -1, 1], [1, -1, 1], [-1, 1, 1], [1, 1, 1]])  # output corners (x, y, 1)
    mapped = corners @ theta.transpose(1, 2)  # (N, 4, 2) corners in the image
    assert (mapped.abs() <= 1 + 1e-6).all()
    half_extent = theta[..., :2].abs().sum(-1)
    assert (half_extent >= 0.2 - 1e-6).all()
    assert (torch.linalg.det(theta[..., :2]) > 0).all()  # never collapses to a line
    centred = transform_to_theta(torch.tensor([[0.0, 0.0, 0.6, 0.6]]))
    torch.testing.assert_close(bound_affine(torch.zeros(1, 6), 0.2), centred)


def test_bad_scales_raise():
    with pytest.raises(FinegrainError, match="min_scale"):
        bound_transform(torch.zeros(1, 3), min_scale=0.0)
    with pytest.raises(FinegrainError, match="min_scale"):
        bound_affine(torch.zeros(1, 6), min_scale=0.5, max_scale=1.5)


@pytest.mark.parametrize(("bound", "width"), [(bound_transform, 3), (bound_affine, 6)])
def test_gradient_reaches_every_transform_parameter(image, bound, width):
    raw = (0.3 * torch.randn(2, width, generator=torch.Generator().manual_seed(3))).requires_grad_()
    images = image.expand(2, -1, -1, -1).clone().requires_grad_()
    weight = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(4))
    theta = bound(raw, 0.2)
    theta = transform_to_theta(theta) if theta.shape[-1] == 4 else theta
    (crop(images, theta, (12, 12)) * weight).sum().backward()
    assert torch.isfinite(raw.grad).all() and (raw.grad.abs() > 1e-6).all()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


def test_crop_samples_in_float32_under_bf16_autocast(image):
    theta = transform_to_theta(torch.tensor([[0.113, -0.071, 0.517, 0.389]]))
    expected = crop(image, theta, (33, 47))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast_result = crop(image, theta, (33, 47))
        bf16_images = crop(image.bfloat16(), theta, (33, 47))
    assert autocast_result.dtype == torch.float32
    torch.testing.assert_close(autocast_result, expected, atol=1e-6, rtol=0)
    assert bf16_images.dtype == torch.bfloat16  # the images' dtype, sampled in float32 then rounded once
    torch.testing.assert_close(bf16_images, F.grid_sample(image.bfloat16().float(), sampling_grid(theta, (33, 47)),
                               padding_mode="border", align_corners=False).bfloat16())  # fmt: skip
    # the check has teeth: a bf16 grid moves samples enough to change the crop well past float32 rounding
    bf16_grid = sampling_grid(theta.bfloat16(), (33, 47)).float()
    coarse = F.grid_sample(image, bf16_grid, padding_mode="border", align_corners=False)
    assert (coarse - expected).abs().max() > 1e-3


def test_sampling_grid_equals_affine_grid():
    theta = torch.randn(3, 2, 3, generator=torch.Generator().manual_seed(5))
    expected = F.affine_grid(theta, [3, 1, 7, 11], align_corners=False)
    torch.testing.assert_close(sampling_grid(theta, (7, 11)), expected, atol=1e-6, rtol=0)


def test_box_gradient_is_the_derivative_of_the_crop():
    """The gradient the localisation learns from equals finite differences of the crop, on a smooth image (a
    bilinear crop is piecewise linear in the box; smooth content keeps the kinks small)."""
    ys, xs = torch.meshgrid(torch.linspace(0, 1, 24), torch.linspace(0, 1, 32), indexing="ij")
    image = torch.stack([torch.sin(3 * xs + 2 * ys), torch.cos(4 * ys - xs), xs * ys])[None]  # (1, 3, 24, 32)
    weight = torch.rand(1, 3, 10, 10, generator=torch.Generator().manual_seed(5))

    def objective(raw: torch.Tensor) -> torch.Tensor:
        transform = bound_transform(raw, 0.2, 0.9, aspect=32 / 24)
        return (crop(image, transform_to_theta(transform), (10, 10)) * weight).sum()

    raw = torch.tensor([[0.3, -0.4, 0.2]], requires_grad=True)
    objective(raw).backward()
    step = 1e-2
    finite = torch.tensor([
        (objective(raw.detach() + step * e) - objective(raw.detach() - step * e)).item() / (2 * step)
        for e in torch.eye(3)[:, None]
    ])  # fmt: skip
    torch.testing.assert_close(raw.grad[0], finite, rtol=0.02, atol=1e-3)


def test_boxes_contain_their_edges():
    boxes = torch.tensor([[0.2, 0.2, 0.6, 0.8]])
    points = torch.tensor([[0.2, 0.8], [0.4, 0.5], [0.61, 0.5], [0.4, 0.1]])
    assert boxes_contain(boxes, points).tolist() == [True, True, False, False]


def test_clip_to_image_clips_the_box_and_the_visible_parts_and_says_by_how_much():
    parts = np.array([[-3.0, 5.0, 1.0], [70.0, 50.0, 1.0], [0.0, 0.0, 0.0]], np.float32)
    box, clipped, overrun = clip_to_image((-2.0, 10.0, 30.0, 35.0), parts, width=60, height=40)
    assert box == (0.0, 10.0, 28.0, 30.0) and overrun == 5.0  # 10 + 35 = 45 reaches 5 px past the bottom
    np.testing.assert_array_equal(clipped, [[0, 5, 1], [60, 40, 1], [0, 0, 0]])
    assert parts[0, 0] == -3.0  # the caller's parts are left as they were
    assert clip_to_image((1.0, 2.0, 3.0, 4.0), parts, 60, 40)[2] == 0.0


def test_crop_to_box_takes_the_whole_pixels_under_the_box_and_moves_the_annotations():
    image = np.arange(40 * 60 * 3, dtype=np.uint8).reshape(40, 60, 3)
    parts = np.array([[20.0, 15.0, 1.0]], np.float32)
    region, box, moved = crop_to_box(image, (10.5, 5.2, 20.0, 40.0), parts)
    np.testing.assert_array_equal(region, image[5:40, 10:31])  # floor/ceil of the edges, inside the image
    assert box == pytest.approx((0.5, 0.2, 20.0, 40.0))
    np.testing.assert_array_equal(moved, [[10, 10, 1]])


def test_crop_to_box_with_context_grows_the_box_on_every_side_inside_the_image():
    image = np.arange(40 * 60 * 3, dtype=np.uint8).reshape(40, 60, 3)
    parts = np.array([[20.0, 15.0, 1.0]], np.float32)
    # 20 x 10 box at (20, 10): a quarter more on each side is 5 px left and right, 2.5 px up and down
    region, box, moved = crop_to_box(image, (20.0, 10.0, 20.0, 10.0), parts, context=0.25)
    np.testing.assert_array_equal(region, image[7:23, 15:45])  # y 7.5 -> 7, 22.5 -> 23
    assert box == pytest.approx((5.0, 3.0, 20.0, 10.0))
    np.testing.assert_array_equal(moved, [[5, 8, 1]])
    # at the photo's edge the grown box stops at the edge
    region, box, _ = crop_to_box(image, (0.0, 0.0, 20.0, 10.0), parts, context=0.5)
    np.testing.assert_array_equal(region, image[0:15, 0:30])
    assert box == (0.0, 0.0, 20.0, 10.0)


def test_crop_to_box_square_keeps_the_aspect_and_pads_outside_the_photo():
    image = np.full((40, 60, 3), 7, np.uint8)
    parts = np.array([[10.0, 20.0, 1.0], [0.0, 0.0, 0.0]], np.float32)
    # a 10 wide, 30 tall box at (5, 5): a 30 x 30 square around its centre (10, 20) spans x -5..25, y 5..35
    region, box, moved = crop_to_box(image, (5.0, 5.0, 10.0, 30.0), parts, square=True)
    assert region.shape == (30, 30, 3)
    np.testing.assert_array_equal(region[:, :5], np.broadcast_to(PAD_COLOUR, (30, 5, 3)))  # the 5 px left of x 0
    assert (region[:, 5:] == 7).all()
    assert box == (10.0, 0.0, 10.0, 30.0)  # the box now starts 10 px into the square, at its top
    np.testing.assert_array_equal(moved, [[15, 15, 1], [5, -5, 0]])
    assert crop_to_box(image, (20.0, 10.0, 20.0, 10.0), parts, context=0.25, square=True)[0].shape == (30, 30, 3)


def test_input_frame_from_corners_maps_input_boxes_back_and_refuses_a_mirror():
    width, height = 400, 300
    corners = photo_corners(width, height) * 0.5 - np.array([30.0, 5.0])  # half size, cropped at (30, 5)
    frame = frame_from_corners(corners, (width, height), (100, 100))
    assert frame.scale == (0.5, 0.5) and frame.shift == (-30.0, -5.0)
    np.testing.assert_allclose(input_box_to_photo(np.array([0.0, 0.0, 0.5, 1.0]), frame), [60, 10, 160, 210])
    np.testing.assert_allclose(input_box_to_photo(np.array([-1.0, 0.0, 9.0, 1.0]), frame), [0, 10, 400, 210])
    with pytest.raises(ValueError, match="upright rectangle"):
        frame_from_corners(corners[[1, 0, 3, 2]], (width, height), (100, 100))
