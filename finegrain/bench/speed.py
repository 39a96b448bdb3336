"""`finegrain bench speed`: training and inference throughput of each recipe, the data pipeline and the Predictor,
each next to a hand-written plain PyTorch/timm/torchvision reference measured in the same run.

Every figure is images per second over timed steps that follow untimed warm-up steps, with peak memory: on CUDA
`torch.cuda.max_memory_allocated` minus what was allocated before the model was built; on CPU the growth of the
process's resident set over the same stretch, sampled every 5 ms from /proc/self/statm (freed memory is handed
back to the OS first, so an earlier measurement does not hide this one's; still approximate).
Over 300 lines on purpose: each measurement sits beside its reference, so that both sides visibly do the same work.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib.util
import io
import itertools
import logging
import os
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

from finegrain.bench.recipes import Recipe, build_task, load_recipe, measure_available, recipes_for
from finegrain.bench.report import figure, new_report
from finegrain.errors import FinegrainError
from finegrain.models.backbones import preprocessing_config

log = logging.getLogger(__name__)

INFERENCE_BATCHES = (1, 32)
DATA_ROUNDS = 11  # the data pipeline's sides take turns this many times (odd: a true median round)
SECTIONS = ("models", "data", "predictor", "phone", "onnx")
PHONE_IMAGE_SIZE = (4032, 3024)  # 12 megapixels, the 4:3 photo of most phones
CUB_IMAGE_SIZE = (500, 375)  # CUB photos are at most 500 px on their long side, most of them 500 x 333-375
TINY_BACKBONE = "test_resnet"  # the Predictor's model when no checkpoint is given: timing shows its overhead


@dataclass
class Settings:
    device: str = "cpu"
    bf16: bool = False
    channels_last: bool = False
    compile: bool = False
    batch_size: int | None = None  # None: each recipe's own data.batch_size
    steps: int = 5
    warmup: int = 2

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.bf16)

    def prepare(self, module: torch.nn.Module) -> torch.nn.Module:
        """Device, memory format and compilation of a model, the same for finegrain's and the reference."""
        module = module.to(self.device)
        if self.channels_last:
            module = module.to(memory_format=torch.channels_last)
        if self.compile:
            module.compile()
        return module

    def images(self, batch: int, size: int) -> torch.Tensor:
        x = torch.randn(batch, 3, size, size, device=self.device)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


class Meter:
    """Times the stretch between `start()` and `stop()` and records peak memory from `__enter__` on."""

    def __init__(self, device: str):
        self.device = device
        self.seconds = 0.0
        self.peak_bytes = 0
        self._stop_sampling = threading.Event()

    def __enter__(self) -> Meter:
        gc.collect()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self._baseline = torch.cuda.memory_allocated()
        else:
            _return_free_memory()
            self._baseline = self._peak_rss = _resident_bytes()
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated() - self._baseline
        else:
            self._stop_sampling.set()
            self._sampler.join()
            self.peak_bytes = max(0, self._peak_rss - self._baseline)

    def _sample(self) -> None:
        while not self._stop_sampling.wait(0.005):
            self._peak_rss = max(self._peak_rss, _resident_bytes())
        self._peak_rss = max(self._peak_rss, _resident_bytes())

    def _sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def start(self) -> None:
        self._sync()
        self._t0 = time.perf_counter()

    def stop(self) -> None:
        self._sync()
        self.seconds = time.perf_counter() - self._t0

    def result(self, images: int) -> dict:
        return {"images_per_s": images / self.seconds, "peak_memory_mb": self.peak_bytes / 2**20}


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _return_free_memory() -> None:
    """glibc keeps freed heap memory in the process; trimming it makes the next RSS growth visible."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def timed_loop(meter: Meter, step: Callable[[], object], steps: int, warmup: int) -> None:
    for _ in range(warmup):
        step()
    meter.start()
    for _ in range(steps):
        step()
    meter.stop()


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Lightning's per-Trainer banners and hints (no workers, few steps) would bury the table."""
    logger = logging.getLogger("pytorch_lightning")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def fake_batch(settings: Settings, batch: int, size: int, num_classes: int) -> dict[str, torch.Tensor]:
    """A batch as CUBDataModule makes it, already on the device (so no transfer is timed on either side)."""
    device = settings.device
    return {
        "image": settings.images(batch, size),
        "label": torch.arange(batch, device=device) % num_classes,
        "box": torch.tensor([[0.2, 0.25, 0.8, 0.75]], device=device).expand(batch, 4).contiguous(),
        "parts": torch.rand(batch, 15, 2, device=device),
        "part_visible": torch.ones(batch, 15, dtype=torch.bool, device=device),
        "index": torch.arange(batch, device=device),
    }


