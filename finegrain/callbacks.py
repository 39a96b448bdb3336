"""What every `finegrain fit|validate|test` run gets around LightningCLI: its loggers (CSV, W&B decided up front),
callbacks that keep a run recoverable (SIGTERM checkpoint, non-finite loss stop, per-step seeds) and W&B panels."""

from __future__ import annotations

import logging
import netrc
import os
import secrets
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytorch_lightning as pl
import torch
from lightning_fabric.plugins import TorchCheckpointIO
from lightning_fabric.utilities.rank_zero import rank_zero_only
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.cli import SaveConfigCallback
from pytorch_lightning.loggers import CSVLogger, Logger, WandbLogger
from pytorch_lightning.utilities.exceptions import SIGTERMException
from torchmetrics.classification import MulticlassConfusionMatrix

from finegrain.errors import FinegrainError
from finegrain.geometry import box_to_transform, crop
from finegrain.models import ModelOutput

log = logging.getLogger(__name__)

WANDB_ID_FILE = "wandb_id"  # in the run dir: a resumed run logs into the same W&B run


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary sibling and renames it into place: a crash while saving leaves the
    previous checkpoint whole instead of a truncated one."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if "://" in str(path):  # remote storage: fsspec's own write
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial")
        try:
            with open(partial, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)


def wandb_mode() -> str:
    """WANDB_MODE if set, else online when logged in (WANDB_API_KEY or a netrc entry for the W&B host), else
    offline. Decided before wandb.init, which would retry for 90 s without a network or a key."""
    if mode := os.environ.get("WANDB_MODE"):
        return "offline" if mode == "dryrun" else mode
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        logged_in = netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        logged_in = False
    return "online" if logged_in else "offline"


def configure_wandb(init_args: dict, run_dir: Path, run_name: str, resuming: bool) -> dict:
    """WandbLogger arguments completed for this run: its folder, name, persisted run id and mode."""
    offline = bool(init_args.get("offline")) or wandb_mode() != "online"
    if offline:
        os.environ.setdefault("WANDB_ERROR_REPORTING", "false")  # no error reports to an unreachable server
        os.environ.setdefault("WANDB_SILENT", "true")  # the one line of WandbPanels says where the run went
    return {
        **init_args,
        "save_dir": str(run_dir) if init_args.get("save_dir") in (None, ".") else init_args["save_dir"],
        "name": init_args.get("name") or run_name,
        "id": init_args.get("id") or wandb_run_id(run_dir, resuming),
        "offline": offline,
        "log_model": init_args.get("log_model", False) and not offline,  # artifacts need the server
    }


def wandb_run_id(run_dir: Path, resuming: bool) -> str:
    """The run's W&B id: the stored one when resuming (or testing) a run, else a new one, stored by rank 0."""
    path = run_dir / WANDB_ID_FILE
    if resuming and path.is_file():
        return path.read_text().strip()
    run_id = secrets.token_hex(4)
    if rank_zero_only.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(run_id + "\n")
    return run_id


def choose_loggers(logger: Logger | list | bool | None, run_dir: Path) -> list[Logger] | bool:
    """CSV logs beside the checkpoints for every run (unless `--trainer.logger false`), plus any logger asked for."""
    if logger is False:
        return False
    csv = CSVLogger(save_dir=str(run_dir), name="logs")
    if logger is None or logger is True:
        return [csv]
    others = list(logger) if isinstance(logger, list | tuple) else [logger]
    return [csv, *[other for other in others if not isinstance(other, CSVLogger)]]


def find_wandb(trainer: pl.Trainer) -> WandbLogger | None:
    return next((logger for logger in trainer.loggers if isinstance(logger, WandbLogger)), None)


class SaveFullConfig(SaveConfigCallback):
    """Saves the resolved config beside the logs and sends all of it to W&B as the run's hyper-parameters."""

    def save_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if (wandb_logger := find_wandb(trainer)) is not None:
            wandb_logger.log_hyperparams(self.config.as_dict())


