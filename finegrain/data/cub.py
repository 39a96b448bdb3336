"""Reader and checker for the official CUB-200-2011 folder layout.

The same reader serves the real dataset and the synthetic birds that `finegrain data synth` writes, so both go
through the same checks. Coordinates stay in original image pixels (x = column, y = row), as in the files.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from finegrain.errors import FinegrainError

PART_NAMES = (
    "back", "beak", "belly", "breast", "crown", "forehead", "left eye", "left leg", "left wing", "nape",
    "right eye", "right leg", "right wing", "tail", "throat",
)  # fmt: skip
REQUIRED_FILES = ("images.txt", "classes.txt", "image_class_labels.txt", "train_test_split.txt",
                  "bounding_boxes.txt")  # fmt: skip
# Boxes in the official files are hand-drawn; allow them to touch the border by a pixel.
BOX_TOLERANCE_PX = 1.0


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
    problems: list[str] = field(default_factory=list)  # disagreements between the metadata files

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


def _read_part_locs(path: Path, image_ids: Sequence[int], num_parts: int, problems: list[str]) -> dict:
    """parts/part_locs.txt -> {image_id: (num_parts, 3) array}. Vectorised: the real file has 176,820 lines."""
    if not path.is_file():
        return {}
    try:
        table = np.loadtxt(path, dtype=np.float64, ndmin=2)
    except ValueError as e:
        problems.append(f"parts/part_locs.txt: unreadable ({e})")
        return {}
    locs: dict[int, np.ndarray] = {}
    counts: dict[int, int] = defaultdict(int)
    for row in table:
        image_id, part_id = int(row[0]), int(row[1])
        if not 1 <= part_id <= num_parts:
            problems.append(f"parts/part_locs.txt: image {image_id} has unknown part {part_id}")
            continue
        locs.setdefault(image_id, np.zeros((num_parts, 3), np.float32))[part_id - 1] = row[2:5]
        counts[image_id] += 1
    listed = set(image_ids)
    extra = sorted(set(locs) - listed)
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
    boxes = _read_table(root / "bounding_boxes.txt", 4, problems)
    part_names = _read_names(root / "parts" / "parts.txt")
    image_ids = sorted(images)
    parts = _read_part_locs(root / "parts" / "part_locs.txt", image_ids, len(part_names), problems)

    reference = set(images)
    for name, table in (("image_class_labels.txt", labels), ("train_test_split.txt", split),
                        ("bounding_boxes.txt", boxes)):  # fmt: skip
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
            continue  # already reported as a disagreement
        class_id = int(labels[image_id][0])
        if class_id not in label_of:
            continue
        records.append(CUBRecord(
            image_id=image_id,
            path=root / "images" / images[image_id][0],
            label=label_of[class_id],
            class_id=class_id,
            is_train=split[image_id][0] == "1",
            box=tuple(float(v) for v in boxes[image_id]),
            parts=parts.get(image_id, no_parts),
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


@dataclass
class CheckReport:
    """What `finegrain data check` prints; `problems` empty means the folder is ready to train on."""

    metadata: CUBMetadata
    missing: list[Path]
    broken: list[tuple[Path, str]]
    box_problems: list[str]

    @property
    def problems(self) -> list[str]:
        found = list(self.metadata.problems)
        if self.missing:
            examples = ", ".join(str(p.relative_to(self.metadata.root)) for p in self.missing[:3])
            found.append(f"{len(self.missing):,} listed images missing on disk, e.g. {examples}")
        found += [f"{path}: {problem}" for path, problem in self.broken]
        found += self.box_problems
        return found

    def format(self) -> str:
        meta = self.metadata
        selected = len(meta.class_ids) != meta.num_listed_classes
        num_train = len(meta.train)
        lines = [
            f"CUB-200-2011 folder {meta.root}",
            f"  images      {len(meta.records):,}" + (" (selected classes)" if selected else ""),
            f"  classes     {len(meta.class_ids):,}" + (f" of {meta.num_listed_classes}" if selected else ""),
            f"  train/test  {num_train:,}/{len(meta.records) - num_train:,}",
            f"  parts       {len(meta.part_names)}",
            f"  attributes  {len(meta.attribute_names)}",
        ]
        problems = self.problems
        if problems:
            lines.append(f"{len(problems)} problem(s):")
            lines += [f"  - {p}" for p in problems]
        else:
            lines.append("no problems found")
        return "\n".join(lines)


def _box_problem(record: CUBRecord, size: tuple[int, int]) -> str | None:
    x, y, w, h = record.box
    width, height = size
    tol = BOX_TOLERANCE_PX
    if w <= 0 or h <= 0 or x < -tol or y < -tol or x + w > width + tol or y + h > height + tol:
        return (f"image {record.image_id} ({record.path.name}): box x={x} y={y} w={w} h={h} "
                f"lies outside the {width}x{height} image")  # fmt: skip
    return None


def check_cub(root: str | Path, classes: str | Iterable[int] | None = None, decode: bool = True,
              workers: int = 4) -> CheckReport:  # fmt: skip
    """Read the folder and look at every selected image: missing, undecodable, or with a box outside it."""
    from finegrain.data.images import check_image, image_size

    metadata = read_cub(root, classes)
    present = [r for r in metadata.records if r.path.is_file()]
    missing = [r.path for r in metadata.records if not r.path.is_file()]

    def inspect(record: CUBRecord) -> tuple[CUBRecord, str | None, tuple[int, int] | None]:
        problem = check_image(record.path) if decode else None
        if problem is not None:
            return record, problem, None
        try:
            return record, None, image_size(record.path)
        except FinegrainError as e:
            return record, str(e), None

    # PIL releases the GIL while decoding, so threads give a real speed-up on many files.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(inspect, present))
    broken = [(r.path, problem) for r, problem, _ in results if problem is not None]
    box_problems = [p for r, _, size in results if size is not None and (p := _box_problem(r, size))]
    return CheckReport(metadata=metadata, missing=missing, broken=broken, box_problems=box_problems)
