"""Training runs: `finegrain fit|validate|test` through LightningCLI, and `fit_and_test` for the benchmarks.

A recipe is YAML read after the built-in base (configs/base.yaml: seed, W&B logger); recipes ship inside the
package, so `--config racnn_cub` names the built-in one from any installed copy and a path names a user's own.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
import warnings
from pathlib import Path

from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

from finegrain.callbacks import (
    AtomicCheckpointIO,
    BestNeedsValidation,
    SaveFullConfig,
    choose_loggers,
    configure_wandb,
    run_callbacks,
)
from finegrain.checkpoints import check_checkpoint_fits, load_checkpoint, prepare_run_dir
from finegrain.data.datamodule import CUBDataModule
from finegrain.errors import FinegrainError
from finegrain.models.backbones import preprocessing_config
from finegrain.tasks.classification import ClassificationTask

CONFIGS = Path(__file__).resolve().parent / "configs"
BASE_CONFIG = CONFIGS / "base.yaml"
CHECKPOINT_ROOT = Path("checkpoints")
DEFAULT_TASK = "finegrain.tasks.classification.ClassificationTask"
BEST_MIN_VAL_IMAGES = 1000  # fewer validation images cannot rank epochs: see callbacks.BestNeedsValidation
# model keys of recipes written before the network was given by class_path, and where they went
MOVED_MODEL_KEYS = ("method", "method_args", "backbone", "weights", "attention", "attention_stages", "drop_rate")


def run_dir(run_name: str) -> str:
    """Where a run's checkpoints, config and logs go."""
    return str(CHECKPOINT_ROOT / run_name)


def resolve_config(name: str) -> str:
    """A recipe path as given, or a built-in recipe by name (`racnn_cub`, `racnn_cub.yaml`, `bench/stn`)."""
    if Path(name).exists():
        return name
    builtin = CONFIGS / (name if name.endswith((".yaml", ".yml")) else f"{name}.yaml")
    if builtin.is_file():
        return str(builtin)
    builtin = CONFIGS / Path(name).name  # configs/X.yaml of a source checkout, from anywhere
    if Path(name).parent.name == "configs" and builtin.is_file():
        return str(builtin)
    names = ", ".join(builtin_recipes())
    raise FinegrainError(f"recipe {name} not found; pass a YAML file or a built-in recipe: {names}")


def builtin_recipes() -> list[str]:
    return sorted(p.stem for p in CONFIGS.glob("*.yaml") if p != BASE_CONFIG)


def with_base(args: list[str]) -> list[str]:
    """The base config first, then `args` with every --config resolved (built-in names included)."""
    resolved, given = [], iter(args)
    for arg in given:
        if arg == "--config":
            resolved += [arg, resolve_config(next(given, ""))]
        elif arg.startswith("--config="):
            resolved.append("--config=" + resolve_config(arg.split("=", 1)[1]))
        else:
            resolved.append(arg)
    return ["--config", str(BASE_CONFIG), *resolved]


def network_preprocessing(network) -> dict | None:
    """The eval preprocessing of the network a recipe names: timm's data config of its backbone, if it has one."""
    backbone = getattr(getattr(network, "init_args", None), "backbone", None)
    return preprocessing_config(backbone) if isinstance(backbone, str) else None


class FinegrainArgumentParser(LightningArgumentParser):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **{**kwargs, "exit_on_error": False})  # errors become one line (parser_message)


