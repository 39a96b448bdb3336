"""Inference as a user runs it: Predictor from a checkpoint, every input kind, boxes in photo pixels, the CLI."""

from __future__ import annotations

import inspect
import io
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from finegrain.cli import main
from finegrain.data.images import load_rgb
from finegrain.data.transforms import build_transform, input_frame
from finegrain.errors import FinegrainError
from finegrain.geometry import input_box_to_photo
from finegrain.models import NETWORKS, RACNN, ModelOutput
from finegrain.models.registry import METHOD_CLASS_PATHS
from finegrain.package import ModelConfig
from finegrain.predict import Predictor
from finegrain.tasks.classification import ClassificationTask
from finegrain.tasks.racnn import RACNNTask
from tests.conftest import CUB_ROOT, needs_cub

CLASS_NAMES = ["Plain_Finch", "Red_crowned_Finch", "Gold_crowned_Hookbill", "Sooty_Auklet"]
PREPROCESSING = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "img_size": 64, "crop_pct": 0.875,
                 "interpolation": "bilinear"}  # fmt: skip
# Small sizes for whichever of these a network takes, so that any network in NETWORKS gets a tiny one.
TINY_ARGS = {"num_parts": 2, "part_size": 32, "loc_size": 32, "zoom_size": 32, "apn_hidden": 16, "share_network": False}


def tiny_init_args(network: str) -> dict:
    """TINY_ARGS that `network` (a class path in NETWORKS, or a method name: baseline, stn, racnn) takes."""
    accepted = inspect.signature(NETWORKS[METHOD_CLASS_PATHS.get(network, network)]).parameters
    return {k: v for k, v in TINY_ARGS.items() if k in accepted}


def tiny_network(method: str = "stn", attention: str = "cbam") -> nn.Module:
    """A test_resnet network of `method` (a class path or method name) scoring CLASS_NAMES."""
    cls = NETWORKS[METHOD_CLASS_PATHS.get(method, method)]
    return cls(num_classes=len(CLASS_NAMES), backbone="test_resnet", attention=attention, **tiny_init_args(method))


def write_checkpoint(path: Path, method: str = "stn", attention: str = "cbam", seed: int = 0, **hparams) -> Path:
    """A checkpoint as Lightning writes one: the task's hyper_parameters and its state_dict.

    The weights are perturbed so that boxes and maps differ between images (a new localisation head starts at
    the same boxes for every image).
    """
    torch.manual_seed(seed)
    network = tiny_network(method, attention)
    task_class = RACNNTask if isinstance(network, RACNN) else ClassificationTask
    task = task_class(network=network, class_names=CLASS_NAMES, preprocessing=PREPROCESSING)
    with torch.no_grad():
        for p in task.network.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    checkpoint = {"epoch": 0, "global_step": 1, "pytorch-lightning_version": "2.6.0", "state_dict": task.state_dict(),
                  "hyper_parameters": {**dict(task.hparams), **hparams}}  # fmt: skip
    torch.save(checkpoint, path)
    return path


