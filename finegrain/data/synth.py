"""Synthetic birds in the official CUB-200-2011 layout: the product's built-in default dataset.

All species share one body shape and palette and differ only in small part details: crown patch, beak shape,
wing bar, eye ring, tail shape and beak colour. Each bird is small, anywhere in the image, faces left or
right, is rotated and scaled, and sits on clutter painted partly in the birds' own colours. A model that sees
only a downsampled whole image should find the species hard to tell apart; one that finds the bird and looks
closely, easy. The rules and conventions are in docs/synthetic_birds.md.

Side view convention (the same as in the real CUB annotations): a bird facing right (beak toward +x) shows
its right side, so `right eye` and `right wing` are visible and `left eye` and `left wing` are not; facing
left, the other way round. Both legs are drawn and visible. Coordinates are in pixels, x = column and
y = row, with pixel (i, j) covering [i, i + 1) x [j, j + 1); a box covers exactly the pixels the bird touches.

One module over 300 lines on purpose: the bird's geometry, its drawing and the CUB-layout writer share the
species table and the part naming, and read best side by side.
"""

from __future__ import annotations

import functools
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from finegrain.errors import FinegrainError

PART_NAMES = (
    "back", "beak", "belly", "breast", "crown", "forehead", "left eye", "left leg", "left wing", "nape",
    "right eye", "right leg", "right wing", "tail", "throat",
)  # fmt: skip
# Each species advances one attribute of its predecessor by one step, cycling through the attributes in this
# order, so neighbouring species differ in exactly one detail. With these value counts the walk visits 72
# distinct combinations before it repeats.
ATTRIBUTES = (
    ("crown", ("none", "red", "gold", "blue")),
    ("beak", ("finch", "long", "hook")),
    ("wing_bar", ("none", "white")),
    ("eye_ring", ("none", "white", "gold")),
    ("tail", ("short", "long", "fork")),
    ("beak_colour", ("dark", "orange")),
)
MAX_CLASSES = 72
JPEG_QUALITY = 92
SUPERSAMPLE = 2  # draw at 2x and downsample: antialiased edges at little cost
BIRD_SIZE = (0.16, 0.30)  # bird length range, fraction of the shorter image side: small, so finding it matters

# The shared palette (RGB); every image scales it by a random brightness.
BODY, BELLY, WING, LEG, EYE = (150, 118, 80), (212, 196, 160), (96, 76, 56), (70, 60, 52), (20, 20, 20)
DETAIL_COLOURS = {
    "red": (210, 40, 35), "gold": (240, 196, 40), "blue": (45, 95, 215), "white": (245, 245, 238),
    "orange": (236, 132, 32), "dark": (45, 40, 38),
}  # fmt: skip
BIRD_COLOURS = (BODY, BELLY, WING, LEG, *DETAIL_COLOURS.values())
BIRD_COLOUR_WEIGHTS = np.array([4.0] * 4 + [1.0] * len(DETAIL_COLOURS)) / (16 + len(DETAIL_COLOURS))


@dataclass(frozen=True)
class Species:
    """One species: a combination of part details on the shared body."""

    crown: str = "none"
    beak: str = "finch"
    wing_bar: str = "none"
    eye_ring: str = "none"
    tail: str = "short"
    beak_colour: str = "dark"

    @property
    def name(self) -> str:
        """Readable and unique, e.g. `Red_crowned_Longbill`; the species with no details is `Plain_Finch`."""
        words = []
        if self.crown != "none":
            words.append(f"{self.crown.capitalize()}_crowned")
        if self.eye_ring != "none":
            words.append(f"{self.eye_ring.capitalize()}_ringed")
        if self.wing_bar != "none":
            words.append("Wingbarred")
        if self.tail != "short":
            words.append(f"{self.tail.capitalize()}tailed")
        if self.beak_colour != "dark":
            words.append(f"{self.beak_colour.capitalize()}_billed")
        noun = {"finch": "Finch", "long": "Longbill", "hook": "Hookbill"}[self.beak]
        return "_".join(words or ["Plain"]) + "_" + noun


