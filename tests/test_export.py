"""`finegrain export`: the package loads to identical outputs, and ONNX Runtime agrees with PyTorch, every method."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from finegrain.cli import main
from finegrain.errors import FinegrainError
from finegrain.models import NETWORKS
from finegrain.package import FORMAT_VERSION
from finegrain.predict import Predictor
from tests.test_predict import CLASS_NAMES, photo, write_checkpoint

ort = pytest.importorskip("onnxruntime")


# the package's own networks (tests register networks of their own, which take other arguments)
@pytest.mark.parametrize("method", sorted(path for path in NETWORKS if path.startswith("finegrain.")))
def test_package_and_onnx_match_the_checkpoint(method, tmp_path, capsys):
    checkpoint = write_checkpoint(tmp_path / f"{method}.ckpt", method=method)
    assert main(["export", str(checkpoint), str(tmp_path / "pkg"), "--onnx"]) == 0
    assert "model.onnx" in capsys.readouterr().out
    meta = json.loads((tmp_path / "pkg" / "finegrain.json").read_text())
    assert meta["format_version"] == FORMAT_VERSION and meta["network"]["class_path"] == method
    assert meta["network"]["init_args"] == torch.load(checkpoint, weights_only=True)["hyper_parameters"]["network"][
        "init_args"] | {"weights": "none"}  # fmt: skip
    assert meta["class_names"] == CLASS_NAMES and meta["preprocessing"]["img_size"] == 64

    original = Predictor.from_checkpoint(checkpoint, device="cpu")
    package = Predictor.from_checkpoint(tmp_path / "pkg", device="cpu")
    photos = [photo(90, 64, 0), photo(64, 100, 1), photo(128, 128, 2)]
    inputs = original.preprocess(photos)
    ours, theirs = original.forward(inputs), package.forward(inputs)
    torch.testing.assert_close(theirs.logits, ours.logits, rtol=0, atol=0)  # the same weights, bit for bit
    assert package.predict(photos) == original.predict(photos)

    session = ort.InferenceSession(str(tmp_path / "pkg" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == meta["onnx"]["outputs"]
    for batch in (inputs, inputs[:1]):  # the batch axis is dynamic
        reference = original.forward(batch)
        outputs = dict(zip(meta["onnx"]["outputs"], session.run(None, {"images": batch.numpy()}), strict=True))
        np.testing.assert_allclose(outputs["logits"], reference.logits.numpy(), atol=1e-4, rtol=0)
        assert (outputs["logits"].argmax(1) == reference.logits.argmax(1).numpy()).all()
        assert set(outputs) == {"logits", *(f"boxes.{name}" for name in reference.boxes)}
        for name, boxes in reference.boxes.items():
            np.testing.assert_allclose(outputs[f"boxes.{name}"], boxes.numpy(), atol=1e-4, rtol=0)

    # the Predictor on the exported graph: the same answers, boxes in photo pixels, no attention maps
    runtime = Predictor.from_checkpoint(tmp_path / "pkg", backend="onnxruntime")
    runtime_output = runtime.forward(inputs)
    torch.testing.assert_close(runtime_output.logits, original.forward(inputs).logits, atol=1e-4, rtol=0)
    for eager, onnx in zip(original.explain(photos), runtime.explain(photos), strict=True):
        assert [p["class_id"] for p in onnx.predictions] == [p["class_id"] for p in eager.predictions]
        assert [p["score"] for p in onnx.predictions] == pytest.approx([p["score"] for p in eager.predictions],
                                                                       abs=1e-4)  # fmt: skip
        assert onnx.boxes.keys() == eager.boxes.keys()
        for name, box in eager.boxes.items():
            assert onnx.boxes[name] == pytest.approx(box, abs=1e-2)
        assert onnx.attention_maps == {}


def test_the_onnxruntime_backend_names_what_it_needs(tmp_path, capsys):
    checkpoint = write_checkpoint(tmp_path / "m.ckpt", method="baseline", attention="none")
    with pytest.raises(FinegrainError, match="no `finegrain export` folder; run `finegrain export"):
        Predictor.from_checkpoint(checkpoint, backend="onnxruntime")
    assert main(["export", str(checkpoint), str(tmp_path / "plain")]) == 0
    with pytest.raises(FinegrainError, match="holds no ONNX graph; export it with --onnx"):
        Predictor.from_checkpoint(tmp_path / "plain", backend="onnxruntime")
    assert main(["export", str(checkpoint), str(tmp_path / "pkg"), "--onnx"]) == 0
    with pytest.raises(FinegrainError, match="runs on the CPU"):
        Predictor.from_checkpoint(tmp_path / "pkg", device="cuda", backend="onnxruntime")
    with pytest.raises(FinegrainError, match="backend 'tensorrt' is not one of torch, onnxruntime"):
        Predictor.from_checkpoint(tmp_path / "pkg", backend="tensorrt")
    (tmp_path / "pkg" / "model.onnx").write_bytes(b"not a graph")
    with pytest.raises(FinegrainError, match="does not load in ONNX Runtime"):
        Predictor.from_checkpoint(tmp_path / "pkg" / "model.onnx", backend="onnxruntime")
    assert main(["export", str(checkpoint), str(tmp_path / "pkg"), "--onnx"]) == 0
    image = tmp_path / "bird.png"
    Image.fromarray(photo(80, 60, 3)).save(image)
    capsys.readouterr()
    assert main(["predict", str(image), "--checkpoint", str(tmp_path / "pkg"), "--backend", "onnxruntime"]) == 0
    assert "bird.png" in capsys.readouterr().out


def test_package_without_onnx_and_its_errors(tmp_path):
    checkpoint = write_checkpoint(tmp_path / "m.ckpt", method="baseline", attention="none")
    assert main(["export", str(checkpoint), str(tmp_path / "pkg")]) == 0
    assert sorted(p.name for p in (tmp_path / "pkg").iterdir()) == ["finegrain.json", "model.safetensors"]

    meta_path = tmp_path / "pkg" / "finegrain.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "format_version": FORMAT_VERSION + 1}))
    with pytest.raises(FinegrainError, match="newer than this finegrain"):
        Predictor.from_checkpoint(tmp_path / "pkg")
    meta_path.write_text("{not json")
    with pytest.raises(FinegrainError, match="not a finegrain package config"):
        Predictor.from_checkpoint(tmp_path / "pkg")
    meta_path.write_text(json.dumps(meta))
    (tmp_path / "pkg" / "model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(FinegrainError, match="model.safetensors is not a safetensors file"):
        Predictor.from_checkpoint(tmp_path / "pkg")


def test_export_errors_exit_2(tmp_path, capsys):
    assert main(["export", str(tmp_path / "none.ckpt"), str(tmp_path / "out")]) == 2
    assert "none.ckpt not found" in capsys.readouterr().err
    checkpoint = write_checkpoint(tmp_path / "m.ckpt", method="baseline", attention="none")
    (tmp_path / "file").write_text("")
    assert main(["export", str(checkpoint), str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err


def test_export_replaces_a_package_whole(tmp_path):
    checkpoint = write_checkpoint(tmp_path / "m.ckpt", method="baseline", attention="none")
    assert main(["export", str(checkpoint), str(tmp_path / "pkg"), "--onnx"]) == 0
    assert (tmp_path / "pkg" / "model.onnx").is_file()
    assert main(["export", str(checkpoint), str(tmp_path / "pkg")]) == 0
    # no stale model.onnx of the earlier export beside the new weights, no temporary folders left
    assert sorted(p.name for p in (tmp_path / "pkg").iterdir()) == ["finegrain.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.ckpt", "pkg"]


def test_export_refuses_what_is_not_a_package_folder(tmp_path, capsys):
    checkpoint = write_checkpoint(tmp_path / "m.ckpt", method="baseline", attention="none")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("my notes")
    assert main(["export", str(checkpoint), str(tmp_path / "mine")]) == 2
    assert "is a non-empty folder without finegrain.json, not a finegrain package" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]
    (tmp_path / "file").write_text("")
    assert main(["export", str(checkpoint), str(tmp_path / "file" / "pkg")]) == 2
    assert "lies under a file" in capsys.readouterr().err
    # a folder nobody may write to (for root, who may write anywhere else, sysfs)
    if os.geteuid() == 0:
        locked = Path("/sys/finegrain-package")
    else:
        (tmp_path / "locked").mkdir(mode=0o555)
        locked = tmp_path / "locked" / "pkg"
    assert main(["export", str(checkpoint), str(locked)]) == 2
    assert f"cannot write the package to {locked}" in capsys.readouterr().err


def test_export_onnx_keeps_the_exporter_chatter_off_the_terminal(tmp_path, caplog):
    checkpoint = write_checkpoint(tmp_path / "m.ckpt", method="baseline", attention="none")
    caplog.set_level(logging.INFO)
    assert main(["export", str(checkpoint), str(tmp_path / "pkg"), "--onnx"]) == 0
    chatter = [r.getMessage() for r in caplog.records if r.name.startswith(("onnx", "torch.onnx"))]
    assert chatter == []


def test_sigterm_during_the_onnx_step_leaves_the_earlier_package(tmp_path):
    checkpoint = write_checkpoint(tmp_path / "m.ckpt", method="racnn", attention="none")
    package = tmp_path / "pkg"
    assert main(["export", str(checkpoint), str(package)]) == 0
    before = {p.name: p.read_bytes() for p in package.iterdir()}
    process = subprocess.Popen([sys.executable, "-m", "finegrain.cli", "export", str(checkpoint), str(package),
                                "--onnx"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".pkg.partial-*/model.safetensors")):  # the weights are written: ONNX is next
        assert process.poll() is None and time.monotonic() < deadline, "the export ended before it could be stopped"
        time.sleep(0.05)
    time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 128 + signal.SIGTERM
    assert {p.name: p.read_bytes() for p in package.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.ckpt", "pkg"]
