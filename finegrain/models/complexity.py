"""Model size and cost, counted the way the ResNet, SE and CBAM papers report them."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_parameters(model: nn.Module) -> int:
    """All parameters, trainable or frozen, each shared tensor once."""
    return sum(p.numel() for p in model.parameters())


def count_gflops(model: nn.Module, input_size: tuple[int, int], batch: int = 1, in_chans: int = 3) -> float:
    """Giga multiply-accumulates of one eval-mode forward of `batch` images of `input_size` (height, width).

    This is what the papers and fvcore call "GFLOPs" (ResNet-50: 3.86 in He et al. and Woo et al.; timm's
    resnet50, which strides in the 3x3 conv instead of the first 1x1, gives 4.09). torch's FlopCounterMode
    counts a multiply and an add as two FLOPs, so its total is halved. Like the papers, it counts convolutions
    and matrix products only: not norms, activations, pooling or elementwise gates. Works on the meta device.
    """
    param = next(model.parameters())
    images = torch.zeros(batch, in_chans, *input_size, device=param.device, dtype=param.dtype)
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(images)
    finally:
        model.train(was_training)
    return counter.get_total_flops() / 2 / 1e9
