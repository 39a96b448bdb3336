"""Networks by class path: a network defined outside the package trains, saves and loads like the built-in ones;
networks finegrain cannot rebuild are refused; checkpoints and packages of the earlier formats still load; recipes
by built-in name, and the old recipe keys refused in one line."""

from __future__ import annotations

import json

import pytest
import pytorch_lightning as pl
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader

from finegrain.cli import main
from finegrain.data.datamodule import DEFAULT_PREPROCESSING
from finegrain.errors import FinegrainError
from finegrain.models import (
    NETWORKS,
    RACNN,
    STCNN,
    Classifier,
    ModelOutput,
    create_network,
    network_config,
    register_network,
)
from finegrain.predict import Predictor
from finegrain.tasks.classification import ClassificationTask
from finegrain.tasks.racnn import RACNNTask
from finegrain.training import builtin_recipes

pytestmark = pytest.mark.usefixtures("one_thread")


@register_network
class TinyNet(nn.Module):
    """A network finegrain does not ship: one strided convolution, pooled, and a linear classifier."""

    def __init__(self, num_classes: int, hidden: int = 8, scale: float = 1.0):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, hidden, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                      nn.Flatten())  # fmt: skip
        self.head = nn.Linear(hidden, num_classes)
        self.scale = scale

    def lr_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"backbone": list(self.features.parameters()), "head": list(self.head.parameters())}

    def forward(self, images: torch.Tensor) -> ModelOutput:
        return ModelOutput(logits=self.head(self.features(images)) * self.scale)


class UnregisteredNet(TinyNet):
    """A subclass of a registered network, itself not registered: a checkpoint could not rebuild it."""


TINY_NET = f"{TinyNet.__module__}.TinyNet"
UNREGISTERED_NET = f"{UnregisteredNet.__module__}.UnregisteredNet"
PREPROCESSING = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "img_size": 64, "crop_pct": 0.875,
                 "interpolation": "bilinear"}  # fmt: skip
CLASS_NAMES = ["Plain_Finch", "Red_crowned_Finch", "Gold_crowned_Hookbill", "Sooty_Auklet"]


def test_a_registered_network_records_its_arguments_and_builds_again_from_them():
    assert TINY_NET == "tests.test_registry.TinyNet" and NETWORKS[TINY_NET] is TinyNet
    net = TinyNet(3, hidden=4)  # positional and keyword arguments, defaults filled in
    assert network_config(net) == {"class_path": TINY_NET, "init_args": {"num_classes": 3, "hidden": 4, "scale": 1.0}}
    again = create_network(TINY_NET, **network_config(net)["init_args"])
    assert type(again) is TinyNet and again.head.out_features == 3 and again.features[0].out_channels == 4
    # the package's own networks by their public path, whatever module defines them
    classifier = Classifier(num_classes=2, backbone="test_resnet")
    assert network_config(classifier)["class_path"] == "finegrain.models.Classifier"
    with pytest.raises(TypeError, match="must take num_classes"):
        register_network(type("NoClasses", (nn.Module,), {"__init__": lambda self, width=3: None}))


def tiny_loader(n: int = 8, size: int = 32) -> DataLoader:
    images = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0))
    return DataLoader([{"image": image, "label": torch.tensor(i % 3)} for i, image in enumerate(images)], batch_size=4)


class LossRecorder(pl.Callback):
    def __init__(self):
        self.losses: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(outputs["loss"].detach())


def test_a_network_from_outside_the_package_trains_in_the_task():
    torch.manual_seed(0)
    task = ClassificationTask(network=TinyNet(num_classes=3), lr=0.1, lr_scales={"backbone": 1.0})
    assert task.hparams["network"] == {"class_path": TINY_NET, "init_args": {"num_classes": 3, "hidden": 8,
                                                                             "scale": 1.0}}  # fmt: skip
    before = {name: p.detach().clone() for name, p in task.network.named_parameters()}
    recorder = LossRecorder()
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[recorder])  # fmt: skip
    trainer.fit(task, tiny_loader())
    assert trainer.global_step == 1 and len(recorder.losses) == 1 and torch.isfinite(recorder.losses[0])
    changed = {name for name, p in task.network.named_parameters() if not torch.equal(p, before[name])}
    assert {"features.0.weight", "head.weight", "head.bias"} <= changed  # both learning-rate groups stepped


