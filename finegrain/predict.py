"""Inference from a trained model: species from photos, the regions each branch looked at, and the network's maps.

The model is read by `finegrain.package` (a `finegrain fit` checkpoint or a `finegrain export` folder); boxes are
mapped back to photo pixels through the eval transform's own map of points (`finegrain.data.transforms`).
"""

from __future__ import annotations

import functools
import itertools
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from finegrain.data.images import MAX_PIXELS, decode_photo
from finegrain.data.transforms import PIL_FILTERS, build_transform, eval_resize_side, input_frame, interpolation_name
from finegrain.errors import FinegrainError
from finegrain.explain import Explanation
from finegrain.geometry import InputFrame, input_box_to_photo, round_box
from finegrain.models import ModelOutput
from finegrain.package import ModelConfig, build_model, read_model, read_onnx_model

FRAME_CACHE_SIZE = 1024  # photo sizes whose input frame is kept; phone and camera photos come in few sizes

ImageSource = str | Path | bytes | Image.Image | np.ndarray
# (name, decoded pixels, the photo's own upright (width, height)): a JPEG may decode smaller than it is
Decoded = tuple[str, np.ndarray, tuple[int, int]]


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
        # where the input lies in a photo depends on the photo's size alone: measured once per size
        self._frames = functools.lru_cache(maxsize=FRAME_CACHE_SIZE)(self._measure_frame)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "auto", backend: str = "torch") -> Predictor:
        """Load a `finegrain fit` checkpoint (.ckpt) or a `finegrain export` folder.

        device: "auto" (CUDA when available, else CPU) or a torch device ("cpu", "cuda:1", ...).
        backend: "torch" (eager PyTorch), or "onnxruntime": the ONNX graph of a folder exported with `--onnx`, on
            the CPU; the same top-1 and boxes, logits within 1e-4 on most networks (an RA-CNN's fused head: up to
            8e-4, docs/benchmarks.md), no attention maps.
        """
        if backend == "onnxruntime":
            if device not in ("auto", "cpu"):
                raise FinegrainError(f"the onnxruntime backend runs on the CPU, not {device!r}; pass --device cpu")
            config, network = read_onnx_model(path)
            return cls(network, config, "cpu")
        if backend != "torch":
            raise FinegrainError(f"backend {backend!r} is not one of torch, onnxruntime")
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
        items, single = self._decoded(x)
        results = [self._top_k(output.logits, top_k) for _, output in self._run(items, batch_size)]
        flat = [p for batch in results for p in batch]
        return flat[0] if single else flat

    def explain(self, x: ImageSource | Sequence[ImageSource], top_k: int = 5,
                batch_size: int = 32) -> Explanation | list[Explanation]:  # fmt: skip
        """Prediction, boxes in photo pixels, crops and attention maps of one image or of each of a list."""
        items, single = self._decoded(x)
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

    @property
    def decode_side(self) -> int:
        """The shorter side a photo needs for the eval resize: a large photo is decoded or reduced to no less.

        Every network crops its zooms and parts from this input, never from the photo itself, so the input's
        resolution is also the largest any branch asks for.
        """
        return eval_resize_side(self.config.preprocessing)

    def decode(self, source: ImageSource, max_pixels: int | None = MAX_PIXELS) -> tuple[np.ndarray, tuple[int, int]]:
        """Pixels for this model and the photo's own (width, height); a large photo decodes at a reduced size."""
        resample = PIL_FILTERS[interpolation_name(self.config.preprocessing)]
        return decode_photo(source, min_side=self.decode_side, max_pixels=max_pixels, resample=resample)

    def explain_decoded(self, photos: Sequence[tuple[np.ndarray, tuple[int, int]]], top_k: int = 5,
                        source: str = "<bytes>") -> list[Explanation]:  # fmt: skip
        """`explain` of photos that `decode` already decoded (pixels, the photo's own size), in one batch: for
        callers that decode elsewhere, such as the server's thread pool."""
        items = [(source, pixels, size) for pixels, size in photos]
        return [
            e for images, output in self._run(items, max(1, len(items))) for e in self._explain(images, output, top_k)
        ]

    def preprocess(self, images: Sequence[np.ndarray]) -> Tensor:
        """Decoded RGB photos -> the network's input (B, 3, S, S): the checkpoint's eval resize, crop and norm.

        Decode with `finegrain.data.images.load_rgb`, the same path training used.
        """
        transform = self._transform()
        return torch.stack([transform(image=image)["image"] for image in images])

    def input_frame(self, width: int, height: int) -> InputFrame:
        """Where the network's input lies in a width x height photo: the eval transform's own map of points
        (`finegrain.data.transforms.input_frame`), measured on the first photo of that size and kept."""
        return self._frames(width, height)

    def _measure_frame(self, width: int, height: int) -> InputFrame:
        return input_frame(self._transform(), width, height)

    def _transform(self):
        """This thread's eval transform."""
        transform = getattr(self._local, "transform", None)
        if transform is None:  # built once per thread: building costs about twice applying it to one photo
            transform = self._local.transform = build_transform(self.config.preprocessing, train=False)
        return transform

    def forward(self, inputs: Tensor) -> ModelOutput:
        """The network on preprocessed inputs, in inference mode, one call at a time."""
        with self._lock, torch.inference_mode():
            return self.network(inputs.to(self.device))

    def _decoded(self, x: ImageSource | Sequence[ImageSource]) -> tuple[Iterator[Decoded], bool]:
        """Items decoded one at a time as they are consumed, and whether `x` was a single image."""
        single = not isinstance(x, list | tuple)
        sources = [x] if single else list(x)
        return ((_source_name(s), *self.decode(s)) for s in sources), single

    def _run(self, items: Iterable[Decoded], batch_size: int) -> Iterator[tuple[list[Decoded], ModelOutput]]:
        """Decoded items -> per batch, those items and the network's output."""
        if batch_size < 1:
            raise FinegrainError(f"batch_size must be a positive integer, got {batch_size}")
        for chunk in _batched(items, batch_size):
            yield chunk, self.forward(self.preprocess([photo for _, photo, _ in chunk]))

    def _top_k(self, logits: Tensor, top_k: int) -> list[list[dict]]:
        if top_k < 1:
            raise FinegrainError(f"top_k must be a positive integer, got {top_k}")
        scores, indices = logits.float().softmax(dim=1).topk(min(top_k, logits.shape[1]), dim=1)
        return [
            [{"label": readable(self.class_names[i]), "class_id": i, "score": s}
             for s, i in zip(row_scores.tolist(), row_indices.tolist(), strict=True)]
            for row_scores, row_indices in zip(scores, indices, strict=True)
        ]  # fmt: skip

    def _explain(self, images: list[Decoded], output: ModelOutput, top_k: int) -> list[Explanation]:
        predictions = self._top_k(output.logits, top_k)
        boxes = {name: b.float().cpu().numpy() for name, b in output.boxes.items()}
        maps = {name: m.float().cpu().numpy() for name, m in output.attention_maps.items()}
        explanations = []
        for i, (name, pixels, photo_size) in enumerate(images):
            height, width = pixels.shape[:2]
            frame = self.input_frame(width, height)
            # boxes in the decoded pixels, for the crops; then in the photo's own pixels, for the user
            decoded_boxes = {key: input_box_to_photo(b[i], frame) for key, b in boxes.items()}
            crops = {key: Image.fromarray(pixels).crop(round_box(box)) for key, box in decoded_boxes.items()}
            to_photo = np.array([photo_size[0] / width, photo_size[1] / height] * 2)
            pixel_boxes = {key: tuple((box * to_photo).tolist()) for key, box in decoded_boxes.items()}
            item_maps = {key: m[i] for key, m in maps.items()}
            seen = tuple((input_box_to_photo(np.array([0.0, 0.0, 1.0, 1.0]), frame) * to_photo).tolist())
            explanations.append(Explanation(pixels, predictions[i], pixel_boxes, crops, item_maps, name, seen,
                                            photo_size))  # fmt: skip
        return explanations


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


def _batched(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _source_name(source: ImageSource) -> str:
    if isinstance(source, str | Path):
        return str(source)
    return {bytes: "<bytes>", np.ndarray: "<array>"}.get(type(source), "<PIL image>")
