"""`finegrain data check` and the pre-flight check of every run: each selected image opened (or decoded), official
boxes that overrun their photograph clipped and noted, and what was found remembered per file while it is unchanged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from finegrain.data.cub import CUBMetadata, CUBRecord, read_cub
from finegrain.errors import FinegrainError
from finegrain.geometry import clip_to_image

log = logging.getLogger(__name__)

NOTES_LISTED = 10  # clipped boxes listed one by one in a report; the rest are counted


@dataclass
class CheckReport:
    """What `finegrain data check` prints. `problems` stop a run (unusable data); `notes` do not.

    usable: the selected records that are on disk, decode, and keep a box with area inside their photograph, with
    boxes and visible parts clipped to the photograph (new records; the metadata's own stay as in the files).
    """

    metadata: CUBMetadata
    missing: list[Path]
    broken: list[tuple[Path, str]]
    annotation_problems: list[str]
    notes: list[str]
    usable: list[CUBRecord]

    @property
    def problems(self) -> list[str]:
        found = list(self.metadata.problems)
        if self.missing:
            examples = ", ".join(str(p.relative_to(self.metadata.root)) for p in self.missing[:3])
            found.append(f"{len(self.missing):,} listed images missing on disk, e.g. {examples}")
        found += [f"{path}: {problem}" for path, problem in self.broken]
        found += self.annotation_problems
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
        if self.notes:  # a note's detail lines start with spaces
            lines.append(f"{sum(not note.startswith(' ') for note in self.notes)} note(s), training goes ahead:")
            lines += [f"    {note.strip()}" if note.startswith(" ") else f"  - {note}" for note in self.notes]
        problems = self.problems
        if problems:
            lines.append(f"{len(problems)} problem(s):")
            lines += [f"  - {p}" for p in problems]
        else:
            lines.append("no problems found")
        return "\n".join(lines)


def _clip_notes(clipped: list[tuple[CUBRecord, float, tuple[int, int]]]) -> list[str]:
    """One note per clipped box (the worst first, the first NOTES_LISTED), headed by their count and worst."""
    if not clipped:
        return []
    clipped = sorted(clipped, key=lambda item: -item[1])
    worst = clipped[0][1]
    notes = [f"{len(clipped)} box(es) of bounding_boxes.txt overrun their photograph by up to {worst:g} px and are "
             "clipped to it"]  # fmt: skip
    for record, overrun, (width, height) in clipped[:NOTES_LISTED]:
        x, y, w, h = record.box
        notes.append(f"  image {record.image_id} ({record.path.name}, {width}x{height}): box x={x:g} y={y:g} "
                     f"w={w:g} h={h:g} overruns by {overrun:g} px")  # fmt: skip
    if len(clipped) > NOTES_LISTED:
        notes.append(f"  ... and {len(clipped) - NOTES_LISTED} more")
    return notes


def cache_dir() -> Path:
    """Where finegrain remembers what it found: $FINEGRAIN_CACHE_DIR, else $XDG_CACHE_HOME/finegrain, else
    ~/.cache/finegrain."""
    if folder := os.environ.get("FINEGRAIN_CACHE_DIR"):
        return Path(folder)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "finegrain"


class ImageCheckCache:
    """What the check found per image file (decoded or not, its problem, its upright size), valid while the file's
    size and modification time stay the same. One JSON file per dataset folder; a cache that cannot be read or
    written is ignored, never an error."""

    def __init__(self, root: Path):
        digest = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:16]
        self.path = cache_dir() / "image-checks" / f"{digest}.json"
        try:
            self.entries: dict[str, list] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.entries = {}
        self.changed = False

    @staticmethod
    def _stamp(path: Path) -> list[int]:
        stat = path.stat()
        return [stat.st_size, stat.st_mtime_ns]

    def get(self, path: Path, decode: bool) -> tuple[str | None, tuple[int, int] | None] | None:
        """(problem, size) remembered for this file as it is now, or None. A header-only entry does not answer a
        decoding check."""
        entry = self.entries.get(str(path))
        if entry is None or entry[0] != self._stamp(path) or (decode and not entry[1]):
            return None
        return entry[2], (tuple(entry[3]) if entry[3] else None)

    def put(self, path: Path, decoded: bool, problem: str | None, size: tuple[int, int] | None) -> None:
        self.entries[str(path)] = [self._stamp(path), decoded, problem, list(size) if size else None]
        self.changed = True

    def save(self) -> None:
        if not self.changed:
            return
        partial = self.path.with_name(f".{self.path.name}.{os.getpid()}.partial")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            partial.write_text(json.dumps(self.entries))
            os.replace(partial, self.path)
        except OSError as e:
            log.debug("image check cache not written (%s)", e)
            partial.unlink(missing_ok=True)


def check_cub(source: str | Path | CUBMetadata, classes: str | Iterable[int] | None = None, decode: bool = True,
              workers: int = 4) -> CheckReport:  # fmt: skip
    """Look at every selected image of a folder (or of metadata already read): missing or undecodable files and
    boxes without area inside their photograph are problems; boxes and parts that overrun it are clipped and noted.

    What was found is remembered per file (see ImageCheckCache); a progress bar shows on a terminal.
    """
    from tqdm import tqdm

    from finegrain.data.images import check_image, image_size

    metadata = source if isinstance(source, CUBMetadata) else read_cub(source, classes)
    present = [r for r in metadata.records if r.path.is_file()]
    missing = [r.path for r in metadata.records if not r.path.is_file()]
    cache = ImageCheckCache(metadata.root)

    def inspect(record: CUBRecord) -> tuple[str | None, tuple[int, int] | None]:
        remembered = cache.get(record.path, decode)
        if remembered is not None:
            return remembered
        problem, size = check_image(record.path) if decode else None, None
        if problem is None:
            try:
                size = image_size(record.path)
            except FinegrainError as e:
                problem = getattr(e, "problem", str(e))
        cache.put(record.path, decode, problem, size)
        return problem, size

    # PIL releases the GIL while decoding, so threads give a real speed-up on many files.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(tqdm(pool.map(inspect, present), total=len(present), desc="checking images", unit="image",
                            disable=None, leave=False))  # fmt: skip
    cache.save()
    broken, annotation_problems, clipped, usable = [], [], [], []
    for record, (problem, size) in zip(present, results, strict=True):
        if problem is not None:
            broken.append((record.path, problem))
            continue
        box, parts, overrun = clip_to_image(record.box, record.parts, *size)
        fitted = dataclasses.replace(record, box=box, parts=parts)
        if fitted.box[2] <= 0 or fitted.box[3] <= 0:
            x, y, w, h = record.box
            annotation_problems.append(f"image {record.image_id} ({record.path.name}): box x={x:g} y={y:g} w={w:g} "
                                       f"h={h:g} has no area inside the {size[0]}x{size[1]} photograph; fix its line "
                                       "in bounding_boxes.txt")  # fmt: skip
            continue
        if overrun > 0:
            clipped.append((record, overrun, size))
        usable.append(fitted)
    return CheckReport(metadata=metadata, missing=missing, broken=broken, annotation_problems=annotation_problems,
                       notes=[*metadata.notes, *_clip_notes(clipped)], usable=usable)  # fmt: skip
