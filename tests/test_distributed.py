"""DDP as a user launches it (the `finegrain` command, 2 CPU processes over gloo), for every method: gradients
synced (identical weights on both ranks although each saw other images), one set of checkpoints, clean exit; and
multi-device test metrics that count every test image exactly once."""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from pytorch_lightning.callbacks import Callback

REPO = Path(__file__).resolve().parents[1]
FINEGRAIN = Path(sys.executable).with_name("finegrain")


def network(name: str, **init_args) -> dict:
    """A recipe's model.network: finegrain.models.<name> on test_resnet."""
    return {"class_path": f"finegrain.models.{name}", "init_args": {"backbone": "test_resnet", **init_args}}


METHODS = {
    "baseline": {"model": {"network": network("Classifier")}},
    "baseline+cbam": {"model": {"network": network("Classifier", attention="cbam")}},
    "stn": {"model": {"network": network("STCNN", num_parts=1, part_size=32, loc_size=32)}},
    "zoom": {"model": {"network": network("ObjectZoom", zoom_size=32)}},
}
if importlib.util.find_spec("finegrain.tasks.racnn") is not None:
    # 2 images a batch: 4 steps, through APN pre-training, classification and ranking. Plain `ddp`, as a user
    # would ask: the CLI switches it to find unused parameters (RACNNTask.leaves_parameters_unused).
    METHODS["racnn"] = {
        "model": {"class_path": "finegrain.tasks.racnn.RACNNTask", "init_args": {
            "network": network("RACNN", scales=2, zoom_size=64, apn_grid=2, apn_hidden=8), "lr": 0.05,
            "pretrain_steps": 1, "classification_steps": 1, "ranking_steps": 1}},
        "data": {"img_size": 64, "batch_size": 2},
    }  # fmt: skip


def tiny_config(root: Path, **sections) -> dict:
    """A tiny recipe on `root`: test_resnet at 32 px, 4 images a batch, CPU, CSV logs."""
    config = {
        "run_name": "tiny",
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": 1, "log_every_n_steps": 1,
                    "enable_progress_bar": False, "enable_model_summary": False},
        "model": {"network": network("Classifier"), "lr": 0.05},
        "data": {"root": str(root), "img_size": 32, "batch_size": 4, "num_workers": 0, "val_fraction": 0.25},
    }  # fmt: skip
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(config.get(section), dict) and "class_path" not in values:
            config[section] = {**config[section], **values}
        else:
            config[section] = values
    return config


def write_config(folder: Path, config: dict) -> Path:
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_finegrain(folder: Path, *args: str, timeout: float = 240, env: dict | None = None):
    """The `finegrain` command in a subprocess in `folder` (tests/ importable for the test callbacks)."""
    environment = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled", **(env or {})}
    return subprocess.run([str(FINEGRAIN), *args], cwd=folder, env=environment, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


class DumpState(Callback):
    """Test-only: each rank writes the sample indices it trained or tested on and its final parameters."""

    def __init__(self, folder: str):
        self.folder = Path(folder)
        self.indices: list[int] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        self.initial = {name: p.detach().clone() for name, p in pl_module.named_parameters()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.indices += batch["index"].tolist()

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.indices += batch["index"].tolist()

    def teardown(self, trainer, pl_module, stage) -> None:
        parameters = {name: p.detach().clone() for name, p in pl_module.named_parameters()}
        state = {"indices": self.indices, "parameters": parameters, "initial": getattr(self, "initial", {})}
        torch.save(state, self.folder / f"{trainer.state.fn.value}-rank{trainer.global_rank}.pt")


def dump_callback(folder: Path) -> list[dict]:
    return [{"class_path": "tests.test_distributed.DumpState", "init_args": {"folder": str(folder)}}]


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_ddp_two_processes_sync_gradients_and_write_one_set_of_checkpoints(method, synth_root, tmp_path):
    config = tiny_config(synth_root, trainer={"callbacks": dump_callback(tmp_path)})
    for section, values in METHODS[method].items():
        config[section] = values if "class_path" in values else {**config[section], **values}
    result = run_finegrain(tmp_path, "fit", "--config", str(write_config(tmp_path, config)),
                           "--trainer.devices", "2", "--trainer.strategy", "ddp")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    if method.startswith("racnn"):  # asked for plain ddp: switched, and told
        assert "strategy ddp -> ddp_find_unused_parameters_true" in result.stderr
    ranks = [torch.load(tmp_path / f"fit-rank{r}.pt", weights_only=True) for r in (0, 1)]
    # 16 training images, 8 a rank: each rank trained on other images ...
    assert len(ranks[0]["indices"]) == len(ranks[1]["indices"]) == 8
    assert not set(ranks[0]["indices"]) & set(ranks[1]["indices"])
    # ... yet both end with the same trained weights: gradients were averaged.
    for name, value in ranks[0]["parameters"].items():
        torch.testing.assert_close(ranks[1]["parameters"][name], value, rtol=0, atol=0, msg=name)
    moved = [not torch.equal(ranks[0]["initial"][name], value) for name, value in ranks[0]["parameters"].items()]
    assert sum(moved) > len(moved) / 2
    run = tmp_path / "checkpoints" / "tiny"
    assert sorted(p.name for p in run.glob("*.ckpt")) == ["last.ckpt"]  # 8 validation images rank nothing
    assert [p.name for p in (run / "logs").iterdir()] == ["version_0"]
    assert not list(tmp_path.rglob("*.partial")) and not (tmp_path / "lightning_logs").exists()
    checkpoint = torch.load(run / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 8 // config["data"]["batch_size"]
    for name, value in ranks[0]["parameters"].items():
        torch.testing.assert_close(checkpoint["state_dict"][name], value, rtol=0, atol=0, msg=name)


def logged_metrics(run: Path) -> dict[str, float]:
    with open(next(run.glob("logs/version_*/metrics.csv"))) as f:
        return {k: float(v) for row in csv.DictReader(f) for k, v in row.items() if v != ""}


@pytest.mark.slow
def test_test_on_two_devices_counts_every_image_once(tmp_path):
    """15 test images on 2 ranks, one a batch (a DistributedSampler would pad to 16; here the ranks run 8 and 7
    steps): each image counted once, and the same accuracy as on one device."""
    from finegrain.data.synth import synthesize_birds

    root = synthesize_birds(tmp_path / "birds", num_classes=3, per_class=10, seed=0)  # 5 test images a class
    results = {}
    for devices in (1, 2):
        folder = tmp_path / f"devices{devices}"
        folder.mkdir()
        config = tiny_config(root, trainer={"callbacks": dump_callback(folder)}, data={"eval_batch_size": 1})
        result = run_finegrain(folder, "test", "--config", str(write_config(folder, config)),
                               "--trainer.devices", str(devices), "--trainer.strategy", "ddp")  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        indices = [i for r in range(devices) for i in torch.load(folder / f"test-rank{r}.pt")["indices"]]
        assert sorted(indices) == list(range(15))
        results[devices] = logged_metrics(folder / "checkpoints" / "tiny")
    for key in ("test/top1", "test/top5", "test/mean_class"):
        assert results[2][key] == pytest.approx(results[1][key], abs=1e-7), key
