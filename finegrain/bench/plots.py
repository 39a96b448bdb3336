"""PNG figures of benchmark reports for the results page: accuracy per method, speed per method, and the speed-ups
of the Predictor on phone photos and of ONNX Runtime across reports."""

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


def _figure(panels: int, size: tuple[float, float] | None = None):
    try:
        from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state
    except ImportError:
        raise FinegrainError("finegrain bench plot needs matplotlib: pip install 'finegrain[bench]'") from None

    figure = Figure(figsize=size or (5 * panels, 4), layout="constrained")
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


# the figures of a speed report that compare one pipeline against its reference: their keys in the report ->
# label, and the speed-up finegrain aims at there (docs/benchmarks.md, "Phone photos and ONNX Runtime")
SPEEDUP_SECTIONS = {("phone", "b1"): ("12 MP JPEG → top-5, batch 1", 3.0),
                    ("phone", "onnxruntime", "b1"): ("12 MP JPEG → top-5, batch 1, ONNX Runtime", 3.0),
                    ("onnx", "b1"): ("ONNX Runtime, batch 1", 1.5),
                    ("onnx", "b32"): ("ONNX Runtime, batch 32", 1.2)}  # fmt: skip


def speedups(reports: dict[str, dict]) -> list[tuple[str, float, float]]:
    """(label, ratio finegrain / reference, aim) of every such figure each report holds, figure by figure, the
    reports in their order; the label is "<figure label> · <report name>"."""
    return [(f"{label} · {name}", fig["ratio"], aim)
            for keys, (label, aim) in SPEEDUP_SECTIONS.items()
            for name, report in reports.items() if (fig := _dig(report, keys))]  # fmt: skip


def _dig(report: dict, keys: tuple[str, ...]) -> dict | None:
    """report[k1][k2]...; None where a key is missing (older reports, a skipped measurement)."""
    for key in keys:
        report = report.get(key) if isinstance(report, dict) else None
    return report


def plot_speedups(reports: dict[str, dict], path: Path) -> None:
    """A horizontal bar per report and section: how many times faster finegrain's path is than the reference's,
    with the aim marked."""
    rows = speedups(reports)
    if not rows:
        raise FinegrainError("none of these reports has a phone or onnx section; run `finegrain bench speed --only "
                             "phone onnx --checkpoint CKPT --json FILE` first")  # fmt: skip
    figure, (axes,) = _figure(1, size=(8, 1.2 + 0.35 * len(rows)))
    y = np.arange(len(rows))[::-1]
    axes.barh(y, [ratio for _, ratio, _ in rows], color="tab:blue", label="finegrain / reference")
    axes.scatter([aim for _, _, aim in rows], y, marker="|", s=300, color="tab:red", label="aim", zorder=3)
    axes.axvline(1.0, color="grey", linewidth=0.8, linestyle="--")
    axes.set_yticks(y, [label for label, _, _ in rows], fontsize="small")
    axes.set_xlabel("× the hand-written pipeline (images / s, CPU)")
    axes.set_title("Speed-ups over the hand-written pipeline")
    axes.set_xlim(0, 1.3 * max(max(ratio, aim) for _, ratio, aim in rows))
    axes.legend(fontsize="small", loc="lower right")
    figure.savefig(path, dpi=120)


def plot_reports(paths: list[Path], out: Path, speedups_name: str | None = None) -> list[Path]:
    """One PNG per report, named after its JSON file, in `out` (a speed report of phone and ONNX sections alone gets
    the speed-ups figure); with `speedups_name`, those sections of all the reports go into one figure of that name
    instead, a bar per report and section."""
    out.mkdir(parents=True, exist_ok=True)
    if speedups_name:
        target = out / f"{Path(speedups_name).stem}.png"
        plot_speedups({Path(path).stem: read_json(path) for path in paths}, target)
        return [target]
    written = []
    for path in paths:
        report = read_json(path)
        target = out / f"{Path(path).stem}.png"
        if not report["results"] and any(section in report for section, _ in SPEEDUP_SECTIONS):
            plot_speedups({Path(path).stem: report}, target)
        elif not report["results"]:
            raise FinegrainError(f"{path} has no results to plot; rerun the benchmark with at least one recipe")
        else:
            (plot_speed if report["kind"] == "speed" else plot_accuracy)(report, target)
        written.append(target)
    return written
