"""The `finegrain` command: training through LightningCLI, the rest (data, ...) through argparse."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from finegrain.bench import add_bench_commands
from finegrain.errors import FinegrainError

TRAINING_COMMANDS = ("fit", "validate", "test")


def data_check(args: argparse.Namespace) -> int:
    from finegrain.data.checks import check_cub

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
    from finegrain.predict import Predictor
    from finegrain.predict_files import check_output_path, find_images, format_table, predict_files, write_results

    if args.output is not None:
        check_output_path(args.output)
    files, problems = find_images(args.paths)
    predictor = Predictor.from_checkpoint(args.checkpoint, device=args.device, backend=args.backend)
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


def serve_model(args: argparse.Namespace) -> int:
    """`finegrain serve --checkpoint X`: the web page and JSON API until Ctrl+C."""
    from finegrain.serve.app import ServeSettings
    from finegrain.serve.server import serve

    settings = ServeSettings(checkpoint=str(args.checkpoint), device=args.device, backend=args.backend,
                             max_batch_size=args.max_batch_size,
                             max_wait_ms=args.max_wait_ms, max_upload_bytes=round(args.max_upload_mb * 2**20),
                             max_pixels=round(args.max_megapixels * 1e6))  # fmt: skip
    serve(settings, host=args.host, port=args.port, workers=args.workers)
    return 0


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

    from finegrain.bench.recipes import Recipe
    from finegrain.models import create_network
    from finegrain.models.complexity import count_gflops, count_parameters
    from finegrain.tasks.classification import ClassificationTask
    from finegrain.training import DEFAULT_TASK, network_preprocessing, with_base

    parser = ArgumentParser(prog="finegrain info", description="Size and cost of a recipe's network.",
                            exit_on_error=False)  # fmt: skip
    parser.add_argument("--config", action=ActionConfigFile)
    # as in `finegrain fit`: ClassificationTask's arguments, or another task (RA-CNN's) by class_path
    parser.add_subclass_arguments(ClassificationTask, "model", skip={"class_names", "preprocessing"})
    parser.set_defaults({"model": {"class_path": DEFAULT_TASK}})
    parser.add_argument("--num_classes", type=int | None, default=None,
                        help="classifier width (default: the classes the recipe trains on)")  # fmt: skip
    for section in ("data", "trainer", "checkpoint"):  # read from the recipe, only data.img_size is used
        parser.add_argument(f"--{section}", type=dict, default={})
    parser.add_argument("--run_name", type=str, default="run")
    parser.add_argument("--seed_everything", type=int | bool, default=True)

    def classifier_width(data: dict, num_classes: int | None) -> int:
        return num_classes or Recipe(Path("<command line>"), {"data": data}).num_classes

    # as `finegrain fit` links data.num_classes into the network: without a link it is a missing required argument
    parser.link_arguments(("data", "num_classes"), "model.init_args.network.init_args.num_classes",
                          compute_fn=classifier_width)  # fmt: skip
    try:
        config = parser.parse_args(with_base(args), defaults=True)
    except argparse.ArgumentError as e:
        from finegrain.training import parser_message

        raise FinegrainError(parser_message(str(e), "info")) from None
    num_classes = classifier_width(config.data, config.num_classes)
    spec = config.model.init_args.network
    init_args = {**spec.init_args.as_dict(), "num_classes": num_classes}
    init_args.update({"weights": "none"} if "weights" in init_args else {})
    with torch.device("meta"):  # shapes only: no memory, no weights (counts do not depend on them)
        network = create_network(spec.class_path, **init_args)
    # `data` is a plain dict: `--data.img_size 224` arrives as the string "224"
    size = int(config.data.get("img_size") or (network_preprocessing(spec) or {}).get("img_size", 224))
    attention = init_args.get("attention", "none")
    described = f"{init_args['backbone']}{f' + {attention}' if attention != 'none' else ''}, " \
        if "backbone" in init_args else ""  # fmt: skip
    print(f"network     {spec.class_path.rsplit('.', 1)[-1]}: {described}{num_classes} classes")
    print(f"parameters  {count_parameters(network) / 1e6:.2f} M")
    print(f"input size  {size}x{size}")
    print(f"GFLOPs      {count_gflops(network, (size, size)):.3f} (multiply-accumulates, one image)")
    return 0


BACKENDS = ("torch", "onnxruntime")
BACKEND_HELP = "torch, or onnxruntime: the graph of a folder from `finegrain export --onnx`, on the CPU"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="finegrain",
        description="Fine-grained bird classification. Training: finegrain fit|validate|test --config X.yaml "
        "(see `finegrain fit --help`). Size and cost: finegrain info --config X.yaml. "
        "Inference: finegrain predict PHOTOS --checkpoint X; finegrain serve --checkpoint X (a web page); "
        "finegrain export X OUT_DIR.",
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
    synth.add_argument(
        "--bird-size",
        type=float,
        nargs=2,
        default=None,
        metavar=("MIN", "MAX"),
        help="bird length range as a fraction of the shorter image side (default 0.16 0.30)",
    )
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
    predict.add_argument("--backend", choices=BACKENDS, default="torch", help=BACKEND_HELP)
    predict.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    predict.add_argument("--output", type=Path, help="also write the results to a .json or .csv file")
    predict.add_argument("--save-viz", type=Path, metavar="DIR",
                         help="write a picture per image: boxes, crops and top-k bars")  # fmt: skip
    predict.set_defaults(handler=predict_images)

    serve = commands.add_parser("serve", help="a web page and JSON API: drop a photo, see the species and the boxes")
    serve.add_argument("--checkpoint", type=Path, required=True,
                       help="a .ckpt from `finegrain fit`, or a folder from `finegrain export`")  # fmt: skip
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    serve.add_argument("--backend", choices=BACKENDS, default="torch", help=BACKEND_HELP)
    serve.add_argument("--workers", type=int, default=1, help="processes, each with its own copy of the model")
    serve.add_argument("--max-batch-size", type=int, default=8, help="photos that arrive together share a pass")
    serve.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a photo waits for others to join")
    serve.add_argument("--max-upload-mb", type=float, default=20.0, help="larger uploads are refused (413)")
    serve.add_argument("--max-megapixels", type=float, default=64.0,
                       help="photos with more pixels are refused as decompression bombs (413)")  # fmt: skip
    serve.set_defaults(handler=serve_model)

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
            from finegrain.training import run_training

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
