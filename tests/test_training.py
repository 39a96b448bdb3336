"""Training through the `finegrain` command as a user runs it: checkpoints, resume, bad data, learning."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import torch

from finegrain.cli import main


def fit_args(root: Path, *extra: str, backbone: str = "test_resnet", epochs: int = 2) -> list[str]:
    return [
        "fit", "--run_name", "t", "--seed_everything", "0",
        "--data.root", str(root), "--data.img_size", "64", "--data.batch_size", "8", "--data.num_workers", "0",
        "--data.val_fraction", "0.25",
        "--model.backbone", backbone, "--model.lr", "0.05",
        "--trainer.max_epochs", str(epochs), "--trainer.accelerator", "cpu", "--trainer.devices", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        *extra,
    ]  # fmt: skip


def last_metrics(run_dir: Path) -> dict[str, float]:
    """The latest value of every metric over all runs (fit, then test) logged in `run_dir`."""
    merged: dict[str, float] = {}
    for path in sorted(run_dir.glob("logs/version_*/metrics.csv"), key=lambda p: int(p.parent.name[8:])):
        with open(path) as f:
            for row in csv.DictReader(f):
                merged.update({k: float(v) for k, v in row.items() if v != ""})
    return merged


def test_fit_writes_best_and_last_then_resumes(synth_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(fit_args(synth_root)) == 0
    run = tmp_path / "checkpoints" / "t"
    assert (run / "best.ckpt").is_file() and (run / "last.ckpt").is_file()
    assert next(run.glob("logs/version_0/config.yaml")).is_file()
    checkpoint = torch.load(run / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["epoch"] == 1
    hparams = checkpoint["hyper_parameters"]
    assert hparams["num_classes"] == 4 and len(hparams["class_names"]) == 4
    assert hparams["preprocessing"]["img_size"] == 64
    metrics = last_metrics(run)
    for key in ("train/loss_epoch", "val/top1", "val/top5", "val/mean_class", "train/top1"):
        assert key in metrics

    assert main(fit_args(synth_root, "--ckpt_path", "last", epochs=3)) == 0
    resumed = torch.load(run / "last.ckpt", map_location="cpu", weights_only=True)
    assert resumed["epoch"] == 2 and resumed["global_step"] > checkpoint["global_step"]

    assert main(["test", *fit_args(synth_root)[1:], "--ckpt_path", str(run / "best.ckpt")]) == 0


def test_missing_images_stop_training_before_the_first_step(synth_root, tmp_path, monkeypatch, capsys):
    root = tmp_path / "birds"
    shutil.copytree(synth_root, root)
    victims = sorted((root / "images").rglob("*.jpg"))[:2]
    victims[0].unlink()
    victims[1].write_bytes(b"broken")
    monkeypatch.chdir(tmp_path)
    assert main(fit_args(root)) == 2
    err = capsys.readouterr().err
    assert "1 listed images missing on disk" in err and victims[1].name in err and "skip_broken" in err
    assert not (tmp_path / "checkpoints" / "t" / "last.ckpt").exists()

    assert main(fit_args(root, "--data.skip_broken", "true", epochs=1)) == 0
    assert (tmp_path / "checkpoints" / "t" / "last.ckpt").is_file()


def test_wrong_config_values_get_a_clear_error(synth_root, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(fit_args(synth_root, "--model.backbone", "resnet5O")) == 2
    assert "resnet5O" in capsys.readouterr().err
    assert main(fit_args(tmp_path / "nowhere")) == 2
    assert "prepare-cub" in capsys.readouterr().err


@pytest.mark.slow
def test_embedded_lite0_learns_synthetic_birds_from_their_boxes(tmp_path, monkeypatch):
    """Easy synthetic data (the ground-truth box crop, 3 species): a short CPU fine-tune beats chance (1/3)."""
    from finegrain.data.synth import synthesize_birds

    root = synthesize_birds(tmp_path / "birds", num_classes=3, per_class=40, seed=1)
    monkeypatch.chdir(tmp_path)
    args = fit_args(root, "--model.weights", "embedded-lite0", "--data.use_boxes", "true", "--data.img_size", "128",
                    "--data.val_fraction", "0.2", backbone="efficientnet_lite0", epochs=8)  # fmt: skip
    assert main(args) == 0
    run = tmp_path / "checkpoints" / "t"
    assert main(["test", *args[1:], "--ckpt_path", str(run / "best.ckpt")]) == 0
    # 60 test images: chance is 0.33 +- 0.06; runs on 1 and 2 threads gave 0.55-0.67
    assert last_metrics(run)["test/top1"] >= 0.5


def test_stn_run_logs_each_part_its_boxes_and_where_they_fall(synth_root, tmp_path, monkeypatch):
    """An ST-CNN run logs accuracy per part, box statistics and localisation against the bird box and parts."""
    monkeypatch.chdir(tmp_path)
    method = ["--model.method", "stn", "--model.method_args", "{num_parts: 2, part_size: 32, loc_size: 64}"]
    assert main(fit_args(synth_root, *method, epochs=1)) == 0
    assert main(["test", *fit_args(synth_root, *method)[1:], "--ckpt_path", "checkpoints/t/last.ckpt"]) == 0
    metrics = last_metrics(tmp_path / "checkpoints" / "t")
    for stage in ("val", "test"):
        for part in ("part1", "part2"):
            assert 0 <= metrics[f"{stage}/{part}/top1"] <= 1
            assert 0.2 <= metrics[f"{stage}/boxes/{part}/side"] <= 1
            for key in ("centre_in_bird", "contains_bird_centre", "contains_beak", "contains_tail"):
                assert 0 <= metrics[f"{stage}/loc/{part}/{key}"] <= 1
                assert 0 <= metrics[f"{stage}/loc/{part}/{key}_chance"] <= 1
    assert "train/part1/top1" in metrics and "train/boxes/part2/centre_spread" in metrics
