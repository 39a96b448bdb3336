"""Recipes as the benchmarks see them: which ones exist for a device, and the task a recipe's model section makes."""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import yaml

from finegrain.data.cub import parse_class_spec
from finegrain.errors import FinegrainError
from finegrain.models.backbones import preprocessing_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
BENCH_CONFIGS = CONFIGS / "bench"
DEFAULT_TASK = "finegrain.tasks.classification.ClassificationTask"
CUB_CLASSES = 200


@dataclass
class Recipe:
    """A recipe file read as plain YAML; `finegrain fit` reads the same file through LightningCLI."""

    path: Path
    config: dict

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def model_args(self) -> dict:
        """The model section's init arguments, whether written flat or under `init_args`."""
        model = dict(self.config.get("model") or {})
        model.pop("class_path", None)
        return {**(model.pop("init_args", None) or {}), **model}

    @property
    def class_path(self) -> str:
        return (self.config.get("model") or {}).get("class_path", DEFAULT_TASK)

    @property
    def data(self) -> dict:
        return self.config.get("data") or {}

    @property
    def backbone(self) -> str:
        return self.model_args.get("backbone", "resnet50")

    @property
    def method(self) -> str:
        """What the tables call the method: the task for another task class, else the network (+ attention)."""
        if self.class_path != DEFAULT_TASK:
            return self.class_path.rsplit(".", 1)[-1].removesuffix("Task").lower()
        attention = self.model_args.get("attention", "none")
        method = self.model_args.get("method", "baseline")
        return method if attention == "none" else f"{method}+{attention}"

    @property
    def accelerator(self) -> str:
        return str((self.config.get("trainer") or {}).get("accelerator", "auto"))

    @property
    def batch_size(self) -> int:
        return int(self.data.get("batch_size", 32))

    @property
    def preprocessing(self) -> dict:
        preprocessing = preprocessing_config(self.backbone, self.data.get("img_size"))
        if self.data.get("crop_pct") is not None:
            preprocessing["crop_pct"] = float(self.data["crop_pct"])
        return preprocessing

    @property
    def num_classes(self) -> int:
        """The classifier width the recipe trains: synthetic species, its class subset, or all of CUB."""
        if self.data.get("synthesize"):
            return int(self.data["synthesize"].get("num_classes", 10))
        classes = parse_class_spec(self.data.get("classes"))
        return len(classes) if classes else CUB_CLASSES

    def unavailable(self) -> str | None:
        """Why this recipe's task cannot be built here (its module is missing), or None."""
        try:
            task_class(self.class_path)
        except FinegrainError as e:
            return str(e)
        return None


def load_recipe(path: str | Path) -> Recipe:
    """Read a recipe file, or a bench method by name (`stn` is configs/bench/stn.yaml)."""
    path = Path(path)
    if path.suffix not in (".yaml", ".yml") and (BENCH_CONFIGS / f"{path}.yaml").is_file():
        path = BENCH_CONFIGS / f"{path}.yaml"
    if not path.is_file():
        methods = ", ".join(sorted(p.stem for p in BENCH_CONFIGS.glob("*.yaml") if p.stem != "quick"))
        raise FinegrainError(f"recipe {path} not found; pass a recipe file such as configs/demo.yaml "
                             f"or a bench method ({methods})")  # fmt: skip
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise FinegrainError(f"recipe {path} is not valid YAML ({e}); fix the file") from None
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise FinegrainError(f"recipe {path} has no model section; it must be a `finegrain fit --config` recipe")
    return Recipe(path, config)


def recipes_for(device: str) -> list[Recipe]:
    """The method recipes that fit `device`: configs/bench/ (sized for a CPU) on cpu; on cuda, the recipes in
    configs/ that do not ask for a CPU (the full-size GPU recipes)."""
    if device == "cpu":
        paths = [p for p in sorted(BENCH_CONFIGS.glob("*.yaml")) if p.stem != "quick"]
        return [load_recipe(p) for p in paths]
    return [r for r in map(load_recipe, sorted(CONFIGS.glob("*.yaml"))) if r.accelerator != "cpu"]


def task_class(class_path: str) -> type[pl.LightningModule]:
    module_name, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as e:
        raise FinegrainError(f"model class_path {class_path} cannot be imported ({e}); "
                             "check the recipe's model section, or update finegrain") from None  # fmt: skip


def build_task(recipe: Recipe, weights: str = "none") -> pl.LightningModule:
    """The recipe's LightningModule with random (or other) weights, sized as the recipe's data would size it."""
    cls = task_class(recipe.class_path)
    args = {**recipe.model_args, "weights": weights}
    linked = {"num_classes": recipe.num_classes, "preprocessing": recipe.preprocessing,
              "class_names": [f"class_{i}" for i in range(recipe.num_classes)]}  # fmt: skip
    accepted = inspect.signature(cls).parameters
    args.update({k: v for k, v in linked.items() if k in accepted})
    try:
        return cls(**args)
    except TypeError as e:  # an argument the task does not take: the recipe was written for another version
        raise FinegrainError(f"recipe {recipe.path}: its model section does not fit {recipe.class_path} ({e}); "
                             "fix the recipe") from None  # fmt: skip


def measure_available(recipes: list, report: dict, measure) -> None:
    """`measure(recipe)` into report["results"] for every recipe that can run here; the others, with the
    reason, into report["skipped"] (a method whose code is not installed, a GPU recipe on a CPU run)."""
    report.setdefault("results", [])
    report.setdefault("skipped", [])
    for recipe in recipes:
        reason = recipe.unavailable()
        if reason:
            report["skipped"].append({"recipe": str(recipe.path), "reason": reason})
        else:
            report["results"].append(measure(recipe))
