"""The model format inference reads: a Lightning checkpoint written by `finegrain fit` or a package written by
`finegrain export`, as a ModelConfig and network weights, and the network built from them.

Neither needs the dataset or the recipe. Nothing is unpickled as code: checkpoints are read with
`torch.load(weights_only=True)`, packages are JSON and safetensors.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from safetensors import SafetensorError
from torch import Tensor, nn

from finegrain.checkpoints import CHECKPOINT_FIX, load_checkpoint, network_spec
from finegrain.errors import FinegrainError
from finegrain.models import ModelOutput, create_network
from finegrain.models.backbones import _first_few

PACKAGE_CONFIG = "finegrain.json"
PACKAGE_WEIGHTS = "model.safetensors"
PACKAGE_ONNX = "model.onnx"
FORMAT_VERSION = 2  # 1: a `method` name and the network's arguments (read as well)
NETWORK_PREFIX = "network."  # ClassificationTask keeps its network as `self.network`
_MODEL_FIX = CHECKPOINT_FIX


@dataclass
class ModelConfig:
    """What inference needs: the network (class path and arguments), the class names and the eval preprocessing."""

    network: dict  # {"class_path", "init_args"}, as a recipe's model.network
    class_names: list[str]
    preprocessing: dict

    def to_json(self) -> dict:
        return {"format": "finegrain", "format_version": FORMAT_VERSION, "network": self.network,
                "class_names": self.class_names, "preprocessing": self.preprocessing}  # fmt: skip

    @property
    def method(self) -> str:
        """The network's class name, for titles and messages."""
        return self.network["class_path"].rsplit(".", 1)[-1]


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
    if not isinstance(hparams, dict) or not isinstance(weights, dict) or not ({"network", "method"} & set(hparams)):
        raise FinegrainError(f"{path} is not a finegrain training checkpoint (no hyper_parameters with a network, "
                             f"or no state_dict); {_MODEL_FIX}")  # fmt: skip
    network = network_spec(hparams, path)
    if "weights" in network["init_args"]:  # the trained weights follow: no pretrained ones to fetch first
        network["init_args"]["weights"] = "none"
    if not hparams.get("preprocessing"):
        raise FinegrainError(f"{path} was saved without its preprocessing; train through `finegrain fit`, which "
                             "stores it with the data module's settings")  # fmt: skip
    num_classes = network["init_args"].get("num_classes", 0)
    class_names = hparams.get("class_names") or [str(i) for i in range(num_classes)]
    state_dict = {k.removeprefix(NETWORK_PREFIX): v for k, v in weights.items() if k.startswith(NETWORK_PREFIX)}
    return ModelConfig(network, list(class_names), dict(hparams["preprocessing"])), state_dict


def read_package(folder: Path) -> tuple[ModelConfig, dict[str, Tensor]]:
    """A `finegrain export` folder: finegrain.json and model.safetensors."""
    weights_path = folder / PACKAGE_WEIGHTS
    if not (folder / PACKAGE_CONFIG).is_file() or not weights_path.is_file():
        raise FinegrainError(f"{folder} is a folder without {PACKAGE_CONFIG} and {PACKAGE_WEIGHTS}; {_MODEL_FIX}")
    config, _ = read_package_config(folder)
    try:
        state_dict = safetensors.torch.load_file(weights_path, device="cpu")
    except (SafetensorError, OSError) as e:
        raise FinegrainError(f"{weights_path} is not a safetensors file ({e}); export the checkpoint again") from e
    return config, state_dict


def read_package_config(folder: Path) -> tuple[ModelConfig, dict]:
    """The ModelConfig of a package folder, and its finegrain.json as read (the "onnx" entry, when exported)."""
    config_path = folder / PACKAGE_CONFIG
    try:
        meta = json.loads(config_path.read_text())
        version = meta["format_version"]
        config = ModelConfig(network_spec(meta, config_path), list(meta["class_names"]), dict(meta["preprocessing"]))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        raise FinegrainError(f"{config_path} is not a finegrain package config ({type(e).__name__}: {e}); "
                             "export the checkpoint again with `finegrain export`") from e  # fmt: skip
    except OSError as e:
        raise FinegrainError(f"cannot read {config_path} ({e.strerror or e}); {_MODEL_FIX}") from e
    if version > FORMAT_VERSION:
        raise FinegrainError(f"{config_path} has format version {version}, newer than this finegrain's "
                             f"{FORMAT_VERSION}; update finegrain")  # fmt: skip
    return config, meta