def species_table(num_classes: int) -> list[Species]:
    """The first `num_classes` species; class k is always the same species, whatever the seed."""
    state = [0] * len(ATTRIBUTES)
    table = []
    for k in range(num_classes):
        table.append(Species(*(values[i] for (_, values), i in zip(ATTRIBUTES, state, strict=True))))
        step = k % len(ATTRIBUTES)
        state[step] = (state[step] + 1) % len(ATTRIBUTES[step][1])
    return table


# ---------------------------------------------------------------------------------------------------------
# Bird geometry in a canonical frame: facing right, y down, unit = body length (tail tip to short beak tip)


def _rotate(points: np.ndarray, angle: float) -> np.ndarray:
    """Rotate (N, 2) points by `angle` degrees about the origin (clockwise on screen, as y points down)."""
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    return points @ np.array([[c, s], [-s, c]])


@functools.cache
def _unit_circle(n: int) -> tuple[np.ndarray, np.ndarray]:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.cos(t), np.sin(t)


def _ellipse(cx: float, cy: float, rx: float, ry: float, angle: float = 0.0, n: int = 28) -> np.ndarray:
    cos, sin = _unit_circle(n)
    return np.array([cx, cy]) + _rotate(np.stack([rx * cos, ry * sin], axis=1), angle)


TILT = -10.0  # degrees: the body's front is higher than its rear
EYE_CENTRE = (0.255, -0.185)
BEAK_BASE = (0.31, -0.17)
BEAKS = {  # polygon relative to BEAK_BASE, and the point annotated as `beak`
    "finch": ([(0, -0.045), (0.15, 0.0), (0, 0.045)], (0.06, 0.0)),
    "long": ([(0, -0.032), (0.28, 0.006), (0.28, 0.014), (0, 0.03)], (0.12, 0.004)),
    "hook": ([(0, -0.045), (0.09, -0.036), (0.15, -0.008), (0.16, 0.035), (0.13, 0.022), (0.09, 0.022),
              (0, 0.04)], (0.07, 0.0)),
}  # fmt: skip
TAIL_BASE, TAIL_ANGLE = (-0.24, 0.03), 165.0  # pointing back and a little down
TAILS = {  # polygon in the tail's frame (along, across), and its length
    "short": ([(-0.02, -0.05), (0.17, -0.06), (0.17, 0.06), (-0.02, 0.05)], 0.17),
    "long": ([(-0.02, -0.05), (0.30, -0.045), (0.36, 0.0), (0.30, 0.045), (-0.02, 0.05)], 0.36),
    "fork": ([(-0.02, -0.05), (0.27, -0.09), (0.17, 0.0), (0.27, 0.09), (-0.02, 0.05)], 0.27),
}
LEGS = {"near": ((0.03, 0.13), (0.01, 0.30)), "far": ((-0.04, 0.12), (-0.06, 0.30))}
LEG_WIDTH, FOOT_Y = 0.03, 0.30


def _leg(hip: tuple[float, float], foot: tuple[float, float]) -> np.ndarray:
    """A polyline: hip -> foot, then the toes forward and back."""
    fx, fy = foot
    return np.array([hip, foot, (fx + 0.07, fy), foot, (fx - 0.04, fy)])


@dataclass
class Shape:
    """A filled polygon, or a polyline when `width` is set (in the points' units)."""

    points: np.ndarray
    colour: tuple[int, ...]
    width: float = 0.0


