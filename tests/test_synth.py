"""The synthetic CUB-format birds: exact file formats, counts, determinism, geometry and species rules."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finegrain.data.synth import (
    ATTRIBUTES,
    MAX_CLASSES,
    PART_NAMES,
    Species,
    render_sample,
    species_table,
    synthesize_birds,
)
from finegrain.errors import FinegrainError

# The conftest fixture `synth_root`: 4 classes x 12 images, seed 0, default 320x256 images, half to test.
NUM_CLASSES, PER_CLASS, WIDTH, HEIGHT = 4, 12, 320, 256
OFFICIAL_PARTS = """1 back
2 beak
3 belly
4 breast
5 crown
6 forehead
7 left eye
8 left leg
9 left wing
10 nape
11 right eye
12 right leg
13 right wing
14 tail
15 throat
"""
LEFT_EYE, LEFT_LEG, LEFT_WING, RIGHT_EYE, RIGHT_LEG, RIGHT_WING = 7, 8, 9, 11, 12, 13
BEAK, TAIL = 2, 14


def _lines(path: Path) -> list[list[str]]:
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n") and "\n\n" not in text and "\r" not in text
    return [line.split(" ") for line in text.splitlines()]


def _table(root: Path, name: str) -> dict[int, list[str]]:
    rows = _lines(root / name)
    ids = [int(row[0]) for row in rows]
    assert ids == list(range(1, len(ids) + 1)), f"{name}: ids must be 1-based and consecutive"
    return {int(row[0]): row[1:] for row in rows}


def _part_locs(root: Path) -> dict[int, np.ndarray]:
    rows = _lines(root / "parts" / "part_locs.txt")
    locs: dict[int, list] = {}
    for row in rows:
        assert len(row) == 5 and row[4] in ("0", "1")
        assert re.fullmatch(r"\d+\.\d", row[2]) and re.fullmatch(r"\d+\.\d", row[3]), row
        if row[4] == "0":
            assert row[2:] == ["0.0", "0.0", "0"], "invisible parts are written as 0.0 0.0 0"
        locs.setdefault(int(row[0]), []).append((int(row[1]), *map(float, row[2:])))
    for image_id, rows_of_image in locs.items():
        assert [r[0] for r in rows_of_image] == list(range(1, 16)), f"image {image_id}: parts 1..15 in order"
    return {image_id: np.array([r[1:] for r in rows]) for image_id, rows in locs.items()}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_formats(synth_root: Path):
    assert (synth_root / "parts" / "parts.txt").read_text() == OFFICIAL_PARTS
    assert tuple(line.split(" ", 1)[1] for line in OFFICIAL_PARTS.splitlines()) == PART_NAMES

    classes = _table(synth_root, "classes.txt")
    assert classes == {1: ["001.Plain_Finch"], 2: ["002.Red_crowned_Finch"], 3: ["003.Red_crowned_Longbill"],
                       4: ["004.Red_crowned_Wingbarred_Longbill"]}  # fmt: skip
    images = _table(synth_root, "images.txt")
    labels = _table(synth_root, "image_class_labels.txt")
    assert len(images) == NUM_CLASSES * PER_CLASS
    for image_id, (relative,) in images.items():
        class_id = int(labels[image_id][0])
        folder = classes[class_id][0]
        species = folder.split(".", 1)[1]
        index = (image_id - 1) % PER_CLASS + 1
        assert relative == f"{folder}/{species}_{index:04d}.jpg"
        assert (synth_root / "images" / relative).is_file()
    assert sorted(p.name for p in (synth_root / "images").iterdir()) == [v[0] for v in classes.values()]

    number = r"\d+\.\d"
    for line in (synth_root / "bounding_boxes.txt").read_text().splitlines():
        assert re.fullmatch(rf"\d+ {number} {number} {number} {number}", line), line
    assert set(_part_locs(synth_root)) == set(images)

    readme = (synth_root / "README").read_text()
    assert "Synthetic" in readme and "seed=0" in readme and "num_classes=4, per_class=12" in readme


def test_pinned_numbers(synth_root: Path):
    """The first image of seed 0: if drawing or the random streams change, these lines change."""
    assert (synth_root / "bounding_boxes.txt").read_text().splitlines()[0] == "1 238.0 71.0 59.0 47.0"
    first = (synth_root / "parts" / "part_locs.txt").read_text().splitlines()[:3]
    assert first == ["1 1 259.9 86.8 1", "1 2 290.7 77.2 1", "1 3 270.5 102.1 1"]
    split = [row[0] for row in _table(synth_root, "train_test_split.txt").values()]
    assert "".join(split[:PER_CLASS]) == "001011101100"


def test_counts_per_class_and_split(synth_root: Path):
    labels = _table(synth_root, "image_class_labels.txt")
    split = _table(synth_root, "train_test_split.txt")
    assert Counter(int(v[0]) for v in labels.values()) == {c: PER_CLASS for c in range(1, NUM_CLASSES + 1)}
    assert {v[0] for v in split.values()} == {"0", "1"}
    for class_id in range(1, NUM_CLASSES + 1):
        members = [i for i, v in labels.items() if int(v[0]) == class_id]
        assert sum(split[i][0] == "0" for i in members) == PER_CLASS // 2


def test_read_cub_loads_it_unchanged(synth_root: Path):
    cub = pytest.importorskip("finegrain.data.cub")
    meta = cub.read_cub(synth_root)
    assert meta.problems == []
    assert meta.class_names == ["Plain_Finch", "Red_crowned_Finch", "Red_crowned_Longbill",
                                "Red_crowned_Wingbarred_Longbill"]  # fmt: skip
    assert list(meta.part_names) == list(PART_NAMES)
    assert (len(meta.records), len(meta.train), len(meta.test)) == (48, 24, 24)
    boxes = _table(synth_root, "bounding_boxes.txt")
    record = meta.records[5]
    assert record.box == tuple(float(v) for v in boxes[record.image_id])
    assert record.parts.shape == (15, 3) and record.path.is_file()


def test_boxes_and_parts_lie_inside(synth_root: Path):
    boxes = _table(synth_root, "bounding_boxes.txt")
    images = _table(synth_root, "images.txt")
    short_side = min(WIDTH, HEIGHT)
    for image_id, locs in _part_locs(synth_root).items():
        with Image.open(synth_root / "images" / images[image_id][0]) as image:
            assert image.size == (WIDTH, HEIGHT) and image.mode == "RGB"
        x, y, w, h = map(float, boxes[image_id])
        assert min(x, y) >= 0 and x + w <= WIDTH and y + h <= HEIGHT
        # Small birds: the box's longer side is roughly 12-40% of the image's shorter side.
        assert 0.1 * short_side < max(w, h) < 0.45 * short_side
        visible = locs[:, 2] == 1
        px, py = locs[visible, 0], locs[visible, 1]
        assert np.all((x <= px) & (px <= x + w) & (y <= py) & (py <= y + h)), image_id


def test_visibility_follows_facing(synth_root: Path):
    """Facing right (beak right of tail) shows the right side, as in the real CUB annotations."""
    directions = Counter()
    for image_id, locs in _part_locs(synth_root).items():
        visible = {part_id for part_id in range(1, 16) if locs[part_id - 1, 2] == 1}
        facing_right = locs[BEAK - 1, 0] > locs[TAIL - 1, 0]
        near, far = ({RIGHT_EYE, RIGHT_WING}, {LEFT_EYE, LEFT_WING})
        if not facing_right:
            near, far = far, near
        assert visible == set(range(1, 16)) - far, image_id
        assert near <= visible and {LEFT_LEG, RIGHT_LEG} <= visible
        directions[facing_right] += 1
    assert directions[True] >= 10 and directions[False] >= 10


def test_same_seed_same_bytes_other_seed_other_images(tmp_path: Path):
    arguments = dict(num_classes=2, per_class=3, image_size=(160, 128))
    first = _files(synthesize_birds(tmp_path / "a", seed=5, **arguments))
    assert first == _files(synthesize_birds(tmp_path / "b", seed=5, **arguments))
    other = _files(synthesize_birds(tmp_path / "c", seed=6, **arguments))
    assert first["classes.txt"] == other["classes.txt"] and first["images.txt"] == other["images.txt"]
    jpegs = [name for name in first if name.endswith(".jpg")]
    assert len(jpegs) == 6 and all(first[name] != other[name] for name in jpegs)
    assert first["bounding_boxes.txt"] != other["bounding_boxes.txt"]


def test_class_images_do_not_depend_on_the_number_of_classes(tmp_path: Path):
    two = _files(synthesize_birds(tmp_path / "two", num_classes=2, per_class=2, image_size=(128, 96)))
    three = _files(synthesize_birds(tmp_path / "three", num_classes=3, per_class=2, image_size=(128, 96)))
    assert all(three[name] == data for name, data in two.items() if name.startswith("images/"))


def test_species_rules():
    table = species_table(MAX_CLASSES)
    combos = [tuple(getattr(s, name) for name, _ in ATTRIBUTES) for s in table]
    assert len(set(combos)) == MAX_CLASSES and len({s.name for s in table}) == MAX_CLASSES
    for a, b in zip(combos, combos[1:], strict=False):
        assert sum(x != y for x, y in zip(a, b, strict=True)) == 1  # neighbours differ in one detail
    assert species_table(10) == table[:10]
    assert table[0] == Species() and table[0].name == "Plain_Finch"
    assert [s.name for s in table[4:7]] == [
        "Red_crowned_White_ringed_Wingbarred_Longbill",
        "Red_crowned_White_ringed_Wingbarred_Longtailed_Longbill",
        "Red_crowned_White_ringed_Wingbarred_Longtailed_Orange_billed_Longbill",
    ]
    # The 10 default species use every attribute, each with at least two values.
    for index, (_, values) in enumerate(ATTRIBUTES):
        assert len({c[index] for c in combos[:10]}) >= 2
        assert {c[index] for c in combos} == set(values)


@pytest.mark.parametrize("seed", range(6))
def test_bird_pixels_are_where_the_box_says(seed: int):
    species = species_table(10)[seed]
    sample = render_sample(species, np.random.default_rng(seed))
    empty = render_sample(species, np.random.default_rng(seed), draw_bird=False)
    assert sample.box == empty.box and np.array_equal(sample.parts, empty.parts)
    changed = np.abs(sample.image.astype(int) - empty.image.astype(int)).sum(axis=2) > 0
    rows, cols = np.nonzero(sample.mask > 0)
    x, y, w, h = sample.box
    assert (x, y, x + w, y + h) == (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
    assert not changed[sample.mask == 0].any()  # nothing outside the bird changes
    assert changed[sample.mask == 1].mean() > 0.9  # and the bird is really drawn
    assert (sample.mask == 1).sum() > 0.2 * w * h
    # the bird covers a small part of the image
    assert 0.003 < (sample.mask > 0).mean() < 0.12


def test_details_are_a_few_pixels_wide():
    """At 320x256 the head of a short-billed species spans several pixels: its details are not sub-pixel."""
    distances = []
    for seed in range(20):
        sample = render_sample(species_table(1)[0], np.random.default_rng(seed))
        eye = sample.parts[(RIGHT_EYE if sample.facing_right else LEFT_EYE) - 1, :2]
        distances.append(np.hypot(*(sample.parts[BEAK - 1, :2] - eye)))
    assert min(distances) > 3 and max(distances) < 20 and np.median(distances) > 5


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"num_classes": 1}, "num_classes"),
        ({"num_classes": MAX_CLASSES + 1}, f"2 to {MAX_CLASSES}"),
        ({"per_class": 1}, "per_class"),
        ({"seed": -1}, "seed"),
        ({"image_size": (320,)}, "image_size"),
        ({"image_size": (32, 256)}, "image_size"),
        ({"test_fraction": 0.0}, "test_fraction"),
        ({"test_fraction": 1.0}, "test_fraction"),
    ],
)
def test_bad_arguments(tmp_path: Path, arguments: dict, message: str):
    with pytest.raises(FinegrainError, match=re.escape(message)):
        synthesize_birds(tmp_path / "out", **arguments)
    assert not (tmp_path / "out").exists()


def test_refuses_non_empty_folder_unless_overwrite(tmp_path: Path):
    root = tmp_path / "birds"
    root.mkdir()
    (root / "notes.txt").write_text("mine")
    with pytest.raises(FinegrainError, match="not empty.*overwrite"):
        synthesize_birds(root, num_classes=2, per_class=2)
    synthesize_birds(root, num_classes=3, per_class=2, image_size=(128, 96), overwrite=True)
    synthesize_birds(root, num_classes=2, per_class=2, image_size=(128, 96), overwrite=True)
    # Overwriting replaces what the generator wrote (no class 3 left behind) and nothing else.
    assert sorted(p.name for p in (root / "images").iterdir()) == ["001.Plain_Finch", "002.Red_crowned_Finch"]
    assert (root / "notes.txt").read_text() == "mine"
    (tmp_path / "file").write_text("")
    with pytest.raises(FinegrainError, match="is a file"):
        synthesize_birds(tmp_path / "file", overwrite=True)


def test_bird_size_sets_the_framing(tmp_path):
    from finegrain.data.cub import read_cub

    def mean_length(root) -> float:
        records = read_cub(root).records
        return sum(max(r.box[2], r.box[3]) for r in records) / len(records) / 256

    small = mean_length(synthesize_birds(tmp_path / "small", num_classes=2, per_class=4))
    large = mean_length(synthesize_birds(tmp_path / "large", num_classes=2, per_class=4, bird_size=(0.6, 0.7)))
    assert small < 0.35 < 0.5 < large  # box sides follow the bird length (beak to tail, plus legs and tilt)
    with pytest.raises(FinegrainError, match="bird_size"):
        synthesize_birds(tmp_path / "bad", num_classes=2, per_class=4, bird_size=(0.5, 0.95))
