"""The `finegrain` command: training through LightningCLI, the rest (data, ...) through argparse."""

from __future__ import annotations

import argparse
import logging
import re
import signal
import sys
import warnings
from pathlib import Path

from finegrain.bench import add_bench_commands
from finegrain.errors import FinegrainError

TRAINING_COMMANDS = ("fit", "validate", "test")
CHECKPOINT_ROOT = Path("checkpoints")


def run_dir(run_name: str) -> str:
    """Where a run's checkpoints, config and logs go."""
    return str(CHECKPOINT_ROOT / run_name)


def run_training(args: list[str]) -> None:
    """`finegrain fit|validate|test --config configs/X.yaml [--section.key value ...]`."""
    from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
    from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    from finegrain.bench.recipes import task_class
    from finegrain.checkpoints import load_checkpoint
    from finegrain.data.datamodule import CUBDataModule
    from finegrain.tasks.classification import ClassificationTask
    from finegrain.training import (
        AtomicCheckpointIO,
        SaveFullConfig,
        check_checkpoint_fits,
        choose_loggers,
        configure_wandb,
        prepare_run_dir,
        run_callbacks,
    )

    class FinegrainArgumentParser(LightningArgumentParser):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **{**kwargs, "exit_on_error": False})  # errors become one line below

    class FinegrainCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            parser.add_argument("--run_name", default="run",
                                help="checkpoints and logs go to checkpoints/<run_name>/")  # fmt: skip
            parser.add_argument("--overwrite", type=bool, default=False,
                                help="fit: replace the checkpoints of an earlier run of this run_name")  # fmt: skip
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

        def before_instantiate_classes(self) -> None:
            config = self.config[self.subcommand]
            max_epochs = config.trainer.max_epochs
            if max_epochs is not None and (max_epochs == 0 or max_epochs < -1):
                raise FinegrainError(f"trainer.max_epochs must be 1 or more (-1: no limit), got {max_epochs}")
            folder = Path(run_dir(config.run_name))
            if self.subcommand == "fit":  # before anything is written to the run's folder
                prepare_run_dir(folder, config.run_name, config.ckpt_path, config.overwrite)
            task = task_class(config.model.class_path)
            if task.leaves_parameters_unused and config.trainer.strategy == "ddp":
                config.trainer.strategy = "ddp_find_unused_parameters_true"
                print(f"finegrain: {task.__name__} leaves some parameters without gradients in a step: strategy "
                      "ddp -> ddp_find_unused_parameters_true", file=sys.stderr)  # fmt: skip
            loggers = config.trainer.logger if isinstance(config.trainer.logger, list) else [config.trainer.logger]
            resuming = self.subcommand != "fit" or config.ckpt_path is not None
            for logger in loggers:
                if str(getattr(logger, "class_path", "")).endswith("WandbLogger"):
                    logger.init_args = type(logger.init_args)(**configure_wandb(
                        vars(logger.init_args), folder, config.run_name, resuming))  # fmt: skip

        def instantiate_trainer(self, **kwargs):
            config, trainer = self.config[self.subcommand], self.config_init[self.subcommand].trainer
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
            kwargs["callbacks"] = [*filter(None, recipe_callbacks), *([latest] if checkpointing else []), *monitor,
                                   *run_callbacks(folder, checkpointing)]  # fmt: skip
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
            config = self.config[self.subcommand]
            if config.ckpt_path is not None:
                check_checkpoint_fits(config.ckpt_path, Path(run_dir(config.run_name)), self.model)

        before_fit = before_validate = before_test = _check_ckpt_path

    # Lightning's notes for a caller that passes `args` (we always do) and for a run folder that exists (checked
    # above: prepare_run_dir).
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
    try:
        FinegrainCLI(
            ClassificationTask,
            CUBDataModule,
            args=args,
            subclass_mode_model=True,
            save_config_callback=SaveFullConfig,
            save_config_kwargs={"overwrite": True},
            parser_class=FinegrainArgumentParser,
            parser_kwargs={"description": "Train and evaluate finegrain recipes.", "default_env": False},
        )
    except SIGTERMException:
        sys.exit(128 + signal.SIGTERM)  # pre-empted, last.ckpt saved: not a success for the scheduler
    except argparse.ArgumentError as e:
        raise FinegrainError(parser_message(str(e), args[0])) from None
    except Exception as e:
        # jsonargparse wraps what a class raised while it was built (a FinegrainError of the data module or task)
        # in its own union-type error: report the user's error alone.
        cause = e
        while cause is not None and not isinstance(cause, FinegrainError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        raise cause from None
    finally:
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
        return f"--{key.group(1)}.{option.group(1)} is not a setting of {key.group(1)}; {help_hint}"
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


def data_check(args: argparse.Namespace) -> int:
    from finegrain.data.cub import check_cub

    report = check_cub(args.root, args.classes, decode=not args.fast)
    print(report.format())
    return 1 if report.problems else 0


def data_synth(args: argparse.Namespace) -> int:
    from finegrain.data.synth import synthesize_birds

    size = {"bird_size": tuple(args.bird_size)} if args.bird_size else {}
    root = synthesize_birds(args.root, num_classes=args.classes, per_class=args.per_class, seed=args.seed,
                            overwrite=args.overwrite, **size)  # fmt: skip
    print(f"wrote synthetic birds to {root}")
    return data_check(argparse.Namespace(root=root, classes=None, fast=False))


def data_prepare_cub(args: argparse.Namespace) -> int:
    from finegrain.data.download import prepare_cub

    root = prepare_cub(args.dir, archive=args.archive)
    return data_check(argparse.Namespace(root=root, classes=None, fast=False))


def predict_images(args: argparse.Namespace) -> int:
    """`finegrain predict PATH... --checkpoint X`: top-k table; bad files are named, the rest still predicted."""
    from finegrain.predict import Predictor, check_output_path, find_images, format_table, predict_files, write_results

    if args.output is not None:
        check_output_path(args.output)
    files, problems = find_images(args.paths)
    predictor = Predictor.from_checkpoint(args.checkpoint, device=args.device)
    if args.top_k > len(predictor.class_names):
        print(f"finegrain: --top-k {args.top_k} is more than the model's {len(predictor.class_names)} classes: "
              f"listing all {len(predictor.class_names)}", file=sys.stderr)  # fmt: skip
    results, unreadable = predict_files(predictor, files, top_k=args.top_k, batch_size=args.batch_size,
                                        viz_dir=args.save_viz)  # fmt: skip
    problems += unreadable
    if results:
        print(format_table(results))
    if args.output is not None and results:
        write_results(results, args.output)
        print(f"wrote {len(results)} results to {args.output}")
    elif args.output is not None:
        print(f"finegrain: no image was predicted, so {args.output} was not written", file=sys.stderr)
    if args.save_viz is not None and results:
        print(f"wrote {len(results)} pictures to {args.save_viz}")
    for problem in problems:
        print(f"finegrain: skipped {problem}", file=sys.stderr)
    if problems:
        print(f"finegrain: {len(problems)} path(s) could not be predicted (above); {len(results)} image(s) were",
              file=sys.stderr)  # fmt: skip
    return 1 if problems else 0


def export_model(args: argparse.Namespace) -> int:
    """`finegrain export CKPT OUT_DIR [--onnx]`: a package Predictor loads without the dataset or recipe."""
    from finegrain.export import export_package

    # SIGTERM ends the export through SystemExit, so its temporary folder is removed and the old package stays.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        out_dir = export_package(args.checkpoint, args.out_dir, onnx=args.onnx)
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"exported {args.checkpoint} to {out_dir}: {', '.join(sorted(p.name for p in out_dir.iterdir()))}")
    return 0


