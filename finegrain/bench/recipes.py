"""Recipes as the benchmarks see them: which ones exist for a device, and the task a recipe's model section makes.

A recipe here is the same list of YAML files `finegrain fit` reads (configs/base.yaml, for a bench method also
configs/bench/setup.yaml, then the recipe), merged as plain YAML: the benchmarks need its network, sizes and
classes without instantiating its data.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path

import pytorch_lightning as pl
import yaml
from jsonargparse.typing import import_object

from finegrain.data.cub import parse_class_spec
from finegrain.errors import FinegrainError
from finegrain.models import create_network, network_class
from finegrain.models.backbones import preprocessing_config
from finegrain.training import BASE_CONFIG, CONFIGS, DEFAULT_TASK

BENCH_CONFIGS = CONFIGS / "bench"
BENCH_SETUP = BENCH_CONFIGS / "setup.yaml"
BENCH_QUICK = BENCH_CONFIGS / "quick.yaml"
CUB_CLASSES = 200


def merge(base: dict, over: dict) -> dict:
    """`over` laid on `base` key by key, as repeated --config files combine."""
    merged = dict(base)
    for key, value in over.items():
        merged[key] = merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) \
            else value  # fmt: skip
    return merged


@dataclass
class Recipe:
    """A recipe file (with the files read before it) read as plain YAML."""

    path: Path
    config: dict
    before: list[Path] = field(default_factory=list)  # configs `finegrain fit` needs before this one (bench setup)

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def config_args(self) -> list[str]:
        """The --config arguments of `finegrain fit` for this recipe (the base config is added by finegrain)."""
        return [arg for path in (*self.before, self.path) for arg in ("--config", str(path))]

    @property
    def class_path(self) -> str:
        return (self.config.get("model") or {}).get("class_path", DEFAULT_TASK)

    @property
    def model_args(self) -> dict:
        """The task's init arguments, whether written flat or under `init_args`."""
        model = dict(self.config.get("model") or {})
        model.pop("class_path", None)
        return {**(model.pop("init_args", None) or {}), **model}

    @property
    def network(self) -> dict:
        """{"class_path", "init_args"} of the recipe's network."""
        network = self.model_args.get("network")
        if not isinstance(network, dict) or "class_path" not in network:
            raise FinegrainError(f"recipe {self.path} has no model.network with a class_path; the built-in recipes "
                                 "show the form")  # fmt: skip
        return {"class_path": network["class_path"], "init_args": dict(network.get("init_args") or {})}

    @property
    def backbone(self) -> str:
        return self.network["init_args"].get("backbone", "resnet50")

    @property
    def method(self) -> str:
        """What the tables call the method: the network class (+ attention)."""
        name = self.network["class_path"].rsplit(".", 1)[-1].lower()
        name = {"classifier": "baseline", "stcnn": "stn", "objectzoom": "zoom"}.get(name, name)
        attention = self.network["init_args"].get("attention", "none")
        return name if attention == "none" else f"{name}+{attention}"

    @property
    def data(self) -> dict:
        return self.config.get("data") or {}

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


def read_yaml(path: Path) -> dict:
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise FinegrainError(f"recipe {path} is not valid YAML ({e}); fix the file") from None
    if not isinstance(config, dict):
        raise FinegrainError(f"recipe {path} is not a YAML mapping; it must be a `finegrain fit --config` recipe")
    return config


def load_recipe(path: str | Path) -> Recipe:
    """Read a recipe file, a built-in recipe by name, or a bench method by name (`stn` is configs/bench/stn.yaml)."""
    path = Path(path)
    for candidate in (BENCH_CONFIGS / f"{path}.yaml", CONFIGS / f"{path}.yaml"):
        if path.suffix not in (".yaml", ".yml") and candidate.is_file():
            path = candidate
            break
    if not path.is_file():
        methods = ", ".join(sorted(p.stem for p in BENCH_CONFIGS.glob("*.yaml") if p not in (BENCH_QUICK, BENCH_SETUP)))
        raise FinegrainError(f"recipe {path} not found; pass a recipe file such as configs/demo.yaml "
                             f"or a bench method ({methods})")  # fmt: skip
    before = [BENCH_SETUP] if path.resolve().parent == BENCH_CONFIGS.resolve() else []
    config = read_yaml(BASE_CONFIG)
    for part in (*before, path):
        config = merge(config, read_yaml(part))
    if not isinstance(config.get("model"), dict):
        raise FinegrainError(f"recipe {path} has no model section; it must be a `finegrain fit --config` recipe")
    return Recipe(path, config, before)


def recipes_for(device: str) -> list[Recipe]:
    """The method recipes that fit `device`: configs/bench/ (sized for a CPU) on cpu; on cuda, the built-in recipes
    that do not ask for a CPU (the full-size GPU recipes)."""
    if device == "cpu":
        paths = [p for p in sorted(BENCH_CONFIGS.glob("*.yaml")) if p not in (BENCH_QUICK, BENCH_SETUP)]
        return [load_recipe(p) for p in paths]
    recipes = [load_recipe(p) for p in sorted(CONFIGS.glob("*.yaml")) if p != BASE_CONFIG]
    return [r for r in recipes if r.accelerator != "cpu"]


def task_class(class_path: str) -> type[pl.LightningModule]:
    try:
        return import_object(class_path)
    except (ImportError, AttributeError, ValueError) as e:
        raise FinegrainError(f"model class_path {class_path} cannot be imported ({e}); "
                             "check the recipe's model section, or update finegrain") from None  # fmt: skip


def build_task(recipe: Recipe, weights: str = "none") -> pl.LightningModule:
    """The recipe's LightningModule with random (or other) weights, sized as the recipe's data would size it."""
    cls = task_class(recipe.class_path)
    spec = recipe.network
    init_args = {**spec["init_args"], "num_classes": recipe.num_classes}
    if "weights" in inspect.signature(network_class(spec["class_path"])).parameters:
        init_args["weights"] = weights
    args = {k: v for k, v in recipe.model_args.items() if k != "network"}
    linked = {"preprocessing": recipe.preprocessing, "class_names": [f"class_{i}" for i in range(recipe.num_classes)]}
    try:
        return cls(network=create_network(spec["class_path"], **init_args), **args, **linked)
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
