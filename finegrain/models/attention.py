"""CBAM (Woo et al., ECCV 2018) and its relatives SE (Hu et al., CVPR 2018) and ECA (Wang et al., CVPR 2020),
and `add_attention`, which puts them into a timm CNN after its weights are loaded.

Identity-initialised gates (the default, `identity_init=True`). A gate multiplies features by
`2 * sigmoid(z)` instead of the papers' `sigmoid(z)`, and the last layer of every attention path (the second
MLP layer, the 7x7 spatial conv, ECA's 1D conv) starts at zero. Then z = 0 and the gate is exactly 1, so a
backbone with ImageNet weights computes the same function with attention as without, whereas a random
sigmoid gate scales each residual branch by about 1/2 per gate and damages the pretrained features.
The paper's model stays reachable: 2 * sigmoid covers (0, 2), which contains sigmoid's (0, 1), and a
ResNet block computes the paper's block exactly once its last norm's affine weight and bias are a quarter
of the paper's and the first layer of each attention path is rescaled to match (pooling is linear in scale).
The zeroed layers get gradient from the first step (d gate / dz = 1/2 at z = 0); the layers before them get
gradient once those have moved off zero, from the second step on (the same trade as zero-initialising a
ResNet's last norm). `identity_init=False` gives the papers' plain sigmoid gates with PyTorch's default
initialisation, for training from scratch.
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
from timm.models.resnet import BasicBlock, Bottleneck
from torch import Tensor, nn

from finegrain.errors import FinegrainError

KINDS = ("none", "se", "eca", "cbam")
MIN_HIDDEN = 8  # below this the channel MLP is too narrow to model channel interplay (a few C < 128 stages)


def _gate_scale(identity_init: bool) -> float:
    # 2 * sigmoid(0) == 1.0 exactly in floating point, so zero logits leave the features bit-identical
    return 2.0 if identity_init else 1.0


def _zero_init(layer: nn.Module) -> None:
    nn.init.zeros_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


class ChannelAttention(nn.Module):
    """CBAM's channel attention: one MLP (C -> C/r -> C, ReLU) on the average- and max-pooled descriptors, summed.

    With `use_max=False` it is squeeze-and-excitation (Hu et al.). The MLP has biases, as in both papers'
    code and parameter counts.
    """

    def __init__(self, channels: int, reduction: int = 16, use_max: bool = True, identity_init: bool = True):
        super().__init__()
        hidden = max(channels // reduction, min(channels, MIN_HIDDEN))
        self.use_max = use_max
        self.scale = _gate_scale(identity_init)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, 1)
        if identity_init:
            _zero_init(self.fc2)

    def _mlp(self, descriptor: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(descriptor)))

    def forward(self, x: Tensor) -> Tensor:
        logits = self._mlp(x.mean((2, 3), keepdim=True))
        if self.use_max:
            logits = logits + self._mlp(x.amax((2, 3), keepdim=True))
        return x * (self.scale * torch.sigmoid(logits))


class SpatialAttention(nn.Module):
    """CBAM's spatial attention: channel-wise mean and max maps -> k x k conv -> gate.

    `last_map` holds the sigmoid of the last forward, shape (B, H, W), values in (0, 1), detached. It is the
    paper's attention map in both modes; with `identity_init` the gate applied is twice it, so 0.5 is neutral.
    Keeping it costs no compute and one (B, H, W) tensor (1/C of the features) until the next forward; being
    detached, it adds nothing to autograd or DDP. Not kept while torch.export traces the model.
    """

    def __init__(self, kernel_size: int = 7, identity_init: bool = True):
        super().__init__()
        self.scale = _gate_scale(identity_init)
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2)
        # The mean/max maps of pretrained features are large and summed over every pixel in the conv's gradient:
        # one fine-tuning step with a zero-initialised conv alone saturated whole maps to 0 and killed the
        # network. As in the official CBAM code (conv -> BatchNorm -> sigmoid), a norm keeps the logits in
        # range; its scale starts at zero, so the gate still starts as the identity.
        self.norm = nn.BatchNorm2d(1) if identity_init else nn.Identity()
        if identity_init:
            nn.init.zeros_(self.norm.weight)
        self.last_map: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        pooled = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], dim=1)
        attention = torch.sigmoid(self.norm(self.conv(pooled)))
        if not torch.compiler.is_exporting():  # an exported graph has no module state to keep it in
            self.last_map = attention.detach().squeeze(1)
        return x * (self.scale * attention)


class Cbam(nn.Module):
    """Convolutional block attention module: channel attention, then spatial attention (Woo et al.)."""

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7, identity_init: bool = True):
        super().__init__()
        self.channel = ChannelAttention(channels, reduction, identity_init=identity_init)
        self.spatial = SpatialAttention(kernel_size, identity_init=identity_init)

    def forward(self, x: Tensor) -> Tensor:
        return self.spatial(self.channel(x))


class Eca(nn.Module):
    """Efficient channel attention (Wang et al.): a 1D conv across the average-pooled channel descriptor.

    Kernel size from the paper: the odd number at or just above (log2(C) + beta) / gamma, gamma=2, beta=1.
    """

    def __init__(self, channels: int, gamma: int = 2, beta: int = 1, identity_init: bool = True):
        super().__init__()
        size = int((math.log2(channels) + beta) / gamma)
        size += 1 - size % 2
        self.scale = _gate_scale(identity_init)
        self.conv = nn.Conv1d(1, 1, size, padding=size // 2, bias=False)
        if identity_init:
            _zero_init(self.conv)

    def forward(self, x: Tensor) -> Tensor:
        logits = self.conv(x.mean((2, 3)).unsqueeze(1))  # (B, 1, C): channels are the conv's length axis
        return x * (self.scale * torch.sigmoid(logits)).view(x.shape[0], -1, 1, 1)


# kind -> module factory taking (channels, identity_init=...)
ATTENTION: dict[str, Callable[..., nn.Module]] = {
    "se": functools.partial(ChannelAttention, use_max=False),
    "eca": Eca,
    "cbam": Cbam,
}


def add_attention(
    model: nn.Module, kind: str, stages: Sequence[int] | None = None, *, identity_init: bool = True
) -> nn.Module:
    """Put `kind` attention ("none", "se", "eca", "cbam") into a timm CNN, in place; returns `model`.

    Stages are indices into `model.feature_info`. In timm ResNets (BasicBlock/Bottleneck) the module goes
    into every residual block of the chosen stages, where the paper puts it: the block's attention slot
    (`block.se`), after the last norm and before the add; a block that already has attention there (seresnet)
    keeps it and gets the new module after it. stages=None means every stage with residual blocks (all but
    the stem). In other CNNs the module follows each chosen stage (whose output must be (B, C, H, W));
    stages=None means the last three.
    """
    if kind == "none":
        return model
    if kind not in ATTENTION:
        raise FinegrainError(f"attention {kind!r} is unknown; choose one of {', '.join(KINDS)}")
    info = getattr(model, "feature_info", None)
    if not isinstance(info, list) or not info:
        raise FinegrainError(
            f"{architecture_name(model)} is not a timm CNN with a feature_info list of stages, so attention "
            f"{kind!r} has nowhere to go; use a timm CNN backbone (resnet50, efficientnet_lite0, ...) or "
            "attention: none"
        )
    like = next(model.parameters())

    def make(channels: int) -> nn.Module:  # on the model's device, in its dtype
        return ATTENTION[kind](channels, identity_init=identity_init).to(like.device, like.dtype)

    blocks = {i: _resnet_blocks(model, stage["module"]) for i, stage in enumerate(info)}
    residual = [i for i, found in blocks.items() if found]
    if residual:
        for i in _chosen(model, stages, valid=residual, default=residual):
            for block in blocks[i]:
                module = make(info[i]["num_chs"])
                block.se = module if block.se is None else nn.Sequential(OrderedDict(existing=block.se, added=module))
        return model
    # Early stages are wide in pixels and narrow in channels: the spatial conv there costs the most memory and
    # a C/16 MLP has almost no width; the discriminative parts of a bird show up in the later, semantic stages.
    valid = list(range(len(info)))
    for i in _chosen(model, stages, valid=valid, default=valid[-3:]):
        parent, _, child = info[i]["module"].rpartition(".")
        owner = model.get_submodule(parent)
        stage = owner.get_submodule(child)
        setattr(owner, child, nn.Sequential(OrderedDict(stage=stage, attention=make(info[i]["num_chs"]))))
    return model


def attention_maps(model: nn.Module) -> dict[str, Tensor]:
    """The last spatial map (B, H, W), values in (0, 1), of every CBAM module that has run, by module name.

    SE and ECA have no spatial map; a model with only those gives {}.
    """
    return {
        name: module.spatial.last_map
        for name, module in model.named_modules()
        if isinstance(module, Cbam) and module.spatial.last_map is not None
    }


def attention_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of every attention module in `model`, so they can learn at their own rate."""
    modules = [m for m in model.modules() if isinstance(m, Cbam | Eca | ChannelAttention)]
    return list({id(p): p for m in modules for p in m.parameters()}.values())


