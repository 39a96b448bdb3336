"""`finegrain export`: a self-contained package (weights + JSON config) and, optionally, an ONNX graph.

Package layout (format version 1):
- model.safetensors: the network's state dict.
- finegrain.json: {"format", "format_version", "method", "network" (build_network arguments), "class_names",
  "preprocessing" (eval resize/crop/normalisation), "onnx" (input and output names, when exported)}.
- model.onnx (--onnx): input "images" (B, 3, S, S) preprocessed as finegrain.json says; outputs "logits" (B, C)
  and "boxes.<branch>" (B, 4) normalised xyxy in the input, one per branch with a box.
"""

from __future__ import annotations

import json
from pathlib import Path

import safetensors.torch
import torch
from torch import Tensor, nn

from finegrain.errors import FinegrainError
from finegrain.predict import PACKAGE_CONFIG, PACKAGE_ONNX, PACKAGE_WEIGHTS, Predictor

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
    """Write `model` (a checkpoint or package) to `out_dir` as a package; with `onnx`, also model.onnx."""
    predictor = Predictor.from_checkpoint(model, device="cpu")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FinegrainError(f"{out_dir} is a file; pass a folder for the package")
    out_dir.mkdir(parents=True, exist_ok=True)
    state_dict = {k: v.contiguous() for k, v in predictor.network.state_dict().items()}
    safetensors.torch.save_file(state_dict, out_dir / PACKAGE_WEIGHTS, metadata={"format": "pt"})
    meta = predictor.config.to_json()
    if onnx:
        export_onnx(predictor.network, predictor.config.preprocessing["img_size"], out_dir / PACKAGE_ONNX)
        meta["onnx"] = {"file": PACKAGE_ONNX, "input": ONNX_INPUT, "outputs": onnx_output_names(predictor.network)}
    (out_dir / PACKAGE_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    return out_dir


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
    torch.onnx.export(OnnxOutputs(network).eval(), (sample,), str(path), input_names=[ONNX_INPUT],
                      output_names=onnx_output_names(network), opset_version=ONNX_OPSET, dynamo=True,
                      dynamic_shapes=({0: batch},), external_data=False, verbose=False)  # fmt: skip
    return Path(path)
