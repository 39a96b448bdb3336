"""`finegrain bench speed|accuracy|serve|plot|markdown`: benchmarks anyone can rerun, written as JSON, shown as tables.

Only argument parsing lives here, so that building the CLI parser imports nothing heavy.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from finegrain.errors import FinegrainError


def _options(args: argparse.Namespace, *skip: str) -> dict:
    return {k: v for k, v in vars(args).items() if k not in {"command", "bench_command", "handler", *skip}}


def _finish(report: dict, json_path: Path | None) -> int:
    from finegrain.bench.report import render_markdown, write_json

    print(render_markdown(report))
    if json_path is not None:
        write_json(report, json_path)
        print(f"wrote {json_path}")
    return 0


def bench_speed(args: argparse.Namespace) -> int:
    from finegrain.bench.report import command_line
    from finegrain.bench.speed import SECTIONS, Settings, run_speed

    defaults = {"cpu": (5, 2), "cuda": (30, 10)}[args.device]
    settings = Settings(device=args.device, bf16=args.bf16, channels_last=args.channels_last, compile=args.compile,
                        batch_size=args.batch_size, steps=args.steps or defaults[0],
                        warmup=defaults[1] if args.warmup is None else args.warmup)  # fmt: skip
    command = command_line("finegrain bench speed", args.recipes, _options(args, "recipes"))
    sections = tuple(args.only) if args.only else SECTIONS if args.device == "cpu" else SECTIONS[:-1]
    phone_sources = None
    if args.phone_photos:
        from finegrain.predict_files import find_images

        phone_sources, problems = find_images(args.phone_photos)
        if problems or not phone_sources:
            raise FinegrainError("; ".join(problems) or "--phone-photos: no JPEG or PNG photos found")
    report = run_speed(args.recipes, settings, checkpoint=args.checkpoint, sections=sections, command=command,
                       phone_sources=phone_sources)  # fmt: skip
    return _finish(report, args.json)


def bench_accuracy(args: argparse.Namespace) -> int:
    from finegrain.bench.accuracy import Budget, run_accuracy
    from finegrain.bench.report import command_line

    budget = Budget(data=args.data, classes=args.classes, epochs=args.epochs, img_size=args.img_size, seeds=args.seeds,
                    quick=args.quick, overrides=args.set or [])  # fmt: skip
    command = command_line("finegrain bench accuracy", args.recipes, _options(args, "recipes", "set"))
    command += "".join(f" --set {override}" for override in args.set or [])
    return _finish(run_accuracy(args.recipes, budget, command=command), args.json)


def bench_serve(args: argparse.Namespace) -> int:
    from finegrain.bench.report import command_line
    from finegrain.bench.serve import ServeBench, run_serve_bench

    settings = ServeBench(clients=args.clients, seconds=args.seconds, max_batch_size=args.max_batch_size)
    command = command_line("finegrain bench serve", [], _options(args, "json"))
    return _finish(run_serve_bench(args.checkpoint, args.images, settings, command=command), args.json)


def bench_plot(args: argparse.Namespace) -> int:
    from finegrain.bench.plots import plot_reports

    for path in plot_reports(args.reports, args.out, args.speedups):
        print(f"wrote {path}")
    return 0


def bench_markdown(args: argparse.Namespace) -> int:
    from finegrain.bench.report import read_json, render_markdown

    print("\n".join(render_markdown(read_json(path)) for path in args.reports))
    return 0


def add_bench_commands(commands: argparse._SubParsersAction) -> None:
    """Add `bench` and its subcommands to the `finegrain` parser's subcommands."""
    bench = commands.add_parser("bench", help="speed and accuracy benchmarks of the recipes, as JSON and tables")
    sub = bench.add_subparsers(dest="bench_command", required=True)

    speed = sub.add_parser("speed", help="training/inference images/s, memory, data pipeline, Predictor latency, "
                                         "each against a plain PyTorch/timm reference")  # fmt: skip
    speed.add_argument("recipes", nargs="*", help="recipe files or bench methods (baseline, cbam, stn, racnn); "
                       "default: configs/bench/*.yaml on cpu, the GPU recipes in configs/ on cuda")  # fmt: skip
    speed.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    speed.add_argument("--bf16", action="store_true", help="bf16 autocast (Lightning bf16-mixed) on both sides")
    speed.add_argument("--channels-last", action="store_true")
    speed.add_argument("--compile", action="store_true", help="torch.compile both models")
    speed.add_argument("--batch-size", type=int, help="training batch (default: each recipe's data.batch_size)")
    speed.add_argument("--steps", type=int, help="timed steps of every measurement (default: cpu 5, cuda 30)")
    speed.add_argument("--warmup", type=int, help="untimed steps first (default: cpu 2, cuda 10)")
    speed.add_argument("--checkpoint", type=Path, help="Predictor latency of this checkpoint (default: a tiny model)")
    speed.add_argument("--only", nargs="+", choices=("models", "data", "predictor", "phone", "onnx"),
                       help="measure only these parts (phone: Predictor on 12-megapixel JPEGs; onnx: ONNX "
                            "Runtime against PyTorch eager)")  # fmt: skip
    speed.add_argument("--phone-photos", type=Path, nargs="+", metavar="PATH",
                       help="photos to upscale to 12 megapixels for --only phone (default: synthetic)")  # fmt: skip
    speed.add_argument("--json", type=Path, help="write the report here")
    speed.set_defaults(handler=bench_speed)

    accuracy = sub.add_parser("accuracy", help="train and test each recipe under the same budget; test metrics, "
                                               "per-branch accuracy and localisation")  # fmt: skip
    accuracy.add_argument("recipes", nargs="*", help="recipe files or bench methods (default: baseline cbam stn "
                          "racnn zoom, i.e. configs/bench/<method>.yaml, synthetic birds)")  # fmt: skip
    accuracy.add_argument("--data", help="a CUB-layout folder instead of the recipes' data")
    accuracy.add_argument("--classes", help="official class ids of --data to use, e.g. 1-10")
    accuracy.add_argument("--epochs", type=int)
    accuracy.add_argument("--img-size", type=int)
    accuracy.add_argument("--seeds", type=int, nargs="+", default=[0], metavar="SEED",
                          help="train every recipe once per seed; the report shows each and their mean "
                               "(e.g. 0 1 2)")  # fmt: skip
    accuracy.add_argument("--quick", action="store_true", help="configs/bench/quick.yaml on top of each recipe: "
                          "the five methods on synthetic birds, a few minutes each on 2 CPU cores")  # fmt: skip
    accuracy.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                          help="any further `finegrain fit` setting, for every recipe (repeatable)")  # fmt: skip
    accuracy.add_argument("--json", type=Path, help="write the report here")
    accuracy.set_defaults(handler=bench_accuracy)

    serve = sub.add_parser("serve", help="requests/s and latency of `finegrain serve` under concurrent clients, "
                                         "against Predictor.predict called directly")  # fmt: skip
    serve.add_argument("--checkpoint", type=Path, required=True, help="the model to serve (.ckpt or package)")
    serve.add_argument("--images", type=Path, nargs="+", help="photos or folders (default: 16 synthetic birds)")
    serve.add_argument("--clients", type=int, default=8, help="concurrent clients, each one request at a time")
    serve.add_argument("--seconds", type=float, default=20.0, help="timed seconds of each measurement")
    serve.add_argument("--max-batch-size", type=int, default=8, help="the server's --max-batch-size")
    serve.add_argument("--json", type=Path, help="write the report here")
    serve.set_defaults(handler=bench_serve)

    plot = sub.add_parser("plot", help="PNG figures of benchmark JSON reports")
    plot.add_argument("reports", nargs="+", type=Path)
    plot.add_argument("--out", type=Path, default=Path("docs/img"))
    plot.add_argument("--speedups", metavar="NAME", help="one figure NAME.png of the phone and ONNX speed-ups of "
                      "all the given reports, a bar per report and section, each aim marked")  # fmt: skip
    plot.set_defaults(handler=bench_plot)

    markdown = sub.add_parser("markdown", help="benchmark JSON reports as markdown tables for docs/benchmarks.md")
    markdown.add_argument("reports", nargs="+", type=Path)
    markdown.set_defaults(handler=bench_markdown)
