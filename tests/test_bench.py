"""`finegrain bench`: speed figures and their references, accuracy through fit + test, JSON, markdown and plots."""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from finegrain.bench.accuracy import Budget, seed_means, summarize
from finegrain.bench.plots import plot_reports, speedups
from finegrain.bench.recipes import BENCH_CONFIGS, BENCH_SETUP, build_task, load_recipe, merge, read_yaml
from finegrain.bench.report import command_line, render_markdown
from finegrain.bench.speed import Settings, phone_jpegs, run_speed
from finegrain.cli import main
from finegrain.data.cub import PART_NAMES
from finegrain.errors import FinegrainError

HAS_RACNN = importlib.util.find_spec("finegrain.tasks.racnn") is not None
METHODS = ["baseline", "cbam", "stn", "racnn", "zoom"]
TINY = {"backbone": "test_resnet", "weights": "none"}
FIGURE_KEYS = {"images_per_s", "peak_memory_mb"}


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_recipe(method: str, folder: Path) -> Path:
    """A bench recipe with test_resnet at 64 px, batch 4: the real recipe file (laid over the bench setup it is
    read after), only smaller."""
    config = merge(read_yaml(BENCH_SETUP), read_yaml(BENCH_CONFIGS / f"{method}.yaml"))
    model = config["model"].get("init_args", config["model"])
    model["network"]["init_args"].update(TINY)
    config["data"].update(img_size=64, batch_size=4)
    path = folder / f"{method}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def check_figure(figure: dict) -> None:
    assert set(figure) == {"finegrain", "reference", "ratio"}
    for side in ("finegrain", "reference"):
        assert set(figure[side]) == FIGURE_KEYS
        assert figure[side]["images_per_s"] > 0 and figure[side]["peak_memory_mb"] >= 0
    assert figure["ratio"] == pytest.approx(figure["finegrain"]["images_per_s"] / figure["reference"]["images_per_s"])


@pytest.mark.parametrize("method", ["cbam", "racnn", "zoom"])  # automatic, manual (RA-CNN), two views (zoom)
def test_speed_of_each_method_has_positive_figures_and_a_reference_ratio(method, tmp_path):
    if method == "racnn" and not HAS_RACNN:
        pytest.skip("finegrain.tasks.racnn is not there yet")
    report = run_speed([str(tiny_recipe(method, tmp_path))], Settings(steps=2, warmup=1), sections=("models",))
    (result,) = report["results"]
    assert result["backbone"] == "test_resnet" and result["img_size"] == 64 and result["batch_size"] == 4
    assert result["method"] == {"baseline": "baseline", "cbam": "baseline+cbam"}.get(method, method)
    for key in ("train", "infer_b1", "infer_b32"):
        check_figure(result[key])
    assert "data" not in report and "predictor" not in report


