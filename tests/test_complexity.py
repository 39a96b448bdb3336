"""Parameter and multiply-accumulate counts: by hand on small nets, against the CBAM paper on ResNet-50."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from finegrain.models.attention import add_attention
from finegrain.models.complexity import count_gflops, count_parameters


def test_counts_by_hand():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16 * 16, 10)
    )
    assert count_parameters(model) == (3 * 8 * 9 + 8) + (8 + 8) + (8 * 256 * 10 + 10)
    macs = 8 * 3 * 9 * 16 * 16 + 8 * 256 * 10  # conv + linear; norm, activation and biases are not counted
    model.train()
    assert count_gflops(model, (16, 16)) == pytest.approx(macs / 1e9)
    assert count_gflops(model, (16, 16), batch=3) == pytest.approx(3 * macs / 1e9)
    assert model.training  # the count runs in eval mode and leaves the mode as it was


def test_shared_parameters_count_once():
    layer = nn.Linear(4, 4)
    assert count_parameters(nn.Sequential(layer, layer)) == 20


@pytest.mark.parametrize(
    ("kind", "params", "gflops"),
    [
        ("none", 25_557_032, 4.0892),  # paper (ResNet v1, stride in the first 1x1): 25.56 M, 3.858
        ("se", 28_088_024, 4.0917),  # paper: 28.09 M, 3.860
        ("cbam", 28_089_640, 4.0956),  # paper: 28.09 M, 3.864 (+32: the spatial norms of 16 blocks)
    ],
)
def test_resnet50_against_the_cbam_paper(kind, params, gflops):
    with torch.device("meta"):  # shapes only: counting needs no memory or arithmetic
        model = add_attention(timm.create_model("resnet50", num_classes=1000), kind)
    assert count_parameters(model) == params
    assert count_gflops(model, (224, 224)) == pytest.approx(gflops, abs=1e-4)
