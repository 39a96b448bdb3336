"""`finegrain bench accuracy`: train each recipe and test its best checkpoint (`finegrain.training.fit_and_test`,
what `finegrain fit` and `finegrain test` run) under one budget (epochs, input size, seed, data); the test metrics
the task logs."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

from finegrain.bench.recipes import BENCH_QUICK, Recipe, load_recipe, measure_available
from finegrain.bench.report import new_report
from finegrain.errors import FinegrainError

log = logging.getLogger(__name__)

METHODS = ("baseline", "cbam", "stn", "racnn")  # the bench recipes in configs/bench/, run when none is named


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
        args = ["--config", str(BENCH_QUICK)] if self.quick else []
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
    """Fit then test the best checkpoint, in this process, as `finegrain fit` and `finegrain test` would."""
    from finegrain.training import fit_and_test

    run_name = f"bench_{recipe.name}"
    log.info("accuracy: %s -> run %s", recipe.name, run_name)
    # the quick budget is laid over the recipe, the command line's settings over both
    outcome = fit_and_test([*recipe.config_args, *budget.arguments(), "--run_name", run_name])
    metrics = outcome.pop("metrics")
    return {
        "recipe": str(recipe.path),
        "name": recipe.name,
        "method": recipe.method,
        **outcome,
        "metrics": summarize(metrics),
        "logged": {k: v for k, v in metrics.items() if k.startswith("test/")},
    }


def run_accuracy(recipe_names: list[str], budget: Budget, command: str = "") -> dict:
    """All recipes trained and tested under `budget`; runs go to checkpoints/bench_<recipe>/."""
    recipes = [load_recipe(name) for name in (recipe_names or METHODS)]
    report = new_report("accuracy", command, budget={**asdict(budget), "data": budget.data or "each recipe's own"})
    measure_available(recipes, report, lambda recipe: train_and_test(recipe, budget))
    return report
