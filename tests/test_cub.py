"""The CUB reader and checker, against the real metadata files and hand-made broken folders."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finegrain.cli import main
from finegrain.data.checks import check_cub
from finegrain.data.cub import PART_NAMES, parse_class_spec, read_cub, split_train_val
from finegrain.errors import FinegrainError
from tests.conftest import CUB_ROOT, needs_cub


def write_cub(root: Path, boxes: dict[int, str] | None = None, size: tuple[int, int] = (60, 40)) -> Path:
    """Two classes, three images each (ids 1-6), tiny JPEGs of `size` (width, height)."""
    (root / "parts").mkdir(parents=True)
    (root / "classes.txt").write_text("1 001.Alpha_bird\n2 002.Beta_bird\n")
    images, labels, split, box_lines, part_lines = [], [], [], [], []
    for image_id in range(1, 7):
        class_id = 1 if image_id <= 3 else 2
        rel = f"{class_id:03d}.{'Alpha' if class_id == 1 else 'Beta'}_bird/img_{image_id}.jpg"
        (root / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, (image_id * 30, 0, 0)).save(root / "images" / rel)
        images.append(f"{image_id} {rel}")
        labels.append(f"{image_id} {class_id}")
        split.append(f"{image_id} {int(image_id % 3 != 0)}")
        box_lines.append(f"{image_id} {(boxes or {}).get(image_id, '5.0 6.0 20.0 10.0')}")
        for part_id in range(1, 16):
            visible = part_id == 2
            part_lines.append(f"{image_id} {part_id} {'12.0 9.0 1' if visible else '0.0 0.0 0'}")
    for name, lines in (("images.txt", images), ("image_class_labels.txt", labels),
                        ("train_test_split.txt", split), ("bounding_boxes.txt", box_lines),
                        ("parts/part_locs.txt", part_lines)):  # fmt: skip
        (root / name).write_text("\n".join(lines) + "\n")
    (root / "parts" / "parts.txt").write_text("".join(f"{i} {n}\n" for i, n in enumerate(PART_NAMES, 1)))
    return root


def test_parse_class_spec():
    assert parse_class_spec("1-3,7, 9-10") == [1, 2, 3, 7, 9, 10]
    assert parse_class_spec([3, 1, 3]) == [1, 3]
    assert parse_class_spec(5) == [5]
    assert parse_class_spec(None) is None and parse_class_spec("all") is None
    for bad in ("1-", "a", "5-2"):
        with pytest.raises(FinegrainError, match="classes"):
            parse_class_spec(bad)


def test_reader_on_a_small_folder(tmp_path):
    meta = read_cub(write_cub(tmp_path / "cub"), classes=[2])
    assert meta.class_names == ["Beta_bird"] and meta.class_ids == [2]
    assert [r.image_id for r in meta.records] == [4, 5, 6]
    assert {r.label for r in meta.records} == {0}  # renumbered from 0
    record = meta.records[0]
    assert record.box == (5.0, 6.0, 20.0, 10.0)
    assert record.parts.shape == (15, 3)
    np.testing.assert_array_equal(record.parts[1], [12.0, 9.0, 1.0])
    assert record.parts[:, 2].sum() == 1
    assert [r.is_train for r in meta.records] == [True, True, False]
    assert meta.problems == []


def test_reader_reports_disagreeing_ids(tmp_path):
    root = write_cub(tmp_path / "cub")
    (root / "bounding_boxes.txt").write_text("1 5 6 20 10\n2 5 6 20 10\n99 1 1 1 1\n")
    with open(root / "image_class_labels.txt", "a") as f:
        f.write("junk line\n")
    meta = read_cub(root)
    text = "\n".join(meta.problems)
    assert "bounding_boxes.txt: 4 image ids of images.txt are missing" in text
    assert "bounding_boxes.txt: 1 image ids not in images.txt" in text
    assert "image_class_labels.txt line 7" in text
    assert [r.image_id for r in meta.records] == [1, 2]  # only images with every annotation


def test_reader_errors_name_the_fix(tmp_path):
    with pytest.raises(FinegrainError, match="prepare-cub"):
        read_cub(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FinegrainError, match="images.txt"):
        read_cub(tmp_path / "empty")
    with pytest.raises(FinegrainError, match=r"ids \[7\] are not in"):
        read_cub(write_cub(tmp_path / "cub"), classes="1,7")


def test_check_finds_missing_broken_and_boxes_without_area(tmp_path):
    root = write_cub(tmp_path / "cub", boxes={2: "61.0 30.0 20.0 20.0"})  # starts right of the 60x40 photo
    meta = read_cub(root)
    meta.records[0].path.unlink()
    meta.records[2].path.write_bytes(b"not a jpeg")
    report = check_cub(root)
    assert report.missing == [meta.records[0].path]
    assert [p for p, _ in report.broken] == [meta.records[2].path]
    assert len(report.annotation_problems) == 1 and "image 2" in report.annotation_problems[0]
    assert "has no area inside the 60x40 photograph" in report.annotation_problems[0]
    assert len(report.problems) == 3
    assert "1 listed images missing on disk" in report.format()
    assert [r.image_id for r in report.usable] == [4, 5, 6]


def test_boxes_and_parts_that_overrun_the_photo_are_clipped_and_noted(tmp_path):
    # 60x40 photos: image 1 overruns by 3 px right and 2 px below, image 5 by 32 px left; image 3 is inside
    root = write_cub(tmp_path / "cub", boxes={1: "45.0 30.0 18.0 12.0", 5: "-32.0 4.0 50.0 20.0"})
    lines = (root / "parts" / "part_locs.txt").read_text().splitlines()
    lines[1] = "1 2 65.0 -1.0 1"  # image 1's beak 5 px right of and 1 px above the photo
    (root / "parts" / "part_locs.txt").write_text("\n".join(lines) + "\n")
    report = check_cub(root)
    assert report.problems == []
    usable = {r.image_id: r for r in report.usable}
    assert usable[1].box == (45.0, 30.0, 15.0, 10.0)  # x + w = 60, y + h = 40: the photo's edges
    assert usable[5].box == (0.0, 4.0, 18.0, 20.0)
    assert usable[3].box == (5.0, 6.0, 20.0, 10.0)
    np.testing.assert_array_equal(usable[1].parts[1], [60.0, 0.0, 1.0])
    np.testing.assert_array_equal(usable[1].parts[0], [0.0, 0.0, 0.0])  # invisible parts untouched
    assert read_cub(root).records[0].box == (45.0, 30.0, 18.0, 12.0)  # the metadata keeps the files' values
    text = report.format()
    assert "2 box(es) of bounding_boxes.txt overrun their photograph by up to 32 px and are clipped to it" in text
    assert text.index("image 5 ") < text.index("image 1 ")  # the worst first
    assert "1 note(s), training goes ahead" in text and "no problems found" in text


@pytest.mark.parametrize("value", ["abc", "nan", "inf", "-5.0"])
def test_a_box_value_that_is_not_a_finite_size_is_a_problem(tmp_path, value, capsys):
    root = write_cub(tmp_path / "cub", boxes={4: f"5.0 6.0 {value} 10.0"})
    meta = read_cub(root)
    assert 4 not in [r.image_id for r in meta.records]
    assert len(meta.problems) == 1 and "bounding_boxes.txt: 1 box(es) are not four finite numbers" in meta.problems[0]
    assert f"image 4 ('5.0 6.0 {value} 10.0')" in meta.problems[0]
    assert main(["data", "check", str(root)]) == 1
    assert "1 problem(s)" in capsys.readouterr().out


@pytest.mark.parametrize("row", ["4 3 nan 5.0 1", "4 3 5.0 5.0 2", "4 3 5.0 inf 0"])
def test_a_part_value_that_is_not_finite_or_a_visibility_is_a_problem(tmp_path, row):
    root = write_cub(tmp_path / "cub")
    lines = (root / "parts" / "part_locs.txt").read_text().splitlines()
    lines[3 * 15 + 2] = row  # image 4, part 3
    (root / "parts" / "part_locs.txt").write_text("\n".join(lines) + "\n")
    meta = read_cub(root)
    assert [r.image_id for r in meta.records] == [1, 2, 3, 5, 6]
    assert len(meta.problems) == 1 and "1 image(s) with a value that is not a finite number" in meta.problems[0]


def test_missing_part_locations_are_a_note(tmp_path):
    root = write_cub(tmp_path / "cub")
    (root / "parts" / "part_locs.txt").unlink()
    report = check_cub(root)
    assert report.problems == [] and len(report.usable) == 6
    assert (report.usable[0].parts == 0).all()
    assert "parts/part_locs.txt is absent" in report.format()


def test_check_remembers_unchanged_files(tmp_path, monkeypatch):
    import finegrain.data.images as images

    root = write_cub(tmp_path / "cub")
    decoded = []
    real_check = images.check_image
    monkeypatch.setattr(images, "check_image", lambda path: decoded.append(path) or real_check(path))
    first = check_cub(root)
    assert len(decoded) == 6
    decoded.clear()
    again = check_cub(root)
    assert decoded == [] and [r.box for r in again.usable] == [r.box for r in first.usable]
    changed = first.metadata.records[1].path
    changed.write_bytes(changed.read_bytes()[:100])  # truncated: another size
    report = check_cub(root)
    assert decoded == [changed] and [p for p, _ in report.broken] == [changed]
    fast = []
    monkeypatch.setattr(images, "check_image", lambda path: fast.append(path))
    assert check_cub(root, decode=False).broken == report.broken  # a header-only check reuses decoded results


def test_split_is_stratified_seeded_and_disjoint(tmp_path):
    meta = read_cub(write_cub(tmp_path / "cub"))
    train, val = split_train_val(meta.train, val_fraction=0.5, seed=3)
    assert {r.label for r in val} == {0, 1}  # every class in validation
    assert {r.label for r in train} == {0, 1}  # and still in training
    assert not {r.image_id for r in train} & {r.image_id for r in val}
    assert len(train) + len(val) == len(meta.train)
    again = split_train_val(meta.train, val_fraction=0.5, seed=3)
    assert [r.image_id for r in again[1]] == [r.image_id for r in val]
    with pytest.raises(FinegrainError, match="val_fraction"):
        split_train_val(meta.train, 1.0, 0)


@needs_cub
def test_real_cub_metadata():
    meta = read_cub(CUB_ROOT)
    assert len(meta.records) == 11_788 and len(meta.class_names) == 200
    assert (len(meta.train), len(meta.test)) == (5_994, 5_794)
    assert meta.part_names == list(PART_NAMES)
    assert len(meta.attribute_names) == 312
    assert meta.problems == []
    first = meta.records[0]  # 1 001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg
    assert first.path.name == "Black_Footed_Albatross_0046_18.jpg" and first.label == 0
    assert first.box == (60.0, 27.0, 325.0, 304.0)
    np.testing.assert_array_equal(first.parts[1], [312.0, 182.0, 1.0])  # beak
    assert first.parts[0, 2] == 0  # back not visible
    subset = read_cub(CUB_ROOT, "1-10")
    assert len(subset.records) == 543 and subset.class_names[-1] == "Red_winged_Blackbird"
    val_split = split_train_val(subset.train, 0.1, 0)[1]
    assert len(val_split) == sum(round(n * 0.1) for n in np.bincount([r.label for r in subset.train]))


@needs_cub
def test_data_check_command_on_real_cub(capsys):
    assert main(["data", "check", str(CUB_ROOT), "--fast"]) == 1
    out = capsys.readouterr().out
    for expected in ("images      11,788", "classes     200", "train/test  5,994/5,794", "parts       15",
                     "10,087 listed images missing on disk"):  # fmt: skip
        assert expected in out
    assert main(["data", "check", str(CUB_ROOT), "--classes", "1-10"]) == 0
    out = capsys.readouterr().out
    assert "images      543" in out and "no problems found" in out
    # the official boxes of images 960, 999 and 1218 overrun their photographs by 2 to 32 px: clipped, not refused
    assert main(["data", "check", str(CUB_ROOT), "--classes", "1-30"]) == 0
    out = capsys.readouterr().out
    assert "images      1,701" in out and "train/test  900/801" in out and "no problems found" in out
    assert "box(es) of bounding_boxes.txt overrun their photograph by up to 32 px" in out
    for image_id in (960, 999, 1218):
        assert f"image {image_id} (" in out


def test_data_check_command_on_a_copy_with_a_broken_image(tmp_path, capsys):
    root = write_cub(tmp_path / "cub")
    broken = next((root / "images").rglob("*.jpg"))
    data = broken.read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    assert main(["data", "check", str(root)]) == 1
    assert f"{broken}: truncated" in capsys.readouterr().out
    shutil.rmtree(root / "images")
    assert main(["data", "check", str(root)]) == 1


def test_an_image_too_narrow_to_resize_is_a_problem_of_the_check(tmp_path):
    root = write_cub(tmp_path / "cub")
    strip = read_cub(root).records[0].path
    Image.new("RGB", (2100, 100)).save(strip, format="JPEG")  # 21:1
    report = check_cub(root)
    assert [p for p, _ in report.broken] == [strip]
    assert "2100x100 pixels is no photograph" in report.format()
