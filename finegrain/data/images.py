"""The one image decoding path for training and inference: any file, bytes, PIL image or array to RGB uint8.

Every format Pillow reads, and HEIC/HEIF through pillow-heif; a whole, upright RGB or greyscale JPEG decoded at
full size (training, checks) goes through OpenCV instead, to the same pixels with fewer copies (`_plain_jpeg`).
Conversion rules, so that every source gives the same pixels:

- EXIF orientation is applied (all 8 orientations); the result is upright.
- Transparency (alpha bands, palette or grey/RGB ``transparency`` keys) is composited over white.
- 16-bit modes (``I;16*``) keep their top 8 bits (``>> 8``). Mode ``I`` is how PIL decodes 16-bit PGM/PPM
  files, so it gets the same 16-bit scale; values outside 0..65535 saturate.
- Mode ``F`` follows PIL's convention for floats, the 0..255 scale: rounded, clipped to 0..255, NaN to 0.
- Everything else (1, L, P, CMYK incl. Adobe JPEG CMYK, YCbCr, ...) goes through PIL's own ``convert("RGB")``.
- Arrays: HxW, HxWx1, HxWx3 or HxWx4 of uint8, uint16 (``>> 8``) or float in [0, 1] (``x 255``, rounded).

Truncated or corrupt data is an error, never silently padded: PIL's global ``LOAD_TRUNCATED_IMAGES`` is
left alone. The pixel limit is checked from the header, before any pixel is decoded, without touching
PIL's global limit or the warning filters (``warnings.catch_warnings`` is process-wide and not thread-safe,
and datasets are checked from a thread pool). PIL's own limit still applies first: it refuses images above
twice ``PIL.Image.MAX_IMAGE_PIXELS`` whatever ``max_pixels`` says.
"""

from __future__ import annotations

import io
import math
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError
from PIL.JpegImagePlugin import JpegImageFile
from pillow_heif import register_heif_opener

from finegrain.errors import FinegrainError

register_heif_opener()  # HEIC/HEIF phone photos open like JPEGs (iPhones save HEIC by default)

MAX_PIXELS: int | None = Image.MAX_IMAGE_PIXELS  # default limit of width * height; None disables it
# Longer side / shorter side. Resizing scales the shorter side to the input size, so this bounds the pixels a
# resize can make (a 40000x1 PNG of 201 bytes would otherwise ask for gigabytes); wide panoramas are about 4:1.
MAX_ASPECT_RATIO = 20.0

# Orientations 5-8 turn the picture by 90 degrees, so width and height swap.
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)

# What PIL and its decoders raise on bad data (PIL's own Image.open catches the same family).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error,
                  Image.DecompressionBombError)  # fmt: skip


class ImageDecodeError(FinegrainError):
    """An image that cannot be turned into RGB pixels; ``problem`` is the one-line reason.

    ``kind`` sorts the problems for callers that answer differently (the server's HTTP status): "too_large"
    (over a pixel limit, or a strip no resize can take), "not_image" (no format recognised), else "unreadable".
    """

    def __init__(self, source: str, problem: str, fix: str, kind: str = "unreadable") -> None:
        super().__init__(f"{source}: {problem}; {fix}")
        self.source = source
        self.problem = problem
        self.kind = kind


def load_rgb(source: str | Path | bytes | Image.Image | np.ndarray, *,
             max_pixels: int | None = MAX_PIXELS) -> np.ndarray:  # fmt: skip
    """Decode ``source`` to an upright HxWx3 uint8 C-contiguous RGB array (a new, writable one).

    ``max_pixels`` limits width * height of encoded sources (paths and bytes); None disables it.
    Raises ImageDecodeError for missing, empty, non-image, truncated, corrupt or oversized sources.
    """
    return decode_photo(source, max_pixels=max_pixels)[0]


