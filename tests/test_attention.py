"""CBAM, SE and ECA: the papers' math, identity at initialisation, placement in timm models, maps, errors."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.resnet import BasicBlock, Bottleneck
from torch import nn

from finegrain.errors import FinegrainError
from finegrain.models.attention import (
    Cbam,
    ChannelAttention,
    Eca,
    SpatialAttention,
    add_attention,
    attention_maps,
)
from finegrain.models.backbones import create_backbone


def pretrained_like(name: str, **kwargs) -> nn.Module:
    """A tiny timm model in eval mode whose norms are random, as trained weights would be.

    timm zero-initialises the last norm of each residual branch, which would make every branch (and so any
    gate on it) trivially zero.
    """
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_(0, 0.1)
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def random_weights(module: nn.Module) -> nn.Module:
    torch.manual_seed(1)
    for p in module.parameters():
        p.data.normal_(0, 0.3)
    return module


@pytest.mark.parametrize("identity_init", [False, True])
def test_cbam_matches_hand_written_paper_math(identity_init):
    torch.manual_seed(0)
    x = torch.randn(2, 32, 5, 6)
    cbam = random_weights(Cbam(32, reduction=4, identity_init=identity_init))
    w1, b1 = cbam.channel.fc1.weight.flatten(1), cbam.channel.fc1.bias
    w2, b2 = cbam.channel.fc2.weight.flatten(1), cbam.channel.fc2.bias

    def mlp(v):  # shared by both descriptors
        return F.relu(v @ w1.T + b1) @ w2.T + b2

    scale = 2.0 if identity_init else 1.0  # the paper's plain sigmoid, or the identity-init gate 2 * sigmoid
    channel = torch.sigmoid(mlp(x.mean((2, 3))) + mlp(x.amax((2, 3))))
    xc = x * scale * channel[:, :, None, None]
    pooled = torch.stack([xc.mean(1), xc.max(1).values], dim=1)
    spatial_logits = F.conv2d(pooled, cbam.spatial.conv.weight, cbam.spatial.conv.bias, padding=3)
    if identity_init:  # conv -> BatchNorm (batch statistics in training) -> gate, as in the official CBAM code
        norm = cbam.spatial.norm
        spatial_logits = F.batch_norm(spatial_logits, None, None, norm.weight, norm.bias, training=True, eps=norm.eps)
    spatial = torch.sigmoid(spatial_logits)
    expected = xc * scale * spatial

    torch.testing.assert_close(cbam(x), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(attention_maps(nn.Sequential(cbam)), {"0": spatial[:, 0]}, rtol=1e-6, atol=1e-6)
    assert cbam.channel.fc1.out_channels == 8 and cbam.spatial.conv.kernel_size == (7, 7)


def test_se_and_eca_match_their_papers():
    torch.manual_seed(0)
    x = torch.randn(2, 64, 4, 3)
    se = random_weights(ChannelAttention(64, use_max=False, identity_init=False))
    descriptor = x.mean((2, 3))
    hidden = F.relu(descriptor @ se.fc1.weight.flatten(1).T + se.fc1.bias)
    expected = x * torch.sigmoid(hidden @ se.fc2.weight.flatten(1).T + se.fc2.bias)[:, :, None, None]
    torch.testing.assert_close(se(x), expected, rtol=0, atol=1e-6)

    eca = random_weights(Eca(64, identity_init=False))
    k = eca.conv.weight.flatten()
    padded = F.pad(descriptor, (1, 1))  # k = 3 for 64 channels, zero padding keeps C
    logits = k[0] * padded[:, :-2] + k[1] * padded[:, 1:-1] + k[2] * padded[:, 2:]
    torch.testing.assert_close(eca(x), x * torch.sigmoid(logits)[:, :, None, None], rtol=0, atol=1e-6)


def test_sizes_follow_the_papers():
    # ECA: odd k at or above (log2 C + 1) / 2
    assert {c: Eca(c).conv.kernel_size[0] for c in (16, 64, 256, 512, 1024, 2048)} == {
        16: 3, 64: 3, 256: 5, 512: 5, 1024: 5, 2048: 7,
    }  # fmt: skip
    # C/16 hidden channels, at least 8 (or C when C < 8)
    assert [ChannelAttention(c).fc1.out_channels for c in (4, 32, 256, 2048)] == [4, 8, 16, 128]


def test_parameter_counts_by_hand():
    hidden = 256 // 16
    mlp = (256 * hidden + hidden) + (hidden * 256 + 256)  # both layers have biases
    assert sum(p.numel() for p in ChannelAttention(256, use_max=False).parameters()) == mlp == 8464
    assert sum(p.numel() for p in SpatialAttention(identity_init=False).parameters()) == 2 * 7 * 7 + 1
    assert sum(p.numel() for p in SpatialAttention().parameters()) == 2 * 7 * 7 + 1 + 2  # + the norm's scale, shift
    assert sum(p.numel() for p in Cbam(256).parameters()) == 8464 + 101
    assert sum(p.numel() for p in Eca(256).parameters()) == 5


@pytest.mark.parametrize("name", ["test_resnet", "test_efficientnet", "test_convnext"])
def test_identity_at_initialisation_keeps_pretrained_logits(name):
    model = pretrained_like(name)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        plain = model(images)
        for kind in ("se", "eca", "cbam"):
            with_attention = add_attention(copy.deepcopy(model), kind)(images)
            torch.testing.assert_close(with_attention, plain, rtol=0, atol=1e-5, msg=kind)
        paper_init = add_attention(copy.deepcopy(model), "cbam", identity_init=False)(images)
    assert not torch.allclose(paper_init, plain, atol=1e-2)  # why the identity gate exists


def test_identity_on_embedded_lite0_weights():
    model = create_backbone("efficientnet_lite0", weights="embedded-lite0", num_classes=1000).eval()
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model(images)
        with_cbam = add_attention(model, "cbam")(images)
    assert sum(isinstance(m, Cbam) for m in model.modules()) == 3
    torch.testing.assert_close(with_cbam, plain, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["se", "eca", "cbam"])
def test_gates_learn_from_the_first_step(kind):
    model = add_attention(pretrained_like("test_resnet", num_classes=5).train(), kind)
    module_type, gates = {  # the zero-initialised last layer of every attention path
        "se": (ChannelAttention, lambda m: [m.fc2]),
        "eca": (Eca, lambda m: [m.conv]),
        "cbam": (Cbam, lambda m: [m.channel.fc2, m.spatial.norm]),
    }[kind]
    modules = [m for m in model.modules() if type(m) is module_type]
    layers = [layer for m in modules for layer in gates(m)]
    assert len(modules) == 4 and all(layer.weight.abs().sum() == 0 for layer in layers)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    images, labels = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 3])

    F.cross_entropy(model(images), labels).backward()
    assert all(layer.weight.grad.abs().sum() > 0 for layer in layers)
    optimizer.step()
    assert all(layer.weight.abs().sum() > 0 for layer in layers)
    if kind != "eca":  # the first MLP layer learns once the zeroed layer after it has moved
        first = [m.fc1 if kind == "se" else m.channel.fc1 for m in modules]
        assert all(layer.weight.grad.abs().sum() == 0 for layer in first)
        optimizer.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        assert all(layer.weight.grad.abs().sum() > 0 for layer in first)


def test_resnet_attention_sits_after_the_last_norm_and_before_the_add():
    model = add_attention(pretrained_like("test_resnet"), "cbam")
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock | Bottleneck)]
    assert [type(b).__name__ for b in blocks] == ["BasicBlock", "BasicBlock", "Bottleneck", "BasicBlock"]
    seen = {}

    def keep(key):
        # clone: the block adds the shortcut into the attention output in place
        return lambda module, args, out: seen.__setitem__(key, (args[0].clone(), out.clone()))

    for block in blocks:
        last_norm = block.bn3 if hasattr(block, "bn3") else block.bn2
        watched = {"norm": last_norm, "se": block.se, "block": block}
        handles = [m.register_forward_hook(keep(k)) for k, m in watched.items()]
        with torch.no_grad():
            block_in = torch.randn(1, block.conv1.in_channels, 8, 8)
            block(block_in)
            shortcut = block_in if block.downsample is None else block.downsample(block_in)
        for handle in handles:
            handle.remove()
        assert isinstance(block.se, Cbam)
        torch.testing.assert_close(seen["se"][0], seen["norm"][1], rtol=0, atol=0)
        torch.testing.assert_close(seen["block"][1], F.relu(seen["se"][1] + shortcut), rtol=0, atol=1e-6)


def test_resnet_stage_selection_and_existing_attention():
    model = add_attention(pretrained_like("test_resnet"), "eca", stages=[2, 4])
    assert [name for name, m in model.named_modules() if isinstance(m, Eca)] == ["layer2.0.se", "layer4.0.se"]

    se_resnet = pretrained_like("test_resnet", block_args={"attn_layer": "se"})
    pretrained_se = se_resnet.layer1[0].se
    add_attention(se_resnet, "cbam", stages=[1])
    assert se_resnet.layer1[0].se.existing is pretrained_se and isinstance(se_resnet.layer1[0].se.added, Cbam)


def test_other_cnns_get_attention_after_their_last_three_stages_by_default():
    model = add_attention(pretrained_like("test_efficientnet"), "cbam")
    assert [name for name, m in model.named_modules() if isinstance(m, Cbam)] == [
        "blocks.2.attention",
        "blocks.3.attention",
        "blocks.4.attention",
    ]
    assert model.blocks[2].attention.channel.fc2.in_channels == 8  # 32 channels: C/16 = 2, raised to 8
    model = add_attention(pretrained_like("test_convnext"), "se", stages=[0])
    assert [name for name, m in model.named_modules() if isinstance(m, ChannelAttention)] == ["stages.0.attention"]


def test_attention_maps_are_keyed_by_module_and_shaped_like_the_features():
    model = add_attention(pretrained_like("test_resnet"), "cbam", stages=[1, 3])
    assert attention_maps(model) == {}
    model(torch.randn(2, 3, 64, 96))
    maps = attention_maps(model)
    assert {k: tuple(v.shape) for k, v in maps.items()} == {"layer1.0.se": (2, 16, 24), "layer3.0.se": (2, 4, 6)}
    assert all(not m.requires_grad and m.min() >= 0 and m.max() <= 1 for m in maps.values())

    model = add_attention(pretrained_like("test_efficientnet"), "cbam", stages=[4])
    model(torch.randn(1, 3, 64, 64))
    assert {k: tuple(v.shape) for k, v in attention_maps(model).items()} == {"blocks.4.attention": (1, 2, 2)}


def test_user_errors_name_the_fix():
    with pytest.raises(FinegrainError, match="attention 'bam' is unknown; choose one of none, se, eca, cbam"):
        add_attention(pretrained_like("test_resnet"), "bam")
    with pytest.raises(FinegrainError, match=r"from 1 to 4 \(0 is the stem"):
        add_attention(pretrained_like("test_resnet"), "cbam", stages=[0, 1])
    with pytest.raises(FinegrainError, match="test_efficientnet: choose stages from 0 to 4"):
        add_attention(pretrained_like("test_efficientnet"), "cbam", stages=[5])
    with pytest.raises(FinegrainError, match=r"attention_stages \[\] do not fit"):
        add_attention(pretrained_like("test_efficientnet"), "cbam", stages=[])
    with pytest.raises(FinegrainError, match="Sequential is not a timm CNN with a feature_info list of stages"):
        add_attention(nn.Sequential(nn.Conv2d(3, 8, 3)), "se")
    plain = nn.Sequential(nn.Conv2d(3, 8, 3))
    assert add_attention(plain, "none") is plain
