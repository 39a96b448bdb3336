"""Inference from a trained model: species from photos, the regions each branch looked at, and the network's maps.

A model comes from a Lightning checkpoint written by `finegrain fit` or from a package written by
`finegrain export`; neither needs the dataset or the recipe. Nothing is unpickled as code: checkpoints are read
with `torch.load(weights_only=True)`, packages are JSON and safetensors.
"""

from __future__ import annotations

import csv
import inspect
import itertools
import json
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from PIL import Image
from safetensors import SafetensorError
from torch import Tensor, nn

from finegrain.checkpoints import CHECKPOINT_FIX, load_checkpoint
from finegrain.data.images import ImageDecodeError, load_rgb
from finegrain.data.transforms import build_transform
from finegrain.errors import FinegrainError
from finegrain.models import NETWORKS, ModelOutput, build_network
from finegrain.models.backbones import _first_few

PACKAGE_CONFIG = "finegrain.json"
PACKAGE_WEIGHTS = "model.safetensors"
PACKAGE_ONNX = "model.onnx"
FORMAT_VERSION = 1
RESULT_SUFFIXES = (".json", ".csv")
PROGRESS_MIN_FILES = 20  # fewer images finish before a bar would say anything
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
NETWORK_PREFIX = "network."  # ClassificationTask keeps its network as `self.network`
_MODEL_FIX = CHECKPOINT_FIX

ImageSource = str | Path | bytes | Image.Image | np.ndarray


@dataclass
class ModelConfig:
    """What inference needs: the network's arguments, the class names and the eval preprocessing."""

    method: str
    network: dict  # build_network keyword arguments, weights excluded
    class_names: list[str]
    preprocessing: dict

    def to_json(self) -> dict:
        return {"format": "finegrain", "format_version": FORMAT_VERSION, "method": self.method,
                "network": self.network, "class_names": self.class_names,
                "preprocessing": self.preprocessing}  # fmt: skip


@dataclass
class Explanation:
    """One image's prediction and where the network looked.

    image: the decoded photo, HxWx3 uint8 RGB, upright.
    predictions: the top-k, as `Predictor.predict` returns them.
    boxes: per branch (scale, part), (x1, y1, x2, y2) in pixels of `image`; empty for a network without boxes.
    crops: the photo inside each box, at the photo's own resolution (for a sheared affine part, the box around
        the region it sampled).
    attention_maps: CBAM spatial maps (h, w) in [0, 1], keyed as the network names them; each lies in the input
        of its branch (see the method's docstring), so a part's map covers that part's crop.
    source: what the image came from (its path, "<bytes>", ...), for titles and messages.
    input_box: the part of the photo the network saw (the eval resize and centre crop), in pixels of `image`.
    """

    image: np.ndarray
    predictions: list[dict]
    boxes: dict[str, tuple[float, float, float, float]]
    crops: dict[str, Image.Image]
    attention_maps: dict[str, np.ndarray]
    source: str
    input_box: tuple[float, float, float, float]