def train_finegrain(recipe: Recipe, settings: Settings, batch: int) -> dict:
    """The recipe's task trained by a Lightning Trainer: its own training_step, optimiser and schedule."""
    import pytorch_lightning as pl

    class Timer(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            if batch_idx == settings.warmup:
                meter.start()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            if batch_idx == settings.warmup + settings.steps - 1:
                meter.stop()

    size = recipe.preprocessing["img_size"]
    # batch_size=None: the loader hands the ready batch over as it is, once per step
    data = DataLoader([fake_batch(settings, batch, size, recipe.num_classes)] * (settings.warmup + settings.steps),
                      batch_size=None)  # fmt: skip
    with Meter(settings.device) as meter, quiet_lightning():
        task = settings.prepare(build_task(recipe))
        trainer = pl.Trainer(
            accelerator="gpu" if settings.device == "cuda" else "cpu", devices=1,
            precision="bf16-mixed" if settings.bf16 else "32-true", max_epochs=1, limit_val_batches=0,
            num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, callbacks=[Timer()],
        )  # fmt: skip
        trainer.fit(task, train_dataloaders=data)
    return meter.result(batch * settings.steps)


def reference_model(recipe: Recipe, settings: Settings) -> torch.nn.Module:
    import timm

    return settings.prepare(timm.create_model(recipe.backbone, num_classes=recipe.num_classes))


def train_reference(recipe: Recipe, settings: Settings, batch: int) -> dict:
    """The plain loop: timm model, SGD, cross-entropy on the same backbone, input size and batch."""
    size = recipe.preprocessing["img_size"]
    with Meter(settings.device) as meter:
        model = reference_model(recipe, settings).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        images = settings.images(batch, size)
        labels = torch.arange(batch, device=settings.device) % recipe.num_classes

        def step() -> None:
            with settings.autocast():
                loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        timed_loop(meter, step, settings.steps, settings.warmup)
    return meter.result(batch * settings.steps)


def infer(make_model: Callable[[], torch.nn.Module], settings: Settings, batch: int, size: int) -> dict:
    with Meter(settings.device) as meter:
        model = make_model().eval()
        images = settings.images(batch, size)

        def step() -> None:
            with torch.inference_mode(), settings.autocast():
                model(images)

        timed_loop(meter, step, settings.steps, settings.warmup)
    return meter.result(batch * settings.steps)


def recipe_speed(recipe: Recipe, settings: Settings) -> dict:
    batch = settings.batch_size or recipe.batch_size
    size = recipe.preprocessing["img_size"]
    log.info("speed: %s (%s, %s, %d px, batch %d)", recipe.name, recipe.method, recipe.backbone, size, batch)
    train = figure(train_finegrain(recipe, settings, batch), train_reference(recipe, settings, batch))
    result = {"recipe": str(recipe.path), "name": recipe.name, "method": recipe.method, "backbone": recipe.backbone,
              "img_size": size, "batch_size": batch, "train": train}  # fmt: skip
    for n in INFERENCE_BATCHES:
        mine = infer(lambda: settings.prepare(build_task(recipe)), settings, n, size)
        result[f"infer_b{n}"] = figure(mine, infer(lambda: reference_model(recipe, settings), settings, n, size))
    return result


def cub_like_jpegs(count: int, seed: int = 0) -> list[bytes]:
    """JPEGs the size of CUB photos with photo-like content (smooth colour fields plus grain), quality 90."""
    rng = np.random.default_rng(seed)
    width, height = CUB_IMAGE_SIZE
    jpegs = []
    for _ in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((width, height),
                                                                                        Image.BICUBIC)  # fmt: skip
        pixels = np.asarray(coarse, dtype=np.float32) + rng.normal(0, 6, (height, width, 3))
        buffer = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
        jpegs.append(buffer.getvalue())
    return jpegs


@contextlib.contextmanager
def one_core() -> Iterator[None]:
    """What a DataLoader worker gets: torch on one thread (the loader sets it), and OpenCV too."""
    import cv2

    torch_threads, cv2_threads = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        torch.set_num_threads(torch_threads)
        cv2.setNumThreads(cv2_threads)


def data_speed(preprocessing: dict, settings: Settings, jpegs: list[bytes]) -> dict:
    """Decode + train augmentation of one image per call, on one core: finegrain's path (load_rgb, then the
    albumentations pipeline carrying the bird box and 15 parts) against torchvision transforms v2 on the image
    alone (decode_jpeg, RandomResizedCrop, flip, ColorJitter, normalise) with the same settings, in DATA_ROUNDS
    rounds taken in turns: the round of median ratio."""
    from torchvision.io import decode_jpeg
    from torchvision.transforms import InterpolationMode, v2

    from finegrain.data.images import load_rgb
    from finegrain.data.transforms import Augment, apply_transform, build_transform

    augment, size = Augment(), preprocessing["img_size"]
    train_tf = build_transform(preprocessing, train=True, augment=augment, seed=0)
    width, height = CUB_IMAGE_SIZE
    box = (width * 0.2, height * 0.2, width * 0.6, height * 0.6)
    parts = np.column_stack([np.linspace(0.25 * width, 0.75 * width, 15), np.full(15, height / 2), np.ones(15)])
    reference_tf = v2.Compose([
        v2.RandomResizedCrop(size, scale=augment.scale, ratio=augment.ratio, antialias=True,
                             interpolation=InterpolationMode(preprocessing["interpolation"])),
        v2.RandomHorizontalFlip(augment.hflip),
        v2.RandomApply([v2.ColorJitter(augment.color_jitter, augment.color_jitter, augment.color_jitter)], p=0.8),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(preprocessing["mean"], preprocessing["std"]),
    ])  # fmt: skip
    count = max(settings.steps, len(jpegs))  # photos per round and side

    def measure(sample: Callable[[bytes], object]) -> dict:
        images = itertools.cycle(jpegs)
        with Meter("cpu") as meter, one_core():
            timed_loop(meter, lambda: sample(next(images)), count, settings.warmup)
        return meter.result(count)

    # The sides take turns for DATA_ROUNDS short rounds and the round of median ratio is the figure: a millisecond
    # or two per image makes one long stretch per side swing with whatever else the VM does (x1.06 to x1.49 in
    # three runs of one stretch each).
    rounds = []
    for _ in range(DATA_ROUNDS):
        mine = measure(lambda data: apply_transform(train_tf, load_rgb(data), box, parts))
        theirs = measure(lambda data: reference_tf(decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))))
        rounds.append(figure(mine, theirs))
    ratios = [r["ratio"] for r in rounds]
    return {"img_size": size, "source_size": list(CUB_IMAGE_SIZE), "jpeg_kb": sum(map(len, jpegs)) / len(jpegs) / 1024,
            "rounds": DATA_ROUNDS, "round_ratios": ratios,
            "train_sample": rounds[sorted(range(DATA_ROUNDS), key=ratios.__getitem__)[DATA_ROUNDS // 2]]}  # fmt: skip


def tiny_checkpoint(folder: Path, img_size: int) -> Path:
    """A checkpoint as `finegrain fit` writes it, of a tiny random model (so preprocessing dominates)."""
    import pytorch_lightning as pl

    from finegrain.models import Classifier
    from finegrain.tasks.classification import ClassificationTask

    task = ClassificationTask(network=Classifier(num_classes=10, backbone=TINY_BACKBONE),
                              class_names=[f"bird_{i}" for i in range(10)],
                              preprocessing=preprocessing_config(TINY_BACKBONE, img_size))  # fmt: skip
    path = folder / "tiny.ckpt"
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams),
                "pytorch-lightning_version": pl.__version__, "epoch": 0, "global_step": 0}, path)  # fmt: skip
    return path