class StopOnNonFiniteLoss(Callback):
    """Stops before a NaN/inf loss reaches the weights, so that last.ckpt stays the last good state.

    Every rank takes part in the decision, so that DDP ranks stop together instead of waiting on each other.
    """

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        bad = not bool(torch.isfinite(loss.detach()).all())
        if trainer.strategy.reduce_boolean_decision(bad, all=False):
            raise FinegrainError(
                f"the training loss became {loss.item()} at step {trainer.global_step} (epoch {trainer.current_epoch}):"
                f" training stopped before that update; the last good checkpoint is {self.run_dir / 'last.ckpt'}."
                " Lower model.lr or use precision 32, then resume with --ckpt_path last"
            )


class CheckpointOnSigterm(Callback):
    """Cluster pre-emption (SIGTERM): Lightning finishes the current batch and stops; this saves last.ckpt
    first, so that `--ckpt_path last` continues from that batch."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "last.ckpt"

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException) and trainer.training:
            trainer.save_checkpoint(self.path)
            log.warning("SIGTERM: saved %s at step %d; resume with --ckpt_path last", self.path, trainer.global_step)


class BestNeedsValidation(Callback):
    """Writes best.ckpt only when the validation share can rank epochs: `min_images` images or more.

    The standard error of a top-1 near 75 % on n images is 43 / sqrt(n) points: 4.5 on CUB 1-30's 90 validation
    photos, 1.8 on full CUB's 600, 1.4 at 1000, while late epochs of a cosine schedule differ by a point or
    two. Below that, picking the best epoch picks noise, and picks it early: on 20 held-out species best.ckpt
    (60 validation photos) scored 73.5 % against the final model's 79.8 % (docs/training.md). Then last.ckpt,
    the final model, is the checkpoint to use.
    """

    def __init__(self, min_images: int):
        self.min_images = min_images

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        val = (getattr(trainer.datamodule, "datasets", None) or {}).get("val")
        if stage != "fit" or val is None or len(val) >= self.min_images:
            return
        ranking = [c for c in trainer.checkpoint_callbacks if c.monitor is not None and c.save_top_k != 0]
        for callback in ranking:
            callback.save_top_k = 0
        if ranking:
            log.warning("validation share of %d images is too small to rank epochs (best_min_val_images: %d): "
                        "no best.ckpt; use last.ckpt, the final model", len(val), self.min_images)  # fmt: skip


class SeedEachStep(Callback):
    """Seeds torch before every training step from (run seed, step, rank): dropout and any other randomness in the
    model then does not depend on RNG state that checkpoints do not keep, so a resumed run matches an
    uninterrupted one. (Data order and augmentation follow (seed, epoch) through the data module's sampler.)"""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.seed = torch.initial_seed() % 2**31

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        step_seed = np.random.SeedSequence([self.seed, trainer.global_step, trainer.global_rank]).generate_state(1)
        torch.manual_seed(int(step_seed[0]))


def to_pixels(images: torch.Tensor, preprocessing: dict) -> np.ndarray:
    """Normalised (B, 3, H, W) tensors -> (B, H, W, 3) uint8 for display."""
    mean = torch.tensor(preprocessing["mean"], device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(preprocessing["std"], device=images.device).view(1, 3, 1, 1)
    pixels = (images.float() * std + mean).clamp(0, 1) * 255
    return pixels.round().byte().permute(0, 2, 3, 1).cpu().numpy()


class WandbPanels(Callback):
    """With a WandbLogger: every `every_n_epochs` a panel of validation images with the ground-truth box and each
    branch's box (ModelOutput.boxes) and that branch's crop of the input; at test, per-class accuracy and the
    confusion matrix (summed over ranks). Reads the network's outputs through a forward hook: no extra forward."""

    def __init__(self, every_n_epochs: int = 5, num_images: int = 8, crop_size: int = 128):
        self.every_n_epochs = every_n_epochs
        self.num_images = num_images
        self.crop_size = crop_size
        self.output: ModelOutput | None = None
        self.hook = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.wandb = find_wandb(trainer)
        if self.wandb is None:
            return
        if trainer.is_global_zero and self.wandb._offline and os.environ.get("WANDB_MODE") != "disabled":
            run_dir = Path(self.wandb.experiment.dir).parent
            log.warning("W&B offline (no API key, or WANDB_MODE=offline): run written to %s; upload it with "
                        "`wandb sync %s`", run_dir, run_dir)  # fmt: skip
        self.hook = getattr(pl_module, "network", pl_module).register_forward_hook(self._keep_output)
        self.confusion = MulticlassConfusionMatrix(pl_module.num_classes).to(pl_module.device)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.hook is not None:
            self.hook.remove()
            self.hook, self.output = None, None

    def _keep_output(self, module, inputs, output) -> None:
        if isinstance(output, ModelOutput):
            self.output = output

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        epoch = trainer.current_epoch
        due = epoch % self.every_n_epochs == 0 or epoch == trainer.max_epochs - 1
        if self.hook is None or batch_idx != 0 or trainer.sanity_checking or not due or not trainer.is_global_zero:
            return
        self.log_boxes(pl_module, batch, self.output, trainer.global_step)

    def log_boxes(self, pl_module: pl.LightningModule, batch: dict, output: ModelOutput, step: int) -> None:
        import wandb

        count = min(self.num_images, len(batch["label"]))
        images, labels = batch["image"][:count], batch["label"][:count].tolist()
        predictions = output.logits[:count].argmax(dim=1).tolist()
        preprocessing, class_names = pl_module.hparams.preprocessing, pl_module.hparams.class_names
        names = list(output.boxes)
        class_labels = {0: "bird (ground truth)", **{i + 1: name for i, name in enumerate(names)}}
        panels = []
        for i, pixels in enumerate(to_pixels(images, preprocessing)):
            boxes = [(0, "bird", batch["box"][i]), *[(k + 1, n, output.boxes[n][i]) for k, n in enumerate(names)]]
            box_data = [{"position": dict(zip(("minX", "minY", "maxX", "maxY"), map(float, box), strict=True)),
                         "class_id": class_id, "box_caption": caption} for class_id, caption, box in boxes]  # fmt: skip
            caption = f"{class_names[labels[i]]} -> {class_names[predictions[i]]}"
            boxes = {"boxes": {"box_data": box_data, "class_labels": class_labels}}
            panels.append(wandb.Image(pixels, caption=caption, boxes=boxes))
        logged = {"val/boxes": panels}
        for name in names:
            transform = box_to_transform(output.boxes[name][:count].detach().float())
            crops = to_pixels(crop(images, transform, (self.crop_size, self.crop_size)), preprocessing)
            logged[f"val/crops/{name}"] = [wandb.Image(pixels) for pixels in crops]
        self.wandb.log_metrics(logged, step=step)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self.hook is not None:
            self.confusion.update(self.output.logits.detach().argmax(dim=1), batch["label"])

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.hook is None:
            return
        matrix = self.confusion.compute().cpu()  # summed over ranks; every rank takes part
        self.confusion.reset()
        if trainer.is_global_zero:
            self.log_test_tables(matrix, pl_module.hparams.class_names)

    def log_test_tables(self, matrix: torch.Tensor, class_names: list[str]) -> None:
        import wandb

        totals, correct = matrix.sum(dim=1), matrix.diag()
        rows = [[name, int(n), int(c), float(c / n) if n else None]
                for name, n, c in zip(class_names, totals, correct, strict=True)]  # fmt: skip
        per_class = wandb.Table(columns=["class", "images", "correct", "accuracy"], data=rows)
        pairs = [[class_names[t], class_names[p], int(matrix[t, p])]
                 for t in range(len(class_names)) for p in range(len(class_names))]  # fmt: skip
        confusion = wandb.plot_table(
            "wandb/confusion_matrix/v1",
            wandb.Table(columns=["Actual", "Predicted", "nPredictions"], data=pairs),
            {"Actual": "Actual", "Predicted": "Predicted", "nPredictions": "nPredictions"},
            {"title": "test confusion matrix"},
        )
        self.wandb.experiment.log({"test/per_class": per_class, "test/confusion_matrix": confusion})


def run_callbacks(run_dir: Path, checkpointing: bool = True) -> list[Callback]:
    """The callbacks every training command adds to the recipe's own (no SIGTERM checkpoint without checkpoints)."""
    on_sigterm = [CheckpointOnSigterm(run_dir)] if checkpointing else []
    return [StopOnNonFiniteLoss(run_dir), *on_sigterm, SeedEachStep(), WandbPanels()]
