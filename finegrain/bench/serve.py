"""`finegrain bench serve`: requests/s and latency of `finegrain serve` under concurrent clients, against
`Predictor.predict` called directly on the same photos, measured one after the other in one run.

The server runs as its own process (`finegrain serve`), the clients are asyncio tasks of this process, all on the
same machine: the figures include the clients' own cost, as a user's load test on one machine would.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import torch

from finegrain.bench.report import new_report
from finegrain.errors import FinegrainError
from finegrain.predict import Predictor
from finegrain.predict_files import find_images

STARTUP_TIMEOUT_S = 180


@dataclass
class ServeBench:
    clients: int = 8
    seconds: float = 20.0
    warmup_seconds: float = 3.0
    max_batch_size: int = 8
    top_k: int = 5


def run_serve_bench(checkpoint: Path, images: list[Path] | None, settings: ServeBench, command: str) -> dict:
    """Server under `settings.clients` concurrent clients, then the Predictor directly at batch 1 and batched."""
    with tempfile.TemporaryDirectory() as scratch:
        photos = _photo_bytes(images, Path(scratch))
    server = _measure_server(checkpoint, photos, settings)
    predictor = Predictor.from_checkpoint(checkpoint, device="cpu")
    direct_batched = _measure_direct(predictor, photos, settings, batch_size=settings.clients)
    direct_single = _measure_direct(predictor, photos, settings, batch_size=1)
    return new_report(
        "serve", command, settings=asdict(settings), checkpoint=str(checkpoint), method=predictor.config.method,
        photos=len(photos), photo_kb=round(sum(map(len, photos)) / len(photos) / 1024, 1),
        torch_threads=torch.get_num_threads(), server=server, direct_batched=direct_batched,
        direct_single=direct_single,
        ratio=server["requests_per_s"] / direct_batched["images_per_s"],
    )  # fmt: skip


def _photo_bytes(images: list[Path] | None, scratch: Path) -> list[bytes]:
    if not images:  # synthetic birds at the CUB framing: what `make demo` trains on
        from finegrain.data.synth import synthesize_birds

        root = synthesize_birds(scratch / "birds", num_classes=4, per_class=4, seed=1, bird_size=(0.5, 0.8))
        images = [root / "images"]
    files, problems = find_images(images)
    if problems or not files:
        raise FinegrainError("; ".join(problems) or "no photos found in --images; pass JPEG or PNG files or folders")
    return [f.read_bytes() for f in files[:64]]


def _measure_server(checkpoint: Path, photos: list[bytes], settings: ServeBench) -> dict:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "finegrain.cli", "serve", "--checkpoint", str(checkpoint), "--port", str(port),
         "--device", "cpu", "--max-batch-size", str(settings.max_batch_size)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        _wait_until_up(server, url)
        latencies, seconds = asyncio.run(_load(url, photos, settings))
        health = httpx.get(f"{url}/health").json()
    finally:
        server.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(timeout=15)
        if server.poll() is None:
            server.kill()
    return {"requests": len(latencies), "requests_per_s": len(latencies) / seconds, **_percentiles(latencies),
            "mean_batch": health["images"] / max(health["batches"], 1)}  # fmt: skip


def _wait_until_up(server: subprocess.Popen, url: str) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise FinegrainError(f"finegrain serve exited before answering: {server.stderr.read().strip()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        time.sleep(0.2)
    raise FinegrainError(f"finegrain serve did not answer within {STARTUP_TIMEOUT_S} s")


async def _load(url: str, photos: list[bytes], settings: ServeBench) -> tuple[list[float], float]:
    """Each client posts the photos in turn, one request at a time; latencies of requests that start and end
    inside the timed window after the warm-up."""
    latencies: list[float] = []
    limits = httpx.Limits(max_connections=settings.clients)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        start = time.perf_counter() + settings.warmup_seconds
        end = start + settings.seconds

        async def one_client(index: int) -> None:
            i = index
            while (began := time.perf_counter()) < end:
                response = await client.post(f"/predict?top_k={settings.top_k}", content=photos[i % len(photos)],
                                             headers={"content-type": "image/jpeg"})  # fmt: skip
                response.raise_for_status()
                finished = time.perf_counter()
                if began >= start and finished <= end:
                    latencies.append(finished - began)
                i += settings.clients

        await asyncio.gather(*(one_client(i) for i in range(settings.clients)))
    if not latencies:
        raise FinegrainError("no request finished inside the timed window; pass a longer --seconds")
    return latencies, settings.seconds


def _measure_direct(predictor: Predictor, photos: list[bytes], settings: ServeBench, batch_size: int) -> dict:
    """`Predictor.predict` on lists of `batch_size` photo bytes, for the same warm-up and timed seconds."""
    latencies, images, i = [], 0, 0
    start = time.perf_counter() + settings.warmup_seconds
    end = start + settings.seconds
    while (began := time.perf_counter()) < end:
        batch = [photos[(i + j) % len(photos)] for j in range(batch_size)]
        predictor.predict(batch, top_k=settings.top_k, batch_size=batch_size)
        finished = time.perf_counter()
        if began >= start and finished <= end:
            latencies.append(finished - began)
            images += batch_size
        i += batch_size
    timed = sum(latencies)
    return {"batch_size": batch_size, "images_per_s": images / timed, **_percentiles(latencies)}


def _percentiles(latencies: list[float]) -> dict:
    ordered = sorted(latencies)
    cut = statistics.quantiles(ordered, n=20, method="inclusive") if len(ordered) > 1 else ordered * 19
    return {"p50_ms": 1000 * statistics.median(ordered), "p95_ms": 1000 * cut[18]}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