def decode_photo(source: str | Path | bytes | Image.Image | np.ndarray, *, min_side: int | None = None,
                 max_pixels: int | None = MAX_PIXELS, resample: Image.Resampling = Image.Resampling.BICUBIC,
                 ) -> tuple[np.ndarray, tuple[int, int]]:  # fmt: skip
    """`load_rgb`'s pixels, and the photo's own upright (width, height).

    With ``min_side``, a photo whose shorter side is at least twice ``min_side`` comes back with its shorter side
    exactly ``min_side``: a JPEG first decodes at the smallest of libjpeg's DCT scales (1/2, 1/4, 1/8) that keeps
    ``min_side`` (Pillow's ``Image.draft``; a 12-megapixel photo seen at 256 px decodes at 1/8 of its side), then
    Pillow's antialiased ``resample`` filter takes it the rest of the way, as a hand-written PIL pipeline
    resizes the whole decode. Smaller photos come back whole. The size returned is always the photo's own.
    """
    if isinstance(source, np.ndarray):
        pixels = _array_to_rgb(source)
        return pixels, (pixels.shape[1], pixels.shape[0])
    if isinstance(source, Image.Image):
        _check_shape(source.size, None, "<PIL image>")
        with _translated("<PIL image>"):
            pixels = _pil_to_rgb(source)
        return pixels, (pixels.shape[1], pixels.shape[0])
    if isinstance(source, bytes):
        fp, name = io.BytesIO(source), "<bytes>"
    elif isinstance(source, str | Path):
        fp, name = Path(source), str(source)
    else:
        raise TypeError(f"load_rgb takes a path, bytes, PIL image or array, not {type(source).__name__}")
    with _translated(name, fp), Image.open(fp) as image:
        _check_shape(image.size, max_pixels, name)
        size = _upright_size(image)
        width, height = image.size
        if min_side is None or min(width, height) < 2 * min_side:
            pixels = _plain_jpeg(image, fp)
            return (_pil_to_rgb(image) if pixels is None else pixels), size
        if isinstance(image, JpegImageFile):  # MPO, many cameras' format, is one too
            factor = min_side / min(width, height)
            image.draft(None, (math.ceil(width * factor), math.ceil(height * factor)))
        pixels = _pil_to_rgb(image)
    # the rest antialiased, here: the eval transform's OpenCV resize does not antialias
    short, long = sorted(size)
    target = (min_side, int(min_side * long / short))  # torchvision's Resize(int) rounding of the longer side
    target = target if size[0] <= size[1] else target[::-1]
    return np.array(Image.fromarray(pixels).resize(target, resample, reducing_gap=3.0)), size


