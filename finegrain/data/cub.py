"""Reader and checker for the official CUB-200-2011 folder layout.

The same reader serves the real dataset and the synthetic birds that `finegrain data synth` writes, so both go
through the same checks. Coordinates stay in original image pixels (x = column, y = row), as in the files.
"""

from __future__ import annotations

import logging
import math
import random
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from finegrain.errors import FinegrainError

log = logging.getLogger(__name__)

PART_NAMES = (
    "back", "beak", "belly", "breast", "crown", "forehead", "left eye", "left leg", "left wing", "nape",
    "right eye", "right leg", "right wing", "tail", "throat",
)  # fmt: skip
# Body regions as groups of CUB parts: what an ST-CNN part named after one is trained to frame (tasks.stn), and
# where evaluation asks whether a box holds the region. Two parts: head and body; four: head, the front, the
# upperparts and the tail with the legs.
PART_REGIONS: dict[str, tuple[str, ...]] = {
    "head": ("beak", "crown", "forehead", "left eye", "right eye", "nape", "throat"),
    "body": ("back", "breast", "belly", "left wing", "right wing"),
    "front": ("throat", "breast", "belly"),
    "upperparts": ("back", "left wing", "right wing"),
    "tail": ("tail", "left leg", "right leg"),
}
REQUIRED_FILES = ("images.txt", "classes.txt", "image_class_labels.txt", "train_test_split.txt",
                  "bounding_boxes.txt")  # fmt: skip
# Official boxes are hand-drawn and some overrun their photograph (image 1218 by 32 px): they are clipped to it.


@dataclass(eq=False)
class CUBRecord:
    """One annotated image. `label` is 0-based within the selected classes; `class_id` is the official id."""

    image_id: int
    path: Path
    label: int
    class_id: int
    is_train: bool
    box: tuple[float, float, float, float]  # x, y, width, height in pixels
    parts: np.ndarray  # (15, 3) float32: x, y, visible (0/1); invisible parts are (0, 0, 0)


@dataclass
class CUBMetadata:
    """Everything read from a CUB folder, restricted to the selected classes."""

    root: Path
    records: list[CUBRecord]
    class_names: list[str]  # in label order
    class_ids: list[int]  # official ids, in label order
    num_listed_images: int  # over all classes, before selection
    num_listed_classes: int
    part_names: list[str]
    attribute_names: list[str]
    problems: list[str] = field(default_factory=list)  # disagreements between the metadata files, bad values
    notes: list[str] = field(default_factory=list)  # imperfections that do not stop training

    @property
    def train(self) -> list[CUBRecord]:
        return [r for r in self.records if r.is_train]

    @property
    def test(self) -> list[CUBRecord]:
        return [r for r in self.records if not r.is_train]


def parse_class_spec(spec: str | int | Iterable[int] | None) -> list[int] | None:
    """`"1-10"`, `"1-10,15"`, `7`, `[1, 2, 3]` or None (all classes) -> sorted official class ids."""
    if spec is None or spec == "" or spec == "all":
        return None
    if isinstance(spec, int):
        return [spec]
    if isinstance(spec, str):
        ids: set[int] = set()
        for chunk in spec.replace(" ", "").split(","):
            try:
                if "-" in chunk:
                    first, last = (int(v) for v in chunk.split("-", 1))
                    if first > last:
                        raise ValueError
                    ids.update(range(first, last + 1))
                else:
                    ids.add(int(chunk))
            except ValueError:
                raise FinegrainError(
                    f"classes: cannot read {spec!r}; write ranges and ids of the official class numbers, "
                    "e.g. '1-10' or '1-10,15,20-22'"
                ) from None
        return sorted(ids)
    return sorted({int(v) for v in spec})


def _read_table(path: Path, columns: int, problems: list[str]) -> dict[int, list[str]]:
    """`id value...` lines -> {id: [values]}; malformed and repeated lines are reported, not dropped silently."""
    table: dict[int, list[str]] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            fields = line.split(maxsplit=columns) if columns else line.split(maxsplit=1)
            try:
                key = int(fields[0])
            except ValueError:
                problems.append(f"{path.name} line {number}: cannot read an id from {line.strip()!r}")
                continue
            if key in table:
                problems.append(f"{path.name} line {number}: id {key} appears twice")
            table[key] = [v.strip() for v in fields[1:]]
    return table