class Predictor:
    """A trained network with its preprocessing and class names, ready for photos.

    Thread-safe: preprocessing runs in the calling thread, the forward pass under a lock (attention modules
    keep their last map on the module, so two forwards at once would swap each other's maps).
    """

    def __init__(self, network: nn.Module, config: ModelConfig, device: str | torch.device = "cpu"):
        self.config = config
        self.device = torch.device(device)
        self.network = network.to(self.device).eval()
        self._lock = threading.Lock()
        self._local = threading.local()  # one eval transform per thread: a Compose keeps per-call state

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "auto") -> Predictor:
        """Load a `finegrain fit` checkpoint (.ckpt) or a `finegrain export` folder.

        device: "auto" (CUDA when available, else CPU) or a torch device ("cpu", "cuda:1", ...).
        """
        device = resolve_device(device)
        config, state_dict = read_model(path)
        return cls(build_model(config, state_dict, Path(path)), config, device)

    @property
    def class_names(self) -> list[str]:
        """Class names in label order: `class_id` indexes this list."""
        return self.config.class_names

    def predict(self, x: ImageSource | Sequence[ImageSource], top_k: int = 5,
                batch_size: int = 32) -> list[dict] | list[list[dict]]:  # fmt: skip
        """Top-k species of one image, or of each image of a list.

        x: a path, JPEG/PNG bytes, a PIL image, an HxWx3 uint8 array, or a list of them.
        Returns [{"label", "class_id", "score"}, ...] from the highest score down (a list of those for a list):
        label is the readable species name, class_id the 0-based index into `class_names` (the label the
        network was trained with), score the softmax probability. Images are decoded and run `batch_size` at a
        time, so a long list needs memory for one batch only.
        """
        items, single = _decoded(x)
        results = [self._top_k(output.logits, top_k) for _, output in self._run(items, batch_size)]
        flat = [p for batch in results for p in batch]
        return flat[0] if single else flat

    def explain(self, x: ImageSource | Sequence[ImageSource], top_k: int = 5,
                batch_size: int = 32) -> Explanation | list[Explanation]:  # fmt: skip
        """Prediction, boxes in photo pixels, crops and attention maps of one image or of each of a list."""
        items, single = _decoded(x)
        explanations = [e for images, output in self._run(items, batch_size)
                        for e in self._explain(images, output, top_k)]  # fmt: skip
        return explanations[0] if single else explanations

    def visualize(self, x: ImageSource, path: str | Path, top_k: int = 5) -> Path:
        """Write one PNG: the photo with each box, the zoomed crops, and the top-k as bars (see `visualize`)."""
        from finegrain.visualize import render

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        render(self.explain(x, top_k=top_k)).save(path)
        return path

    def preprocess(self, images: Sequence[np.ndarray]) -> Tensor:
        """Decoded RGB photos -> the network's input (B, 3, S, S): the checkpoint's eval resize, crop and norm.

        Decode with `finegrain.data.images.load_rgb`, the same path training used.
        """
        transform = getattr(self._local, "transform", None)
        if transform is None:  # built once per thread: building costs about twice applying it to one photo
            transform = self._local.transform = build_transform(self.config.preprocessing, train=False)
        return torch.stack([transform(image=image)["image"] for image in images])

    def forward(self, inputs: Tensor) -> ModelOutput:
        """The network on preprocessed inputs, in inference mode, one call at a time."""
        with self._lock, torch.inference_mode():
            return self.network(inputs.to(self.device))

    def _run(self, items: Iterable[tuple[str, np.ndarray]],
             batch_size: int) -> Iterator[tuple[list[tuple[str, np.ndarray]], ModelOutput]]:  # fmt: skip
        """Decoded (name, photo) items -> per batch, those items and the network's output."""
        if batch_size < 1:
            raise FinegrainError(f"batch_size must be a positive integer, got {batch_size}")
        for chunk in _batched(items, batch_size):
            yield chunk, self.forward(self.preprocess([photo for _, photo in chunk]))

    def _top_k(self, logits: Tensor, top_k: int) -> list[list[dict]]:
        if top_k < 1:
            raise FinegrainError(f"top_k must be a positive integer, got {top_k}")
        scores, indices = logits.float().softmax(dim=1).topk(min(top_k, logits.shape[1]), dim=1)
        return [
            [{"label": readable(self.class_names[i]), "class_id": i, "score": s}
             for s, i in zip(row_scores.tolist(), row_indices.tolist(), strict=True)]
            for row_scores, row_indices in zip(scores, indices, strict=True)
        ]  # fmt: skip

    def _explain(self, images: list, output: ModelOutput, top_k: int) -> list[Explanation]:
        predictions = self._top_k(output.logits, top_k)
        boxes = {name: b.float().cpu().numpy() for name, b in output.boxes.items()}
        maps = {name: m.float().cpu().numpy() for name, m in output.attention_maps.items()}
        explanations = []
        for i, (name, photo) in enumerate(images):
            height, width = photo.shape[:2]
            frame = input_frame(width, height, self.config.preprocessing)
            pixel_boxes = {key: tuple(input_box_to_image(b[i], frame).tolist()) for key, b in boxes.items()}
            crops = {key: Image.fromarray(photo).crop(tuple(round(v) for v in box)) for key, box in pixel_boxes.items()}
            item_maps = {key: m[i] for key, m in maps.items()}
            seen = tuple(input_box_to_image(np.array([0.0, 0.0, 1.0, 1.0]), frame).tolist())
            explanations.append(Explanation(photo, predictions[i], pixel_boxes, crops, item_maps, name, seen))
        return explanations


