"""`finegrain serve`: run the app under uvicorn, one process or `--workers` processes sharing the port."""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace

import uvicorn

from finegrain.errors import FinegrainError
from finegrain.serve.app import ServeSettings, create_app, load_predictor, settings_to_environment


def serve(settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000, workers: int = 1) -> None:
    """Serve until interrupted. Every user mistake (model, port, sizes) ends in one FinegrainError line first."""
    if workers < 1:
        raise FinegrainError(f"--workers must be a positive integer, got {workers}")
    if settings.max_batch_size < 1:
        raise FinegrainError(f"--max-batch-size must be a positive integer, got {settings.max_batch_size}")
    if settings.max_upload_bytes < 1:
        raise FinegrainError("--max-upload-mb must be positive")
    if settings.max_pixels < 1:
        raise FinegrainError("--max-megapixels must be positive")
    if settings.max_wait_ms < 0:
        raise FinegrainError(f"--max-wait-ms must be 0 or more, got {settings.max_wait_ms:g}")
    check_port_free(host, port)
    if workers == 1:
        app = create_app(load_predictor(settings), settings)
    else:
        load_predictor(settings)  # a bad checkpoint is one line here, not a traceback in every worker
        # each worker runs its own forward passes: share the cores instead of oversubscribing them
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ.update(settings_to_environment(replace(settings, torch_threads=threads)))
    url = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
    print(f"finegrain: serving {settings.checkpoint} at {url}/ (API docs at {url}/docs); Ctrl+C stops",
          file=sys.stderr)  # fmt: skip
    if not is_loopback(host):
        print(f"finegrain: {host} is reachable from other machines: anyone who can reach it can send photos",
              file=sys.stderr)  # fmt: skip
    if workers == 1:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    else:
        uvicorn.run("finegrain.serve.app:app_from_environment", factory=True, host=host, port=port,
                    workers=workers, log_level="warning")  # fmt: skip


def serve_in_thread(app, host: str = "127.0.0.1", port: int = 0,
                    timeout_s: float = 30.0) -> tuple[str, Callable[[], None]]:  # fmt: skip
    """Serve `app` from a thread of this process (a notebook, a test): its URL once it accepts connections, and
    the function that stops it. Port 0 picks a free port."""
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="finegrain-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            server.should_exit = True
            raise FinegrainError(f"the server on {host}:{port} did not start within {timeout_s:g} s")
        time.sleep(0.05)
    bound = server.servers[0].sockets[0].getsockname()[1]

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=timeout_s)

    return f"http://{host}:{bound}", stop


def check_port_free(host: str, port: int) -> None:
    """One line instead of uvicorn's traceback when the port is taken or the address is not this machine's."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise FinegrainError(f"port {port} on {host} is in use; stop what holds it or pass --port N") from e
            if e.errno == errno.EACCES:
                raise FinegrainError(f"port {port} needs privileges; pass --port 1024 or above") from e
            raise FinegrainError(f"cannot listen on {host}:{port} ({e.strerror}); pass --host 127.0.0.1 or an "
                                 "address of this machine") from e  # fmt: skip
        except socket.gaierror as e:
            raise FinegrainError(f"--host {host!r} is not an address ({e}); pass e.g. 127.0.0.1 or 0.0.0.0") from e


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