def _read_names(path: Path) -> list[str]:
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as f:
        return [line.strip().split(maxsplit=1)[1] for line in f if line.strip()]


def _read_boxes(table: dict[int, list[str]], problems: list[str]) -> dict[int, tuple[float, float, float, float]]:
    """bounding_boxes.txt rows -> {image_id: (x, y, w, h)}; a row that is not four finite numbers with a positive
    width and height is reported and its image left out."""
    boxes, bad = {}, []
    for image_id, values in table.items():
        try:
            box = tuple(float(v) for v in " ".join(values).split())
        except ValueError:
            box = ()
        if len(box) == 4 and all(math.isfinite(v) for v in box) and box[2] > 0 and box[3] > 0:
            boxes[image_id] = box
        else:
            bad.append((image_id, " ".join(values)))
    if bad:
        examples = ", ".join(f"image {i} ({v!r})" for i, v in bad[:3])
        problems.append(f"bounding_boxes.txt: {len(bad)} box(es) are not four finite numbers x y width height with "
                        f"a positive width and height, e.g. {examples}; fix those lines")  # fmt: skip
    return boxes


def _read_part_locs(path: Path, image_ids: Sequence[int], num_parts: int, problems: list[str]) -> dict:
    """parts/part_locs.txt -> {image_id: (num_parts, 3) array}. Vectorised: the real file has 176,820 lines.
    Images with a value that is not a finite number, or a visibility other than 0/1, are reported and left out."""
    try:
        table = np.loadtxt(path, dtype=np.float64, ndmin=2)
    except ValueError as e:
        problems.append(f"parts/part_locs.txt: unreadable ({e}); every line must be `image part x y visible`")
        return {}
    if table.size and table.shape[1] != 5:
        problems.append(f"parts/part_locs.txt: {table.shape[1]} columns, not 5 (image part x y visible)")
        return {}
    locs: dict[int, np.ndarray] = {}
    counts: dict[int, int] = defaultdict(int)
    bad: set[int] = set()
    for row in table:
        image_id, part_id = int(row[0]), int(row[1])
        if not 1 <= part_id <= num_parts:
            problems.append(f"parts/part_locs.txt: image {image_id} has unknown part {part_id}")
            continue
        if not np.isfinite(row[2:5]).all() or row[4] not in (0.0, 1.0):
            bad.add(image_id)
        locs.setdefault(image_id, np.zeros((num_parts, 3), np.float32))[part_id - 1] = row[2:5]
        counts[image_id] += 1
    if bad:
        problems.append(f"parts/part_locs.txt: {len(bad)} image(s) with a value that is not a finite number or a "
                        f"visibility other than 0/1, e.g. ids {sorted(bad)[:3]}; fix those lines")  # fmt: skip
        for image_id in bad:
            del locs[image_id]
    listed = set(image_ids)
    extra = sorted(set(locs) - listed - bad)
    if extra:
        problems.append(f"parts/part_locs.txt: {len(extra)} image ids not in images.txt, e.g. {extra[:3]}")
    incomplete = [i for i in image_ids if counts.get(i, 0) != num_parts]
    if incomplete:
        problems.append(
            f"parts/part_locs.txt: {len(incomplete)} images without exactly {num_parts} part rows, "
            f"e.g. ids {incomplete[:3]}"
        )
    return locs


def _disagreement(name: str, ids: set[int], reference: set[int]) -> list[str]:
    missing, extra = sorted(reference - ids), sorted(ids - reference)
    problems = []
    if missing:
        problems.append(f"{name}: {len(missing)} image ids of images.txt are missing, e.g. {missing[:3]}")
    if extra:
        problems.append(f"{name}: {len(extra)} image ids not in images.txt, e.g. {extra[:3]}")
    return problems


