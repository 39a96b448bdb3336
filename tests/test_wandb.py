"""W&B through Lightning's WandbLogger: the mode decided up front (never a hang), an offline run folder holding
metrics, hyper-parameters, box panels, crops and test tables, and the run id kept in the run dir."""

from __future__ import annotations

import json
import logging
import os

import pytest

from finegrain.callbacks import WANDB_ID_FILE, configure_wandb, wandb_mode
from finegrain.cli import main
from tests.test_distributed import network, tiny_config, write_config

WANDB_LOGGER = {"class_path": "pytorch_lightning.loggers.WandbLogger",
                "init_args": {"project": "finegrain-test", "log_model": True}}  # fmt: skip


@pytest.fixture
def logged_out(tmp_path, monkeypatch):
    """No API key, no netrc, W&B's own folders in tmp_path."""
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL", "WANDB_ERROR_REPORTING", "WANDB_SILENT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_CONSOLE", "off")  # keep pytest's output out of the run's output.log
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))


def test_mode_online_only_when_logged_in(logged_out, tmp_path, monkeypatch):
    assert wandb_mode() == "offline"
    netrc = tmp_path / "netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password 0123456789abcdef\n")
    monkeypatch.setenv("NETRC", str(netrc))
    assert wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode() == "disabled"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode() == "offline"
    monkeypatch.delenv("WANDB_MODE")
    assert wandb_mode() == "online"


def test_offline_arguments_and_persisted_run_id(logged_out, tmp_path):
    run = tmp_path / "checkpoints" / "r"
    args = configure_wandb({"save_dir": ".", "name": None, "id": None, "offline": False, "log_model": True}, run, "r",
                           resuming=False)  # fmt: skip
    # offline + log_model would raise in WandbLogger: checkpoints become artifacts only online
    assert args["offline"] is True and args["log_model"] is False
    assert args["save_dir"] == str(run) and args["name"] == "r"
    assert (run / WANDB_ID_FILE).read_text().strip() == args["id"]
    assert os.environ["WANDB_ERROR_REPORTING"] == "false"
    assert configure_wandb({"id": None}, run, "r", resuming=True)["id"] == args["id"]
    assert configure_wandb({"id": None}, run, "r", resuming=False)["id"] != args["id"]


@pytest.mark.parametrize(("spec", "box"), [(network("STCNN", num_parts=1, part_size=32, loc_size=32), "part1"),
                                           (network("ObjectZoom", zoom_size=32), "object")])  # fmt: skip
def test_offline_run_holds_metrics_box_panels_crops_and_test_tables(logged_out, synth_root, tmp_path, monkeypatch,
                                                                     caplog, spec, box):  # fmt: skip
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, tiny_config(synth_root, model={"network": spec}, trainer={"logger": WANDB_LOGGER}))
    with caplog.at_level(logging.WARNING, logger="finegrain.callbacks"):
        assert main(["fit", "--config", str(config)]) == 0
    run = tmp_path / "checkpoints" / "tiny"
    run_id = (run / WANDB_ID_FILE).read_text().strip()
    [folder] = run.glob(f"wandb/offline-run-*-{run_id}")
    [message] = [r.getMessage() for r in caplog.records if "wandb sync" in r.getMessage()]
    assert f"wandb sync {folder.relative_to(tmp_path)}" in message
    assert main(["test", "--config", str(config), "--ckpt_path", str(run / "last.ckpt")]) == 0

    # fit and test logged into the same W&B run (one folder each); its record (wandb's own binary log) names the
    # metrics, learning rates and the full config
    assert len(list(run.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"))) == 2
    record = (folder / f"run-{run_id}.wandb").read_bytes()
    for key in (b"val/top1", b"train/loss_step", f"val/boxes/{box}/side".encode(), b"lr-SGD/head", b"seed_everything"):
        assert key in record, key
    media = folder / "files" / "media"
    panels = sorted(media.glob("metadata/boxes2D/val/boxes_*.json"))
    assert len(panels) == 4 and len(list(media.glob("images/val/boxes_*.png"))) == 4  # the first val batch
    boxes = json.loads(panels[0].read_text())
    assert [b["box_caption"] for b in boxes["box_data"]] == ["bird", box]
    assert all(0 <= v <= 1 for b in boxes["box_data"] for v in b["position"].values())
    assert len(list(media.glob(f"images/val/crops/{box}_*.png"))) == 4
    test_media = "wandb/offline-run-*/files/media/table/test"
    [per_class] = run.glob(f"{test_media}/per_class_*.table.json")
    table = json.loads(per_class.read_text())
    assert table["columns"] == ["class", "images", "correct", "accuracy"] and len(table["data"]) == 4
    assert sum(row[1] for row in table["data"]) == 24  # every test image once
    assert list(run.glob(f"{test_media}/confusion_matrix_table_*.table.json"))


def test_logger_false_or_csv_still_work(synth_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, tiny_config(synth_root, trainer={"logger": WANDB_LOGGER}))
    assert main(["fit", "--config", str(config), "--trainer.logger", "false"]) == 0  # no logger for the lr monitor
    run = tmp_path / "checkpoints" / "tiny"
    assert (run / "last.ckpt").exists() and (run / "config.yaml").exists() and not (tmp_path / "config.yaml").exists()
    assert not (run / "logs").exists() and not (run / "wandb").exists()
    assert main(["validate", "--config", str(config), "--trainer.logger", "true"]) == 0
    assert list(run.glob("logs/version_0/metrics.csv")) and not (run / "wandb").exists()
