"""`finegrain predict` on files: finding the photos, predicting them in batches, and writing the results as a
table, JSON or CSV."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from finegrain.data.images import ImageDecodeError
from finegrain.errors import FinegrainError

if TYPE_CHECKING:
    from finegrain.predict import Decoded, Predictor

RESULT_SUFFIXES = (".json", ".csv")
PROGRESS_MIN_FILES = 20  # fewer images finish before a bar would say anything
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def find_images(paths: Sequence[str | Path]) -> tuple[list[Path], list[str]]:
    """Image files named or inside the folders named (recursively, sorted), and one problem per bad path."""
    files, problems = [], []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            files += found
            if not found:
                problems.append(f"{path}: no images ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
        elif path.is_file():
            files.append(path)
        else:
            problems.append(f"{path}: no such file or folder")
    return files, problems


def predict_files(predictor: Predictor, files: Sequence[Path], top_k: int = 5, batch_size: int = 32,
                  viz_dir: Path | None = None) -> tuple[list[dict], list[str]]:  # fmt: skip
    """Predict image files, skipping the ones that do not decode: ([{"image", "predictions"}], problems).

    With `viz_dir`, also writes each image's picture there as <file stem>.png (numbered when stems repeat).
    A progress bar shows on a terminal when there are many files.
    """
    from tqdm import tqdm

    problems: list[str] = []

    def decoded() -> Iterator[Decoded]:
        for path in tqdm(files, unit="image", disable=True if len(files) < PROGRESS_MIN_FILES else None):
            try:
                yield str(path), *predictor.decode(path)
            except ImageDecodeError as e:
                problems.append(str(e))

    results, viz_names = [], set()
    for images, output in predictor._run(decoded(), batch_size):
        if viz_dir is None:
            predictions = predictor._top_k(output.logits, top_k)
        else:
            from finegrain.visualize import render

            explanations = predictor._explain(images, output, top_k)
            for explanation in explanations:
                render(explanation).save(_unique_path(viz_dir, Path(explanation.source).stem, viz_names))
            predictions = [e.predictions for e in explanations]
        results += [{"image": name, "predictions": p} for (name, *_), p in zip(images, predictions, strict=True)]
    return results, problems


def format_table(results: list[dict]) -> str:
    """One row per prediction: the image (on its first row), rank, species, score."""
    rows = [(r["image"] if rank == 1 else "", str(rank), p["label"], f"{100 * p['score']:.1f}%")
            for r in results for rank, p in enumerate(r["predictions"], 1)]  # fmt: skip
    header = ("image", "rank", "species", "score")
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(4)]
    w_image, w_rank, w_species, w_score = widths
    lines = [f"{a:<{w_image}}  {b:>{w_rank}}  {c:<{w_species}}  {d:>{w_score}}" for a, b, c, d in (header, *rows)]
    return "\n".join(lines)


def write_results(results: list[dict], path: Path) -> None:
    """.json: the results as returned; .csv: one row per prediction (image, rank, class_id, label, score).

    Written to a temporary sibling and renamed into place: an interrupted write leaves the old file whole."""
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        with partial.open("w", newline="") as f:
            if path.suffix.lower() == ".json":
                f.write(json.dumps(results, indent=2) + "\n")
            else:
                writer = csv.writer(f)
                writer.writerow(["image", "rank", "class_id", "label", "score"])
                for result in results:
                    for rank, p in enumerate(result["predictions"], 1):
                        writer.writerow([result["image"], rank, p["class_id"], p["label"], f"{p['score']:.6f}"])
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def check_output_path(path: Path) -> None:
    """Fail before any work when results could not be written to `path`."""
    if path.suffix.lower() not in RESULT_SUFFIXES:
        raise FinegrainError(f"--output {path} must end in {' or '.join(RESULT_SUFFIXES)}")
    if not path.parent.is_dir():
        raise FinegrainError(f"--output {path}: folder {path.parent} does not exist; create it first")
    if path.is_dir():
        raise FinegrainError(f"--output {path} is a folder; name a file in it, e.g. {path / 'results.csv'}")


def _unique_path(folder: Path, stem: str, used: set[str]) -> Path:
    name, n = stem, 1
    while name in used:
        n += 1
        name = f"{stem}_{n}"
    used.add(name)
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{name}.png"