def read_cub(root: str | Path, classes: str | int | Iterable[int] | None = None) -> CUBMetadata:
    """Read a CUB-200-2011 folder; `classes` selects official class ids and renumbers labels from 0."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FinegrainError(
            f"CUB folder {root} does not exist: download it with `finegrain data prepare-cub {root.parent}` "
            f"or make synthetic birds with `finegrain data synth {root}`"
        )
    absent = [name for name in REQUIRED_FILES if not (root / name).is_file()]
    if absent:
        raise FinegrainError(
            f"{root} is not a CUB-200-2011 folder: {', '.join(absent)} missing. Point data.root at the folder that "
            "holds images.txt (the archive unpacks to CUB_200_2011/)"
        )
    problems: list[str] = []
    images = _read_table(root / "images.txt", 1, problems)
    class_table = _read_table(root / "classes.txt", 1, problems)
    labels = _read_table(root / "image_class_labels.txt", 1, problems)
    split = _read_table(root / "train_test_split.txt", 1, problems)
    box_table = _read_table(root / "bounding_boxes.txt", 4, problems)
    boxes = _read_boxes(box_table, problems)
    part_names = _read_names(root / "parts" / "parts.txt") or list(PART_NAMES)
    image_ids = sorted(images)
    notes: list[str] = []
    part_locs = root / "parts" / "part_locs.txt"
    if part_locs.is_file():
        parts = _read_part_locs(part_locs, image_ids, len(part_names), problems)
    else:
        parts = None
        notes.append("parts/part_locs.txt is absent: no part locations (training works; part scores and part "
                     "supervision need them)")  # fmt: skip

    reference = set(images)
    for name, table in (("image_class_labels.txt", labels), ("train_test_split.txt", split),
                        ("bounding_boxes.txt", box_table)):  # fmt: skip
        problems += _disagreement(name, set(table), reference)
    unknown_classes = sorted({int(v[0]) for v in labels.values()} - set(class_table))
    if unknown_classes:
        problems.append(f"image_class_labels.txt: class ids not in classes.txt: {unknown_classes[:5]}")

    selected = parse_class_spec(classes)
    if selected is None:
        selected = sorted(class_table)
    not_listed = [c for c in selected if c not in class_table]
    if not_listed:
        raise FinegrainError(
            f"classes: ids {not_listed[:5]} are not in {root / 'classes.txt'} "
            f"(it lists {min(class_table)}-{max(class_table)})"
        )
    label_of = {class_id: label for label, class_id in enumerate(selected)}

    records = []
    no_parts = np.zeros((len(PART_NAMES), 3), np.float32)
    for image_id in image_ids:
        if image_id not in labels or image_id not in split or image_id not in boxes:
            continue  # already reported as a disagreement or a bad value
        if parts is not None and image_id not in parts:
            continue  # part values reported above
        class_id = int(labels[image_id][0])
        if class_id not in label_of:
            continue
        records.append(CUBRecord(
            image_id=image_id,
            path=root / "images" / images[image_id][0],
            label=label_of[class_id],
            class_id=class_id,
            is_train=split[image_id][0] == "1",
            box=boxes[image_id],
            parts=no_parts if parts is None else parts[image_id],
        ))  # fmt: skip
    return CUBMetadata(
        root=root,
        records=records,
        class_names=[_species_name(class_table[c][0]) for c in selected],
        class_ids=selected,
        num_listed_images=len(images),
        num_listed_classes=len(class_table),
        part_names=part_names,
        attribute_names=_read_names(root / "attributes.txt") or _read_names(root.parent / "attributes.txt"),
        problems=problems,
        notes=notes,
    )


def _species_name(folder: str) -> str:
    """`001.Black_footed_Albatross` -> `Black_footed_Albatross`."""
    return folder.split(".", 1)[1] if "." in folder else folder


def split_train_val(records: Sequence[CUBRecord], val_fraction: float, seed: int) -> tuple[list, list]:
    """Carve a validation set from the official train split: stratified per class, seeded."""
    if not 0.0 <= val_fraction < 1.0:
        raise FinegrainError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
    by_class: dict[int, list[CUBRecord]] = defaultdict(list)
    for record in records:
        by_class[record.label].append(record)
    rng = random.Random(seed)
    train, val = [], []
    for label in sorted(by_class):
        members = sorted(by_class[label], key=lambda r: r.image_id)
        rng.shuffle(members)
        count = round(len(members) * val_fraction)
        if val_fraction > 0 and len(members) > 1:
            count = min(max(count, 1), len(members) - 1)  # every class in both parts
        val += members[:count]
        train += members[count:]
    return sorted(train, key=lambda r: r.image_id), sorted(val, key=lambda r: r.image_id)
