"""`finegrain serve`: the JSON API through FastAPI's test client, the request batcher, the upload parser and the CLI."""

from __future__ import annotations

import asyncio
import io
import socket
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from finegrain.cli import main
from finegrain.errors import FinegrainError
from finegrain.predict import Predictor
from finegrain.serve.app import (
    ServeSettings,
    app_from_environment,
    create_app,
    load_predictor,
    settings_to_environment,
)
from finegrain.serve.batching import MicroBatcher
from finegrain.serve.server import check_port_free
from finegrain.serve.uploads import UploadError, extract_upload
from tests.test_predict import photo, same_predictions, write_checkpoint


def jpeg(array: np.ndarray, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height: what a decompression bomb looks like before decoding."""
    data = bytearray(_png(np.zeros((4, 4, 3), np.uint8)))
    ihdr = 8 + 8  # signature, then the IHDR chunk's length and type
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[12 : ihdr + 13])))
    return bytes(data)


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("serve") / "racnn.ckpt", method="racnn", attention="cbam")


@pytest.fixture(scope="module")
def predictor(checkpoint) -> Predictor:
    return Predictor.from_checkpoint(checkpoint, device="cpu")


@pytest.fixture(scope="module")
def client(predictor, checkpoint):
    settings = ServeSettings(checkpoint=str(checkpoint), max_batch_size=4, max_upload_bytes=200_000)
    with TestClient(create_app(predictor, settings)) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    return [jpeg(photo(160 + 20 * i, 120 + 10 * i, seed=i)) for i in range(6)]


def test_predict_matches_predictor_on_the_same_photo(client, predictor, photos):
    response = client.post("/predict?top_k=3", files={"file": ("bird.jpg", photos[0], "image/jpeg")})
    assert response.status_code == 200, response.text
    body = response.json()
    assert same_predictions(body["predictions"], predictor.predict(photos[0], top_k=3))
    assert [p["label"] for p in body["predictions"]] == [p["label"] for p in predictor.predict(photos[0], top_k=3)]
    explanation = predictor.explain(photos[0])
    assert body["image"] == {"width": 160, "height": 120}
    assert set(body["boxes"]) == {"scale2", "scale3"}
    for name, box in body["boxes"].items():
        np.testing.assert_allclose(box, explanation.boxes[name], atol=1e-3)
    np.testing.assert_allclose(body["input_box"], explanation.input_box, atol=1e-6)
    # every CBAM map of the RA-CNN, each placed on the region of the photo its branch saw
    assert set(body["attention_maps"]) == set(explanation.attention_maps)
    for name, entry in body["attention_maps"].items():
        values = np.array(entry["values"])
        assert values.shape == (entry["height"], entry["width"]) == explanation.attention_maps[name].shape
        np.testing.assert_allclose(values, explanation.attention_maps[name], atol=5e-4)
        branch = name.split(".")[0]
        expected = body["boxes"].get(branch, body["input_box"])
        assert entry["region"] == expected
    assert "preview" not in body


def test_raw_image_bytes_and_octet_stream_answer_like_multipart(client, photos):
    form = client.post("/predict", files={"file": ("a.jpg", photos[1], "image/jpeg")}).json()
    for content_type in ("image/jpeg", "application/octet-stream"):
        raw = client.post("/predict", content=photos[1], headers={"content-type": content_type})
        assert raw.status_code == 200, raw.text
        assert raw.json() == form


def test_preview_is_the_upright_photo_as_a_jpeg_data_url(client):
    array = photo(90, 60, seed=3)
    image = Image.fromarray(array)
    exif = image.getexif()
    exif[0x0112] = 6  # stored sideways: shown turned 90 degrees clockwise
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    body = client.post("/predict?preview=true", content=buffer.getvalue(), headers={"content-type": "image/jpeg"})
    body = body.json()
    assert body["image"] == {"width": 60, "height": 90}
    assert body["preview"].startswith("data:image/jpeg;base64,")
    import base64

    preview = Image.open(io.BytesIO(base64.b64decode(body["preview"].split(",", 1)[1])))
    assert preview.size == (60, 90)


@pytest.mark.parametrize(
    ("upload", "status", "words"),
    [
        (("notes.txt", b"this is a shopping list, not a bird", "image/jpeg"), 415, "not an image"),
        (("bird.jpg", b"", "image/jpeg"), 400, "empty upload"),
        (("bird.pdf", b"%PDF-1.4 whatever", "application/pdf"), 415, "unsupported type 'application/pdf'"),
        (("bomb.png", "bomb", "image/png"), 413, "decompression bomb"),
        (("truncated.jpg", "truncated", "image/jpeg"), 400, "truncated"),
        (("big.jpg", b"\xff" * 300_000, "image/jpeg"), 413, "over the limit of 200,000 bytes"),
        (("line.png", "line", "image/png"), 413, "no photograph"),
    ],
)
def test_bad_uploads_get_one_line_json_errors_and_the_server_keeps_serving(client, photos, upload, status, words):
    name, data, content_type = upload
    data = {"bomb": png_claiming(30_000, 30_000), "truncated": photos[0][: len(photos[0]) // 2],
            "line": _png(np.zeros((1, 400, 3), np.uint8))}.get(data, data)  # fmt: skip
    response = client.post("/predict", files={"file": (name, data, content_type)})
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and words in detail
    assert client.post("/predict", files={"file": ("ok.jpg", photos[0], "image/jpeg")}).status_code == 200


def test_refused_requests_name_the_problem(client, photos):
    cases = [
        (dict(content=b"hello", headers={"content-type": "text/plain"}), 415, "unsupported content type 'text/plain'"),
        (dict(content=b"", headers={"content-type": "image/jpeg"}), 400, "empty upload"),
        (dict(files=[("a", ("a.jpg", photos[0], "image/jpeg")), ("b", ("b.jpg", photos[1], "image/jpeg"))]), 400,
         "2 files"),
        (dict(content=b'--B\r\nContent-Disposition: form-data; name="note"\r\n\r\nno file\r\n--B--\r\n',
              headers={"content-type": "multipart/form-data; boundary=B"}), 400, "0 files"),
        (dict(content=b"--x\r\nbroken", headers={"content-type": "multipart/form-data"}), 400, "boundary"),
    ]  # fmt: skip
    for request, status, words in cases:
        response = client.post("/predict", **request)
        assert response.status_code == status, (words, response.text)
        assert words in response.json()["detail"]
    for query, words in (("top_k=0", "top_k"), ("top_k=lots", "top_k")):
        response = client.post(f"/predict?{query}", files={"file": ("a.jpg", photos[0], "image/jpeg")})
        assert response.status_code == 422 and words in response.json()["detail"]


def test_a_declared_size_over_the_limit_is_refused_before_the_body_is_read(client):
    response = client.post("/predict", content=b"x" * 10, headers={"content-type": "image/jpeg",
                                                                  "content-length": "999999999"})  # fmt: skip
    assert response.status_code == 413 and "999,999,999 bytes" in response.json()["detail"]


def test_requests_at_once_get_the_answers_of_one_at_a_time(client, photos):
    one_at_a_time = [client.post("/predict", content=p, headers={"content-type": "image/jpeg"}).json() for p in photos]
    before = client.get("/health").json()
    with ThreadPoolExecutor(12) as pool:
        at_once = list(pool.map(lambda p: client.post("/predict", content=p, headers={"content-type": "image/jpeg"}),
                                photos * 2))  # fmt: skip
    assert all(r.status_code == 200 for r in at_once)
    for expected, response in zip(one_at_a_time * 2, at_once, strict=True):
        got = response.json()
        assert same_predictions(got["predictions"], expected["predictions"], tol=1e-4)
        for name, box in expected["boxes"].items():
            np.testing.assert_allclose(got["boxes"][name], box, atol=1e-2)
    health = client.get("/health").json()
    # every request ran exactly once, and the queue is empty again
    assert health["status"] == "ok" and health["images"] - before["images"] == len(photos) * 2
    assert health["queued"] == 0


def test_model_health_and_openapi(client, predictor, checkpoint):
    model = client.get("/model").json()
    assert model["method"] == "RACNN" and model["classes"] == len(predictor.class_names)
    assert model["class_names"] == predictor.class_names and model["input_size"] == 64
    assert model["checkpoint"] == checkpoint.name and len(model["checkpoint_id"]) == 12
    schema = client.get("/openapi.json").json()
    body = schema["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "image/*", "application/octet-stream"} <= set(body)
    assert {"/health", "/model"} <= set(schema["paths"])
    page = client.get("/")
    assert page.status_code == 200 and "/static/app.js" in page.text
    for asset in ("app.js", "style.css"):
        assert client.get(f"/static/{asset}").status_code == 200
    # nothing the page loads comes from outside the server
    assert "http://" not in page.text.replace("http://www.w3.org", "") and "https://" not in page.text


def test_top_k_over_the_classes_lists_all_of_them(client, predictor, photos):
    body = client.post("/predict?top_k=50", content=photos[0], headers={"content-type": "image/jpeg"}).json()
    assert len(body["predictions"]) == len(predictor.class_names)


def test_batcher_runs_requests_that_arrive_together_in_one_batch():
    calls = []

    def run(items):
        calls.append(list(items))
        return [item * 10 for item in items]

    async def scenario():
        batcher = MicroBatcher(run, max_batch_size=3, max_wait_s=0.5)
        await batcher.start()
        results = await asyncio.gather(*(batcher.submit(i) for i in range(5)))
        await batcher.stop()
        return results

    assert asyncio.run(scenario()) == [0, 10, 20, 30, 40]
    assert calls == [[0, 1, 2], [3, 4]]


def test_batcher_fails_only_the_batch_that_raised():
    def run(items):
        if 0 in items:
            raise ValueError("boom")
        return items

    async def scenario():
        batcher = MicroBatcher(run, max_batch_size=1, max_wait_s=0.0)
        await batcher.start()
        outcomes = await asyncio.gather(batcher.submit(0), batcher.submit(1), return_exceptions=True)
        await batcher.stop()
        return outcomes

    failed, answered = asyncio.run(scenario())
    assert isinstance(failed, ValueError) and answered == 1


def test_multipart_parser_keeps_the_file_in_memory_with_its_name_and_type():
    body = (b"--XyZ\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nhello\r\n"
            b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"b\xc3\xa9c.heic\"\r\n"
            b"Content-Type: image/heic\r\n\r\n\x00\x01binary\r\n--XyZ--\r\n")  # fmt: skip
    upload = extract_upload(body, "multipart/form-data; boundary=XyZ")
    assert (upload.data, upload.content_type, upload.filename) == (b"\x00\x01binary", "image/heic", "béc.heic")
    with pytest.raises(UploadError, match="unsupported content type 'application/json'"):
        extract_upload(b"{}", "application/json")


def test_heic_photos_decode(client, predictor):
    array = photo(120, 90, seed=5)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="HEIF", quality=95)
    response = client.post("/predict", files={"file": ("phone.heic", buffer.getvalue(), "image/heic")})
    assert response.status_code == 200, response.text
    assert response.json()["image"] == {"width": 120, "height": 90}


def test_cli_refuses_a_taken_port_and_a_missing_model_in_one_line(tmp_path, capsys, checkpoint):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(FinegrainError, match=f"port {port} on 127.0.0.1 is in use"):
            check_port_free("127.0.0.1", port)
        assert main(["serve", "--checkpoint", str(checkpoint), "--port", str(port)]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    assert main(["serve", "--checkpoint", str(tmp_path / "nope.ckpt"), "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "nope.ckpt not found" in err and "\n" not in err
    assert main(["serve", "--checkpoint", str(checkpoint), "--max-upload-mb", "0"]) == 2
    assert "--max-upload-mb must be positive" in capsys.readouterr().err
    assert main(["serve", "--checkpoint", str(checkpoint), "--max-megapixels", "0"]) == 2
    assert "--max-megapixels must be positive" in capsys.readouterr().err


def test_worker_processes_build_the_app_from_the_environment(checkpoint, photos, monkeypatch):
    """What each `--workers` process runs: the settings travel as JSON in an environment variable."""
    settings = ServeSettings(checkpoint=str(checkpoint), device="cpu", max_batch_size=2, torch_threads=1)
    for name, value in settings_to_environment(settings).items():
        monkeypatch.setenv(name, value)
    threads = torch.get_num_threads()
    try:
        with TestClient(app_from_environment()) as worker:
            assert torch.get_num_threads() == 1
            assert worker.get("/model").json()["max_batch_size"] == 2
            response = worker.post("/predict", content=photos[0], headers={"content-type": "image/jpeg"})
            assert response.status_code == 200 and len(response.json()["predictions"]) == 4
    finally:
        torch.set_num_threads(threads)


def test_the_onnxruntime_backend_serves_the_same_species_without_maps(checkpoint, predictor, photos, tmp_path):
    pytest.importorskip("onnxruntime")
    from finegrain.export import export_package

    package = export_package(checkpoint, tmp_path / "package", onnx=True)
    settings = ServeSettings(checkpoint=str(package), backend="onnxruntime")
    with TestClient(create_app(load_predictor(settings), settings)) as onnx_client:
        assert onnx_client.get("/model").json()["backend"] == "onnxruntime"
        body = onnx_client.post("/predict", content=photos[2], headers={"content-type": "image/jpeg"}).json()
    assert same_predictions(body["predictions"], predictor.predict(photos[2]), tol=1e-4)
    eager = predictor.explain(photos[2])
    for name, box in eager.boxes.items():
        np.testing.assert_allclose(body["boxes"][name], box, atol=1e-2)
    assert body["attention_maps"] == {}


def test_a_large_photo_is_decoded_as_the_predictor_decodes_it(client, predictor):
    large = jpeg(photo(640, 480, seed=9))  # decoded at 1/4 of its side for the 73 px eval resize
    body = client.post("/predict", content=large, headers={"content-type": "image/jpeg"}).json()
    explanation = predictor.explain(large)
    assert explanation.image_scale < 1 and body["image"] == {"width": 640, "height": 480}
    assert same_predictions(body["predictions"], explanation.predictions)
    for name, box in explanation.boxes.items():
        np.testing.assert_allclose(body["boxes"][name], box, atol=1e-3)