class OnnxRuntimeNetwork(nn.Module):
    """A package's exported ONNX graph run by ONNX Runtime on the CPU, answering with a ModelOutput as the network
    it was exported from does: logits and boxes (the graph has no attention maps)."""

    branch_names: tuple[str, ...] = ()

    def __init__(self, path: Path, input_name: str, output_names: list[str]):
        super().__init__()
        import onnxruntime

        options = onnxruntime.SessionOptions()
        # the same thread count as torch, so that the backends compare like for like
        options.intra_op_num_threads = torch.get_num_threads()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - ONNX Runtime raises its own pybind types for a bad graph
            raise FinegrainError(f"{path} does not load in ONNX Runtime ({e}); export the model again") from e
        self.input_name, self.output_names = input_name, list(output_names)
        self.box_names = [name.removeprefix("boxes.") for name in self.output_names if name.startswith("boxes.")]

    def forward(self, images: Tensor) -> ModelOutput:
        arrays = self.session.run(self.output_names, {self.input_name: images.detach().cpu().float().numpy()})
        named = dict(zip(self.output_names, (torch.from_numpy(a) for a in arrays), strict=True))
        return ModelOutput(logits=named["logits"], boxes={name: named[f"boxes.{name}"] for name in self.box_names})


def read_onnx_model(path: str | Path) -> tuple[ModelConfig, OnnxRuntimeNetwork]:
    """The config and ONNX Runtime network of a package exported with `--onnx` (its folder or one of its files)."""
    folder = Path(path)
    if folder.is_file() and folder.name in (PACKAGE_CONFIG, PACKAGE_WEIGHTS, PACKAGE_ONNX):
        folder = folder.parent
    if not (folder / PACKAGE_CONFIG).is_file():
        raise FinegrainError(f"the onnxruntime backend runs an exported graph, and {path} is no `finegrain export` "
                             f"folder; run `finegrain export {path} OUT_DIR --onnx` and pass OUT_DIR")  # fmt: skip
    config, meta = read_package_config(folder)
    graph = meta.get("onnx")
    if not isinstance(graph, dict) or not (folder / str(graph.get("file"))).is_file():
        raise FinegrainError(f"{folder} holds no ONNX graph; export it with --onnx: finegrain export CKPT {folder} "
                             "--onnx")  # fmt: skip
    if importlib.util.find_spec("onnxruntime") is None:
        raise FinegrainError("the onnxruntime backend needs ONNX Runtime: pip install 'finegrain[onnx]'")
    return config, OnnxRuntimeNetwork(folder / graph["file"], graph["input"], graph["outputs"])


def build_model(config: ModelConfig, state_dict: dict[str, Tensor], source: Path) -> nn.Module:
    """The network of `config` (random init, no hub access) with `state_dict` loaded strictly."""
    try:
        network = create_network(config.network["class_path"], **config.network["init_args"])
    except (FinegrainError, TypeError, ValueError) as e:
        raise FinegrainError(f"{source}: its network config does not build ({e}); {_MODEL_FIX}") from e
    own = network.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong_shape = [k for k in state_dict if k in own and own[k].shape != state_dict[k].shape]
    problems = [f"{what} {_first_few(keys)}" for what, keys in
                (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)) if keys]  # fmt: skip
    if problems:
        described = f"{config.method} network (backbone {config.network['init_args'].get('backbone')})"
        raise FinegrainError(
            f"{source}: its weights do not fit the {described} its config describes ({'; '.join(problems)}); "
            "use the file as `finegrain fit` or `finegrain export` wrote it"
        )
    network.load_state_dict(state_dict, strict=True)
    num_classes = config.network["init_args"].get("num_classes")
    if num_classes is not None and len(config.class_names) != num_classes:
        raise FinegrainError(f"{source}: it names {len(config.class_names)} classes but its network scores "
                             f"{num_classes}; export the checkpoint again with `finegrain export`")  # fmt: skip
    return network.eval()