def backbone_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """A (pretrained) backbone's parameters as learning-rate groups: "backbone" for the trunk, "attention" for the
    gates inserted into it (new layers, which learn at their own rate)."""
    gates = attention_parameters(model)
    gate_ids = {id(p) for p in gates}
    return {"backbone": [p for p in model.parameters() if id(p) not in gate_ids], "attention": gates}


def _resnet_blocks(model: nn.Module, stage: str) -> list[BasicBlock | Bottleneck]:
    modules = model.named_modules()
    return [m for name, m in modules if name.startswith(f"{stage}.") and isinstance(m, BasicBlock | Bottleneck)]


def _chosen(model: nn.Module, stages: Sequence[int] | None, valid: list[int], default: list[int]) -> list[int]:
    if stages is None:
        return default
    if not stages or set(stages) - set(valid):
        stem = " (0 is the stem, which has no residual blocks)" if valid[0] else ""
        raise FinegrainError(
            f"attention_stages {list(stages)} do not fit {architecture_name(model)}: choose stages from {valid[0]} to "
            f"{valid[-1]}{stem}, numbered as its feature_info, or leave attention_stages unset"
        )
    return sorted(set(stages))


def architecture_name(model: nn.Module) -> str:
    """The timm architecture of a model (for messages), or its class name."""
    return (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or type(model).__name__