def photo(width: int, height: int, seed: int) -> np.ndarray:
    """A smooth random RGB photo (blurry blobs, not noise, so crops and resizes are well defined)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC))


@pytest.fixture(scope="module")
def stn_checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "stn.ckpt")


@pytest.fixture(scope="module")
def predictor(stn_checkpoint) -> Predictor:
    return Predictor.from_checkpoint(stn_checkpoint, device="cpu")


def same_predictions(a: list[dict], b: list[dict], tol: float = 1e-5) -> bool:
    return [p["class_id"] for p in a] == [p["class_id"] for p in b] and all(
        abs(p["score"] - q["score"]) < tol for p, q in zip(a, b, strict=True)
    )


def test_import_finegrain_is_cheap_and_exports_predictor():
    code = "import sys, finegrain; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    import finegrain

    assert finegrain.Predictor is Predictor


def test_predict_returns_sorted_top_k_with_names_and_ids(predictor):
    predictions = predictor.predict(photo(80, 60, 0), top_k=3)
    assert [set(p) for p in predictions] == [{"label", "class_id", "score"}] * 3
    scores = [p["score"] for p in predictions]
    assert scores == sorted(scores, reverse=True) and scores[-1] > 0 and scores[0] < 1
    for p in predictions:  # class_id indexes class_names (the training label); label is its readable form
        assert p["label"] == CLASS_NAMES[p["class_id"]].replace("_", " ")
    everything = predictor.predict(photo(80, 60, 0), top_k=10)
    assert len(everything) == 4 and sum(p["score"] for p in everything) == pytest.approx(1.0, abs=1e-5)


def test_every_input_kind_gives_the_same_prediction(predictor, tmp_path):
    pixels = photo(90, 70, 1)
    path = tmp_path / "bird.png"
    Image.fromarray(pixels).save(path)
    reference = predictor.predict(pixels)
    for source in (path, str(path), path.read_bytes(), Image.fromarray(pixels)):
        assert same_predictions(predictor.predict(source), reference, tol=1e-6)


def test_a_batch_equals_single_calls(predictor):
    photos = [photo(80 + 10 * i, 60 + 7 * i, i) for i in range(5)]
    batched = predictor.predict(photos, batch_size=2)
    assert len(batched) == 5
    for image, predictions in zip(photos, batched, strict=True):
        assert same_predictions(predictor.predict(image), predictions)
    assert predictor.predict([]) == []


def test_threads_get_their_own_boxes_and_maps(predictor):
    photos = [photo(100, 70 + 5 * i, 10 + i) for i in range(6)]
    expected = predictor.explain(photos)
    assert len({e.boxes["part1"] for e in expected}) == 6  # each image has its own boxes
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(predictor.explain, photos * 3))
    for got, want in zip(results, expected * 3, strict=True):
        assert same_predictions(got.predictions, want.predictions)
        for key, box in want.boxes.items():
            assert got.boxes[key] == pytest.approx(box)
        for key, value in want.attention_maps.items():
            np.testing.assert_allclose(got.attention_maps[key], value, atol=1e-5)


class FixedBoxes(nn.Module):
    """A stand-in network: uniform logits and the same input-frame box for every image."""

    box_names = ("part",)

    def __init__(self, box: list[float]):
        super().__init__()
        self.box = torch.tensor(box)

    def forward(self, images: torch.Tensor) -> ModelOutput:
        batch = images.shape[0]
        return ModelOutput(logits=torch.zeros(batch, 4), boxes={"part": self.box.expand(batch, 4)})


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        # 400x300 -> shorter side 300 to round(224 / 0.875) = 256: points scale by 256/300 on both axes (the
        # pixels to the rounded 341x256); centre crop 224 at (58, 16) of those pixels. Input box (0.25, 0.5,
        # 0.75, 1) = (56, 112, 168, 224) px -> resized (114, 128, 226, 240) -> photo (114 * 300/256, ...).
        ((400, 300), tuple(v * 300 / 256 for v in (114, 128, 226, 240))),
        # portrait 300x400: crop at (16, 58): (72, 170, 184, 282) -> (72 * 300/256, ...)
        ((300, 400), tuple(v * 300 / 256 for v in (72, 170, 184, 282))),
    ],
)
def test_boxes_map_back_through_resize_and_centre_crop_by_hand(size, expected):
    config = ModelConfig({"class_path": "FixedBoxes", "init_args": {}}, CLASS_NAMES, {**PREPROCESSING, "img_size": 224})
    predictor = Predictor(FixedBoxes([0.25, 0.5, 0.75, 1.0]), config)
    explanation = predictor.explain(photo(*size, seed=2))
    assert explanation.boxes["part"] == pytest.approx(expected, abs=1e-4)
    x1, y1, x2, y2 = (round(v) for v in expected)
    assert explanation.crops["part"].size == (x2 - x1, y2 - y1)
    np.testing.assert_array_equal(np.asarray(explanation.crops["part"]), explanation.image[y1:y2, x1:x2])
    # the whole input frame: the 224 crop of the 256 resize, i.e. 0.875 of each side around the centre
    seen = (58, 16, 282, 240) if size[0] > size[1] else (16, 58, 240, 282)
    assert explanation.input_box == pytest.approx(tuple(v * 300 / 256 for v in seen), abs=1e-4)


@pytest.mark.parametrize("crop_pct", [1.0, 0.875, 0.95])
@pytest.mark.parametrize("size", [(400, 300), (301, 451), (64, 64), (999, 100)])
def test_input_frame_is_the_eval_transforms_own_map(size, crop_pct):
    """Photo points carried through the real transform as keypoints, beside a real photo, land where the input
    frame (measured on the photo's corners alone) puts them; its inverse maps the input back to the photo.

    albumentations moves keypoints by the unrounded resize factor, the pixels by the rounded image size: the two
    agree to half a resized pixel, and the frame follows the points, as training's boxes and parts did.
    """
    preprocessing = {**PREPROCESSING, "img_size": 56, "crop_pct": crop_pct}
    width, height = size
    transform = build_transform(preprocessing, train=False)
    points = np.array([[0, 0], [width, height], [width / 3, height / 5]], np.float32)
    out = transform(image=photo(width, height, 0), keypoints=points)
    assert tuple(out["image"].shape) == (3, 56, 56)
    frame = input_frame(transform, width, height)
    assert frame.size == (56, 56) and frame.photo_size == size
    mapped = points * np.array(frame.scale) + np.array(frame.shift)
    np.testing.assert_allclose(np.asarray(out["keypoints"])[:, :2], mapped, atol=1e-3)
    # and back: the input's own corners are the photo region the network saw
    seen = input_box_to_photo(np.array([0.0, 0.0, 1.0, 1.0]), frame)
    corners = (np.array([[0, 0], [56, 56]]) - np.array(frame.shift)) / np.array(frame.scale)
    np.testing.assert_allclose(seen, np.clip(corners.ravel(), 0, [width, height, width, height]), atol=1e-4)


def test_the_input_frame_is_measured_once_per_photo_size():
    config = ModelConfig({"class_path": "FixedBoxes", "init_args": {}}, CLASS_NAMES, PREPROCESSING)
    predictor = Predictor(FixedBoxes([0.25, 0.5, 0.75, 1.0]), config)
    first = predictor.explain([photo(80, 60, 0), photo(60, 90, 1), photo(80, 60, 2)])
    again = predictor.explain(photo(80, 60, 3))
    assert first[0].boxes == first[2].boxes == again.boxes and first[1].boxes != first[0].boxes
    info = predictor._frames.cache_info()
    assert (info.misses, info.hits) == (2, 2)


def test_explain_and_visualize(predictor, tmp_path):
    explanation = predictor.explain(photo(120, 80, 3), top_k=2)
    assert set(explanation.boxes) == {"part1", "part2"} and len(explanation.predictions) == 2
    for x1, y1, x2, y2 in explanation.boxes.values():
        assert 0 <= x1 < x2 <= 120 and 0 <= y1 < y2 <= 80
    assert all(key.split(".")[0] in {"part1", "part2"} for key in explanation.attention_maps)
    assert all(m.min() >= 0 and m.max() <= 1 for m in explanation.attention_maps.values())
    path = predictor.visualize(photo(120, 80, 3), tmp_path / "viz" / "bird.png")
    with Image.open(path) as picture:
        assert picture.format == "PNG" and picture.width > 420  # the photo at 420 px tall, crops beside it


@needs_cub
def test_picture_of_a_real_cub_photo(tmp_path):
    path = write_checkpoint(tmp_path / "m.ckpt", method="stn", attention="none")
    predictor = Predictor.from_checkpoint(path)
    image = sorted((CUB_ROOT / "images").rglob("*.jpg"))[0]
    with Image.open(predictor.visualize(image, tmp_path / "cub.png")) as picture:
        assert picture.height > 420 + 5 * 22


def test_checkpoint_errors_name_the_file_and_the_fix(tmp_path, stn_checkpoint):
    cases = {}
    cases["missing"] = tmp_path / "nowhere.ckpt"
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint at all")
    cases["junk"] = tmp_path / "junk.ckpt"
    torch.save({"weights": torch.zeros(2)}, tmp_path / "plain.pt")
    cases["plain"] = tmp_path / "plain.pt"
    torch.save(Path("x"), tmp_path / "code.ckpt")  # needs unpickling a class: refused, never run
    cases["code"] = tmp_path / "code.ckpt"
    checkpoint = torch.load(stn_checkpoint, weights_only=True)
    hparams = checkpoint["hyper_parameters"]
    checkpoint["hyper_parameters"] = {**hparams, "network": {**hparams["network"], "class_path": "capsnet.CapsNet"}}
    torch.save(checkpoint, tmp_path / "network.ckpt")
    cases["network"] = tmp_path / "network.ckpt"
    # written before networks were given by class path: a `method` name and the network's arguments
    old = {k: v for k, v in hparams.items() if k != "network"}
    checkpoint["hyper_parameters"] = {**old, **hparams["network"]["init_args"], "method": "capsnet"}
    torch.save(checkpoint, tmp_path / "method.ckpt")
    cases["method"] = tmp_path / "method.ckpt"
    init_args = {**hparams["network"]["init_args"], "backbone": "test_efficientnet"}  # the weights are test_resnet's
    checkpoint["hyper_parameters"] = {**hparams, "network": {**hparams["network"], "init_args": init_args}}
    torch.save(checkpoint, tmp_path / "mismatch.ckpt")
    cases["mismatch"] = tmp_path / "mismatch.ckpt"
    (tmp_path / "folder").mkdir()
    cases["folder"] = tmp_path / "folder"
    data = Path(stn_checkpoint).read_bytes()
    (tmp_path / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    cases["truncated"] = tmp_path / "truncated.ckpt"
    (tmp_path / "empty.ckpt").write_bytes(b"")
    cases["empty"] = tmp_path / "empty.ckpt"
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00garbage!garbage!")
    cases["safetensors"] = tmp_path / "model.safetensors"
    expected = {"missing": "not found", "junk": "not a PyTorch checkpoint", "plain": "not a finegrain training",
                "code": r"refused: it pickles Python objects \(pathlib.PosixPath\), so loading it would run code",
                "network": "network capsnet.CapsNet cannot be imported", "method": r"\(method 'capsnet'\)",
                "mismatch": r"do not fit the STCNN network \(backbone test_efficientnet\)",
                "folder": "without finegrain.json",
                "truncated": "is truncated or corrupt", "empty": "is an empty file",
                "safetensors": "bare weights without their network"}  # fmt: skip
    for name, path in cases.items():
        with pytest.raises(FinegrainError, match=expected[name]) as error:
            Predictor.from_checkpoint(path)
        assert str(path) in str(error.value)
        assert "finegrain" in str(error.value)  # every message says which finegrain command or version fixes it


def test_task_only_hparams_are_left_out(tmp_path):
    path = write_checkpoint(tmp_path / "extra.ckpt", margin=0.05, phase_epochs=[2, 2])
    assert Predictor.from_checkpoint(path).predict(photo(64, 64, 0))


def test_bad_arguments_are_clear(predictor):
    with pytest.raises(FinegrainError, match="top_k"):
        predictor.predict(photo(64, 64, 0), top_k=0)
    with pytest.raises(FinegrainError, match="batch_size"):
        predictor.predict([photo(64, 64, 0)], batch_size=0)
    with pytest.raises(FinegrainError, match="not an image"):
        predictor.predict(b"garbage")
    with pytest.raises(FinegrainError, match="device 'tpu9'"):
        Predictor.from_checkpoint("x.ckpt", device="tpu9")


def fit_stn(root: Path, folder: Path) -> Path:
    """A real `finegrain fit` run: one epoch of two batches on the synthetic birds."""
    args = ["fit", "--run_name", "p", "--seed_everything", "0", "--data.root", str(root),
            "--data.img_size", "64", "--data.batch_size", "8", "--data.num_workers", "0",
            "--model.network", "finegrain.models.STCNN", "--model.network.init_args.backbone", "test_resnet",
            *[f"--model.network.init_args.{key}={value}" for key, value in tiny_init_args("stn").items()],
            "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
            "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false"]  # fmt: skip
    assert main(args) == 0
    return folder / "checkpoints" / "p" / "last.ckpt"


def test_cli_predicts_a_checkpoint_written_by_fit(synth_root, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    checkpoint = fit_stn(synth_root, tmp_path)
    predictor = Predictor.from_checkpoint(checkpoint)
    assert predictor.config.network["class_path"] == "finegrain.models.STCNN"
    assert predictor.config.network["init_args"]["num_parts"] == 2
    assert predictor.config.preprocessing["img_size"] == 64 and len(predictor.class_names) == 4
    capsys.readouterr()

    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    images = sorted((synth_root / "images").rglob("*.jpg"))[:3]
    for i, image in enumerate(images):
        (folder / ("sub" if i else "") / image.name).write_bytes(image.read_bytes())
    (folder / "corrupt.jpg").write_bytes(images[0].read_bytes()[:300])
    (folder / "notes.jpg").write_text("not a photo")
    (folder / "readme.txt").write_text("ignored: not an image extension")
    args = ["predict", str(folder), str(tmp_path / "missing.jpg"), "--checkpoint", str(checkpoint),
            "--top-k", "2", "--batch-size", "2", "--output", str(tmp_path / "out.json"),
            "--save-viz", str(tmp_path / "viz")]  # fmt: skip
    assert main(args) == 1
    out, err = capsys.readouterr()
    for image in images:
        assert image.name in out
    for bad in ("corrupt.jpg: truncated", "notes.jpg: not an image", "missing.jpg: no such file"):
        assert bad in err
    assert "readme" not in out + err
    results = json.loads((tmp_path / "out.json").read_text())
    assert len(results) == 3 and all(len(r["predictions"]) == 2 for r in results)
    first = next(r for r in results if r["image"].endswith(images[0].name))
    assert same_predictions(first["predictions"], predictor.predict(images[0], top_k=2))
    assert sorted(p.name for p in (tmp_path / "viz").iterdir()) == sorted(f"{i.stem}.png" for i in images)

    assert main(["predict", str(images[0]), "--checkpoint", str(checkpoint), "--output", str(tmp_path / "r.csv")]) == 0
    rows = (tmp_path / "r.csv").read_text().splitlines()
    assert rows[0] == "image,rank,class_id,label,score" and len(rows) == 1 + 4  # top-5 of 4 classes
    assert "rank" in capsys.readouterr().out


def test_cli_errors_exit_2_with_the_fix(tmp_path, stn_checkpoint, capsys):
    image = tmp_path / "bird.png"
    Image.fromarray(photo(64, 64, 0)).save(image)
    assert main(["predict", str(image), "--checkpoint", str(tmp_path / "none.ckpt")]) == 2
    assert "none.ckpt not found" in capsys.readouterr().err
    assert main(["predict", str(image), "--checkpoint", str(stn_checkpoint), "--output", "out.txt"]) == 2
    assert ".json or .csv" in capsys.readouterr().err
    assert main(["predict", str(image), "--checkpoint", str(stn_checkpoint)]) == 0
    buffer = io.StringIO(capsys.readouterr().out)
    assert buffer.readline().split() == ["image", "rank", "species", "score"]


def test_an_image_with_a_side_over_20_times_the_other_is_skipped_and_the_rest_predicted(stn_checkpoint, tmp_path,
                                                                                        capsys):  # fmt: skip
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(photo(80, 60, 0)).save(folder / "a.png")
    Image.new("RGB", (525, 25)).save(folder / "b_strip.png")  # 21:1; a 40000x1 PNG would ask for 7.9 GB
    Image.fromarray(photo(60, 90, 1)).save(folder / "c.png")
    output = tmp_path / "results.json"
    assert main(["predict", str(folder), "--checkpoint", str(stn_checkpoint), "--output", str(output)]) == 1
    assert [Path(r["image"]).name for r in json.loads(output.read_text())] == ["a.png", "c.png"]
    err = capsys.readouterr().err
    assert "b_strip.png: 525x25 pixels is no photograph (a side over 20 times the other" in err
    assert "Traceback" not in err


def test_predict_keeps_an_earlier_output_when_nothing_was_predicted(stn_checkpoint, tmp_path, capsys):
    output = tmp_path / "results.csv"
    output.write_text("image,rank,class_id,label,score\nold.jpg,1,0,Plain Finch,0.9\n")
    before = output.read_text()
    assert main(["predict", str(tmp_path / "nosuchdir"), "--checkpoint", str(stn_checkpoint),
                 "--output", str(output)]) == 1  # fmt: skip
    assert output.read_text() == before
    assert f"no image was predicted, so {output} was not written" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["results.csv"]  # no temporary file left behind


def test_predict_says_when_top_k_exceeds_the_classes(stn_checkpoint, tmp_path, capsys):
    Image.fromarray(photo(80, 60, 0)).save(tmp_path / "a.png")
    assert main(["predict", str(tmp_path / "a.png"), "--checkpoint", str(stn_checkpoint), "--top-k", "9"]) == 0
    captured = capsys.readouterr()
    assert "--top-k 9 is more than the model's 4 classes: listing all 4" in captured.err
    assert captured.out.count("%") == 4


def test_a_package_naming_fewer_classes_than_its_head_is_refused(tmp_path):
    checkpoint = write_checkpoint(tmp_path / "m.ckpt", method="baseline", attention="none")
    assert main(["export", str(checkpoint), str(tmp_path / "pkg")]) == 0
    config = tmp_path / "pkg" / "finegrain.json"
    meta = json.loads(config.read_text())
    config.write_text(json.dumps({**meta, "class_names": meta["class_names"][:3]}))
    with pytest.raises(FinegrainError, match="names 3 classes but its network scores 4"):
        Predictor.from_checkpoint(tmp_path / "pkg")


def test_the_weights_file_of_a_package_loads_as_its_package(tmp_path):
    checkpoint = write_checkpoint(tmp_path / "m.ckpt", method="baseline", attention="none")
    assert main(["export", str(checkpoint), str(tmp_path / "pkg")]) == 0
    image = photo(80, 60, 0)
    by_file = Predictor.from_checkpoint(tmp_path / "pkg" / "model.safetensors").predict(image)
    assert by_file == Predictor.from_checkpoint(tmp_path / "pkg").predict(image)


def test_an_output_path_that_is_a_folder_is_refused_before_any_work(stn_checkpoint, tmp_path, capsys):
    Image.fromarray(photo(80, 60, 0)).save(tmp_path / "a.png")
    (tmp_path / "results.csv").mkdir()
    args = ["predict", str(tmp_path / "a.png"), "--checkpoint", str(stn_checkpoint), "--output"]
    assert main([*args, str(tmp_path / "results.csv")]) == 2
    assert "results.csv is a folder; name a file in it" in capsys.readouterr().err


def test_a_large_jpeg_is_decoded_small_and_its_boxes_are_in_the_photos_own_pixels(tmp_path):
    predictor = Predictor.from_checkpoint(write_checkpoint(tmp_path / "racnn.ckpt", method="racnn"), device="cpu")
    array = photo(1600, 1200, seed=4)
    path = tmp_path / "camera.jpg"
    Image.fromarray(array).save(path, quality=95)
    reduced = predictor.explain(path)
    whole = predictor.explain(load_rgb(path))  # an array: decoded whole
    assert predictor.decode_side == 73  # 64 px input / crop_pct 0.875
    # 1/8 of the side by the DCT scaling (150 rows), then resized to the 73 rows the input needs
    assert reduced.image.shape[:2] == (73, 97) and reduced.photo_size == (1600, 1200)
    assert reduced.image_scale == pytest.approx(97 / 1600) and whole.image_scale == 1
    assert reduced.input_box == pytest.approx(whole.input_box, abs=17)  # one reduced pixel is 16.5 photo pixels
    for name, box in whole.boxes.items():
        assert reduced.boxes[name] == pytest.approx(box, abs=0.02 * 1600)
    assert reduced.crops["scale2"].size[0] == pytest.approx(whole.crops["scale2"].size[0] / 16, abs=2)
    assert [p["class_id"] for p in reduced.predictions[:1]] == [p["class_id"] for p in whole.predictions[:1]]
    predictor.visualize(path, tmp_path / "camera.png")