def test_speed_command_writes_the_json_schema_and_prints_the_table(tmp_path, capsys):
    out = tmp_path / "speed.json"
    args = ["bench", "speed", str(tiny_recipe("baseline", tmp_path)), "--steps", "1", "--warmup", "1",
            "--batch-size", "2", "--json", str(out)]  # fmt: skip
    assert main(args) == 0
    report = json.loads(out.read_text())
    assert {"kind", "schema", "command", "date", "machine", "settings", "memory", "results", "skipped", "data",
            "predictor"} <= set(report)  # fmt: skip
    assert report["kind"] == "speed" and report["schema"] == 1
    assert report["command"].startswith("finegrain bench speed ") and "--batch-size 2" in report["command"]
    assert {"cpu", "cpu_cores", "memory_gb", "gpu", "torch", "python"} <= set(report["machine"])
    assert report["settings"] == {"device": "cpu", "bf16": False, "channels_last": False, "compile": False,
                                  "batch_size": 2, "steps": 1, "warmup": 1}  # fmt: skip
    assert report["results"][0]["batch_size"] == 2
    data = report["data"]
    assert data["img_size"] == 64 and data["source_size"] == [500, 375] and data["rounds"] == 11
    check_figure(data["train_sample"])
    assert len(data["round_ratios"]) == 11 and data["train_sample"]["ratio"] == sorted(data["round_ratios"])[5]
    predictor = report["predictor"]
    assert predictor["checkpoint"] == "fresh test_resnet"
    check_figure(predictor["b1"])
    check_figure(predictor["b32"])
    phone = report["phone"]
    assert phone["source_size"] == [4032, 3024] and phone["photos"] == 8 and phone["decode_side"] >= phone["img_size"]
    agreement = {
        "same_top1",
        "same_top5",
        "same_top5_set",
        "same_top1_as_whole",
        "same_top5_as_whole",
        "whole_same_top5",
    }
    assert agreement <= set(phone) and phone["same_top5"] <= phone["same_top5_set"]
    check_figure(phone["b1"])
    runtime = phone["onnxruntime"]  # the Predictor on the exported graph: the same answers as on PyTorch
    assert runtime["same_top1"] == phone["same_top1"] and runtime["same_top5"] == phone["same_top5"]
    check_figure(runtime["b1"])
    onnx = report["onnx"]
    assert onnx["method"] == "Classifier" and onnx["images"] == 32 and onnx["same_top1"] == 32
    assert onnx["max_logit_difference"] < 1e-3 and onnx["max_box_difference"] == 0
    assert 0 <= onnx["max_score_difference"] < 1e-4
    check_figure(onnx["b1"])
    check_figure(onnx["b32"])
    out_text = capsys.readouterr().out
    assert "| baseline | baseline | test_resnet | 64 | 2 |" in out_text and f"wrote {out}" in out_text
    assert "Predictor on 4032×3024 JPEGs" in out_text and "ONNX Runtime on the exported graph" in out_text
    assert "| torch |" in out_text and "| onnxruntime |" in out_text


def test_phone_photos_are_12_megapixel_jpegs_made_from_the_given_photos(tmp_path):
    Image.new("RGB", (500, 375), (200, 10, 10)).save(tmp_path / "bird.jpg")
    (jpeg,) = phone_jpegs(1, [tmp_path / "bird.jpg"])
    with Image.open(io.BytesIO(jpeg)) as image:
        assert image.format == "JPEG" and image.size == (4032, 3024)
        assert image.getpixel((2000, 1500))[0] > 150


def test_bench_recipes_build_and_the_defaults_cover_every_method():
    for method in METHODS:
        recipe = load_recipe(method)
        assert recipe.path == BENCH_CONFIGS / f"{method}.yaml" and recipe.num_classes == 10
        assert recipe.preprocessing["img_size"] == 160 and recipe.batch_size == 16
        if method != "racnn" or HAS_RACNN:
            assert recipe.unavailable() is None
            model = recipe.config["model"]
            network = model.get("init_args", model)["network"]
            network["init_args"].update(TINY)  # the recipe's own network, on a tiny backbone
            task = build_task(recipe)
            assert task.num_classes == 10 and task.hparams.network["init_args"]["weights"] == "none"
            assert task.hparams.network["class_path"] == network["class_path"]
            assert {k: task.hparams.network["init_args"][k] for k in network["init_args"]} == network["init_args"]


