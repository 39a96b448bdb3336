"""`finegrain export`: the package loads to identical outputs, and ONNX Runtime agrees with PyTorch, every method."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from finegrain.cli import main
from finegrain.errors import FinegrainError
from finegrain.models import NETWORKS
from finegrain.predict import FORMAT_VERSION, Predictor
from tests.test_predict import CLASS_NAMES, photo, write_checkpoint

ort = pytest.importorskip("onnxruntime")


@pytest.mark.parametrize("method", sorted(NETWORKS))
def test_package_and_onnx_match_the_checkpoint(method, tmp_path, capsys):
    checkpoint = write_checkpoint(tmp_path / f"{method}.ckpt", method=method)
    assert main(["export", str(checkpoint), str(tmp_path / "pkg"), "--onnx"]) == 0
    assert "model.onnx" in capsys.readouterr().out
    meta = json.loads((tmp_path / "pkg" / "finegrain.json").read_text())
    assert meta["format_version"] == FORMAT_VERSION and meta["method"] == method
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
