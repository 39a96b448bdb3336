"""The web page and JSON API of `finegrain serve`, on FastAPI: one process, requests batched into forward passes.

`create_app` builds the app around a `Predictor`; `app_from_environment` is the factory uvicorn calls in each
worker process when `--workers` is above 1 (settings travel in an environment variable).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from finegrain.data.images import ImageDecodeError
from finegrain.explain import Explanation
from finegrain.predict import Predictor
from finegrain.serve.batching import MicroBatcher
from finegrain.serve.uploads import ACCEPTED, UploadError, extract_upload, read_body

SETTINGS_VARIABLE = "FINEGRAIN_SERVE_SETTINGS"
STATIC = resources.files("finegrain.serve") / "static"
PREVIEW_SIDE = 1024  # longest side of the preview the page shows; the boxes are in the photo's own pixels
MAX_TOP_K = 1000
# ImageDecodeError.kind -> the HTTP status and the fix a client is told
DECODE_ANSWERS = {"too_large": (413, "send a photo within the server's pixel limit"),
                  "not_image": (415, "send a JPEG, PNG, WebP or HEIC photo"),
                  "unreadable": (400, "export or download the photo again")}  # fmt: skip
PREVIEW_HELP = "add the upright photo as a JPEG data URL (what the page draws the boxes on)"


@dataclass
class ServeSettings:
    checkpoint: str
    device: str = "auto"
    backend: str = "torch"  # or "onnxruntime": the exported graph of a package
    max_batch_size: int = 8
    max_wait_ms: float = 5.0
    max_upload_bytes: int = 20 * 2**20
    max_pixels: int = 64_000_000  # a 48-megapixel phone photo passes; a decompression bomb does not
    torch_threads: int | None = None  # per worker process; None: torch's default


class Prediction(BaseModel):
    label: str
    class_id: int
    score: float


class ImageSize(BaseModel):
    width: int
    height: int


class AttentionMap(BaseModel):
    region: list[float]  # the box of the photo (x1, y1, x2, y2 in photo pixels) that the map covers
    height: int
    width: int
    values: list[list[float]]  # rows of the map, values in [0, 1]


class PredictResponse(BaseModel):
    predictions: list[Prediction]
    image: ImageSize
    input_box: list[float]
    boxes: dict[str, list[float]]
    attention_maps: dict[str, AttentionMap]
    preview: str | None = None


class ModelInfo(BaseModel):
    method: str
    backend: str
    network: str
    classes: int
    class_names: list[str]
    input_size: int
    checkpoint: str
    checkpoint_id: str
    max_batch_size: int
    max_upload_bytes: int


def create_app(predictor: Predictor, settings: ServeSettings) -> FastAPI:
    """The app: `/` the page, `POST /predict`, `GET /health`, `GET /model`, `/docs` and `/openapi.json`."""

    def run_batch(items: list[tuple[tuple[np.ndarray, tuple[int, int]], int]]) -> list[Explanation]:
        return predictor.explain_decoded([photo for photo, _ in items], top_k=max(k for _, k in items))

    batcher: MicroBatcher[tuple[tuple[np.ndarray, tuple[int, int]], int], Explanation] = MicroBatcher(
        run_batch, max_batch_size=settings.max_batch_size, max_wait_s=settings.max_wait_ms / 1000
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="finegrain", summary="Bird species from a photo, and where the model looked.",
                  lifespan=lifespan)  # fmt: skip
    model_info = ModelInfo(
        method=predictor.config.method,
        backend=settings.backend,
        network=predictor.config.network["class_path"],
        classes=len(predictor.class_names),
        class_names=predictor.class_names,
        input_size=int(predictor.config.preprocessing["img_size"]),
        checkpoint=Path(settings.checkpoint).name,
        checkpoint_id=checkpoint_id(Path(settings.checkpoint)),
        max_batch_size=settings.max_batch_size,
        max_upload_bytes=settings.max_upload_bytes,
    )

    @app.exception_handler(RequestValidationError)
    async def one_line_validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'][1:])) or e['loc'][0]}: {e['msg']}" for e in error.errors())
        return JSONResponse({"detail": problems}, status_code=422)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(str(STATIC / "index.html"))

    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")

    @app.get("/health", summary="Whether the server answers, and how its batches ran")
    async def health() -> dict:
        sizes = batcher.batch_sizes
        return {"status": "ok", "batches": len(sizes), "images": sum(sizes), "queued": batcher.pending}

    @app.get("/model", summary="The served model", response_model=ModelInfo)
    async def model() -> ModelInfo:
        return model_info

    @app.post("/predict", summary="Top-k species of one photo, the boxes each branch looked at, the maps",
              response_model=PredictResponse, response_model_exclude_none=True,
              openapi_extra={"requestBody": {"required": True, "description": ACCEPTED, "content": {
                  "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
                      "file": {"type": "string", "format": "binary"}}}},
                  "image/*": {"schema": {"type": "string", "format": "binary"}},
                  "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}},
              responses={code: {"description": text, "content": {"application/json": {"example": {"detail": text}}}}
                         for code, text in ((400, "empty, truncated or corrupt photo, or a malformed form"),
                                            (413, "over the upload size or pixel limit (decompression bomb)"),
                                            (415, "not an image, or an unsupported type"))})  # fmt: skip
    async def predict(request: Request, top_k: int = Query(5, ge=1, le=MAX_TOP_K, description="species listed"),
                      preview: bool = Query(False, description=PREVIEW_HELP)) -> dict:  # fmt: skip
        try:
            body = await read_body(request.stream(), request.headers.get("content-length"), settings.max_upload_bytes)
            upload = extract_upload(body, request.headers.get("content-type", ""))
        except UploadError as e:
            raise HTTPException(e.status, str(e)) from e
        name = upload.filename or "the upload"
        try:
            # the Predictor's own decode: a large JPEG decodes at the size the network needs, as predict() does
            photo = await run_in_threadpool(predictor.decode, upload.data, settings.max_pixels)
        except ImageDecodeError as e:
            status, fix = DECODE_ANSWERS[e.kind]
            raise HTTPException(status, f"{name}: {e.problem}; {fix}") from e
        explanation = await batcher.submit((photo, top_k))
        return await run_in_threadpool(response_body, explanation, top_k, preview)

    return app


def app_from_environment() -> FastAPI:
    """The app of one uvicorn worker process: settings from $FINEGRAIN_SERVE_SETTINGS (JSON of ServeSettings)."""
    settings = ServeSettings(**json.loads(os.environ[SETTINGS_VARIABLE]))
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    return create_app(load_predictor(settings), settings)


def load_predictor(settings: ServeSettings) -> Predictor:
    return Predictor.from_checkpoint(settings.checkpoint, device=settings.device, backend=settings.backend)


def settings_to_environment(settings: ServeSettings) -> dict[str, str]:
    return {SETTINGS_VARIABLE: json.dumps(asdict(settings))}


def response_body(explanation: Explanation, top_k: int, preview: bool) -> dict:
    """The JSON of one prediction: `Predictor.predict`'s list, then where the model looked, in photo pixels."""
    width, height = explanation.photo_size
    regions = {name: list(box) for name, box in explanation.boxes.items()}
    maps = {}
    for name, values in explanation.attention_maps.items():
        branch = name.split(".", 1)[0]  # "scale2.blocks.5.cbam" lies in the scale2 crop; unprefixed: the input
        maps[name] = {"region": regions.get(branch, list(explanation.input_box)), "height": values.shape[0],
                      "width": values.shape[1], "values": np.round(values, 3).tolist()}  # fmt: skip
    body = {
        "predictions": explanation.predictions[:top_k],
        "image": {"width": width, "height": height},
        "input_box": list(explanation.input_box),
        "boxes": regions,
        "attention_maps": maps,
    }
    if preview:
        body["preview"] = preview_url(explanation.image)
    return body


def preview_url(photo: np.ndarray) -> str:
    """The upright photo as a JPEG data URL, longest side at most PREVIEW_SIDE (browsers show no HEIC)."""
    image = Image.fromarray(photo)
    image.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def checkpoint_id(path: Path) -> str:
    """A short content hash: which weights answer, whatever the file is called (a package: each of its files)."""
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    digests = []
    for file in files:
        with file.open("rb") as f:
            digests.append(hashlib.file_digest(f, "sha256").hexdigest())
    return hashlib.sha256("".join(digests).encode()).hexdigest()[:12]
