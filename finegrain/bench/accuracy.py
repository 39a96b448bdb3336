"""`finegrain bench accuracy`: train each recipe through `finegrain fit`, test its best checkpoint through
`finegrain test`, under one budget (epochs, input size, seed, data), and collect the test metrics the task logs."""

from __future__ import annotations

import csv
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from finegrain.bench.recipes import BENCH_CONFIGS, Recipe, load_recipe, measure_available
from finegrain.bench.report import new_report
from finegrain.errors import FinegrainError

log = logging.getLogger(__name__)

METHODS = ("baseline", "cbam", "stn", "racnn")  # the bench recipes in configs/bench/, run when none is named
QUICK = BENCH_CONFIGS / "quick.yaml"


@dataclass
class Budget:
    """What every recipe of one benchmark shares; None keeps the recipe's own value."""

    data: str | None = None  # a CUB-layout folder; None: the recipes' data (synthetic birds for the bench recipes)
    classes: str | None = None
    epochs: int | None = None
    img_size: int | None = None
    seed: int = 0
    quick: bool = False  # configs/bench/quick.yaml on top of each recipe
    overrides: list[str] = field(default_factory=list)  # further `finegrain fit` arguments, "section.key=value"

    def arguments(self) -> list[str]:
        args = ["--config", str(QUICK)] if self.quick else []
        args += ["--seed_everything", str(self.seed), "--trainer.enable_progress_bar", "false",
                 "--trainer.enable_model_summary", "false"]  # fmt: skip
        if self.epochs is not None:
            args += ["--trainer.max_epochs", str(self.epochs)]
        if self.img_size is not None:
            args += ["--data.img_size", str(self.img_size)]
        if self.data is not None:  # a real folder: never write synthetic birds into it
            args += ["--data.root", self.data, "--data.synthesize", "null"]
        if self.classes is not None:
            args += ["--data.classes", self.classes]
        for override in self.overrides:
            if "=" not in override:
                raise FinegrainError(f"--set {override!r}: write section.key=value, e.g. --set data.num_workers=0")
            args.append("--" + override)
        return args


def read_csv_metrics(path: Path) -> list[dict[str, float]]:
    """The rows of a CSVLogger metrics file, empty cells left out."""
    with open(path) as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def log_versions(run: Path) -> set[Path]:
    return set(run.glob("logs/version_*/metrics.csv"))


def summarize(metrics: dict[str, float]) -> dict:
    """Test metrics as the tables show them: fused and per-branch top-1, mean per-class, top-5, and for each
    box the bird-box scores and the CUB part it contains most often, each as [value, chance]."""
    test = {k.removeprefix("test/"): v for k, v in metrics.items() if k.startswith("test/")}
    branches = {k.removesuffix("/top1"): v for k, v in test.items()
                if k.endswith("/top1") and k.count("/") == 1}  # fmt: skip
    localization: dict[str, dict] = {}
    for key, value in test.items():
        if not key.startswith("loc/") or key.endswith("_chance"):
            continue
        _, box, score = key.split("/", 2)
        pair = [value, test.get(f"{key}_chance")]
        scores = localization.setdefault(box, {"parts": {}})
        if score in ("centre_in_bird", "contains_bird_centre"):
            scores[score] = pair
        else:
            scores["parts"][score.removeprefix("contains_").replace("_", " ")] = pair
    for scores in localization.values():
        if scores["parts"]:
            part, (rate, chance) = max(scores["parts"].items(), key=lambda item: item[1][0])
            scores["best_part"] = {"part": part, "rate": rate, "chance": chance}
    return {"top1": test.get("top1"), "top5": test.get("top5"), "mean_class": test.get("mean_class"),
            "branches": branches, "localization": localization}  # fmt: skip


def train_and_test(recipe: Recipe, budget: Budget) -> dict:
    """`finegrain fit` then `finegrain test` on the best checkpoint, in this process; the logged metrics."""
    from finegrain.cli import CHECKPOINT_ROOT

    run_name = f"bench_{recipe.name}"
    run = CHECKPOINT_ROOT / run_name
    args = ["--config", str(recipe.path), *budget.arguments(), "--run_name", run_name]
    log.info("accuracy: %s -> %s", recipe.name, run)
    started = time.perf_counter()
    fit_logs = _run("fit", args, run)
    fit_seconds = time.perf_counter() - started
    checkpoint = run / "best.ckpt" if (run / "best.ckpt").is_file() else run / "last.ckpt"
    started = time.perf_counter()
    test_logs = _run("test", [*args, "--ckpt_path", str(checkpoint)], run)
    test_seconds = time.perf_counter() - started
    val_top1 = [row["val/top1"] for path in fit_logs for row in read_csv_metrics(path) if "val/top1" in row]
    metrics = {k: v for path in test_logs for row in read_csv_metrics(path) for k, v in row.items()}
    return {"recipe": str(recipe.path), "name": recipe.name, "method": recipe.method, "run": str(run),
            "checkpoint": checkpoint.name, "fit_seconds": fit_seconds, "test_seconds": test_seconds,
            "best_val_top1": max(val_top1, default=None), "metrics": summarize(metrics),
            "logged": {k: v for k, v in metrics.items() if k.startswith("test/")}}  # fmt: skip


def _run(subcommand: str, args: list[str], run: Path) -> list[Path]:
    """One `finegrain fit|test`; the metrics files it wrote."""
    from finegrain.cli import run_training

    before = log_versions(run)
    try:
        run_training([subcommand, *args])
    except SystemExit as e:  # LightningCLI exits on arguments it rejects, after printing why
        if e.code:
            raise FinegrainError(f"finegrain {subcommand} {' '.join(args)} failed (exit {e.code}): see above") from None
    written = sorted(log_versions(run) - before)
    if not written:
        raise FinegrainError(f"finegrain {subcommand} wrote no metrics under {run}/logs; was --trainer.logger false?")
    return written


def run_accuracy(recipe_names: list[str], budget: Budget, command: str = "") -> dict:
    """All recipes trained and tested under `budget`; runs go to checkpoints/bench_<recipe>/."""
    recipes = [load_recipe(name) for name in (recipe_names or METHODS)]
    report = new_report("accuracy", command, budget={**asdict(budget), "data": budget.data or "each recipe's own"})
    measure_available(recipes, report, lambda recipe: train_and_test(recipe, budget))
    return report
