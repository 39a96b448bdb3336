"""`finegrain export`: a self-contained package (weights + JSON config) and, optionally, an ONNX graph.

Package layout (format version 2; finegrain.package reads version 1 too):
- model.safetensors: the network's state dict.
- finegrain.json: {"format", "format_version", "network" ({"class_path", "init_args"}, as in a recipe),
  "class_names", "preprocessing" (eval resize/crop/normalisation), "onnx" (input and output names, when exported)}.
- model.onnx (--onnx): input "images" (B, 3, S, S) preprocessed as finegrain.json says; outputs "logits" (B, C)
  and "boxes.<branch>" (B, 4) normalised xyxy in the input, one per branch with a box.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import sys
from pathlib import Path

import safetensors.torch
import torch
from torch import Tensor, nn

from finegrain.errors import FinegrainError
from finegrain.package import PACKAGE_CONFIG, PACKAGE_ONNX, PACKAGE_WEIGHTS
from finegrain.predict import Predictor

ONNX_OPSET = 18  # GridSample (the crops) needs >= 16
ONNX_INPUT = "images"


class OnnxOutputs(nn.Module):
    """A network whose ModelOutput becomes a flat tuple: logits, then one box tensor per `box_names` entry."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network
        self.box_names = list(network.box_names)

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        output = self.network(images)
        return (output.logits, *(output.boxes[name] for name in self.box_names))


def onnx_output_names(network: nn.Module) -> list[str]:
    return ["logits", *(f"boxes.{name}" for name in network.box_names)]


def export_package(model: str | Path, out_dir: str | Path, onnx: bool = False) -> Path:
    """Write `model` (a checkpoint or package) to `out_dir` as a package; with `onnx`, also model.onnx.

    The package is built in a hidden sibling folder and renamed into place whole, so an interrupted export leaves
    the folder as it was. `out_dir` may be new, empty, or an earlier package (replaced); anything else is refused.
    """
    predictor = Predictor.from_checkpoint(model, device="cpu")
    out_dir = Path(out_dir)
    _check_package_target(out_dir)
    staging = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    try:
        try:
            staging.mkdir(parents=True)
        except OSError as e:
            raise FinegrainError(f"cannot write the package to {out_dir} ({e.strerror or e}); choose a folder you can "
                                 "write to") from e  # fmt: skip
        state_dict = {k: v.contiguous() for k, v in predictor.network.state_dict().items()}
        safetensors.torch.save_file(state_dict, staging / PACKAGE_WEIGHTS, metadata={"format": "pt"})
        meta = predictor.config.to_json()
        if onnx:
            export_onnx(predictor.network, predictor.config.preprocessing["img_size"], staging / PACKAGE_ONNX)
            meta["onnx"] = {"file": PACKAGE_ONNX, "input": ONNX_INPUT, "outputs": onnx_output_names(predictor.network)}
        (staging / PACKAGE_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
        _swap_in(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def _check_package_target(out_dir: Path) -> None:
    """Refuse a target that is a file, or a non-empty folder that is not a finegrain package."""
    if out_dir.exists() and not out_dir.is_dir():
        raise FinegrainError(f"{out_dir} is a file; pass a folder for the package")
    if any(parent.is_file() for parent in out_dir.parents):
        raise FinegrainError(f"{out_dir} lies under a file; pass a folder path for the package")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / PACKAGE_CONFIG).is_file():
        raise FinegrainError(f"{out_dir} is a non-empty folder without {PACKAGE_CONFIG}, not a finegrain package: "
                             "export into a new or empty folder (an earlier package is replaced whole)")  # fmt: skip


def _swap_in(staging: Path, out_dir: Path) -> None:
    """Rename the finished package into place; an earlier package there is moved aside first and removed after."""
    old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
    try:
        if out_dir.exists():
            os.rename(out_dir, old)
        try:
            os.rename(staging, out_dir)
        except OSError:
            if old.exists():
                os.rename(old, out_dir)  # put the earlier package back
            raise
    except OSError as e:
        raise FinegrainError(f"cannot write the package to {out_dir} ({e.strerror or e}); choose a folder you can "
                             "write to") from e  # fmt: skip
    shutil.rmtree(old, ignore_errors=True)


def export_onnx(network: nn.Module, img_size: int, path: str | Path) -> Path:
    """A CPU network as one ONNX file (weights inside) with a dynamic batch axis, via torch's dynamo exporter.

    Dynamo rather than the TorchScript exporter: that one froze the batch size into the crops' shape arithmetic.
    """
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter's dependency; fail here with the fix, not deep inside)
    except ImportError as e:
        raise FinegrainError("ONNX export needs onnx and onnxscript: pip install 'finegrain[onnx]'") from e
    # batch 2: the exporter specialises a sample dimension of size 1 to a constant
    sample = torch.zeros(2, 3, img_size, img_size)
    batch = torch.export.Dim("batch", min=1)
    with _quiet_exporter() as chatter:
        try:
            torch.onnx.export(OnnxOutputs(network).eval(), (sample,), str(path), input_names=[ONNX_INPUT],
                              output_names=onnx_output_names(network), opset_version=ONNX_OPSET, dynamo=True,
                              dynamic_shapes=({0: batch},), external_data=False, verbose=False)  # fmt: skip
        except Exception:
            print(chatter.getvalue(), end="", file=sys.stderr)  # what the exporter said helps explain its failure
            raise
    return Path(path)


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter's and onnxscript's progress lines (hundreds of optimiser messages) go to a buffer, not the
    user's terminal."""
    buffer = io.StringIO()
    loggers = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir", "torch.onnx", "torch.export")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(buffer):
            yield buffer
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