def test_accuracy_trains_and_tests_each_recipe_under_one_budget(synth_root, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "accuracy.json"
    args = ["bench", "accuracy", "stn", "racnn", "--quick", "--data", str(synth_root), "--epochs", "1",
            "--img-size", "64", "--seeds", "3", "4", "--set", "model.network.init_args.backbone=test_resnet",
            "--set", "model.network.init_args.weights=none",
            "--set", "data.num_workers=0", "--set", "data.batch_size=8", "--set", "data.val_fraction=0.25",
            "--json", str(out)]  # fmt: skip
    assert main(args) == 0
    report = json.loads(out.read_text())
    assert report["kind"] == "accuracy" and report["budget"]["epochs"] == 1 and report["budget"]["seeds"] == [3, 4]
    names = ["stn", "racnn"] if HAS_RACNN else ["stn"]
    assert [(r["name"], r["seed"]) for r in report["results"]] == [(n, s) for n in names for s in (3, 4)]
    results = {r["name"]: r for r in report["results"] if r["seed"] == 3}
    for name, result in results.items():
        run = tmp_path / "checkpoints" / f"bench_{name}_s3"
        assert (run / "last.ckpt").is_file() and result["run"] == str(Path("checkpoints") / f"bench_{name}_s3")
        assert result["checkpoint"] == "last.ckpt"  # 12 validation images cannot rank epochs
        metrics = result["metrics"]
        assert 0 <= metrics["top1"] <= 1 and 0 <= metrics["mean_class"] <= 1 and result["fit_seconds"] > 0
        assert metrics["top1"] == result["logged"]["test/top1"]
        for scores in metrics["localization"].values():
            assert len(scores["centre_in_bird"]) == 2 and scores["best_part"]["part"] in PART_NAMES
    stn = results["stn"]["metrics"]
    assert set(stn["branches"]) == {"part1", "part2"} and set(stn["localization"]) == {"part1", "part2"}
    if HAS_RACNN:
        assert set(results["racnn"]["metrics"]["branches"]) == {"scale1", "scale2", "scale3"}
    else:
        assert report["skipped"][0]["recipe"].endswith("racnn.yaml")
    means = {m["name"]: m for m in report["means"]}
    stn_runs = [r["metrics"]["top1"] for r in report["results"] if r["name"] == "stn"]
    assert means["stn"]["top1_per_seed"] == stn_runs and means["stn"]["top1"] == pytest.approx(sum(stn_runs) / 2)
    assert means["stn"]["vs_baseline"] is None  # no baseline recipe ran
    out = capsys.readouterr().out
    assert "| stn | stn | 3 |" in out and "| stn | stn | 4 |" in out and "top-1 per seed" in out


def test_summarize_reads_the_logged_test_metrics():
    logged = {"test/top1": 0.5, "test/top5": 0.9, "test/mean_class": 0.45, "test/loss": 1.2, "val/top1": 0.7,
              "test/part1/top1": 0.3, "test/part1/top5": 0.8, "test/boxes/part1/side": 0.4,
              "test/loc/part1/centre_in_bird": 0.8, "test/loc/part1/centre_in_bird_chance": 0.2,
              "test/loc/part1/contains_bird_centre": 0.1, "test/loc/part1/contains_bird_centre_chance": 0.05,
              "test/loc/part1/contains_crown": 0.6, "test/loc/part1/contains_crown_chance": 0.1,
              "test/loc/part1/contains_left_eye": 0.7, "test/loc/part1/contains_left_eye_chance": 0.12}  # fmt: skip
    summary = summarize(logged)
    assert (summary["top1"], summary["top5"], summary["mean_class"]) == (0.5, 0.9, 0.45)
    assert summary["branches"] == {"part1": 0.3}
    part1 = summary["localization"]["part1"]
    assert part1["centre_in_bird"] == [0.8, 0.2] and part1["contains_bird_centre"] == [0.1, 0.05]
    assert part1["parts"] == {"crown": [0.6, 0.1], "left eye": [0.7, 0.12]}
    assert part1["best_part"] == {"part": "left eye", "rate": 0.7, "chance": 0.12}
    assert summarize({"test/top1": 0.25})["localization"] == {}


MACHINE = {"cpu": "Test CPU", "cpu_cores": 2, "memory_gb": 8.0, "gpu": None, "platform": "Linux", "python": "3.11.7",
           "torch": "2.14.1"}  # fmt: skip


def side(images_per_s: float, memory: float = 100.0) -> dict:
    return {"images_per_s": images_per_s, "peak_memory_mb": memory}


def speed_report() -> dict:
    figure = {"finegrain": side(12.34, 250.4), "reference": side(24.68, 200.0), "ratio": 0.5}
    return {"kind": "speed", "schema": 1, "command": "finegrain bench speed stn", "date": "2026-11-26T10:00:00+00:00",
            "machine": MACHINE, "memory": "RSS growth",
            "settings": {"device": "cpu", "bf16": True, "channels_last": False, "compile": False, "batch_size": None,
                         "steps": 5, "warmup": 2},
            "results": [{"recipe": "configs/bench/stn.yaml", "name": "stn", "method": "stn",
                         "backbone": "efficientnet_lite0", "img_size": 160, "batch_size": 16, "train": figure,
                         "infer_b1": figure, "infer_b32": {**figure, "ratio": 1.25}}],
            "skipped": [{"recipe": "configs/bench/racnn.yaml", "reason": "cannot be imported"}],
            "data": {"img_size": 160, "source_size": [500, 375], "jpeg_kb": 60.2, "rounds": 3,
                     "round_ratios": [1.6, 1.2, 1.5],
                     "train_sample": {"finegrain": side(150.0), "reference": side(100.0), "ratio": 1.5}},
            "predictor": {"checkpoint": "fresh test_resnet", "img_size": 224, "b1": figure, "b32": figure},
            "phone": {"checkpoint": "demo.ckpt", "img_size": 224, "source_size": [4032, 3024], "jpeg_kb": 845.0,
                      "decode_side": 224, "photos": 8, "same_top5": 4, "same_top5_set": 6, "same_top1": 7,
                      "same_top5_as_whole": 1, "same_top1_as_whole": 5, "whole_same_top5": 0,
                      "b1": {"finegrain": side(29.5), "reference": side(6.04), "ratio": 4.884},
                      "onnxruntime": {"same_top5": 4, "same_top1": 7,
                                      "b1": {"finegrain": side(61.0), "reference": side(6.1), "ratio": 10.0}}},
            "onnx": {"checkpoint": "demo.ckpt", "img_size": 224, "method": "Classifier", "threads": 2,
                     "max_logit_difference": 5.4e-6, "max_score_difference": 2.1e-7,
                     "max_box_difference": 0.0, "same_top1": 32, "images": 32,
                     "b1": {"finegrain": side(107.2), "reference": side(61.9), "ratio": 1.732},
                     "b32": {"finegrain": side(162.0), "reference": side(26.8), "ratio": 6.05}}}  # fmt: skip


def accuracy_report() -> dict:
    metrics = {"top1": 0.5, "top5": 0.9, "mean_class": 0.456, "branches": {"part1": 0.3},
               "localization": {"part1": {"parts": {}, "centre_in_bird": [0.8, 0.2],
                                          "best_part": {"part": "left eye", "rate": 0.7, "chance": 0.125}}},
               }  # fmt: skip
    return {"kind": "accuracy", "schema": 1, "command": "finegrain bench accuracy --quick", "date": "2026-11-26T10:00",
            "machine": MACHINE, "skipped": [],
            "budget": {"data": "recipe (synthetic)", "classes": None, "epochs": None, "img_size": 128, "seed": 0,
                       "quick": True, "overrides": []},
            "results": [{"name": "stn", "method": "stn", "fit_seconds": 61.6, "metrics": metrics}]}  # fmt: skip


def test_markdown_shows_command_machine_date_and_the_figures():
    speed = render_markdown(speed_report())
    machine = "2026-11-26, Test CPU (2 cores, 8.0 GB), no GPU, torch 2.14.1, Python 3.11.7"
    assert speed.startswith(f"`finegrain bench speed stn`\n\n{machine}\n")
    assert "Device cpu, bf16; 5 timed steps after 2 warm-up steps." in speed
    row = "| stn | stn | efficientnet_lite0 | 160 | 16 | 12.3 (×0.50) | 12.3 (×0.50) | 12.3 (×1.25) | 250 (200) |"
    assert row in speed
    assert "| torchvision transforms v2 (decode_jpeg, image only) | 100.0 |\n| ratio | ×1.50 |" in speed
    rounds = "to 160 px; 3 rounds, the sides taking turns, the round of median ratio shown (all rounds: ×1.20 ×1.50"
    assert rounds + " ×1.60)." in speed
    assert "Of 8 photos (the same five species as the reference, in any order, on 6)." in speed
    assert "| 1 | 12.3 | 24.7 | ×0.50 |" in speed  # the Predictor against the timm pipeline
    assert "| torch | 29.50 | 6.04 | ×4.88 | 7 / 4 | 5 / 1 |" in speed and "top-5 on 0:" in speed
    assert "| onnxruntime | 61.00 | 6.10 | ×10.00 | 7 / 4 | – |" in speed
    assert "| 1 | 107.2 | 61.9 | ×1.73 |\n| 32 | 162.0 | 26.8 | ×6.05 |" in speed
    assert (
        "Largest logit difference 5.4e-06, score (softmax) difference 2.1e-07, box difference 0.0e+00; same "
        "top-1 on 32 of 32 images."
    ) in speed
    assert "- skipped configs/bench/racnn.yaml: cannot be imported" in speed
    older = speed_report()
    del older["onnx"]["max_score_difference"]  # a report written before the scores were compared
    del older["phone"]["onnxruntime"]  # ... and before the phone row ran the exported graph
    assert "Largest logit difference 5.4e-06, box difference 0.0e+00; same top-1" in render_markdown(older)
    assert "| onnxruntime |" not in render_markdown(older)
    older["phone"]["onnxruntime"] = {"skipped": "onnxruntime not installed (pip install 'finegrain[onnx]')"}
    assert "ONNX Runtime: onnxruntime not installed (pip install 'finegrain[onnx]')." in render_markdown(older)

    accuracy = render_markdown(accuracy_report())
    assert "The same budget for every recipe: quick.yaml's epochs, 128 px input, seed 0." in accuracy
    row = ("| stn | stn | 0 | 50.0 % | part1 30.0 % | 45.6 % | 90.0 % | part1: centre in bird 80.0 % (20.0 %), "
           "left eye 70.0 % (12.5 %) | 62 |")  # fmt: skip
    assert row in accuracy


def test_seed_means_against_the_baseline_hand_computed():
    def run(name: str, method: str, seed: int, top1: float, whole: float | None = None) -> dict:
        branches = {} if whole is None else {"whole": whole}
        return {"name": name, "method": method, "seed": seed, "fit_seconds": 100.0 + seed, "checkpoint": "last.ckpt",
                "metrics": {"top1": top1, "top5": None, "mean_class": top1, "branches": branches,
                            "localization": {}}}  # fmt: skip

    results = [run("lite0", "baseline", 0, 0.70), run("lite0", "baseline", 1, 0.74),
               run("zoom", "zoom", 0, 0.75, 0.71), run("zoom", "zoom", 1, 0.78, 0.73)]  # fmt: skip
    means = seed_means(results)
    assert [m["name"] for m in means] == ["lite0", "zoom"]
    assert means[0]["top1"] == pytest.approx(0.72) and means[0]["vs_baseline"] == pytest.approx(0.0)
    assert means[1]["top1_per_seed"] == [0.75, 0.78] and means[1]["vs_baseline"] == pytest.approx(0.045)
    assert means[1]["branches"] == {"whole": pytest.approx(0.72)} and means[1]["fit_seconds"] == 100.5
    report = {**accuracy_report(), "results": results, "means": means}
    report["budget"] = {**report["budget"], "seeds": [0, 1]}
    text = render_markdown(report)
    assert "seeds 0, 1. Test split, last.ckpt tested" in text
    assert "| zoom | zoom | 75.0 %, 78.0 % | 76.5 % | +4.5 | whole 72.0 % | 76.5 % | 100 |" in text
    assert "| lite0 | baseline | 1 | 74.0 % |" in text


def test_markdown_and_plot_commands_read_the_json(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    paths = []
    for name, report in (("speed", speed_report()), ("accuracy", accuracy_report())):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(report))
    assert main(["bench", "markdown", *map(str, paths)]) == 0
    assert "`finegrain bench accuracy --quick`" in capsys.readouterr().out
    written = plot_reports(paths, tmp_path / "img")
    assert [p.name for p in written] == ["speed.png", "accuracy.png"]
    for path in written:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width > 300


def test_the_speedups_figure_puts_phone_and_onnx_ratios_of_several_reports_together(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    demo = {**speed_report(), "results": []}
    phone_only = {key: value for key, value in demo.items() if key != "onnx"}
    phone_only["phone"] = {**demo["phone"], "b1": {**demo["phone"]["b1"], "ratio": 3.01},
                           "onnxruntime": {"skipped": "onnxruntime not installed"}}  # fmt: skip
    assert speedups({"demo": demo, "racnn": phone_only}) == [
        ("12 MP JPEG → top-5, batch 1 · demo", 4.884, 3.0),
        ("12 MP JPEG → top-5, batch 1 · racnn", 3.01, 3.0),
        ("12 MP JPEG → top-5, batch 1, ONNX Runtime · demo", 10.0, 3.0),
        ("ONNX Runtime, batch 1 · demo", 1.732, 1.5),
        ("ONNX Runtime, batch 32 · demo", 6.05, 1.2),
    ]
    paths = []
    for name, report in (("demo", demo), ("racnn", phone_only), ("accuracy", accuracy_report())):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(report))
    assert main(["bench", "plot", *map(str, paths[:2]), "--out", str(tmp_path / "img"), "--speedups", "ups"]) == 0
    assert capsys.readouterr().out == f"wrote {tmp_path / 'img' / 'ups.png'}\n"
    with Image.open(tmp_path / "img" / "ups.png") as image:
        assert image.format == "PNG" and image.width > 300
    assert [p.name for p in plot_reports(paths[:1], tmp_path / "one")] == ["demo.png"]  # a report of sections alone
    assert main(["bench", "plot", str(paths[2]), "--speedups", "ups", "--out", str(tmp_path / "img")]) == 2
    assert "none of these reports has a phone or onnx section" in capsys.readouterr().err


def test_user_mistakes_are_clear_errors(tmp_path, capsys):
    assert main(["bench", "speed", str(tmp_path / "nowhere.yaml")]) == 2
    assert "recipe" in (err := capsys.readouterr().err) and "nowhere.yaml not found" in err and "stn" in err
    no_model = tmp_path / "data_only.yaml"
    no_model.write_text("data: {img_size: 64}\n")
    with pytest.raises(FinegrainError, match="has no model section"):
        load_recipe(no_model)
    with pytest.raises(FinegrainError, match="section.key=value"):
        Budget(overrides=["data.num_workers"]).arguments(0)
    assert main(["bench", "markdown", str(no_model)]) == 2
    assert "not JSON" in capsys.readouterr().err
    assert main(["bench", "speed", "baseline", "--checkpoint", str(tmp_path / "missing.ckpt")]) == 2
    assert "missing.ckpt not found" in capsys.readouterr().err


def test_budget_arguments_and_the_reproducing_command():
    budget = Budget(data="cub", classes="1-10", epochs=3, img_size=96, seeds=[1, 2], quick=True,
                    overrides=["data.num_workers=0"])  # fmt: skip
    assert budget.arguments(1) == [
        "--config", str(BENCH_CONFIGS / "quick.yaml"), "--seed_everything", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.max_epochs", "3", "--data.img_size", "96", "--data.root", "cub", "--data.synthesize", "null",
        "--data.classes", "1-10", "--data.num_workers=0",
    ]  # fmt: skip
    assert command_line("finegrain bench speed", ["stn"], {"bf16": True, "steps": 5, "only": ["data"], "json": None,
                                                           "compile": False}) == (
        "finegrain bench speed stn --bf16 --steps 5 --only data"
    )  # fmt: skip


def test_serve_bench_loads_a_live_server_and_compares_with_the_predictor(tmp_path, capsys):
    from tests.test_predict import photo, write_checkpoint

    checkpoint = write_checkpoint(tmp_path / "stn.ckpt")
    for i in range(3):
        Image.fromarray(photo(200, 150, seed=i)).save(tmp_path / f"bird{i}.jpg")
    report_path = tmp_path / "serve.json"
    assert main(["bench", "serve", "--checkpoint", str(checkpoint), "--images", str(tmp_path), "--clients", "3",
                 "--seconds", "2", "--json", str(report_path)]) == 0  # fmt: skip
    report = json.loads(report_path.read_text())
    assert report["kind"] == "serve" and report["photos"] == 3 and report["method"] == "STCNN"
    server = report["server"]
    assert server["requests"] > 0 and server["requests_per_s"] > 0 and 0 < server["p50_ms"] <= server["p95_ms"]
    assert 1 <= server["mean_batch"] <= 3
    assert report["direct_batched"]["batch_size"] == 3 and report["direct_single"]["batch_size"] == 1
    assert report["ratio"] == pytest.approx(server["requests_per_s"] / report["direct_batched"]["images_per_s"])
    out = capsys.readouterr().out
    assert "finegrain bench serve --checkpoint" in out and "finegrain serve, 3 concurrent clients" in out
    assert "finegrain serve" in render_markdown(json.loads(report_path.read_text()))
