"""The image decoding path: every mode, orientation and broken file, pinned to exact pixels and messages."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile
from PIL.JpegImagePlugin import JpegImageFile

from finegrain.data.images import ImageDecodeError, check_image, decode_photo, image_size, load_rgb
from finegrain.errors import FinegrainError
from tests.conftest import CUB_ROOT, needs_cub

GREY, RED, GREEN = (100, 100, 100), (255, 0, 0), (0, 255, 0)


def marked(width: int = 30, height: int = 20, block: int = 1) -> np.ndarray:
    """Grey image with a red block at the top-left and a green block at the top-right corner."""
    pixels = np.full((height, width, 3), GREY, np.uint8)
    pixels[:block, :block] = RED
    pixels[:block, -block:] = GREEN
    return pixels


def save_oriented(path: Path, pixels: np.ndarray, orientation: int, **kwargs) -> Path:
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = orientation
    image.save(path, exif=exif, **kwargs)
    return path


def corners(rgb: np.ndarray) -> dict[str, tuple[int, ...]]:
    picks = {"TL": (0, 0), "TR": (0, -1), "BL": (-1, 0), "BR": (-1, -1)}
    return {name: tuple(rgb[at].tolist()) for name, at in picks.items()}


def broken_jpeg(path: Path, size: tuple[int, int] = (64, 48)) -> Path:
    """A noisy JPEG cut in half, so the decoder runs out of data mid-image."""
    buffer = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(noise).save(buffer, "JPEG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return path


# Where the stored top-left (red) and top-right (green) corners appear once upright, per the EXIF spec.
ORIENTED_CORNERS = {
    1: ("TL", "TR"), 2: ("TR", "TL"), 3: ("BR", "BL"), 4: ("BL", "BR"),
    5: ("TL", "BL"), 6: ("TR", "BR"), 7: ("BR", "TR"), 8: ("BL", "TL"),
}  # fmt: skip


@pytest.mark.parametrize("orientation", sorted(ORIENTED_CORNERS))
def test_exif_orientation_all_eight(tmp_path, orientation):
    path = save_oriented(tmp_path / "o.png", marked(), orientation)
    rgb = load_rgb(path)
    upright = (30, 20) if orientation >= 5 else (20, 30)
    assert rgb.shape == (*upright, 3)
    assert image_size(path) == (upright[1], upright[0])
    red_at, green_at = ORIENTED_CORNERS[orientation]
    assert corners(rgb)[red_at] == RED and corners(rgb)[green_at] == GREEN
    assert sum(corner == GREY for corner in corners(rgb).values()) == 2


@pytest.mark.parametrize("orientation", [6, 3])
def test_exif_orientation_jpeg(tmp_path, orientation):
    path = save_oriented(tmp_path / "o.jpg", marked(48, 32, block=8), orientation, quality=95)
    rgb = load_rgb(path).astype(int)
    upright = (48, 32) if orientation == 6 else (32, 48)
    assert rgb.shape == (*upright, 3) and image_size(path) == (upright[1], upright[0])
    # The centre of each 8x8 corner block, away from JPEG ringing at its edges.
    centres = {"TL": rgb[4, 4], "TR": rgb[4, -5], "BL": rgb[-5, 4], "BR": rgb[-5, -5]}
    red_at, green_at = ORIENTED_CORNERS[orientation]
    assert np.abs(centres[red_at] - RED).max() <= 12 and np.abs(centres[green_at] - GREEN).max() <= 12


def test_output_contract(tmp_path):
    path = tmp_path / "rgb.png"
    Image.fromarray(marked()).save(path)
    rgb = load_rgb(path)
    assert rgb.dtype == np.uint8 and rgb.shape == (20, 30, 3)
    assert rgb.flags.c_contiguous and rgb.flags.writeable
    np.testing.assert_array_equal(rgb, marked())


@pytest.mark.parametrize(
    ("mode", "value", "expected"),
    [("L", 77, (77, 77, 77)), ("1", 1, (255, 255, 255)), ("1", 0, (0, 0, 0)), ("RGB", (1, 2, 3), (1, 2, 3))],
)
def test_plain_modes(tmp_path, mode, value, expected):
    path = tmp_path / f"{mode}.png"
    Image.new(mode, (5, 4), value).save(path)
    rgb = load_rgb(path)
    assert rgb.shape == (4, 5, 3) and tuple(rgb[2, 3]) == expected


def test_palette(tmp_path):
    image = Image.new("P", (4, 2))
    image.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    image.putpixel((1, 0), 1)
    image.save(tmp_path / "p.png")
    rgb = load_rgb(tmp_path / "p.png")
    assert tuple(rgb[0, 1]) == (10, 200, 30) and tuple(rgb[0, 0]) == (0, 0, 0)


def test_palette_transparency_over_white(tmp_path):
    image = Image.new("P", (4, 2))
    image.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    image.putpixel((1, 0), 1)
    image.info["transparency"] = 0  # index 0 (black) is transparent
    image.save(tmp_path / "pt.png")
    with Image.open(tmp_path / "pt.png") as reopened:
        assert reopened.mode == "P" and "transparency" in reopened.info
    rgb = load_rgb(tmp_path / "pt.png")
    assert tuple(rgb[0, 0]) == (255, 255, 255) and tuple(rgb[0, 1]) == (10, 200, 30)


def test_rgba_and_la_composite_over_white(tmp_path):
    rgba = Image.new("RGBA", (3, 1))
    for x, pixel in enumerate([(10, 20, 30, 0), (255, 0, 0, 128), (10, 20, 30, 255)]):
        rgba.putpixel((x, 0), pixel)
    rgba.save(tmp_path / "rgba.png")
    assert load_rgb(tmp_path / "rgba.png")[0].tolist() == [[255, 255, 255], [255, 127, 127], [10, 20, 30]]
    Image.new("LA", (2, 2), (0, 0)).save(tmp_path / "la.png")
    assert load_rgb(tmp_path / "la.png").min() == 255


def test_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    with Image.open(tmp_path / "cmyk.jpg") as reopened:
        assert reopened.mode == "CMYK"
    rgb = load_rgb(tmp_path / "cmyk.jpg").astype(int)
    assert np.abs(rgb[8, 8] - RED).max() <= 3


def test_16_bit_keeps_top_byte_instead_of_clipping(tmp_path):
    values = np.array([[0, 255, 256, 40000, 65535]], np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as reopened:
        assert reopened.mode == "I;16"
    assert load_rgb(tmp_path / "g16.png")[0, :, 0].tolist() == [0, 0, 1, 156, 255]
    Image.fromarray(values).save(tmp_path / "g16.pgm")  # PIL decodes 16-bit PGM as mode "I"
    with Image.open(tmp_path / "g16.pgm") as reopened:
        assert reopened.mode == "I"
    assert load_rgb(tmp_path / "g16.pgm")[0, :, 0].tolist() == [0, 0, 1, 156, 255]


def test_mode_i_saturates_outside_16_bits():
    image = Image.fromarray(np.array([[-5, 70000, 512]], np.int32))
    assert image.mode == "I"
    assert load_rgb(image)[0, :, 0].tolist() == [0, 255, 2]


def test_float_mode_is_0_to_255_rounded_and_clipped():
    image = Image.fromarray(np.array([[0.4, 0.6, 127.5, 254.5, 300.0, -3.0, np.nan]], np.float32))
    assert image.mode == "F"
    assert load_rgb(image)[0, :, 0].tolist() == [0, 1, 128, 254, 255, 0, 0]


def test_pil_input_is_left_unchanged(tmp_path):
    path = save_oriented(tmp_path / "o.png", marked(), 6)
    with Image.open(path) as image:
        assert load_rgb(image).shape == (30, 20, 3)
        assert image.size == (30, 20) and image.getexif()[0x0112] == 6


@pytest.mark.parametrize(
    ("array", "expected"),
    [
        (np.full((2, 3), 9, np.uint8), (9, 9, 9)),
        (np.full((2, 3, 1), 9, np.uint8), (9, 9, 9)),
        (np.full((2, 3, 3), (1, 2, 3), np.uint8), (1, 2, 3)),
        (np.full((2, 3, 4), (1, 2, 3, 0), np.uint8), (255, 255, 255)),
        (np.full((2, 3, 4), (1, 2, 3, 255), np.uint8), (1, 2, 3)),
        (np.full((2, 3), 40000, np.uint16), (156, 156, 156)),
        (np.full((2, 3, 3), (0.0, 0.5, 1.0), np.float32), (0, 128, 255)),
        (np.full((2, 3), 0.2, np.float64), (51, 51, 51)),
    ],
)
def test_numpy_forms(array, expected):
    rgb = load_rgb(array)
    assert rgb.shape == (2, 3, 3) and rgb.dtype == np.uint8 and rgb.flags.c_contiguous
    assert tuple(rgb[1, 2]) == expected
    assert not np.shares_memory(rgb, array)


def test_numpy_non_contiguous_view():
    pixels = marked()
    np.testing.assert_array_equal(load_rgb(pixels[:, ::-1]), pixels[:, ::-1])


@pytest.mark.parametrize(
    ("array", "problem"),
    [
        (np.zeros((2, 3, 2), np.uint8), "shape (2, 3, 2) is not an image"),
        (np.zeros((2, 3, 3, 1), np.uint8), "shape (2, 3, 3, 1) is not an image"),
        (np.zeros((0, 3), np.uint8), "shape (0, 3) is not an image"),
        (np.zeros((2, 3), np.int64), "unsupported dtype int64"),
        (np.zeros((2, 3), bool), "unsupported dtype bool"),
        (np.full((2, 3), 255.0), "float pixels outside [0, 1]"),
        (np.full((2, 3), np.nan), "float pixels outside [0, 1]"),
    ],
)
def test_numpy_errors(array, problem):
    with pytest.raises(ImageDecodeError) as info:
        load_rgb(array)
    assert info.value.problem == problem and str(info.value).startswith(f"<array>: {problem}; ")


def test_bytes_input(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(marked()).save(buffer, "PNG")
    np.testing.assert_array_equal(load_rgb(buffer.getvalue()), marked())
    with pytest.raises(ImageDecodeError, match=r"^<bytes>: empty file; "):
        load_rgb(b"")
    with pytest.raises(ImageDecodeError, match=r"^<bytes>: not an image; "):
        load_rgb(b"hello")


def test_wrong_source_type_is_a_type_error():
    with pytest.raises(TypeError, match="not int"):
        load_rgb(3)


def test_truncated_jpeg(tmp_path):
    path = broken_jpeg(tmp_path / "cut.jpg")
    with pytest.raises(ImageDecodeError) as info:
        load_rgb(path)
    assert info.value.problem == "truncated" and str(info.value).startswith(f"{path}: truncated; ")
    assert info.value.kind == "unreadable"
    assert isinstance(info.value, FinegrainError)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    assert image_size(path) == (64, 48)  # the header is intact, and image_size reads nothing else


@pytest.mark.parametrize(
    ("make", "problem", "kind"),
    [
        (lambda p: p.write_text("not a photo\n"), "not an image", "not_image"),
        (lambda p: p.write_bytes(b""), "empty file", "unreadable"),
        (lambda p: None, "no such file", "unreadable"),
        (lambda p: p.mkdir(), "cannot read (Is a directory)", "unreadable"),
    ],
)
def test_unreadable_files_name_the_path(tmp_path, make, problem, kind):
    path = tmp_path / "bird.jpg"
    make(path)
    assert check_image(path) == problem
    with pytest.raises(ImageDecodeError) as info:
        load_rgb(path)
    assert info.value.problem == problem and str(info.value).startswith(f"{path}: {problem}; ")
    assert info.value.kind == kind
    with pytest.raises(ImageDecodeError) as info:
        image_size(path)
    assert info.value.problem == problem


def test_decompression_bomb_checked_from_header(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (20, 10)).save(path)
    limit_before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageDecodeError, match="pass a larger max_pixels") as info:
        load_rgb(path, max_pixels=199)
    assert info.value.problem == "decompression bomb (200 pixels > limit 199)" and info.value.kind == "too_large"
    assert load_rgb(path, max_pixels=200).shape == (10, 20, 3)
    assert load_rgb(path, max_pixels=None).shape == (10, 20, 3)
    assert check_image(path, max_pixels=100) == "decompression bomb (200 pixels > limit 100)"
    # Refused before decoding: a truncated file reports the size, not the truncation.
    assert check_image(broken_jpeg(tmp_path / "cut.jpg"), max_pixels=100).startswith("decompression bomb")
    assert limit_before == Image.MAX_IMAGE_PIXELS


def test_pil_own_bomb_error_is_translated(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("L", (20, 10)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)  # PIL refuses above twice its limit
    assert check_image(path, max_pixels=None) == "decompression bomb (over PIL's limit of 100 pixels)"
    with pytest.raises(ImageDecodeError, match="raise PIL.Image.MAX_IMAGE_PIXELS"):
        image_size(path)


def test_check_image_accepts_good_files(tmp_path):
    Image.fromarray(marked()).save(tmp_path / "ok.jpg")
    assert check_image(tmp_path / "ok.jpg") is None
    assert check_image(str(tmp_path / "ok.jpg")) is None


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to count open files")
def test_file_handles_are_closed(tmp_path):
    good = tmp_path / "ok.png"
    Image.fromarray(marked()).save(good)
    cut = broken_jpeg(tmp_path / "cut.jpg")
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        load_rgb(good), image_size(good), check_image(cut), check_image(good, max_pixels=1)
    assert len(os.listdir("/proc/self/fd")) == before


@needs_cub
def test_real_cub_grayscale_originals_load_as_rgb():
    grey = []
    for path in sorted((CUB_ROOT / "images").rglob("*.jpg")):
        with Image.open(path) as image:
            if image.mode == "L":
                grey.append(path)
    if not grey:
        pytest.skip("no grayscale photo among the CUB classes present")
    for path in grey:
        rgb = load_rgb(path)
        assert rgb.shape == (*image_size(path)[::-1], 3) and rgb.dtype == np.uint8
        assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
        assert check_image(path) is None


@needs_cub
def test_real_cub_orientation_zero_is_ignored():
    # Many CUB JPEGs carry the invalid EXIF orientation 0; it must read as "upright", not fail.
    path = CUB_ROOT / "images" / "001.Black_footed_Albatross" / "Black_Footed_Albatross_0003_796136.jpg"
    if not path.is_file():
        pytest.skip(f"{path.name} not in this CUB copy")
    with Image.open(path) as image:
        assert image.getexif().get(0x0112) == 0
        header_size = image.size
    assert image_size(path) == header_size
    assert load_rgb(path).shape == (header_size[1], header_size[0], 3)


def test_an_extreme_aspect_ratio_is_refused_from_the_header(tmp_path, monkeypatch):
    """A 201-byte 40000x1 PNG passes the pixel limit, but resizing its shorter side to 256 would need 7.9 GB."""
    path = tmp_path / "strip.png"
    Image.new("RGB", (40_000, 1)).save(path)
    assert path.stat().st_size < 1000
    decoded = []
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(self) or None)  # must not be reached
    with pytest.raises(ImageDecodeError, match=r"40000x1 pixels is no photograph \(a side over 20 times the other: "
                                               r"resizing it would need 7,864,320,000 bytes"):  # fmt: skip
        load_rgb(path)
    assert decoded == []
    with pytest.raises(ImageDecodeError, match="no photograph"):
        image_size(path)
    monkeypatch.undo()
    assert check_image(path).startswith("40000x1 pixels is no photograph")
    with pytest.raises(ImageDecodeError, match="<array>: 1x30 pixels is no photograph"):
        load_rgb(np.zeros((30, 1, 3), np.uint8))
    with pytest.raises(ImageDecodeError, match="<PIL image>: 30x1 pixels"):
        load_rgb(Image.new("RGB", (30, 1)))
    assert load_rgb(np.zeros((20, 1), np.uint8)).shape == (20, 1, 3)  # 20:1 is still a (narrow) photo


def _jpeg(width: int, height: int, orientation: int = 1) -> bytes:
    rng = np.random.default_rng(0)
    small = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((width, height))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=90, exif=exif)
    return buffer.getvalue()


# min_side, decoded (width, height), the size asked of libjpeg's DCT scaling (None: no reduction)
REDUCED_DECODES = [(256, (341, 256), (342, 256)), (180, (240, 180), (240, 180)), (400, (533, 400), (534, 400)),
                   (750, (1000, 750), (1000, 750)), (751, (2000, 1500), None), (None, (2000, 1500), None),
                   (60, (80, 60), (80, 60))]  # fmt: skip


@pytest.mark.parametrize(("min_side", "decoded", "draft"), REDUCED_DECODES)
def test_a_photo_twice_min_side_decodes_at_a_dct_scale_then_resizes_to_min_side(min_side, decoded, draft, monkeypatch):
    asked, draft_as_pillow_does = [], JpegImageFile.draft

    def recorded_draft(self, mode, size):
        asked.append(size)
        return draft_as_pillow_does(self, mode, size)

    monkeypatch.setattr(JpegImageFile, "draft", recorded_draft)
    pixels, size = decode_photo(_jpeg(2000, 1500), min_side=min_side)
    assert size == (2000, 1500)
    assert (pixels.shape[1], pixels.shape[0]) == decoded  # shorter side min_side, longer as torchvision's Resize
    assert asked == ([draft] if draft else [])  # libjpeg picks the smallest scale that covers the size asked
    assert pixels.dtype == np.uint8 and pixels.flags.c_contiguous and pixels.flags.writeable


def test_a_reduced_decode_is_upright_and_close_to_the_whole_decode_resized_by_pil():
    pixels, size = decode_photo(_jpeg(2000, 1500, orientation=6), min_side=256)
    assert size == (1500, 2000) and pixels.shape[:2] == (341, 256)
    full = Image.fromarray(load_rgb(_jpeg(2000, 1500, orientation=6)))
    for resample in (Image.Resampling.BICUBIC, Image.Resampling.BILINEAR):
        pixels = decode_photo(_jpeg(2000, 1500, orientation=6), min_side=256, resample=resample)[0]
        reference = np.asarray(full.resize((256, 341), resample), dtype=np.float32)
        assert np.abs(reference - pixels).mean() < 0.5  # a hand-written PIL pipeline's pixels, within half a level


def test_other_formats_are_resized_to_min_side_and_small_photos_stay_whole():
    buffer = io.BytesIO()
    Image.new("RGB", (2000, 1500), (10, 200, 30)).save(buffer, format="PNG")
    pixels, size = decode_photo(buffer.getvalue(), min_side=64)
    assert pixels.shape[:2] == (64, 85) and size == (2000, 1500)
    assert (pixels == (10, 200, 30)).all()
    assert decode_photo(buffer.getvalue(), min_side=751)[0].shape[:2] == (1500, 2000)  # under twice: whole
    assert decode_photo(buffer.getvalue())[0].shape[:2] == (1500, 2000)


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_a_plain_jpeg_decodes_through_opencv_to_the_same_pixels_as_pil(tmp_path, monkeypatch, mode):
    import cv2

    calls = []
    imdecode = cv2.imdecode
    monkeypatch.setattr(cv2, "imdecode", lambda *a: calls.append(1) or imdecode(*a))
    noise = np.random.default_rng(1).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    path = tmp_path / "plain.jpg"
    Image.fromarray(noise).convert(mode).save(path, quality=85)
    with Image.open(path) as image:
        expected = np.array(image.convert("RGB"))
    for source in (path, path.read_bytes()):
        pixels = load_rgb(source)
        assert pixels.flags.c_contiguous and pixels.flags.writeable and pixels.dtype == np.uint8
        np.testing.assert_array_equal(pixels, expected)
    assert len(calls) == 2


def test_rotated_truncated_or_cmyk_jpegs_stay_with_pil(tmp_path, monkeypatch):
    import cv2

    monkeypatch.setattr(cv2, "imdecode", lambda *a: pytest.fail("OpenCV must not decode this JPEG"))
    rotated = save_oriented(tmp_path / "six.jpg", marked(30, 20, block=4), 6, quality=95)
    assert load_rgb(rotated).shape == (30, 20, 3)  # upright: the sides swapped
    with pytest.raises(ImageDecodeError, match="truncated"):
        load_rgb(broken_jpeg(tmp_path / "cut.jpg"))  # no end marker: OpenCV would pad it silently
    Image.new("CMYK", (8, 6), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    assert load_rgb(tmp_path / "cmyk.jpg").shape == (6, 8, 3)