@dataclass(frozen=True)
class InputFrame:
    """Where the network input lies in a photo: input pixel = photo pixel * scale - offset, per axis."""

    scale: tuple[float, float]  # (x, y): resized size / photo size
    offset: tuple[int, int]  # (x, y): the centre crop's top-left corner in the resized photo
    size: int  # the input's side in pixels
    photo_size: tuple[int, int]  # (width, height)


def input_frame(width: int, height: int, preprocessing: dict) -> InputFrame:
    """The geometry of `build_transform(preprocessing, train=False)` for a width x height photo.

    It mirrors albumentations' SmallestMaxSize (shorter side to round(img_size / crop_pct), each side rounded)
    and CenterCrop (offset (resized - img_size) // 2); tests hold the two together.
    """
    size = int(preprocessing["img_size"])
    shorter = round(size / float(preprocessing.get("crop_pct", 1.0)))
    factor = shorter / min(width, height)
    resized = (max(1, round(width * factor)), max(1, round(height * factor)))
    return InputFrame(scale=(resized[0] / width, resized[1] / height),
                      offset=((resized[0] - size) // 2, (resized[1] - size) // 2), size=size,
                      photo_size=(width, height))  # fmt: skip


def input_box_to_image(box: np.ndarray, frame: InputFrame) -> np.ndarray:
    """A normalised xyxy box of the network input -> xyxy pixels of the photo, clipped to the photo."""
    offset, scale = np.array(frame.offset * 2, np.float64), np.array(frame.scale * 2, np.float64)
    pixels = (np.asarray(box, np.float64) * frame.size + offset) / scale
    return np.clip(pixels, 0.0, np.array(frame.photo_size * 2, np.float64))


def readable(class_name: str) -> str:
    """ "Black_footed_Albatross" -> "Black footed Albatross"."""
    return class_name.replace("_", " ")


def resolve_device(device: str) -> torch.device:
    """ "auto" -> CUDA if available, else CPU; any other name must be a device torch has."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as e:
        raise FinegrainError(f"device {device!r} is not a torch device; use auto, cpu or cuda[:N]") from e
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise FinegrainError(f"device {device!r} asked for CUDA, which this machine lacks; use --device cpu")
    return resolved


def read_model(path: str | Path) -> tuple[ModelConfig, dict[str, Tensor]]:
    """The config and network weights of a checkpoint file or an exported package folder."""
    path = Path(path)
    if path.is_dir():
        return read_package(path)
    if not path.exists():
        raise FinegrainError(f"model {path} not found; {_MODEL_FIX}")
    if path.name == PACKAGE_WEIGHTS and (path.parent / PACKAGE_CONFIG).is_file():
        return read_package(path.parent)  # the package's weights file named instead of its folder
    return read_checkpoint(path)


def read_checkpoint(path: Path) -> tuple[ModelConfig, dict[str, Tensor]]:
    """A Lightning checkpoint of ClassificationTask (or a subclass): hyper_parameters and network weights."""
    checkpoint = load_checkpoint(path)
    hparams, weights = checkpoint.get("hyper_parameters"), checkpoint.get("state_dict")
    if not isinstance(hparams, dict) or not isinstance(weights, dict) or "method" not in hparams:
        raise FinegrainError(f"{path} is not a finegrain training checkpoint (no hyper_parameters with a method, "
                             f"or no state_dict); {_MODEL_FIX}")  # fmt: skip
    method = hparams["method"]
    _check_method(method, path)
    if not hparams.get("preprocessing"):
        raise FinegrainError(f"{path} was saved without its preprocessing; train through `finegrain fit`, which "
                             "stores it with the data module's settings")  # fmt: skip
    # Only the network's own arguments: a task may add its own (loss margins, phase lengths, ...).
    accepted = set(inspect.signature(NETWORKS[method]).parameters) - {"weights"}
    network = {k: v for k, v in hparams.items() if k in accepted}
    network.update(hparams.get("method_args") or {})
    class_names = hparams.get("class_names") or [str(i) for i in range(hparams["num_classes"])]
    state_dict = {k.removeprefix(NETWORK_PREFIX): v for k, v in weights.items() if k.startswith(NETWORK_PREFIX)}
    config = ModelConfig(method, network, list(class_names), dict(hparams["preprocessing"]))
    return config, state_dict


def read_package(folder: Path) -> tuple[ModelConfig, dict[str, Tensor]]:
    """A `finegrain export` folder: finegrain.json and model.safetensors."""
    config_path, weights_path = folder / PACKAGE_CONFIG, folder / PACKAGE_WEIGHTS
    if not config_path.is_file() or not weights_path.is_file():
        raise FinegrainError(f"{folder} is a folder without {PACKAGE_CONFIG} and {PACKAGE_WEIGHTS}; {_MODEL_FIX}")
    try:
        meta = json.loads(config_path.read_text())
        version = meta["format_version"]
        config = ModelConfig(meta["method"], dict(meta["network"]), list(meta["class_names"]),
                             dict(meta["preprocessing"]))  # fmt: skip
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        raise FinegrainError(f"{config_path} is not a finegrain package config ({type(e).__name__}: {e}); "
                             "export the checkpoint again with `finegrain export`") from e  # fmt: skip
    if version > FORMAT_VERSION:
        raise FinegrainError(f"{config_path} has format version {version}, newer than this finegrain's "
                             f"{FORMAT_VERSION}; update finegrain")  # fmt: skip
    _check_method(config.method, folder)
    try:
        state_dict = safetensors.torch.load_file(weights_path, device="cpu")
    except (SafetensorError, OSError) as e:
        raise FinegrainError(f"{weights_path} is not a safetensors file ({e}); export the checkpoint again") from e
    return config, state_dict


def build_model(config: ModelConfig, state_dict: dict[str, Tensor], source: Path) -> nn.Module:
    """The network of `config` (random init, no hub access) with `state_dict` loaded strictly."""
    try:
        network = build_network(config.method, weights="none", **config.network)
    except FinegrainError as e:
        raise FinegrainError(f"{source}: its network config does not build ({e}); {_MODEL_FIX}") from e
    own = network.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong_shape = [k for k in state_dict if k in own and own[k].shape != state_dict[k].shape]
    problems = [f"{what} {_first_few(keys)}" for what, keys in
                (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)) if keys]  # fmt: skip
    if problems:
        described = f"{config.method} network (backbone {config.network.get('backbone')})"
        raise FinegrainError(
            f"{source}: its weights do not fit the {described} its config describes ({'; '.join(problems)}); "
            "use the file as `finegrain fit` or `finegrain export` wrote it"
        )
    network.load_state_dict(state_dict, strict=True)
    num_classes = config.network.get("num_classes")
    if num_classes is not None and len(config.class_names) != num_classes:
        raise FinegrainError(f"{source}: it names {len(config.class_names)} classes but its network scores "
                             f"{num_classes}; export the checkpoint again with `finegrain export`")  # fmt: skip
    return network.eval()


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

    def decoded() -> Iterator[tuple[str, np.ndarray]]:
        for path in tqdm(files, unit="image", disable=True if len(files) < PROGRESS_MIN_FILES else None):
            try:
                yield str(path), load_rgb(path)
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
        results += [{"image": name, "predictions": p} for (name, _), p in zip(images, predictions, strict=True)]
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


def _check_method(method: str, source: Path) -> None:
    if method not in NETWORKS:
        raise FinegrainError(
            f"{source} holds a {method!r} network, a method this finegrain lacks (it has "
            f"{', '.join(sorted(NETWORKS))}); update finegrain to a version with {method!r}"
        )


def _decoded(x: ImageSource | Sequence[ImageSource]) -> tuple[Iterator[tuple[str, np.ndarray]], bool]:
    """(name, photo) pairs decoded one at a time as they are consumed, and whether `x` was a single image."""
    single = not isinstance(x, list | tuple)
    sources = [x] if single else list(x)
    return ((_source_name(s), load_rgb(s)) for s in sources), single


def _batched(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _source_name(source: ImageSource) -> str:
    if isinstance(source, str | Path):
        return str(source)
    return {bytes: "<bytes>", np.ndarray: "<array>"}.get(type(source), "<PIL image>")
