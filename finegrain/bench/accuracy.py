"""`finegrain bench accuracy`: train each recipe and test the checkpoint the product recommends (last.ckpt unless
the validation share can rank epochs, docs/training.md) through `finegrain.training.fit_and_test`, what
`finegrain fit` and `finegrain test` run, under one budget (epochs, input size, seed, data); the test metrics
the task logs."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

from finegrain.bench.recipes import BENCH_QUICK, Recipe, load_recipe, measure_available
from finegrain.bench.report import new_report
from finegrain.errors import FinegrainError

log = logging.getLogger(__name__)

METHODS = ("baseline", "cbam", "stn", "racnn", "zoom")  # the bench recipes in configs/bench/, run when none is named


@dataclass
class Budget:
    """What every recipe of one benchmark shares; None keeps the recipe's own value."""

    data: str | None = None  # a CUB-layout folder; None: the recipes' data (synthetic birds for the bench recipes)
    classes: str | None = None
    epochs: int | None = None
    img_size: int | None = None
    seeds: list[int] = field(default_factory=lambda: [0])  # each recipe trains once per seed
    quick: bool = False  # configs/bench/quick.yaml on top of each recipe
    overrides: list[str] = field(default_factory=list)  # further `finegrain fit` arguments, "section.key=value"

    def arguments(self, seed: int) -> list[str]:
        args = ["--config", str(BENCH_QUICK)] if self.quick else []
        args += ["--seed_everything", str(seed), "--trainer.enable_progress_bar", "false",
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
        if score in ("centre_in_bird", "contains_bird_centre", "holds_region"):
            scores[score] = pair
        else:
            scores["parts"][score.removeprefix("contains_").replace("_", " ")] = pair
    for scores in localization.values():
        if scores["parts"]:
            part, (rate, chance) = max(scores["parts"].items(), key=lambda item: item[1][0])
            scores["best_part"] = {"part": part, "rate": rate, "chance": chance}
    return {"top1": test.get("top1"), "top5": test.get("top5"), "mean_class": test.get("mean_class"),
            "branches": branches, "localization": localization}  # fmt: skip


def train_and_test(recipe: Recipe, budget: Budget, seed: int) -> dict:
    """Fit then test the recommended checkpoint, in this process, as `finegrain fit` and `finegrain test` would."""
    from finegrain.training import fit_and_test

    run_name = f"bench_{recipe.name}" + (f"_s{seed}" if len(budget.seeds) > 1 else "")
    log.info("accuracy: %s, seed %d -> run %s", recipe.name, seed, run_name)
    # the quick budget is laid over the recipe, the command line's settings over both
    outcome = fit_and_test([*recipe.config_args, *budget.arguments(seed), "--run_name", run_name])
    metrics = outcome.pop("metrics")
    return {
        "recipe": str(recipe.path),
        "name": recipe.name,
        "method": recipe.method,
        "seed": seed,
        **outcome,
        "metrics": summarize(metrics),
        "logged": {k: v for k, v in metrics.items() if k.startswith("test/")},
    }


def run_accuracy(recipe_names: list[str], budget: Budget, command: str = "") -> dict:
    """All recipes trained and tested under `budget`, once per seed; runs go to checkpoints/bench_<recipe>/
    (bench_<recipe>_s<seed>/ with several seeds). One result per recipe and seed, and per recipe the mean."""
    if not budget.seeds:
        raise FinegrainError("--seeds: give at least one seed, e.g. --seeds 0 1 2")
    recipes = [load_recipe(name) for name in (recipe_names or METHODS)]
    report = new_report("accuracy", command, budget={**asdict(budget), "data": budget.data or "each recipe's own"})
    measure_available(recipes, report, lambda recipe: [train_and_test(recipe, budget, seed) for seed in budget.seeds])
    report["results"] = [result for per_seed in report["results"] for result in per_seed]
    report["means"] = seed_means(report["results"])
    return report


def seed_means(results: list[dict]) -> list[dict]:
    """Per recipe, in the order run: each seed's top-1, the mean top-1, mean per-class and per-branch top-1, the
    mean fit seconds, and the difference of the mean top-1 from the first baseline recipe's."""
    by_recipe: dict[str, list[dict]] = {}
    for result in results:
        by_recipe.setdefault(result["name"], []).append(result)

    def mean(values: list) -> float | None:
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None

    means = []
    for name, runs in by_recipe.items():
        metrics = [r["metrics"] for r in runs]
        branches = {branch: mean([m["branches"].get(branch) for m in metrics]) for branch in metrics[0]["branches"]}
        means.append({"name": name, "method": runs[0]["method"], "seeds": [r["seed"] for r in runs],
                      "top1_per_seed": [m["top1"] for m in metrics], "top1": mean([m["top1"] for m in metrics]),
                      "mean_class": mean([m["mean_class"] for m in metrics]), "branches": branches,
                      "fit_seconds": mean([r["fit_seconds"] for r in runs])})  # fmt: skip
    baseline = next((m for m in means if m["method"] == "baseline"), None)
    for m in means:
        m["vs_baseline"] = None if baseline is None or m["top1"] is None else m["top1"] - baseline["top1"]
    return means
