"""Nothing lost on interruption: a SIGKILLed or SIGTERMed run resumed with `--ckpt_path last` ends with exactly the
weights of an uninterrupted run (and in the same W&B run); a non-finite loss stops with the step named and the last
good checkpoint kept; a crash while saving never breaks last.ckpt."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
from pytorch_lightning.callbacks import Callback

from finegrain.callbacks import WANDB_ID_FILE, AtomicCheckpointIO
from finegrain.cli import main
from tests.test_distributed import network, run_finegrain, tiny_config, write_config

EPOCHS = 3  # 16 training images, 4 a batch: 4 steps an epoch, 12 in all


class SignalAt(Callback):
    """Test-only: the process sends itself `signal` once `step` optimiser steps are done."""

    def __init__(self, step: int, signal: int):
        self.step, self.signal = step, signal

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signal)


class PoisonAt(Callback):
    """Test-only: turns a weight into NaN before the step `step`, as a diverging run would."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                next(pl_module.parameters()).view(-1)[0] = float("nan")


WANDB_LOGGER = {"class_path": "pytorch_lightning.loggers.WandbLogger", "init_args": {"project": "t"}}


def recipe(folder: Path, root: Path, *callbacks: dict, logger: dict | bool = True) -> Path:
    """3 epochs with dropout (model randomness) and a loader worker (Lightning starts workers before it restores
    the epoch: the case to get right)."""
    config = tiny_config(root, trainer={"max_epochs": EPOCHS, "callbacks": list(callbacks), "logger": logger},
                         data={"num_workers": 1}, model={"network": network("Classifier", drop_rate=0.3)})  # fmt: skip
    return write_config(folder, config)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def uninterrupted(synth_root, tmp_path_factory) -> dict[str, torch.Tensor]:
    folder = tmp_path_factory.mktemp("uninterrupted")
    result = run_finegrain(folder, "fit", "--config", str(recipe(folder, synth_root)))
    assert result.returncode == 0, result.stderr[-3000:]
    return weights(folder / "checkpoints" / "tiny" / "last.ckpt")


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "step"), [(signal.SIGKILL, 6), (signal.SIGTERM, 7)], ids=["SIGKILL", "SIGTERM"])
def test_interrupted_run_resumes_to_the_uninterrupted_weights(signum, step, uninterrupted, synth_root, tmp_path):
    kill = {"class_path": "tests.test_resume.SignalAt", "init_args": {"step": step, "signal": int(signum)}}
    offline = {"WANDB_MODE": "offline", "WANDB_CONFIG_DIR": str(tmp_path), "WANDB_CACHE_DIR": str(tmp_path)}
    config = recipe(tmp_path, synth_root, kill, logger=WANDB_LOGGER)
    result = run_finegrain(tmp_path, "fit", "--config", str(config), env=offline)
    run = tmp_path / "checkpoints" / "tiny"
    saved = torch.load(run / "last.ckpt", map_location="cpu", weights_only=True)
    if signum == signal.SIGKILL:
        assert result.returncode == -signal.SIGKILL
        assert saved["global_step"] == 4  # the end of epoch 0: killed mid-epoch 1
    else:  # pre-emption: the batch under way finishes, then last.ckpt is written mid-epoch and the run stops
        assert result.returncode == 128 + signal.SIGTERM, result.stderr[-3000:]
        assert saved["global_step"] == step and "SIGTERM: saved" in result.stderr
    run_id = (run / WANDB_ID_FILE).read_text().strip()

    config = recipe(tmp_path, synth_root, logger=WANDB_LOGGER)  # the same recipe without the test's signal
    result = run_finegrain(tmp_path, "fit", "--config", str(config), "--ckpt_path", "last", env=offline)
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = weights(run / "last.ckpt")
    for name, value in uninterrupted.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=0, msg=name)
    # the second command logged into the same W&B run
    assert len(list(run.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"))) == 2
    assert (run / WANDB_ID_FILE).read_text().strip() == run_id


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(synth_root, tmp_path, monkeypatch,
                                                                                   capsys):  # fmt: skip
    monkeypatch.chdir(tmp_path)
    poison = {"class_path": "tests.test_resume.PoisonAt", "init_args": {"step": 6}}
    config = tiny_config(synth_root, trainer={"max_epochs": EPOCHS, "callbacks": [poison]})
    assert main(["fit", "--config", str(write_config(tmp_path, config))]) == 2
    err = capsys.readouterr().err
    assert "finegrain: error: the training loss became nan at step 6 (epoch 1)" in err and "--ckpt_path last" in err
    last = torch.load(tmp_path / "checkpoints" / "tiny" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())


def test_a_crash_while_saving_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    io, path = AtomicCheckpointIO(), tmp_path / "run" / "last.ckpt"
    io.save_checkpoint({"step": 1, "weights": torch.ones(1000)}, path)

    def crash_midway(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"step": 2, "weights": torch.zeros(1000)}, path)
    monkeypatch.undo()
    kept = torch.load(path, weights_only=True)
    assert kept["step"] == 1 and torch.equal(kept["weights"], torch.ones(1000))
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no partial file left behind