def bird_shapes(species: Species) -> tuple[list[Shape], dict[str, np.ndarray]]:
    """The canonical bird, back to front, and its part points ("near"/"far" for the sides)."""
    tail_poly, tail_len = TAILS[species.tail]
    to_tail = np.asarray(TAIL_BASE) + _rotate(np.asarray(tail_poly), TAIL_ANGLE)
    beak_poly, beak_point = BEAKS[species.beak]
    shapes = [
        Shape(_leg(*LEGS["far"]), LEG, LEG_WIDTH),
        Shape(to_tail, WING),
        Shape(_ellipse(-0.02, 0.0, 0.27, 0.16, TILT), BODY),
        Shape(_ellipse(0.03, 0.06, 0.18, 0.085, TILT), BELLY),
        Shape(_ellipse(0.22, -0.17, 0.11, 0.11), BODY),
        Shape(_ellipse(0.25, -0.10, 0.06, 0.045), BELLY),
        Shape(_ellipse(-0.07, -0.03, 0.19, 0.085, TILT), WING),
    ]
    if species.wing_bar != "none":
        shapes.append(Shape(_ellipse(-0.03, -0.03, 0.06, 0.085, 20.0), DETAIL_COLOURS[species.wing_bar]))
    if species.crown != "none":
        shapes.append(Shape(_ellipse(0.215, -0.22, 0.115, 0.075), DETAIL_COLOURS[species.crown]))
    shapes.append(Shape(_leg(*LEGS["near"]), LEG, LEG_WIDTH))
    if species.eye_ring != "none":
        shapes.append(Shape(_ellipse(*EYE_CENTRE, 0.065, 0.065), DETAIL_COLOURS[species.eye_ring]))
    shapes.append(Shape(_ellipse(*EYE_CENTRE, 0.026, 0.026, n=12), EYE))
    shapes.append(Shape(np.asarray(BEAK_BASE) + np.asarray(beak_poly), DETAIL_COLOURS[species.beak_colour]))

    (near_hip, near_foot), (far_hip, far_foot) = LEGS["near"], LEGS["far"]
    points = {
        "back": (-0.08, -0.13), "beak": tuple(np.add(BEAK_BASE, beak_point)), "belly": (0.02, 0.11),
        "breast": (0.17, -0.03), "crown": (0.21, -0.25), "forehead": (0.29, -0.235), "near eye": EYE_CENTRE,
        "near leg": tuple(np.add(near_hip, near_foot) / 2), "far leg": tuple(np.add(far_hip, far_foot) / 2),
        "near wing": (-0.07, -0.03), "nape": (0.13, -0.21), "throat": (0.29, -0.09),
        "tail": tuple(np.asarray(TAIL_BASE) + _rotate(np.array([tail_len / 2, 0.0]), TAIL_ANGLE)),
    }  # fmt: skip
    return shapes, {name: np.asarray(p, dtype=np.float64) for name, p in points.items()}


# ---------------------------------------------------------------------------------------------------------
# Rendering


@dataclass
class Pose:
    """Where the bird is: centre in pixels (x = column, y = row), body length in pixels, rotation, facing."""

    centre: tuple[float, float]
    length: float
    angle: float
    facing_right: bool

    def apply(self, points: np.ndarray) -> np.ndarray:
        """Canonical points -> image pixels."""
        flipped = points * np.array([1.0 if self.facing_right else -1.0, 1.0])
        return np.asarray(self.centre) + self.length * _rotate(flipped, self.angle)


@dataclass
class BirdSample:
    """One rendered image with its ground truth, as written to the CUB files."""

    image: np.ndarray  # (H, W, 3) uint8
    mask: np.ndarray  # (H, W) float32 in [0, 1]: how much of each pixel the bird covers
    box: tuple[float, float, float, float]  # x, y, width, height: exactly the pixels with mask > 0
    parts: np.ndarray  # (15, 3) in PART_NAMES order: x, y, visible; invisible parts are (0, 0, 0)
    facing_right: bool


