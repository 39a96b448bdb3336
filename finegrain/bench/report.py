"""Benchmark reports: the JSON written to disk (with machine, date and command) and its markdown tables, which are
both what the screen shows and what docs/benchmarks.md pastes."""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path

import torch

from finegrain.errors import FinegrainError

SCHEMA_VERSION = 1
# how the tables name LocalizationScore's bird-box scores
LOCALIZATION_LABELS = {"centre_in_bird": "centre in bird", "contains_bird_centre": "holds bird centre",
                       "holds_region": "holds a keypoint of its region"}  # fmt: skip


def machine_info() -> dict:
    """What the figures depend on: processor, cores this process may use, memory, GPU, library versions."""
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").is_file():
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]  # fmt: skip
        cpu = names[0] if names else cpu
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    return {
        "cpu": cpu,
        "cpu_cores": cores,
        "memory_gb": round(memory / 2**30, 1),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def new_report(kind: str, command: str, **fields) -> dict:
    return {"kind": kind, "schema": SCHEMA_VERSION, "command": command,
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "machine": machine_info(), **fields}  # fmt: skip


def figure(mine: dict, reference: dict) -> dict:
    """finegrain's measurement, the reference's, and the throughput ratio (> 1: finegrain is faster)."""
    return {"finegrain": mine, "reference": reference, "ratio": mine["images_per_s"] / reference["images_per_s"]}


def command_line(prog: str, positional: list[str], options: dict) -> str:
    """The command that reproduces a run: flags for every option that is set (True flags bare)."""
    words = [prog, *positional]
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            words.append(flag)
        elif isinstance(value, list | tuple):
            words += [flag, *map(str, value)]
        elif value not in (None, False):
            words += [flag, str(value)]
    return " ".join(words)


def write_json(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


def read_json(path: str | Path) -> dict:
    path = Path(path)
    try:
        report = json.loads(path.read_text())
    except FileNotFoundError:
        raise FinegrainError(f"benchmark report {path} not found; write one with finegrain bench ... --json") from None
    except json.JSONDecodeError as e:
        raise FinegrainError(f"{path} is not JSON ({e}); pass a file written by finegrain bench --json") from None
    if not isinstance(report, dict) or report.get("kind") not in ("speed", "accuracy", "serve"):
        raise FinegrainError(f"{path} is not a finegrain benchmark report; pass a file written by finegrain bench")
    return report


def _batch_rows(section: dict) -> list[list[str]]:
    """Rows of batch size, finegrain's images/s, the reference's and their ratio, for batches 1 and 32."""
    return [[str(n), f"{section[f'b{n}']['finegrain']['images_per_s']:.1f}",
             f"{section[f'b{n}']['reference']['images_per_s']:.1f}", f"×{section[f'b{n}']['ratio']:.2f}"]
            for n in (1, 32)]  # fmt: skip


def _phone_rows(phone: dict) -> list[list[str]]:
    """The phone table's rows: the Predictor on PyTorch, then on the exported graph where it was measured."""
    rows = []
    for backend, part in (("torch", phone), ("onnxruntime", phone.get("onnxruntime", {}))):
        if "b1" in part:
            fig, agree = part["b1"], f"{part.get('same_top1', '–')} / {part['same_top5']}"
            whole = (f"{phone.get('same_top1_as_whole', '–')} / {phone.get('same_top5_as_whole', '–')}"
                     if backend == "torch" else "–")  # fmt: skip
            rows.append([backend, f"{fig['finegrain']['images_per_s']:.2f}",
                         f"{fig['reference']['images_per_s']:.2f}", f"×{fig['ratio']:.2f}", agree, whole])  # fmt: skip
    return rows


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f} %"


def _rate(fig: dict) -> str:
    return f"{fig['finegrain']['images_per_s']:.1f} (×{fig['ratio']:.2f})"


def _machine_line(report: dict) -> str:
    m = report["machine"]
    gpu = m["gpu"] or "no GPU"
    return (f"{report['date'][:10]}, {m['cpu']} ({m['cpu_cores']} cores, {m['memory_gb']} GB), {gpu}, "
            f"torch {m['torch']}, Python {m['python']}")  # fmt: skip


def render_markdown(report: dict) -> str:
    """A report as markdown: command, machine and date, then its tables."""
    lines = [f"`{report['command']}`", "", _machine_line(report), ""]
    if report["kind"] == "speed":
        lines += _speed_tables(report)
    elif report["kind"] == "serve":
        lines += _serve_table(report)
    else:
        lines += _accuracy_tables(report)
    lines += [f"- skipped {s['recipe']}: {s['reason']}" for s in report.get("skipped", [])]
    return "\n".join(lines).rstrip() + "\n"


def _speed_tables(report: dict) -> list[str]:
    settings = report["settings"]
    mode = ", ".join(k for k in ("bf16", "channels_last", "compile") if settings[k]) or "fp32"
    lines = [f"Device {settings['device']}, {mode}; {settings['steps']} timed steps after {settings['warmup']} "
             f"warm-up steps. Images/s, and in brackets the ratio to the plain PyTorch/timm reference on the same "
             f"backbone and input. Peak memory: {report['memory']}.", ""]  # fmt: skip
    rows = [[r["name"], r["method"], r["backbone"], str(r["img_size"]), str(r["batch_size"]), _rate(r["train"]),
             _rate(r["infer_b1"]), _rate(r["infer_b32"]),
             f"{r['train']['finegrain']['peak_memory_mb']:.0f} ({r['train']['reference']['peak_memory_mb']:.0f})"]
            for r in report["results"]]  # fmt: skip
    if rows:
        header = ["recipe", "method", "backbone", "px", "batch", "train img/s", "infer b1 img/s", "infer b32 img/s",
                  "train peak MB (ref)"]  # fmt: skip
        lines += [_table(header, rows), ""]
    if "data" in report:
        data, fig = report["data"], report["data"]["train_sample"]
        lines += [f"Data pipeline, one worker (one core): decode a {data['source_size'][0]}×{data['source_size'][1]} "
                  f"JPEG ({data['jpeg_kb']:.0f} kB) + train augmentation to {data['img_size']} px"
                  + (f"; {data['rounds']} rounds, the sides taking turns, the round of median ratio shown (all "
                     f"rounds: {' '.join(f'×{r:.2f}' for r in sorted(data['round_ratios']))})." if "rounds" in data
                     else "."), "",
                  _table(["pipeline", "images/s per worker"],
                         [["finegrain (load_rgb + albumentations, box and 15 parts carried)",
                           f"{fig['finegrain']['images_per_s']:.1f}"],
                          ["torchvision transforms v2 (decode_jpeg, image only)",
                           f"{fig['reference']['images_per_s']:.1f}"],
                          ["ratio", f"×{fig['ratio']:.2f}"]]), ""]  # fmt: skip
    predictor = report.get("predictor")
    if predictor:
        lines += [f"Predictor, JPEG bytes to top-5 ({predictor['checkpoint']}, {predictor['img_size']} px): "
                  "images/s.", "", _table(["batch", "Predictor", "timm reference", "ratio"], _batch_rows(predictor)),
                  ""]  # fmt: skip
    phone = report.get("phone")
    if phone:
        width, height = phone["source_size"]
        lines += [f"Predictor on {width}×{height} JPEGs ({phone['jpeg_kb']:.0f} kB, {phone['photos']} photos; "
                  f"{phone['checkpoint']}, {phone['img_size']} px), batch 1: images/s. The Predictor decodes a "
                  f"JPEG at the smallest DCT scale that keeps {phone['decode_side']} px on the shorter side; the "
                  "reference decodes it whole, then resizes.", "",
                  _table(["Predictor backend", "Predictor", "PIL + timm reference", "ratio",
                          "same top-1 / top-5 as the reference",
                          "same top-1 / top-5 as the Predictor on the whole decode"], _phone_rows(phone)),
                  "", f"Of {phone['photos']} photos"
                  + (f" (the same five species as the reference, in any order, on {phone['same_top5_set']})"
                     if "same_top5_set" in phone else "")  # reports before it was measured
                  + ". The Predictor on the whole decode has the reference's top-5 on "
                  f"{phone.get('whole_same_top5', '–')}: the rest of the difference is the resize filters "
                  "(OpenCV's, without antialiasing, in the training pipeline; PIL's antialiased one in the "
                  "reference)."
                  + (f" ONNX Runtime: {runtime['skipped']}." if "skipped" in (runtime := phone.get("onnxruntime", {}))
                     else ""),
                  ""]  # fmt: skip
    onnx = report.get("onnx")
    if onnx:
        lines += [f"ONNX Runtime on the exported graph against PyTorch eager, the network alone on preprocessed "
                  f"inputs ({onnx['method']}, {onnx['checkpoint']}, {onnx['img_size']} px, {onnx['threads']} "
                  f"threads each): images/s. Largest logit difference {onnx['max_logit_difference']:.1e}, "
                  + (f"score (softmax) difference {onnx['max_score_difference']:.1e}, "
                     if "max_score_difference" in onnx else "")  # reports before it was measured
                  + f"box difference {onnx['max_box_difference']:.1e}; same top-1 on {onnx['same_top1']} of "
                  f"{onnx['images']} images.", "",
                  _table(["batch", "ONNX Runtime", "PyTorch eager", "ratio"], _batch_rows(onnx)), ""]  # fmt: skip
    return lines


def _serve_table(report: dict) -> list[str]:
    settings, server = report["settings"], report["server"]
    batched, single = report["direct_batched"], report["direct_single"]
    lines = [f"{report['method']} ({report['checkpoint']}), {report['photos']} photos of {report['photo_kb']:.0f} kB "
             f"on average, top-{settings['top_k']}; {settings['clients']} clients on the same machine, "
             f"{settings['seconds']:g} s timed after {settings['warmup_seconds']:g} s of warm-up; "
             f"torch threads {report['torch_threads']}.", ""]  # fmt: skip
    rows = [[f"finegrain serve, {settings['clients']} concurrent clients (mean batch {server['mean_batch']:.1f})",
             f"{server['requests_per_s']:.1f}", f"{server['p50_ms']:.0f}", f"{server['p95_ms']:.0f}"],
            [f"Predictor.predict directly, batches of {batched['batch_size']}", f"{batched['images_per_s']:.1f}",
             f"{batched['p50_ms']:.0f} (batch)", f"{batched['p95_ms']:.0f} (batch)"],
            ["Predictor.predict directly, one photo at a time", f"{single['images_per_s']:.1f}",
             f"{single['p50_ms']:.0f}", f"{single['p95_ms']:.0f}"]]  # fmt: skip
    ratio = f"Server against direct batched prediction: ×{report['ratio']:.2f}."
    return [*lines, _table(["", "photos/s", "p50 ms", "p95 ms"], rows), "", ratio, ""]


def _accuracy_tables(report: dict) -> list[str]:
    budget = report["budget"]
    unset = "quick.yaml's" if budget["quick"] else "each recipe's"
    classes = f", classes {budget['classes']}" if budget["classes"] else ""
    seeds = budget.get("seeds", [budget.get("seed", 0)])  # reports before 2026-12-02 ran one seed
    checkpoints = sorted({r.get("checkpoint", "best.ckpt") for r in report["results"]})
    lines = [f"Data: {budget['data']}{classes}. The same budget for every recipe: {budget['epochs'] or unset} "
             f"epochs, {budget['img_size'] or unset} px input, seed{'s' if len(seeds) > 1 else ''} "
             f"{', '.join(map(str, seeds))}"
             f"{', overrides ' + ' '.join(budget['overrides']) if budget['overrides'] else ''}. "
             f"Test split, {' / '.join(checkpoints) or 'no'} tested; chance levels in brackets.", ""]  # fmt: skip
    if len(seeds) > 1 and report.get("means"):
        rows = [[m["name"], m["method"], ", ".join(_pct(v) for v in m["top1_per_seed"]), _pct(m["top1"]),
                 "–" if m["vs_baseline"] is None else f"{100 * m['vs_baseline']:+.1f}",
                 ", ".join(f"{name} {_pct(v)}" for name, v in m["branches"].items()) or "–", _pct(m["mean_class"]),
                 f"{m['fit_seconds']:.0f}"] for m in report["means"]]  # fmt: skip
        header = ["recipe", "method", "top-1 per seed", "mean top-1", "vs baseline (points)", "mean per branch",
                  "mean per-class", "mean fit s"]  # fmt: skip
        lines += [_table(header, rows), "", "Each run:", ""]
    rows = []
    for r in report["results"]:
        m = r["metrics"]
        branches = ", ".join(f"{name} {_pct(v)}" for name, v in m["branches"].items()) or "–"
        loc = []
        for box, scores in m["localization"].items():
            figures = [f"{label} {_pct(scores[key][0])} ({_pct(scores[key][1])})"
                       for key, label in LOCALIZATION_LABELS.items() if key in scores]  # fmt: skip
            if "best_part" in scores:
                best = scores["best_part"]
                figures.append(f"{best['part']} {_pct(best['rate'])} ({_pct(best['chance'])})")
            loc.append(f"{box}: {', '.join(figures)}")
        rows.append([r["name"], r["method"], str(r.get("seed", seeds[0])), _pct(m["top1"]), branches,
                     _pct(m["mean_class"]), _pct(m.get("top5")),
                     "<br>".join(loc) or "–", f"{r['fit_seconds']:.0f}"])  # fmt: skip
    header = ["recipe", "method", "seed", "top-1", "top-1 per branch", "mean per-class", "top-5",
              "localisation per box (chance): " + ", ".join(LOCALIZATION_LABELS.values())
              + ", the CUB part it holds most often", "fit s"]  # fmt: skip
    return [*lines, _table(header, rows), ""]
