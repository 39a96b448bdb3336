"""Training through the `finegrain` command as a user runs it: checkpoints, resume, bad data, learning."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from finegrain.cli import main
from finegrain.training import CONFIGS, fit_and_test
from tests.conftest import CUB_ROOT, needs_cub


def fit_args(root: Path, *extra: str, network: str = "finegrain.models.Classifier", backbone: str = "test_resnet",
             epochs: int = 2) -> list[str]:  # fmt: skip
    return [
        "fit", "--run_name", "t", "--seed_everything", "0",
        "--data.root", str(root), "--data.img_size", "64", "--data.batch_size", "8", "--data.num_workers", "0",
        "--data.val_fraction", "0.25",
        "--model.network", network, "--model.network.init_args.backbone", backbone, "--model.lr", "0.05",
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
    """With a validation share allowed to rank epochs (here any), best.ckpt beside last.ckpt."""
    monkeypatch.chdir(tmp_path)
    assert main(fit_args(synth_root, "--best_min_val_images", "1")) == 0
    run = tmp_path / "checkpoints" / "t"
    assert (run / "best.ckpt").is_file() and (run / "last.ckpt").is_file()
    assert next(run.glob("logs/version_0/config.yaml")).is_file()
    checkpoint = torch.load(run / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["epoch"] == 1
    hparams = checkpoint["hyper_parameters"]
    assert hparams["network"]["class_path"] == "finegrain.models.Classifier"
    assert hparams["network"]["init_args"]["num_classes"] == 4 and len(hparams["class_names"]) == 4
    assert hparams["network"]["init_args"]["backbone"] == "test_resnet"
    assert hparams["preprocessing"]["img_size"] == 64
    metrics = last_metrics(run)
    for key in ("train/loss_epoch", "val/top1", "val/top5", "val/mean_class", "train/top1"):
        assert key in metrics

    assert main(fit_args(synth_root, "--ckpt_path", "last", epochs=3)) == 0
    resumed = torch.load(run / "last.ckpt", map_location="cpu", weights_only=True)
    assert resumed["epoch"] == 2 and resumed["global_step"] > checkpoint["global_step"]

    assert main(["test", *fit_args(synth_root)[1:], "--ckpt_path", str(run / "best.ckpt")]) == 0


def test_a_validation_share_too_small_to_rank_epochs_writes_no_best(synth_root, tmp_path, monkeypatch, caplog):
    """8 validation images (below the default 1000): the final model is the checkpoint, said in one line."""
    monkeypatch.chdir(tmp_path)
    assert main(fit_args(synth_root, "--trainer.logger", "false", epochs=1)) == 0
    run = tmp_path / "checkpoints" / "t"
    assert sorted(p.name for p in run.glob("*.ckpt")) == ["last.ckpt"]
    assert ("validation share of 8 images is too small to rank epochs (best_min_val_images: 1000): no best.ckpt; "
            "use last.ckpt, the final model") in caplog.text  # fmt: skip
    outcome = fit_and_test(fit_args(synth_root, "--trainer.logger", "false", epochs=1)[1:])
    assert outcome["checkpoint"] == "last.ckpt" and outcome["best_val_top1"] is None


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
    assert main(fit_args(synth_root, backbone="resnet5O")) == 2
    assert "resnet5O" in capsys.readouterr().err
    assert main(fit_args(tmp_path / "nowhere")) == 2
    assert "prepare-cub" in capsys.readouterr().err


@pytest.mark.slow
def test_embedded_lite0_learns_synthetic_birds_from_their_boxes(tmp_path, monkeypatch):
    """Easy synthetic data (the ground-truth box crop, 3 species): a short CPU fine-tune beats chance (1/3)."""
    from finegrain.data.synth import synthesize_birds

    root = synthesize_birds(tmp_path / "birds", num_classes=3, per_class=40, seed=1)
    monkeypatch.chdir(tmp_path)
    args = fit_args(root, "--model.network.init_args.weights", "embedded-lite0", "--data.use_boxes", "true",
                    "--data.img_size", "128", "--data.val_fraction", "0.2", backbone="efficientnet_lite0",
                    epochs=8)  # fmt: skip
    assert main(args) == 0
    run = tmp_path / "checkpoints" / "t"
    assert main(["test", *args[1:], "--ckpt_path", str(run / "last.ckpt")]) == 0
    # 60 test images: chance is 0.33 +- 0.06; runs on 1 and 2 threads gave 0.55-0.67
    assert last_metrics(run)["test/top1"] >= 0.5


def test_stn_run_logs_each_part_its_boxes_and_where_they_fall(synth_root, tmp_path, monkeypatch):
    """An ST-CNN run logs accuracy per part, box statistics and localisation against the bird box and parts."""
    monkeypatch.chdir(tmp_path)
    stn = "finegrain.models.STCNN"
    parts = [f"--model.network.init_args.{key}={value}" for key, value in
             (("num_parts", 2), ("part_size", 32), ("loc_size", 64))]  # fmt: skip
    assert main(fit_args(synth_root, *parts, network=stn, epochs=1)) == 0
    assert main(["test", *fit_args(synth_root, *parts, network=stn)[1:], "--ckpt_path", "checkpoints/t/last.ckpt"]) == 0
    metrics = last_metrics(tmp_path / "checkpoints" / "t")
    for stage in ("val", "test"):
        for part in ("part1", "part2"):
            assert 0 <= metrics[f"{stage}/{part}/top1"] <= 1
            assert 0.2 <= metrics[f"{stage}/boxes/{part}/side"] <= 1
            for key in ("centre_in_bird", "contains_bird_centre", "contains_beak", "contains_tail"):
                assert 0 <= metrics[f"{stage}/loc/{part}/{key}"] <= 1
                assert 0 <= metrics[f"{stage}/loc/{part}/{key}_chance"] <= 1
    assert "train/part1/top1" in metrics and "train/boxes/part2/centre_spread" in metrics


def run_files(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def test_fit_refuses_to_replace_a_run_unless_told(synth_root, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(fit_args(synth_root, epochs=1)) == 0
    run = tmp_path / "checkpoints" / "t"
    before = run_files(run)
    assert main(fit_args(synth_root, epochs=1)) == 2
    err = capsys.readouterr().err
    assert (
        "finegrain: error: run 't' already has last.ckpt in checkpoints/t: resume it with "
        "--ckpt_path last, start another with --run_name NAME, or replace it with --overwrite true"
    ) in err
    assert run_files(run) == before  # nothing written, not even W&B's run id or a log folder
    assert main(fit_args(synth_root, "--overwrite", "true", "--seed_everything", "1", epochs=1)) == 0
    assert (run / "last.ckpt").read_bytes() != before["last.ckpt"]


def test_resuming_with_settings_that_do_not_fit_is_refused_before_anything_is_written(synth_root, tmp_path,
                                                                                      monkeypatch, capsys):  # fmt: skip
    monkeypatch.chdir(tmp_path)
    assert main(fit_args(synth_root, epochs=1)) == 0
    run = tmp_path / "checkpoints" / "t"
    before = run_files(run)
    assert main(fit_args(synth_root, "--ckpt_path", "last", "--data.classes", "1-2", epochs=2)) == 2
    err = capsys.readouterr().err
    assert "checkpoints/t/last.ckpt does not fit these settings: it was trained on 4 classes" in err
    assert "these settings give 2" in err and "Traceback" not in err
    assert run_files(run) == before
    assert main(fit_args(synth_root, "--ckpt_path", "last", backbone="test_efficientnet", epochs=2)) == 2
    assert "model.network's backbone was 'test_resnet', now 'test_efficientnet'" in capsys.readouterr().err
    assert run_files(run) == before
    test_args = ["test", *fit_args(synth_root, "--data.classes", "2-4")[1:]]
    assert main([*test_args, "--ckpt_path", str(run / "last.ckpt")]) == 2
    assert "last.ckpt does not fit these settings: it was trained on 4 classes" in capsys.readouterr().err


def test_checkpoints_that_cannot_be_loaded_safely_get_one_line(synth_root, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    torch.save({"state_dict": {}, "trap": Path("x")}, tmp_path / "code.ckpt")  # unpickling it would run code
    torch.save({"state_dict": {"w": torch.zeros(100)}}, tmp_path / "whole.ckpt")
    data = (tmp_path / "whole.ckpt").read_bytes()
    (tmp_path / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    expected = {"code.ckpt": "is refused: it pickles Python objects (pathlib.PosixPath), so loading it would run "
                             "code from the file", "truncated.ckpt": "is truncated or corrupt"}  # fmt: skip
    for name, message in expected.items():
        assert main(["test", *fit_args(synth_root)[1:], "--ckpt_path", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert f"finegrain: error: {tmp_path / name} {message}" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--data.batch_size", "-1"], "data.batch_size must be 1 or more, got -1"),
        (["--data.img_size", "0"], "data.img_size must be 32 pixels or more"),
        (["--trainer.max_epochs", "0"], "trainer.max_epochs must be 1 or more (-1: no limit), got 0"),
        (["--trainer.max_epochs", "-3"], "trainer.max_epochs must be 1 or more (-1: no limit), got -3"),
        (["--model.bogus_lr", "1"], "--model.bogus_lr is not a setting of model; `finegrain fit --help` lists"),
        (["--data.bogus", "1"], "unrecognized arguments: --data.bogus 1; `finegrain fit --help` lists"),
        (["--model.lr", "abc"], "--model.lr: 'abc' is not a valid value (expected float)"),
        (["--trainer.max_epochs", "x"], "--trainer.max_epochs: 'x' is not a valid value (expected int)"),
    ],
)
def test_wrong_settings_end_in_one_line(synth_root, tmp_path, monkeypatch, capsys, extra, message):
    monkeypatch.chdir(tmp_path)
    assert main(fit_args(synth_root, *extra)) == 2
    err = capsys.readouterr().err
    assert f"finegrain: error: {message}" in err
    assert "Traceback" not in err and "usage:" not in err and len(err.splitlines()) <= 3
    assert not (tmp_path / "checkpoints" / "t" / "last.ckpt").exists()


def test_unreachable_timm_weights_end_in_one_line(synth_root, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty hub cache
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert main(fit_args(synth_root, "--model.network.init_args.weights", "timm")) == 2
    err = capsys.readouterr().err
    assert "finegrain: error: timm weights for 'test_resnet' are not in the local cache and HF_HUB_OFFLINE" in err
    assert "Union subtypes" not in err and "Traceback" not in err


def test_fit_without_checkpoints_when_asked(synth_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(fit_args(synth_root, "--trainer.enable_checkpointing", "false", epochs=1)) == 0
    assert not list((tmp_path / "checkpoints" / "t").glob("*.ckpt"))


def test_an_ordinary_resume_prints_no_lightning_notes(synth_root, tmp_path, monkeypatch):
    """Lightning's "args and command line" and "checkpoint directory exists" warnings do not reach the user."""
    monkeypatch.chdir(tmp_path)
    assert main(fit_args(synth_root, epochs=1)) == 0
    done = subprocess.run([sys.executable, "-m", "finegrain.cli", *fit_args(synth_root, "--ckpt_path", "last")],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "args parameter is intended" not in done.stderr and "exists and is not empty" not in done.stderr


@needs_cub
def test_the_official_classes_1_to_30_train_as_downloaded(tmp_path, monkeypatch):
    """Images 960, 999 and 1218 have official boxes that overrun their photographs: clipped, the run trains."""
    monkeypatch.chdir(tmp_path)
    recipe = CONFIGS / "lite0_cub10.yaml"
    args = ["fit", "--config", str(recipe), "--data.root", str(CUB_ROOT), "--data.classes", "1-30",
            "--data.img_size", "96", "--data.batch_size", "8", "--data.num_workers", "0", "--trainer.max_steps", "2",
            "--trainer.limit_val_batches", "1", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
            "--run_name", "cub30"]  # fmt: skip
    assert main(args) == 0
    assert torch.load(tmp_path / "checkpoints" / "cub30" / "last.ckpt", weights_only=True)["global_step"] == 2
