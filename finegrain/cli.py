"""The `finegrain` command: training through LightningCLI, the rest (data, ...) through argparse."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from finegrain.errors import FinegrainError

TRAINING_COMMANDS = ("fit", "validate", "test")
CHECKPOINT_ROOT = Path("checkpoints")


def run_dir(run_name: str) -> str:
    """Where a run's checkpoints, config and logs go."""
    return str(CHECKPOINT_ROOT / run_name)


def run_training(args: list[str]) -> None:
    """`finegrain fit|validate|test --config configs/X.yaml [--section.key value ...]`."""
    from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
    from pytorch_lightning.cli import LightningCLI
    from pytorch_lightning.loggers import CSVLogger

    from finegrain.data.datamodule import CUBDataModule
    from finegrain.tasks.classification import ClassificationTask

    class FinegrainCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            parser.add_argument("--run_name", default="run",
                                help="checkpoints and logs go to checkpoints/<run_name>/")  # fmt: skip
            parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
            parser.set_defaults({
                "checkpoint.monitor": "val/top1",
                "checkpoint.mode": "max",
                "checkpoint.filename": "best",
                "checkpoint.save_last": False,  # see `latest` below
                "checkpoint.auto_insert_metric_name": False,
                "checkpoint.enable_version_counter": False,
            })  # fmt: skip
            parser.link_arguments("run_name", "checkpoint.dirpath", compute_fn=run_dir)
            # A recipe's model section is ClassificationTask's arguments, or another task (RA-CNN's) by class_path.
            parser.set_defaults({"model": {"class_path": "finegrain.tasks.classification.ClassificationTask"}})
            parser.link_arguments("model.init_args.backbone", "data.backbone")
            for name in ("num_classes", "class_names", "preprocessing"):
                parser.link_arguments(f"data.{name}", f"model.init_args.{name}", apply_on="instantiate")

        def instantiate_trainer(self, **kwargs):
            config = self.config[self.subcommand]
            if config.trainer.logger is None or config.trainer.logger is True:
                # Logs beside the checkpoints of the same run, not in a stray lightning_logs/.
                kwargs["logger"] = CSVLogger(save_dir=run_dir(config.run_name), name="logs")
            # `last.ckpt` every epoch: Lightning's save_last only writes when the best checkpoint changed.
            latest = ModelCheckpoint(dirpath=run_dir(config.run_name), filename="last", monitor=None, save_top_k=1,
                                     enable_version_counter=False)  # fmt: skip
            kwargs.setdefault("callbacks", []).extend([latest, LearningRateMonitor(logging_interval="epoch")])
            return super().instantiate_trainer(**kwargs)

    FinegrainCLI(
        ClassificationTask,
        CUBDataModule,
        args=args,
        subclass_mode_model=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"description": "Train and evaluate finegrain recipes.", "default_env": False},
    )


def data_check(args: argparse.Namespace) -> int:
    from finegrain.data.cub import check_cub

    report = check_cub(args.root, args.classes, decode=not args.fast)
    print(report.format())
    return 1 if report.problems else 0


def data_synth(args: argparse.Namespace) -> int:
    from finegrain.data.synth import synthesize_birds

    root = synthesize_birds(args.root, num_classes=args.classes, per_class=args.per_class, seed=args.seed,
                            overwrite=args.overwrite)  # fmt: skip
    print(f"wrote synthetic birds to {root}")
    return data_check(argparse.Namespace(root=root, classes=None, fast=False))


def data_prepare_cub(args: argparse.Namespace) -> int:
    from finegrain.data.download import prepare_cub

    root = prepare_cub(args.dir, archive=args.archive)
    return data_check(argparse.Namespace(root=root, classes=None, fast=False))


def show_info(args: list[str]) -> int:
    """`finegrain info --config X [--model.key value ...] [--num_classes N]`: parameters, GFLOPs, input size."""
    import torch
    from jsonargparse import ActionConfigFile, ArgumentParser

    from finegrain.models import build_network
    from finegrain.models.backbones import preprocessing_config
    from finegrain.models.complexity import count_gflops, count_parameters
    from finegrain.tasks.classification import ClassificationTask

    parser = ArgumentParser(prog="finegrain info", description="Size and cost of a recipe's network.")
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_class_arguments(ClassificationTask, "model", skip={"num_classes", "class_names", "preprocessing"})
    parser.add_argument("--num_classes", type=int, default=200, help="classifier width (CUB: 200)")
    for section in ("data", "trainer", "checkpoint"):  # read from the recipe, only data.img_size is used
        parser.add_argument(f"--{section}", type=dict, default={})
    parser.add_argument("--run_name", type=str, default="run")
    parser.add_argument("--seed_everything", type=int | bool, default=True)
    config = parser.parse_args(args)
    model = config.model
    size = preprocessing_config(model.backbone, config.data.get("img_size"))["img_size"]
    with torch.device("meta"):  # shapes only: no memory, no weights (counts do not depend on them)
        network = build_network(model.method, num_classes=config.num_classes, backbone=model.backbone,
                                weights="none", attention=model.attention, attention_stages=model.attention_stages,
                                drop_rate=model.drop_rate, **(model.method_args or {}))  # fmt: skip
    attention = f" + {model.attention}" if model.attention != "none" else ""
    print(f"network     {model.method}: {model.backbone}{attention}, {config.num_classes} classes")
    print(f"parameters  {count_parameters(network) / 1e6:.2f} M")
    print(f"input size  {size}x{size}")
    print(f"GFLOPs      {count_gflops(network, (size, size)):.3f} (multiply-accumulates, one image)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="finegrain",
        description="Fine-grained bird classification. Training: finegrain fit|validate|test --config X.yaml "
        "(see `finegrain fit --help`). Size and cost: finegrain info --config X.yaml.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    data = commands.add_parser("data", help="check, synthesise or download CUB-layout datasets")
    data_commands = data.add_subparsers(dest="data_command", required=True)

    check = data_commands.add_parser("check", help="count a CUB-layout folder and list every problem")
    check.add_argument("root", type=Path)
    check.add_argument("--classes", help="official class ids, e.g. 1-10 or 1-10,15")
    check.add_argument("--fast", action="store_true", help="read image headers only, do not decode")
    check.set_defaults(handler=data_check)

    synth = data_commands.add_parser("synth", help="write synthetic birds in the CUB layout")
    synth.add_argument("root", type=Path)
    synth.add_argument("--classes", type=int, default=10, help="number of species")
    synth.add_argument("--per-class", type=int, default=40, help="images per species")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--overwrite", action="store_true")
    synth.set_defaults(handler=data_synth)

    prepare = data_commands.add_parser("prepare-cub", help="download, verify and unpack CUB-200-2011")
    prepare.add_argument("dir", type=Path, help="where CUB_200_2011/ is unpacked")
    prepare.add_argument("--archive", type=Path, help="use this local CUB_200_2011.tgz instead of downloading")
    prepare.set_defaults(handler=data_prepare_cub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if argv and argv[0] in TRAINING_COMMANDS:
            run_training(argv)
            return 0
        if argv and argv[0] == "info":
            return show_info(argv[1:])
        args = build_parser().parse_args(argv)
        return args.handler(args)
    except FinegrainError as e:
        print(f"finegrain: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