def predictor_speed(checkpoint: Path | None, settings: Settings, jpegs: list[bytes]) -> dict:
    """From JPEG bytes to the top-5 classes: finegrain's Predictor against a hand-written timm pipeline (PIL
    decode, resize, centre crop, normalise, the same network, softmax, top-k)."""
    with _pipelines(checkpoint, settings) as (predictor, predict, reference, _):
        result = {"checkpoint": str(checkpoint) if checkpoint else f"fresh {TINY_BACKBONE}",
                  "img_size": predictor.config.preprocessing["img_size"]}  # fmt: skip
        images = itertools.cycle(jpegs)
        for n in INFERENCE_BATCHES:
            batches = [[next(images) for _ in range(n)] for _ in range(4)]
            result[f"b{n}"] = figure(_measure(predict, batches, settings), _measure(reference, batches, settings))
    return result


def phone_jpegs(count: int, sources: list[Path] | None = None) -> list[bytes]:
    """Camera-size photos: CUB-size JPEGs (`sources`, else `cub_like_jpegs`) upscaled to 4032 x 3024 (12
    megapixels) with bicubic resampling and saved at quality 90, as phones save them."""
    originals = [p.read_bytes() for p in sources[:count]] if sources else cub_like_jpegs(count, seed=1)
    jpegs = []
    for data in originals:
        with Image.open(io.BytesIO(data)) as image:
            large = image.convert("RGB").resize(PHONE_IMAGE_SIZE, Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        large.save(buffer, format="JPEG", quality=90)
        jpegs.append(buffer.getvalue())
    return jpegs


def phone_speed(checkpoint: Path | None, settings: Settings, jpegs: list[bytes]) -> dict:
    """Batch-1 latency on 12-megapixel JPEGs: the Predictor (which decodes a JPEG at the smallest DCT scale the
    input needs, then resizes it as PIL does) against the hand-written pipeline (full decode, then PIL's resize),
    and whether their top-5 agree; then the same with the Predictor on the exported ONNX graph, where the onnx
    extra is installed."""
    from finegrain.data.images import load_rgb

    with _pipelines(checkpoint, settings) as (predictor, predict, reference, path):
        batches = [[jpeg] for jpeg in jpegs]
        reduced = [[p["class_id"] for p in predict(batch)] for batch in batches]
        theirs = [reference(batch)[1][0].tolist() for batch in batches]
        # the Predictor's own pipeline on the whole decode (an array is used as it is): what the reduction changes
        whole = [[p["class_id"] for p in predictor.predict(load_rgb(jpeg), top_k=5)] for jpeg in jpegs]
        steps = replace(settings, steps=max(settings.steps, len(batches)))
        result = {"checkpoint": str(checkpoint) if checkpoint else f"fresh {TINY_BACKBONE}",
                  "img_size": predictor.config.preprocessing["img_size"], "source_size": list(PHONE_IMAGE_SIZE),
                  "jpeg_kb": sum(map(len, jpegs)) / len(jpegs) / 1024, "decode_side": predictor.decode_side,
                  "photos": len(jpegs), "same_top5": _agree(reduced, theirs), "same_top1": _agree(reduced, theirs, 1),
                  "same_top5_set": sum(set(x) == set(y) for x, y in zip(reduced, theirs, strict=True)),
                  "same_top5_as_whole": _agree(reduced, whole), "same_top1_as_whole": _agree(reduced, whole, 1),
                  "whole_same_top5": _agree(whole, theirs),
                  "b1": figure(_measure(predict, batches, steps), _measure(reference, batches, steps))}  # fmt: skip
        result["onnxruntime"] = _phone_onnxruntime(path, batches, theirs, reference, steps)
        return result


def _phone_onnxruntime(path: Path, batches: list[list[bytes]], theirs: list[list[int]],
                       reference: Callable[[list[bytes]], object], settings: Settings) -> dict:  # fmt: skip
    """The phone row with the Predictor on the exported graph (`backend="onnxruntime"`): the same decode and
    preprocessing, the network replaced by ONNX Runtime; {"skipped": why} without the onnx extra."""
    from finegrain.export import export_package
    from finegrain.predict import Predictor

    missing = [name for name in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(name) is None]
    if missing or settings.device != "cpu":
        return {"skipped": f"{', '.join(missing)} not installed (pip install 'finegrain[onnx]')" if missing
                else "ONNX Runtime runs on the CPU; measured with --device cpu only"}  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        runtime = Predictor.from_checkpoint(export_package(path, Path(folder) / "package", onnx=True),
                                            backend="onnxruntime")  # fmt: skip

        def predict(batch: list[bytes]) -> list:
            return runtime.predict(batch[0], top_k=5)

        ours = [[p["class_id"] for p in predict(batch)] for batch in batches]
        return {"same_top5": _agree(ours, theirs), "same_top1": _agree(ours, theirs, 1),
                "b1": figure(_measure(predict, batches, settings), _measure(reference, batches, settings))}  # fmt: skip


def _agree(a: list[list[int]], b: list[list[int]], k: int = 5) -> int:
    """On how many photos two lists of top-5 class ids have the same first k, in order."""
    return sum(x[:k] == y[:k] for x, y in zip(a, b, strict=True))


def onnx_speed(checkpoint: Path | None, settings: Settings) -> dict:
    """The network alone on preprocessed batches: ONNX Runtime on the exported graph against PyTorch eager, at
    batch 1 and 32, with how far their logits and boxes differ and whether their top-1 agree."""
    from finegrain.export import export_package
    from finegrain.predict import Predictor

    with tempfile.TemporaryDirectory() as folder:
        path = checkpoint or tiny_checkpoint(Path(folder), img_size=224)
        package = export_package(path, Path(folder) / "package", onnx=True)
        eager = Predictor.from_checkpoint(package, device="cpu")
        runtime = Predictor.from_checkpoint(package, backend="onnxruntime")
        size = eager.config.preprocessing["img_size"]
        inputs = eager.preprocess([np.asarray(Image.open(io.BytesIO(j)).convert("RGB")) for j in cub_like_jpegs(32)])
        reference, answer = eager.forward(inputs), runtime.forward(inputs)
        result = {"checkpoint": str(checkpoint) if checkpoint else f"fresh {TINY_BACKBONE}", "img_size": size,
                  "method": eager.config.method, "threads": torch.get_num_threads(),
                  "max_logit_difference": (answer.logits - reference.logits).abs().max().item(),
                  # what a user reads: the Predictor's scores are these softmax probabilities
                  "max_score_difference": (answer.logits.softmax(1) - reference.logits.softmax(1)).abs().max().item(),
                  "max_box_difference": max([(answer.boxes[k] - b).abs().max().item()
                                             for k, b in reference.boxes.items()], default=0.0),
                  "same_top1": int((answer.logits.argmax(1) == reference.logits.argmax(1)).sum()),
                  "images": len(inputs)}  # fmt: skip
        for n in INFERENCE_BATCHES:
            batch = inputs[:n]
            with Meter("cpu") as meter:
                timed_loop(meter, lambda b=batch: runtime.forward(b), settings.steps, settings.warmup)
            mine = meter.result(n * settings.steps)
            with Meter("cpu") as meter:
                timed_loop(meter, lambda b=batch: eager.forward(b), settings.steps, settings.warmup)
            theirs = meter.result(n * settings.steps)
            result[f"b{n}"] = figure(mine, theirs)
    return result


def reference_transform(preprocessing: dict):
    """The hand-written pipeline's eval transform of a PIL image: timm's, from the checkpoint's preprocessing."""
    import timm

    size = preprocessing["img_size"]
    return timm.data.create_transform(
        input_size=(3, size, size), crop_pct=preprocessing["crop_pct"], mean=preprocessing["mean"],
        std=preprocessing["std"], interpolation=preprocessing["interpolation"],
    )  # fmt: skip


@contextlib.contextmanager
def _pipelines(checkpoint: Path | None, settings: Settings) -> Iterator[tuple]:
    """(predictor, predict, reference, checkpoint path): JPEG bytes of a batch to the Predictor's top-5, or to the
    reference's (scores, class ids) from the same network object, so that only the pipeline around it differs."""
    from finegrain.predict import Predictor

    with tempfile.TemporaryDirectory() as folder:
        path = checkpoint or tiny_checkpoint(Path(folder), img_size=224)
        predictor = Predictor.from_checkpoint(path, device=settings.device)
        network, transform = predictor.network, reference_transform(predictor.config.preprocessing)

        def reference(batch: list[bytes]) -> tuple[torch.Tensor, torch.Tensor]:
            images = [transform(Image.open(io.BytesIO(data)).convert("RGB")) for data in batch]
            with torch.inference_mode():  # fp32, as the Predictor runs
                logits = network(torch.stack(images).to(predictor.device)).logits
            return logits.float().softmax(dim=1).topk(min(5, logits.shape[1]), dim=1)

        def predict(batch: list[bytes]) -> list:
            return predictor.predict(batch[0] if len(batch) == 1 else batch, top_k=5)

        yield predictor, predict, reference, path


def _measure(run: Callable[[list[bytes]], object], batches: list[list[bytes]], settings: Settings) -> dict:
    turns = itertools.cycle(batches)
    with Meter(settings.device) as meter:
        timed_loop(meter, lambda: run(next(turns)), settings.steps, settings.warmup)
    return meter.result(len(batches[0]) * settings.steps)


def run_speed(recipe_paths: list[str], settings: Settings, checkpoint: Path | None = None,
              sections: tuple[str, ...] = SECTIONS, command: str = "",
              phone_sources: list[Path] | None = None) -> dict:  # fmt: skip
    """All figures of `finegrain bench speed` as one JSON-ready report."""
    if settings.device == "cuda" and not torch.cuda.is_available():
        raise FinegrainError("--device cuda: no CUDA device is visible to torch; run on a GPU machine or --device cpu")
    if checkpoint is not None and not checkpoint.is_file():
        raise FinegrainError(f"checkpoint {checkpoint} not found; pass a .ckpt written by `finegrain fit`")
    recipes = [load_recipe(p) for p in recipe_paths] if recipe_paths else recipes_for(settings.device)
    report = new_report("speed", command, settings=asdict(settings))
    report["memory"] = ("CUDA max_memory_allocated above the pre-model baseline" if settings.device == "cuda"
                        else "growth of the resident set (RSS), sampled every 5 ms")  # fmt: skip
    report["results"], report["skipped"] = [], []
    if "models" in sections:
        measure_available(recipes, report, lambda recipe: recipe_speed(recipe, settings))
    jpegs = cub_like_jpegs(8)
    if "data" in sections:
        preprocessing = recipes[0].preprocessing if recipes else preprocessing_config("resnet50")
        report["data"] = data_speed(preprocessing, settings, jpegs)
    if "predictor" in sections:
        report["predictor"] = predictor_speed(checkpoint, settings, jpegs)
    if "phone" in sections:
        report["phone"] = phone_speed(checkpoint, settings, phone_jpegs(8, phone_sources))
    if "onnx" in sections:
        if settings.device != "cpu":
            raise FinegrainError("--only onnx measures ONNX Runtime on the CPU; run it with --device cpu")
        report["onnx"] = onnx_speed(checkpoint, settings)
    return report