def show_info(args: list[str]) -> int:
    """`finegrain info --config X [--model.key value ...] [--num_classes N]`: parameters, GFLOPs, input size."""
    import torch
    from jsonargparse import ActionConfigFile, ArgumentParser
    from jsonargparse.typing import import_object

    from finegrain.bench.recipes import Recipe
    from finegrain.models.backbones import preprocessing_config
    from finegrain.models.complexity import count_gflops, count_parameters
    from finegrain.tasks.classification import ClassificationTask

    parser = ArgumentParser(prog="finegrain info", description="Size and cost of a recipe's network.")
    parser.add_argument("--config", action=ActionConfigFile)
    # as in `finegrain fit`: ClassificationTask's arguments, or another task (RA-CNN's) by class_path
    parser.add_subclass_arguments(ClassificationTask, "model", skip={"num_classes", "class_names", "preprocessing"})
    parser.set_defaults({"model": {"class_path": "finegrain.tasks.classification.ClassificationTask"}})
    parser.add_argument("--num_classes", type=int | None, default=None,
                        help="classifier width (default: the classes the recipe trains on)")  # fmt: skip
    for section in ("data", "trainer", "checkpoint"):  # read from the recipe, only data.img_size is used
        parser.add_argument(f"--{section}", type=dict, default={})
    parser.add_argument("--run_name", type=str, default="run")
    parser.add_argument("--seed_everything", type=int | bool, default=True)
    config = parser.parse_args(args)
    num_classes = config.num_classes or Recipe(Path("<command line>"), {"data": config.data}).num_classes
    init_args = config.model.init_args.as_dict() | {"num_classes": num_classes, "weights": "none"}
    with torch.device("meta"):  # shapes only: no memory, no weights (counts do not depend on them)
        task = import_object(config.model.class_path)(**init_args)
    model, network = task.hparams, task.network
    size = preprocessing_config(model.backbone, config.data.get("img_size"))["img_size"]
    attention = f" + {model.attention}" if model.attention != "none" else ""
    print(f"network     {model.method}: {model.backbone}{attention}, {num_classes} classes")
    print(f"parameters  {count_parameters(network) / 1e6:.2f} M")
    print(f"input size  {size}x{size}")
    print(f"GFLOPs      {count_gflops(network, (size, size)):.3f} (multiply-accumulates, one image)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="finegrain",
        description="Fine-grained bird classification. Training: finegrain fit|validate|test --config X.yaml "
        "(see `finegrain fit --help`). Size and cost: finegrain info --config X.yaml. "
        "Inference: finegrain predict PHOTOS --checkpoint X; finegrain export X OUT_DIR.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    # Listed for --help; main() hands these to LightningCLI (and `info` to its own parser) before argparse runs.
    for name, text in (("fit", "train a recipe: finegrain fit --config configs/X.yaml [--section.key value]"),
                       ("validate", "evaluate a checkpoint on the validation share: ... --ckpt_path CKPT"),
                       ("test", "evaluate a checkpoint on the test split: ... --ckpt_path CKPT"),
                       ("info", "parameters, GFLOPs and input size of a recipe's network")):  # fmt: skip
        commands.add_parser(name, help=text, add_help=False)
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
    synth.add_argument("--bird-size", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
                       help="bird length range as a fraction of the shorter image side (default 0.16 0.30)")
    synth.add_argument("--overwrite", action="store_true")
    synth.set_defaults(handler=data_synth)

    prepare = data_commands.add_parser("prepare-cub", help="download, verify and unpack CUB-200-2011")
    prepare.add_argument("dir", type=Path, help="where CUB_200_2011/ is unpacked")
    prepare.add_argument("--archive", type=Path, help="use this local CUB_200_2011.tgz instead of downloading")
    prepare.set_defaults(handler=data_prepare_cub)

    predict = commands.add_parser("predict", help="top-k species of photos, and pictures of where the model looked")
    predict.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="images, or folders searched recursively")
    predict.add_argument("--checkpoint", type=Path, required=True,
                         help="a .ckpt from `finegrain fit`, or a folder from `finegrain export`")  # fmt: skip
    predict.add_argument("--top-k", type=int, default=5, help="species listed per image")
    predict.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    predict.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    predict.add_argument("--output", type=Path, help="also write the results to a .json or .csv file")
    predict.add_argument("--save-viz", type=Path, metavar="DIR",
                         help="write a picture per image: boxes, crops and top-k bars")  # fmt: skip
    predict.set_defaults(handler=predict_images)

    export = commands.add_parser("export", help="a self-contained model package (safetensors + JSON), ONNX too")
    export.add_argument("checkpoint", type=Path, help="a .ckpt written by `finegrain fit`")
    export.add_argument("out_dir", type=Path, help="the package folder (created)")
    export.add_argument("--onnx", action="store_true", help="also write model.onnx (needs finegrain[onnx])")
    export.set_defaults(handler=export_model)
    add_bench_commands(commands)
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