def _sample_pose(rng: np.random.Generator, shapes: list[Shape], size: tuple[int, int],
                 bird_size: tuple[float, float]) -> Pose:  # fmt: skip
    length = min(size) * rng.uniform(*bird_size)
    pose = Pose((0.0, 0.0), length, rng.uniform(-25.0, 25.0), facing_right=bool(rng.random() < 0.5))
    extent = pose.apply(np.concatenate([s.points for s in shapes]))
    margin = 2.0 + pose.length * LEG_WIDTH
    low, high = margin - extent.min(axis=0), np.asarray(size) - margin - extent.max(axis=0)
    pose.centre = tuple(rng.uniform(low, np.maximum(low, high)))
    return pose


def _muted_colours(rng: np.random.Generator, n: int, low: float = 40, high: float = 220) -> np.ndarray:
    colours = rng.uniform(low, high, (n, 3))
    grey = colours.mean(axis=1, keepdims=True)
    return grey + (colours - grey) * rng.uniform(0.3, 0.9, (n, 1))


def _clutter_colours(rng: np.random.Generator, n: int) -> list[tuple[int, ...]]:
    # About a third of the clutter borrows the birds' colours: mostly body colours, so that colour alone does
    # not find the bird, and now and then a detail colour, so that a red patch somewhere is no red crown.
    chosen = rng.choice(len(BIRD_COLOURS), size=n, p=BIRD_COLOUR_WEIGHTS)
    own = np.asarray(BIRD_COLOURS)[chosen] * rng.uniform(0.85, 1.15, (n, 1))
    colours = np.where(rng.random((n, 1)) < 0.35, own, _muted_colours(rng, n))
    return [tuple(c) for c in np.clip(colours, 0, 255).astype(int).tolist()]


def _clutter(rng: np.random.Generator, size: tuple[int, int]) -> list[Shape]:
    """Blobs, leaves, twigs, shards and bird-sized decoy bodies, in pixels."""
    n = int(rng.integers(12, 30))
    centres = rng.uniform((0, 0), size, (n, 2))
    radii = np.exp(rng.uniform(math.log(2.0), math.log(0.12 * min(size)), n))
    kinds, aspects, angles = rng.random(n), rng.uniform(0.25, 1, n), rng.uniform(0, 180, n)
    widths = rng.uniform(1, 4, n)
    vertices = rng.uniform(-1, 1, (n, 4, 2))
    colours = _clutter_colours(rng, n)
    shapes = []
    for centre, r, kind, aspect, angle, width, offsets, colour in zip(
        centres, radii, kinds, aspects, angles, widths, vertices, colours, strict=True
    ):
        if kind < 0.45:  # blob or leaf
            shapes.append(Shape(_ellipse(*centre, r, r * aspect, angle, n=16), colour))
        elif kind < 0.75:  # twig
            shapes.append(Shape(centre + r * np.cumsum(offsets, axis=0), colour, width))
        elif kind < 0.93:  # shard
            shapes.append(Shape(centre + r * offsets, colour))
        else:  # decoy: a body as big as a bird's, in a bird colour
            r = min(size) * (0.05 + 0.05 * aspect)
            colour = BODY if width < 2.5 else WING  # `width` is unused for a decoy: reuse it to pick a colour
            shapes.append(Shape(_ellipse(*centre, r, r * 0.6, angle, n=20), colour))
    return shapes


def _perch(rng: np.random.Generator, pose: Pose) -> Shape:
    """A branch under the bird's feet, in pixels."""
    ends = np.array([[-rng.uniform(0.6, 3.0), FOOT_Y + 0.03], [rng.uniform(0.6, 3.0), FOOT_Y + 0.03]])
    colour = tuple(int(v) for v in np.asarray((105, 80, 55)) * rng.uniform(0.7, 1.2))
    return Shape(pose.apply(ends), colour, pose.length * rng.uniform(0.04, 0.08))