class FinegrainCLI(LightningCLI):
    """LightningCLI with a run folder per run_name, the links data <-> network, W&B decided up front, last.ckpt
    every epoch, atomic checkpoint writes and the callbacks that keep a run recoverable."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--run_name", default="run", help="checkpoints and logs go to checkpoints/<run_name>/")
        parser.add_argument("--overwrite", type=bool, default=False,
                            help="fit: replace the checkpoints of an earlier run of this run_name")  # fmt: skip
        parser.add_argument("--best_min_val_images", type=int, default=BEST_MIN_VAL_IMAGES,
                            help="fit: write best.ckpt (best val/top1) only with at least this many validation "
                                 "images; with fewer, last.ckpt (the final model) is the one to use")  # fmt: skip
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({
            "checkpoint.monitor": "val/top1",
            "checkpoint.mode": "max",
            "checkpoint.filename": "best",
            "checkpoint.save_last": False,  # see `latest` in instantiate_trainer
            "checkpoint.auto_insert_metric_name": False,
            "checkpoint.enable_version_counter": False,
        })  # fmt: skip
        parser.link_arguments("run_name", "checkpoint.dirpath", compute_fn=run_dir)
        # model: ClassificationTask's arguments, or another task (RA-CNN's) by class_path; its network by class_path.
        parser.set_defaults({"model": {"class_path": DEFAULT_TASK}})
        # one way: the network's backbone gives the data its preprocessing; the data gives the network its classes
        parser.link_arguments("model.init_args.network", "data.preprocessing", compute_fn=network_preprocessing)
        parser.link_arguments("data.num_classes", "model.init_args.network.init_args.num_classes",
                              apply_on="instantiate")  # fmt: skip
        for name in ("class_names", "preprocessing"):
            parser.link_arguments(f"data.{name}", f"model.init_args.{name}", apply_on="instantiate")

    @property
    def run_config(self):
        return self.config[self.subcommand] if self.subcommand else self.config

    def before_instantiate_classes(self) -> None:
        config = self.run_config
        max_epochs = config.trainer.max_epochs
        if max_epochs is not None and (max_epochs == 0 or max_epochs < -1):
            raise FinegrainError(f"trainer.max_epochs must be 1 or more (-1: no limit), got {max_epochs}")
        folder = Path(run_dir(config.run_name))
        if self.subcommand in ("fit", None):  # before anything is written to the run's folder
            prepare_run_dir(folder, config.run_name, config.get("ckpt_path"), config.overwrite)
        from jsonargparse.typing import import_object

        task = import_object(config.model.class_path)
        if task.leaves_parameters_unused and config.trainer.strategy == "ddp":
            config.trainer.strategy = "ddp_find_unused_parameters_true"
            print(f"finegrain: {task.__name__} leaves some parameters without gradients in a step: strategy "
                  "ddp -> ddp_find_unused_parameters_true", file=sys.stderr)  # fmt: skip
        loggers = config.trainer.logger if isinstance(config.trainer.logger, list) else [config.trainer.logger]
        resuming = self.subcommand not in ("fit", None) or config.get("ckpt_path") is not None
        for logger in loggers:
            if str(getattr(logger, "class_path", "")).endswith("WandbLogger"):
                logger.init_args = type(logger.init_args)(**configure_wandb(
                    vars(logger.init_args), folder, config.run_name, resuming))  # fmt: skip

    def instantiate_trainer(self, **kwargs):
        config = self.run_config
        trainer = self.config_init[self.subcommand].trainer if self.subcommand else self.config_init.trainer
        folder = Path(run_dir(config.run_name))
        checkpointing = trainer.enable_checkpointing is not False
        # CSV logs beside the checkpoints of the same run (not in a stray lightning_logs/), plus W&B if asked.
        kwargs["logger"] = choose_loggers(trainer.logger, folder)
        if trainer.default_root_dir is None:  # without a logger, Lightning writes config.yaml to the cwd
            kwargs["default_root_dir"] = str(folder)
        # `last.ckpt` every epoch: Lightning's save_last only writes when the best checkpoint changed.
        latest = ModelCheckpoint(dirpath=folder, filename="last", monitor=None, save_top_k=1,
                                 enable_version_counter=False)  # fmt: skip
        recipe_callbacks = trainer.callbacks if isinstance(trainer.callbacks, list) else [trainer.callbacks]
        # the learning-rate monitor needs a logger to write to: none with `--trainer.logger false`
        monitor = [LearningRateMonitor(logging_interval="epoch")] if kwargs["logger"] else []
        ranking = [BestNeedsValidation(config.best_min_val_images)] if checkpointing else []
        kwargs["callbacks"] = [*filter(None, recipe_callbacks), *([latest] if checkpointing else []), *monitor,
                               *ranking, *run_callbacks(folder, checkpointing)]  # fmt: skip
        plugins = trainer.plugins if isinstance(trainer.plugins, list) else [trainer.plugins]
        kwargs["plugins"] = [*filter(None, plugins), AtomicCheckpointIO()]
        # the `checkpoint` section's best.ckpt, unless `--trainer.enable_checkpointing false` says no checkpoints
        extra = [self._get(self.config_init, key) for key in self._parser(self.subcommand).callback_keys]
        extra = [c for c in extra if checkpointing or not isinstance(c, ModelCheckpoint)]
        return self._instantiate_trainer({**self._get(self.config_init, "trainer", default={}), **kwargs}, extra)

    def _parse_ckpt_path(self) -> None:
        # Lightning reads a checkpoint file's hyper-parameters into the config here: refuse a file that is not a
        # safe, whole checkpoint with our one line before it does.
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and Path(ckpt_path).is_file():
            load_checkpoint(ckpt_path)
        super()._parse_ckpt_path()

    def _check_ckpt_path(self) -> None:
        config = self.run_config
        if config.ckpt_path is not None:
            check_checkpoint_fits(config.ckpt_path, Path(run_dir(config.run_name)), self.model)

    before_fit = before_validate = before_test = _check_ckpt_path


def build_cli(args: list[str], run: bool = True) -> FinegrainCLI:
    """LightningCLI over `args` (base config first); parser and build errors as one FinegrainError line."""
    # Lightning's notes for a caller that passes `args` (we always do) and for a run folder that exists (checked
    # in before_instantiate_classes: prepare_run_dir).
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
    command = args[0] if run and args else "fit"
    args = [*args[:1], *with_base(args[1:])] if run else with_base(args)
    try:
        return FinegrainCLI(ClassificationTask, CUBDataModule, args=args, run=run, subclass_mode_model=True,
                            save_config_callback=SaveFullConfig, save_config_kwargs={"overwrite": True},
                            parser_class=FinegrainArgumentParser,
                            parser_kwargs={"description": "Train and evaluate finegrain recipes.",
                                           "default_env": False})  # fmt: skip
    except argparse.ArgumentError as e:
        raise FinegrainError(parser_message(str(e), command)) from None
    except Exception as e:
        # jsonargparse wraps what a class raised while it was built (a FinegrainError of the data module or task)
        # in its own union-type error: report the user's error alone.
        cause = e
        while cause is not None and not isinstance(cause, FinegrainError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        raise cause from None


def run_training(args: list[str]) -> None:
    """`finegrain fit|validate|test --config RECIPE [--section.key value ...]`."""
    import signal

    from pytorch_lightning.utilities.exceptions import SIGTERMException

    try:
        build_cli(args)
    except SIGTERMException:
        sys.exit(128 + signal.SIGTERM)  # pre-empted, last.ckpt saved: not a success for the scheduler
    finally:
        finish_wandb()


def fit_and_test(args: list[str]) -> dict:
    """Train a recipe (`args` as `finegrain fit` takes them, without the subcommand), then test the checkpoint the
    product recommends (best.ckpt where the validation share could rank epochs, else last.ckpt); the test
    metrics, the best validation top-1 (None without best.ckpt) and the times."""
    try:
        cli = build_cli([*args, "--overwrite", "true"], run=False)
        started = time.perf_counter()
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        fit_seconds = time.perf_counter() - started
        ranked = [c for c in cli.trainer.checkpoint_callbacks if c.monitor is not None and c.best_model_path]
        best = ranked[0] if ranked else None
        checkpoint = Path(best.best_model_path) if best else None
        best_val = float(best.best_model_score) if best and best.best_model_score is not None else None
        if checkpoint is None or not checkpoint.is_file():
            checkpoint = Path(run_dir(cli.config.run_name)) / "last.ckpt"
        started = time.perf_counter()
        (metrics,) = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=str(checkpoint), verbose=False)
        test_seconds = time.perf_counter() - started
    finally:
        finish_wandb()
    return {"run": run_dir(cli.config.run_name), "checkpoint": checkpoint.name, "fit_seconds": fit_seconds,
            "test_seconds": test_seconds, "best_val_top1": best_val, "metrics": dict(metrics)}  # fmt: skip


def finish_wandb() -> None:
    if "wandb" in sys.modules:  # one W&B run per command, also when commands run in one process
        sys.modules["wandb"].finish()
        # and its own W&B service: a service left running stays in WANDB_SERVICE, where every later command
        # and child process (a resumed run, a DDP rank) would join it and find its runs still "in use"
        sys.modules["wandb"].teardown()


def parser_message(message: str, command: str) -> str:
    """jsonargparse's many-line error (union subtypes, NestedArg, given value types) -> one line with the fix."""
    help_hint = f"`finegrain {command} --help` lists the options"
    key = re.search(r'Parser key "([^"]+)"', message)
    option = re.search(r"Option '([^']+)' is not accepted", message)
    if key and option:
        name = option.group(1)
        moved = name.split(".")[0]  # a YAML `method_args: {num_parts: 2}` is reported as method_args.num_parts
        if key.group(1) == "model" and moved in MOVED_MODEL_KEYS:
            return (
                f"model.{moved} is a setting of the network now: write it under model.network.init_args "
                "(method baseline/stn/racnn: model.network.class_path finegrain.models.Classifier/STCNN/RACNN; "
                "method_args go into init_args too); the built-in recipes show the form"
            )
        return f"--{key.group(1)}.{name} is not a setting of {key.group(1)}; {help_hint}"
    if "unrecognized arguments" in message:
        return f"{message.strip().splitlines()[0]}; {help_hint}"
    given = re.search(r"Given value: (.*)", message)
    expected = [t for t in re.findall(r"Expected a <class '([^']+)'>", message) if t != "NoneType"]
    if key and given:
        name, value = key.group(1), given.group(1).strip()
        if nested := re.search(r"NestedArg\(key='([^']+)', val='(.*)'\)", value):  # --model.lr abc
            name, value = f"{name}.{nested.group(1)}", nested.group(2)
        wanted = f" (expected {' or '.join(dict.fromkeys(expected))})" if expected else ""
        return f"--{name}: {value!r} is not a valid value{wanted}; {help_hint}"
    noise = ("Subtypes:", "Errors:", "Given value type:", "Does not validate against any of the Union subtypes",
             "- Expected a <class 'NoneType'>")  # fmt: skip
    lines = [line.strip() for line in message.splitlines() if line.strip() and not line.strip().startswith(noise)]
    return f"{' '.join(lines)}; {help_hint}"