def check_image(path: str | Path, *, max_pixels: int | None = MAX_PIXELS) -> str | None:
    """None when ``load_rgb(path)`` succeeds, else its one-line problem ("no such file", "truncated", ...).

    It decodes fully, because truncation only shows at the end of the data.
    """
    try:
        load_rgb(Path(path), max_pixels=max_pixels)
    except ImageDecodeError as e:
        return e.problem
    return None


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of the upright image, read from the header without decoding pixels; the limits of
    `load_rgb` apply."""
    path = Path(path)
    with _translated(str(path), path), Image.open(path) as image:
        _check_shape(image.size, MAX_PIXELS, str(path))
        return _upright_size(image)


def _upright_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) once the EXIF orientation is applied, from the header alone."""
    width, height = image.size
    return (height, width) if _orientation(image) in _SWAPPING_ORIENTATIONS else (width, height)


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation (1, upright, when absent), from the header alone."""
    # PngImageFile.getexif decodes the whole image when no eXIf chunk precedes the pixels; the base
    # method reads only what open() parsed, which is where the orientation lives in practice.
    return Image.Image.getexif(image).get(ExifTags.Base.Orientation, 1)


# OpenCV >= 4.11 decodes straight to RGB; older builds decode BGR, swapped after
_CV2_RGB = getattr(cv2, "IMREAD_COLOR_RGB", None)
_CV2_FLAGS = (cv2.IMREAD_COLOR if _CV2_RGB is None else _CV2_RGB) | cv2.IMREAD_IGNORE_ORIENTATION


def _plain_jpeg(image: Image.Image, fp: Path | io.BytesIO) -> np.ndarray | None:
    """The pixels of a whole, upright RGB or greyscale JPEG, decoded by OpenCV straight into an array; None for
    anything else (then PIL decodes it).

    PIL hands its pixels to numpy through copies that cost about half as much as decoding a CUB-size photo;
    OpenCV's libjpeg-turbo gives the same pixels (identical on all 1,701 CUB photos here; a test pins it) without
    them. Only data ending in the JPEG end marker comes this way: OpenCV pads a truncated JPEG where PIL refuses it.
    """
    if not isinstance(image, JpegImageFile) or image.mode not in ("RGB", "L"):
        return None
    if _orientation(image) in range(2, 9):  # 0 and 1 are upright (exif_transpose)
        return None
    data = fp.getvalue() if isinstance(fp, io.BytesIO) else fp.read_bytes()
    if not data.rstrip(b"\0").endswith(b"\xff\xd9"):
        return None
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), _CV2_FLAGS)
    if pixels is None or pixels.shape != (image.height, image.width, 3):
        return None
    return pixels if _CV2_RGB is not None else np.ascontiguousarray(pixels[..., ::-1])


def _pil_to_rgb(image: Image.Image) -> np.ndarray:
    image = ImageOps.exif_transpose(image)  # loads the pixels; a new image, so the caller's stays as it was
    if image.mode.startswith("I"):
        # PIL's convert would clip at 255; keep the top 8 bits of the 16-bit range instead.
        image = Image.fromarray((np.clip(np.asarray(image), 0, 65535) >> 8).astype(np.uint8))
    elif image.mode == "F":
        values = np.clip(np.rint(np.nan_to_num(np.asarray(image))), 0, 255)
        image = Image.fromarray(values.astype(np.uint8))
    if image.has_transparency_data:
        # Over black, transparent backgrounds would become dark blobs the network learns as a cue.
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image.convert("RGBA"))
    return np.array(image.convert("RGB"))


def _array_to_rgb(array: np.ndarray) -> np.ndarray:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.size == 0 or not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise ImageDecodeError("<array>", f"shape {array.shape} is not an image",
                               "pass HxW, HxWx1, HxWx3 or HxWx4 pixels (height first)")  # fmt: skip
    _check_shape((array.shape[1], array.shape[0]), None, "<array>")
    if array.dtype == np.uint16:
        array = (array >> 8).astype(np.uint8)
    elif array.dtype.kind == "f":
        if not (np.isfinite(array).all() and array.min() >= 0 and array.max() <= 1):
            raise ImageDecodeError("<array>", "float pixels outside [0, 1]",
                                   "scale float images to [0, 1] or pass uint8")  # fmt: skip
        array = np.rint(array * 255).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise ImageDecodeError("<array>", f"unsupported dtype {array.dtype}",
                               "pass uint8, uint16 or float pixels in [0, 1]")  # fmt: skip
    return _pil_to_rgb(Image.fromarray(np.ascontiguousarray(array)))


def _check_shape(size: tuple[int, int], max_pixels: int | None, name: str) -> None:
    """Refuse, from the header alone, images whose decoding or resizing would cost unbounded memory."""
    pixels = size[0] * size[1]
    if max_pixels is not None and pixels > max_pixels:
        raise ImageDecodeError(name, f"decompression bomb ({pixels:,} pixels > limit {max_pixels:,})",
                               "pass a larger max_pixels if you trust this file", "too_large")  # fmt: skip
    longer, shorter = max(size), min(size)
    if shorter < 1 or longer / shorter > MAX_ASPECT_RATIO:
        raise ImageDecodeError(name, f"{size[0]}x{size[1]} pixels is no photograph (a side over "
                                     f"{MAX_ASPECT_RATIO:g} times the other: resizing it would need "
                                     f"{longer / max(shorter, 1) * 3 * 256**2:,.0f} bytes or more)",
                               "crop it to the bird", "too_large")  # fmt: skip


@contextmanager
def _translated(name: str, fp: Path | io.BytesIO | None = None) -> Iterator[None]:
    """Turn what the OS or PIL raises into one ImageDecodeError naming ``name``, its problem and the fix."""
    try:
        yield
    except _DECODE_ERRORS as e:
        raise ImageDecodeError(name, *_diagnose(e, fp)) from e


def _diagnose(error: Exception, fp: Path | io.BytesIO | None) -> tuple[str, str, str]:
    """(problem, fix, kind) for an error of the OS or PIL."""
    message = str(error)
    if isinstance(error, FileNotFoundError):
        return "no such file", "check the path or the dataset folder", "unreadable"
    if isinstance(error, UnidentifiedImageError):
        if fp is not None and _is_empty(fp):
            return "empty file", "replace it with a JPEG or PNG photo, or remove it", "unreadable"
        return "not an image", "replace it with a JPEG or PNG photo, or remove it", "not_image"
    if isinstance(error, Image.DecompressionBombError):
        return (f"decompression bomb (over PIL's limit of {2 * Image.MAX_IMAGE_PIXELS:,} pixels)",
                "raise PIL.Image.MAX_IMAGE_PIXELS if you trust this file", "too_large")  # fmt: skip
    if "truncated" in message.lower():
        return "truncated", "the data ends early; download or export it again", "unreadable"
    if isinstance(error, ValueError) and "conversion" in message:
        return f"unsupported image mode ({message})", "save it as RGB", "unreadable"
    if isinstance(error, OSError) and error.strerror:  # the OS could not read it (permissions, a folder)
        return f"cannot read ({error.strerror})", "check the path and its permissions", "unreadable"
    return f"corrupt image data ({message})", "download or export it again", "unreadable"


def _is_empty(fp: Path | io.BytesIO) -> bool:
    return fp.getbuffer().nbytes == 0 if isinstance(fp, io.BytesIO) else fp.stat().st_size == 0