def _background(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """A vertical gradient with out-of-focus blobs, at the supersampled size."""
    width, height = size
    top, bottom = _muted_colours(rng, 2, 40, 230)
    t = np.linspace(0.0, 1.0, height // 4)[:, None, None]
    gradient = np.broadcast_to(top + (bottom - top) * t, (height // 4, width // 4, 3))
    image = Image.fromarray(gradient.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    n = int(rng.integers(4, 10))
    for (x, y), r, colour in zip(rng.uniform((0, 0), (width / 4, height / 4), (n, 2)), rng.uniform(4, 20, n),
                                 _clutter_colours(rng, n), strict=True):  # fmt: skip
        draw.ellipse((x - r, y - r * 0.7, x + r, y + r * 0.7), fill=colour)
    # 4x bilinear then 2x nearest is much faster than 8x bilinear, and alike after the final 2x reduction.
    image = image.filter(ImageFilter.GaussianBlur(rng.uniform(1.5, 3.0)))
    image = image.resize(size, Image.Resampling.BILINEAR)
    return image.resize((width * SUPERSAMPLE, height * SUPERSAMPLE), Image.Resampling.NEAREST)


def _draw(draw: ImageDraw.ImageDraw, shape: Shape, fill: int | tuple[int, ...]) -> None:
    """Draw a shape given in image coordinates on the supersampled canvas. Image pixel i covers [i, i + 1);
    PIL puts the centre of its pixel k at k, hence the half-pixel shift."""
    points = [tuple(p) for p in (shape.points * SUPERSAMPLE - 0.5).tolist()]
    if shape.width:
        draw.line(points, fill=fill, width=max(SUPERSAMPLE, round(shape.width * SUPERSAMPLE)),
                  joint="curve")  # fmt: skip
    else:
        draw.polygon(points, fill=fill)


def _part_table(points: dict[str, np.ndarray], pose: Pose) -> np.ndarray:
    near = "right" if pose.facing_right else "left"
    table = np.zeros((len(PART_NAMES), 3))
    for i, name in enumerate(PART_NAMES):
        side, _, part = name.rpartition(" ")
        key = name if not side else ("near " if side == near else "far ") + part
        if key in points:  # there is no far eye or far wing: the bird's body hides them
            table[i] = (*pose.apply(points[key][None])[0], 1.0)
    return table


def render_sample(species: Species, rng: np.random.Generator, image_size: tuple[int, int] = (320, 256),
                  draw_bird: bool = True, bird_size: tuple[float, float] = BIRD_SIZE) -> BirdSample:  # fmt: skip
    """Render one image of `species` on clutter. `draw_bird=False` paints the same scene without the bird
    (same random numbers, mask, box and parts), which shows exactly which pixels the bird changes."""
    width, height = image_size
    shapes, points = bird_shapes(species)
    pose = _sample_pose(rng, shapes, image_size, bird_size)
    brightness = rng.uniform(0.85, 1.15)
    canvas = _background(rng, image_size)
    draw = ImageDraw.Draw(canvas)
    for shape in _clutter(rng, image_size):
        _draw(draw, shape, shape.colour)
    if rng.random() < 0.75:
        perch = _perch(rng, pose)
        _draw(draw, perch, perch.colour)

    mask_canvas = Image.new("L", canvas.size, 0)
    mask_draw = ImageDraw.Draw(mask_canvas)
    for shape in shapes:
        placed = Shape(pose.apply(shape.points), shape.colour, shape.width * pose.length)
        _draw(mask_draw, placed, 255)
        if draw_bird:
            _draw(draw, placed, tuple(min(255, int(v * brightness)) for v in shape.colour))
    mask = np.asarray(mask_canvas.reduce(SUPERSAMPLE), dtype=np.float32) / 255.0

    # Blotchy texture and grain over everything, bird included, as in a photograph. In place: large
    # temporaries cost more than the arithmetic.
    image = np.asarray(canvas.reduce(SUPERSAMPLE), dtype=np.float32)
    texture = Image.fromarray(rng.normal(0, rng.uniform(3, 8), (height // 8, width // 8)).astype(np.float32))
    image += np.asarray(texture.resize(image_size, Image.Resampling.BILINEAR))[..., None]
    grain = rng.random((height, width, 3), dtype=np.float32)
    grain -= 0.5
    grain *= rng.uniform(6, 16)
    image += grain
    image = np.clip(image, 0, 255, out=image).astype(np.uint8)

    rows, cols = np.nonzero(mask > 0)
    left, top = cols.min(), rows.min()
    box = (float(left), float(top), float(cols.max() + 1 - left), float(rows.max() + 1 - top))
    return BirdSample(image=image, mask=mask, box=box, parts=_part_table(points, pose),
                      facing_right=pose.facing_right)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# The dataset folder

WRITTEN = ("images", "parts", "images.txt", "classes.txt", "image_class_labels.txt", "train_test_split.txt",
           "bounding_boxes.txt", "README")  # fmt: skip


def _check_arguments(num_classes: int, per_class: int, seed: int, image_size: tuple[int, int],
                     test_fraction: float, bird_size: tuple[float, float]) -> None:  # fmt: skip
    if not isinstance(num_classes, int) or not 2 <= num_classes <= MAX_CLASSES:
        raise FinegrainError(f"num_classes (--classes) must be an integer from 2 to {MAX_CLASSES} (the "
                             f"species the synthetic rules define), got {num_classes!r}")  # fmt: skip
    if not isinstance(per_class, int) or per_class < 2:
        raise FinegrainError(f"per_class (--per-class) must be an integer of at least 2 (one train and one "
                             f"test image), got {per_class!r}")  # fmt: skip
    if not isinstance(seed, int) or seed < 0:
        raise FinegrainError(f"seed must be a non-negative integer, got {seed!r}")
    pair = isinstance(image_size, tuple | list) and len(image_size) == 2
    if not pair or not all(isinstance(v, int) and 64 <= v <= 4096 for v in image_size):
        raise FinegrainError(f"image_size must be (width, height) in pixels, each from 64 to 4096, "
                             f"got {image_size!r}")  # fmt: skip
    if not 0.0 < test_fraction < 1.0:
        raise FinegrainError(f"test_fraction must be between 0 and 1 (exclusive), got {test_fraction!r}")
    if not (len(bird_size) == 2 and 0.05 <= bird_size[0] <= bird_size[1] <= 0.8):
        raise FinegrainError(f"bird_size must be (smallest, largest) bird length as a fraction of the image's "
                             f"shorter side, with 0.05 <= smallest <= largest <= 0.8, got {bird_size!r}")  # fmt: skip


def _prepare_root(root: Path, overwrite: bool) -> None:
    if root.exists() and not root.is_dir():
        raise FinegrainError(f"{root} is a file: choose a folder for the synthetic birds")
    if root.is_dir() and any(root.iterdir()):
        if not overwrite:
            raise FinegrainError(
                f"{root} is not empty: choose an empty or new folder, or pass overwrite=True (--overwrite) "
                "to replace the synthetic birds in it"
            )
        # Only what this function writes, so that a wrong path with overwrite=True loses no one's files.
        for name in WRITTEN:
            path = root / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    root.mkdir(parents=True, exist_ok=True)


def _test_members(per_class: int, test_fraction: float, rng: np.random.Generator) -> set[int]:
    count = min(max(round(per_class * test_fraction), 1), per_class - 1)
    return {int(i) for i in rng.permutation(per_class)[:count]}


def _write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def _number(value: float) -> str:
    # One decimal like the official files; `+ 0.0` turns -0.0 into 0.0.
    return f"{round(value, 1) + 0.0:.1f}"


def _readme(arguments: str, species: list[Species]) -> str:
    lines = [
        "Synthetic birds in the CUB-200-2011 layout (not photographs).",
        f"Made by finegrain.data.synth.synthesize_birds({arguments}).",
        "",
        "Species differ only in small part details; neighbouring class ids differ in one detail.",
        "A bird facing right shows its right side: right eye and right wing visible, left eye and left wing",
        "not (and the other way round facing left); both legs are visible. Invisible parts are 0.0 0.0 0.",
        "Boxes are the tight box of the drawn bird (beak, tail and legs included), in pixels.",
        "",
        "class_id name " + " ".join(name for name, _ in ATTRIBUTES),
    ]
    for class_id, s in enumerate(species, 1):
        lines.append(f"{class_id} {s.name} " + " ".join(getattr(s, name) for name, _ in ATTRIBUTES))
    return "\n".join(lines) + "\n"


def synthesize_birds(root: str | Path, num_classes: int = 10, per_class: int = 40, seed: int = 0,
                     image_size: tuple[int, int] = (320, 256), test_fraction: float = 0.5,
                     bird_size: tuple[float, float] = BIRD_SIZE, overwrite: bool = False) -> Path:  # fmt: skip
    """Write `num_classes * per_class` synthetic bird images with every CUB-200-2011 metadata file to `root`.

    `image_size` is (width, height); `bird_size` the range of bird lengths (beak to tail) as a fraction of the
    image's shorter side: small by default, so that finding the bird matters; (0.5, 0.8) gives CUB-like framing.
    The same arguments give byte-identical files. Returns `root`.
    """
    _check_arguments(num_classes, per_class, seed, image_size, test_fraction, bird_size)
    image_size, bird_size = tuple(image_size), tuple(bird_size)
    root = Path(root).expanduser()
    _prepare_root(root, overwrite)
    (root / "parts").mkdir()

    species = species_table(num_classes)
    images, labels, split, boxes, part_locs = [], [], [], [], []
    image_id = 0
    for class_id, kind in enumerate(species, 1):
        folder = f"{class_id:03d}.{kind.name}"
        (root / "images" / folder).mkdir(parents=True)
        # Seeded per class and image, so a class's images do not depend on how many classes were asked for.
        test = _test_members(per_class, test_fraction, np.random.default_rng((seed, class_id, 0)))
        for index in range(per_class):
            image_id += 1
            sample = render_sample(kind, np.random.default_rng((seed, class_id, index + 1)), image_size,
                                   bird_size=bird_size)  # fmt: skip
            relative = f"{folder}/{kind.name}_{index + 1:04d}.jpg"
            # 4:4:4 chroma keeps the colour of details a few pixels wide.
            Image.fromarray(sample.image).save(root / "images" / relative, quality=JPEG_QUALITY,
                                               subsampling=0)  # fmt: skip
            images.append(f"{image_id} {relative}")
            labels.append(f"{image_id} {class_id}")
            split.append(f"{image_id} {0 if index in test else 1}")
            boxes.append(f"{image_id} " + " ".join(_number(v) for v in sample.box))
            for part_id, (x, y, visible) in enumerate(sample.parts, 1):
                part_locs.append(f"{image_id} {part_id} {_number(x)} {_number(y)} {int(visible)}")

    _write_lines(root / "images.txt", images)
    _write_lines(root / "classes.txt", [f"{i} {i:03d}.{s.name}" for i, s in enumerate(species, 1)])
    _write_lines(root / "image_class_labels.txt", labels)
    _write_lines(root / "train_test_split.txt", split)
    _write_lines(root / "bounding_boxes.txt", boxes)
    _write_lines(root / "parts" / "parts.txt", [f"{i} {name}" for i, name in enumerate(PART_NAMES, 1)])
    _write_lines(root / "parts" / "part_locs.txt", part_locs)
    arguments = (f"num_classes={num_classes}, per_class={per_class}, seed={seed}, image_size={image_size}, "
                 f"test_fraction={test_fraction}, bird_size={bird_size}")  # fmt: skip
    (root / "README").write_text(_readme(arguments, species), encoding="utf-8")
    return root