def test_fit_trains_a_network_given_by_its_class_path_and_the_predictor_loads_it(synth_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--run_name", "tiny", "--seed_everything", "0", "--data.root", str(synth_root),
            "--data.img_size", "32", "--data.batch_size", "8", "--data.num_workers", "0", "--data.val_fraction", "0.25",
            "--model.network", TINY_NET, "--model.network.init_args.hidden", "6", "--model.lr", "0.05",
            "--trainer.max_epochs", "1", "--trainer.logger", "false", "--trainer.accelerator", "cpu",
            "--trainer.devices", "1", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false"]  # fmt: skip
    assert main(args) == 0
    path = tmp_path / "checkpoints" / "tiny" / "last.ckpt"
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    hparams = checkpoint["hyper_parameters"]
    # num_classes linked from the data (4 synthetic species); no backbone, so the data's own preprocessing
    assert hparams["network"] == {"class_path": TINY_NET, "init_args": {"num_classes": 4, "hidden": 6, "scale": 1.0}}
    assert hparams["preprocessing"] == {**DEFAULT_PREPROCESSING, "img_size": 32}
    assert checkpoint["global_step"] == 2  # 16 training images, 8 a batch

    predictor = Predictor.from_checkpoint(path, device="cpu")
    assert type(predictor.network) is TinyNet and predictor.class_names == hparams["class_names"]
    trained = {k.removeprefix("network."): v for k, v in checkpoint["state_dict"].items()}
    loaded = predictor.network.state_dict()
    assert loaded.keys() == trained.keys() and all(torch.equal(loaded[k], trained[k]) for k in trained)
    image = sorted((synth_root / "images").rglob("*.jpg"))[0]
    predictions = predictor.predict(str(image), top_k=4)  # every trained class, from the highest score down
    assert sorted(p["class_id"] for p in predictions) == [0, 1, 2, 3]
    scores = [p["score"] for p in predictions]
    assert sum(scores) == pytest.approx(1) and scores == sorted(scores, reverse=True)


def test_networks_that_cannot_be_rebuilt_or_trained_are_refused_in_one_line():
    with pytest.raises(FinegrainError, match="RACNNTask trains RACNN networks, not Classifier") as refused:
        RACNNTask(network=Classifier(num_classes=3, backbone="test_resnet"))
    assert "\n" not in str(refused.value)
    for network, name in ((nn.Linear(3, 2), "Linear"), (UnregisteredNet(num_classes=2), "UnregisteredNet")):
        with pytest.raises(FinegrainError, match=f"{name} is not a registered network: .*@finegrain.models."
                                                 "register_network") as refused:  # fmt: skip
            ClassificationTask(network=network)
        assert "\n" not in str(refused.value)


def test_the_plain_task_refuses_a_network_that_needs_its_own_task(synth_root, tmp_path, monkeypatch, capsys):
    """Cross-entropy alone would train RA-CNN without APN pre-training and ranking phases."""
    with pytest.raises(FinegrainError, match="RACNN trains with its own task: set model.class_path "
                                             "finegrain.tasks.racnn.RACNNTask") as refused:  # fmt: skip
        ClassificationTask(network=RACNN(num_classes=3, backbone="test_resnet", zoom_size=32, apn_grid=2,
                                         apn_hidden=8))  # fmt: skip
    assert "\n" not in str(refused.value)
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--run_name", "r", "--data.root", str(synth_root), "--data.num_workers", "0",
            "--model.network", "finegrain.models.RACNN", "--model.network.init_args.backbone", "test_resnet",
            "--trainer.logger", "false"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "model.class_path finegrain.tasks.racnn.RACNNTask" in err and "Traceback" not in err
    assert not list(tmp_path.rglob("*.ckpt"))


def test_fit_refuses_an_unregistered_network_before_training(synth_root, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--run_name", "u", "--data.root", str(synth_root), "--data.num_workers", "0",
            "--model.network", UNREGISTERED_NET, "--trainer.logger", "false"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "finegrain: error: UnregisteredNet is not a registered network" in err and "register_network" in err
    assert "Traceback" not in err and not list(tmp_path.rglob("*.ckpt"))


STN_ARGS = {"num_parts": 2, "part_size": 32, "loc_size": 32, "min_scale": 0.3}


def old_checkpoint(path, method_args: dict) -> tuple[STCNN, dict]:
    """A checkpoint as finegrain wrote it before networks were given by class path (commit 90c476b): the task's
    flat hyper-parameters (num_classes, method, backbone, ..., method_args) and its state_dict, here of an ST-CNN
    built today with the same arguments."""
    torch.manual_seed(0)
    network = STCNN(num_classes=len(CLASS_NAMES), backbone="test_resnet", **STN_ARGS)
    with torch.no_grad():  # boxes and logits that differ between images
        for p in network.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hparams = {"num_classes": len(CLASS_NAMES), "method": "stn", "backbone": "test_resnet", "weights": "timm",
               "attention": "none", "attention_stages": None, "method_args": method_args, "drop_rate": 0.0,
               "label_smoothing": 0.1, "optimizer": "sgd", "lr": 0.05, "lr_scales": None, "weight_decay": 1e-4,
               "momentum": 0.9, "warmup_epochs": 1.0, "lr_start_epochs": None, "class_names": CLASS_NAMES,
               "preprocessing": PREPROCESSING}  # fmt: skip
    state_dict = {f"network.{k}": v for k, v in network.state_dict().items()}
    torch.save({"epoch": 3, "global_step": 40, "pytorch-lightning_version": "2.5.0", "state_dict": state_dict,
                "hyper_parameters": hparams}, path)  # fmt: skip
    return network.eval(), hparams


def same_outputs(predictor: Predictor, network: nn.Module) -> None:
    images = torch.rand(3, 3, 64, 80, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = network(images)
    got = predictor.forward(images)
    torch.testing.assert_close(got.logits, expected.logits, rtol=0, atol=0)
    assert got.boxes.keys() == expected.boxes.keys() == {"part1", "part2"}
    for name, boxes in expected.boxes.items():
        torch.testing.assert_close(got.boxes[name], boxes, rtol=0, atol=0)


def test_a_checkpoint_of_the_old_format_loads_with_the_same_outputs(tmp_path):
    # box_gradient "autograd" was the default of the removed option: such checkpoints are today's ST-CNN
    network, _ = old_checkpoint(tmp_path / "old.ckpt", {**STN_ARGS, "box_gradient": "autograd", "box_step": 0.1})
    predictor = Predictor.from_checkpoint(tmp_path / "old.ckpt", device="cpu")
    assert type(predictor.network) is STCNN and predictor.class_names == CLASS_NAMES
    assert predictor.config.network == {
        "class_path": "finegrain.models.STCNN",
        "init_args": {"num_classes": 4, "backbone": "test_resnet", "weights": "none", "attention": "none",
                      "attention_stages": None, "drop_rate": 0.0, **STN_ARGS},
    }  # fmt: skip
    same_outputs(predictor, network)

    # exported: today's package (format 2, the network by class path); and a package of format 1 still loads
    assert main(["export", str(tmp_path / "old.ckpt"), str(tmp_path / "pkg")]) == 0
    config = tmp_path / "pkg" / "finegrain.json"
    meta = json.loads(config.read_text())
    assert meta["format_version"] == 2 and meta["network"] == predictor.config.network
    same_outputs(Predictor.from_checkpoint(tmp_path / "pkg", device="cpu"), network)
    version1 = {"format": "finegrain", "format_version": 1, "method": "stn",
                "network": {k: v for k, v in meta["network"]["init_args"].items() if k != "weights"},
                "class_names": CLASS_NAMES, "preprocessing": PREPROCESSING}  # fmt: skip
    config.write_text(json.dumps(version1))
    package = Predictor.from_checkpoint(tmp_path / "pkg", device="cpu")
    assert package.config.network["class_path"] == "finegrain.models.STCNN"
    same_outputs(package, network)


def test_a_checkpoint_trained_with_finite_difference_box_gradients_is_refused_in_one_line(tmp_path, capsys):
    path = tmp_path / "fd.ckpt"
    old_checkpoint(path, {**STN_ARGS, "box_gradient": "finite-difference", "box_step": 0.25})
    with pytest.raises(FinegrainError, match="trained with box_gradient 'finite-difference'") as refused:
        Predictor.from_checkpoint(path, device="cpu")
    assert str(path) in str(refused.value) and "\n" not in str(refused.value)
    assert main(["export", str(path), str(tmp_path / "pkg")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "box_gradient 'finite-difference'" in err and not (tmp_path / "pkg").exists()


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("finegrain: error: "), err
    return lines[0]


OLD_KEYS = [["--model.method", "stn"], ["--model.backbone", "resnet18"], ["--model.method_args", "{num_parts: 2}"],
            ["--model.init_args.attention", "cbam"]]  # fmt: skip


@pytest.mark.parametrize("old", OLD_KEYS)
def test_old_recipe_keys_on_the_command_line_name_model_network(old, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", "demo", *old]) == 2
    name = old[0].removeprefix("--model.").removeprefix("init_args.")
    line = one_error_line(capsys)
    assert f"model.{name} is a setting of the network now: write it under model.network.init_args" in line
    assert not list(tmp_path.iterdir())  # nothing written: no data, no run folder


@pytest.mark.parametrize(
    "model",
    [{"method": "stn", "backbone": "test_resnet", "method_args": {"num_parts": 2}},
     {"class_path": "finegrain.tasks.racnn.RACNNTask", "init_args": {"backbone": "test_resnet", "margin": 0.05}}],
)  # fmt: skip
def test_old_recipe_keys_in_yaml_name_model_network(model, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "old.yaml"
    recipe.write_text(yaml.safe_dump({"run_name": "old", "model": model, "trainer": {"logger": False}}))
    for command in ("fit", "info"):
        assert main([command, "--config", str(recipe)]) == 2
        line = one_error_line(capsys)
        assert "is a setting of the network now: write it under model.network.init_args" in line
        assert "model.network.class_path finegrain.models.Classifier/STCNN/RACNN" in line


def test_network_arguments_on_the_command_line_are_typed(tmp_path, monkeypatch, capsys):
    """`--model.network.init_args.min_scale 0.4` is the float the network takes; a value of the wrong type is one
    line naming the option (the old method_args strings were parsed by hand)."""
    monkeypatch.chdir(tmp_path)
    stn = ["--model.network", "finegrain.models.STCNN", "--model.network.init_args.backbone", "test_resnet"]
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", "demo", *stn, "--model.network.init_args.min_scale", "0.4",
              "--model.network.init_args.num_parts", "3", "--model.network.init_args.global_branch", "true",
              "--print_config"])  # fmt: skip
    assert done.value.code == 0
    network = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]["network"]
    assert network["class_path"] == "finegrain.models.STCNN"
    init_args = network["init_args"]
    assert (init_args["min_scale"], init_args["num_parts"], init_args["global_branch"]) == (0.4, 3, True)
    assert init_args["backbone"] == "test_resnet" and init_args["drop_rate"] == 0.2  # the recipe's, carried over
    assert main(["fit", "--config", "demo", *stn, "--model.network.init_args.min_scale", "small"]) == 2
    line = one_error_line(capsys)
    assert "--model.network.init_args.min_scale: 'small' is not a valid value (expected float)" in line


def test_a_builtin_recipe_by_name_from_any_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", "demo", "--print_config"])
    assert done.value.code == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["run_name"] == "demo" and config["seed_everything"] == 0  # the recipe over configs/base.yaml
    assert config["model"]["init_args"]["network"]["class_path"] == "finegrain.models.Classifier"
    assert config["model"]["init_args"]["network"]["init_args"]["backbone"] == "efficientnet_lite0"
    assert config["trainer"]["logger"]["class_path"] == "pytorch_lightning.loggers.WandbLogger"  # from the base
    assert config["data"]["root"] == "data/synthbirds_large" and config["data"]["img_size"] == 224
    assert not list(tmp_path.iterdir())  # the data is not read (nor synthesised) to print the config
    # the same recipe by file name, and as configs/X.yaml of a source checkout, from this folder too
    for name in ("demo.yaml", "configs/demo.yaml"):
        with pytest.raises(SystemExit):
            main(["fit", "--config", name, "--print_config"])
        assert yaml.safe_load(capsys.readouterr().out) == config
    assert main(["info", "--config", "demo"]) == 0
    assert "network     Classifier: efficientnet_lite0, 10 classes" in capsys.readouterr().out


def test_a_missing_recipe_lists_the_builtin_ones_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    names = builtin_recipes()
    assert {"demo", "racnn_synth", "stn_synth", "baseline_cub"} <= set(names) and "base" not in names
    for command in ("fit", "info"):
        assert main([command, "--config", "demoo"]) == 2
        line = one_error_line(capsys)
        assert f"recipe demoo not found; pass a YAML file or a built-in recipe: {', '.join(names)}" in line
