"""PNG figures of benchmark reports for the results page: accuracy per method, speed per method."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from finegrain.bench.report import read_json
from finegrain.errors import FinegrainError


def _bars(axes, names: list[str], series: dict[str, list[float]], ylabel: str, title: str) -> None:
    width = 0.8 / len(series)
    x = np.arange(len(names))
    for i, (label, values) in enumerate(series.items()):
        axes.bar(x + (i - (len(series) - 1) / 2) * width, values, width, label=label)
    axes.set_xticks(x, names, rotation=20, ha="right")
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.legend(fontsize="small")


def _figure(panels: int):
    try:
        from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state
    except ImportError:
        raise FinegrainError("finegrain bench plot needs matplotlib: pip install 'finegrain[bench]'") from None

    figure = Figure(figsize=(5 * panels, 4), layout="constrained")
    return figure, figure.subplots(1, panels, squeeze=False)[0]


def plot_accuracy(report: dict, path: Path) -> None:
    # one bar per recipe: the mean over seeds where several ran, else the one run
    several = len({r.get("seed") for r in report["results"]}) > 1 and report.get("means")
    rows = report["means"] if several else [{"name": r["name"], **r["metrics"]} for r in report["results"]]
    names = [r["name"] for r in rows]
    figure, (axes,) = _figure(1)
    percent = {"top-1": [100 * (r["top1"] or 0) for r in rows],
               "mean per-class": [100 * (r["mean_class"] or 0) for r in rows]}  # fmt: skip
    title = "Accuracy per method" + (f" (mean of {len(report['budget']['seeds'])} seeds)" if several else "")
    _bars(axes, names, percent, "test accuracy (%)", title)
    figure.savefig(path, dpi=120)


def plot_speed(report: dict, path: Path) -> None:
    results = report["results"]
    names = [r["name"] for r in results]
    keys = {"train": "training", "infer_b1": "inference, batch 1", "infer_b32": "inference, batch 32"}
    figure, panels = _figure(len(keys))
    for axes, (key, title) in zip(panels, keys.items(), strict=True):
        series = {label: [r[key][side]["images_per_s"] for r in results]
                  for side, label in (("finegrain", "finegrain"), ("reference", "plain PyTorch/timm"))}  # fmt: skip
        _bars(axes, names, series, "images / s", f"{title} ({report['settings']['device']})")
    figure.savefig(path, dpi=120)


def plot_reports(paths: list[Path], out: Path) -> list[Path]:
    """One PNG per report, named after its JSON file, in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in paths:
        report = read_json(path)
        if not report["results"]:
            raise FinegrainError(f"{path} has no results to plot; rerun the benchmark with at least one recipe")
        target = out / f"{Path(path).stem}.png"
        (plot_speed if report["kind"] == "speed" else plot_accuracy)(report, target)
        written.append(target)
    return written
