"""Reading a Lightning checkpoint file safely: tensors and plain types only, and one line for every way it can fail."""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path

import torch

from finegrain.errors import FinegrainError

CHECKPOINT_FIX = "pass a .ckpt written by `finegrain fit` (checkpoints/<run_name>/best.ckpt) or a folder written by " \
                 "`finegrain export`"  # fmt: skip


def load_checkpoint(path: str | Path) -> dict:
    """`torch.load(path, weights_only=True)` on CPU; a file that is missing, empty, truncated, not a checkpoint, or
    that pickles code (loading it would run that code) is a FinegrainError naming the file and the fix."""
    path = Path(path)
    if not path.is_file():
        raise FinegrainError(f"checkpoint {path} not found; {CHECKPOINT_FIX}")
    if path.stat().st_size == 0:
        raise FinegrainError(f"{path} is an empty file; {CHECKPOINT_FIX}")
    if path.suffix == ".safetensors":
        raise FinegrainError(
            f"{path} holds bare weights without their network and class names; pass the folder `finegrain export` "
            "wrote (finegrain.json beside model.safetensors), or a .ckpt"
        )
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"  # torch.save's format is a zip archive
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if not is_zip or "Weights only load failed" not in str(e):
            raise FinegrainError(f"{path} is not a PyTorch checkpoint; {CHECKPOINT_FIX}") from e
        what = f" ({found.group(1)})" if found else ""
        raise FinegrainError(
            f"{path} is refused: it pickles Python objects{what}, so loading it would run code from the file; use a "
            "checkpoint written by `finegrain fit`, which holds tensors and plain values only"
        ) from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        if is_zip:
            raise FinegrainError(
                f"{path} is truncated or corrupt ({type(e).__name__}); copy it again, or use the other checkpoint "
                "`finegrain fit` kept for the run (best.ckpt / last.ckpt)"
            ) from e
        raise FinegrainError(f"{path} is not a PyTorch checkpoint; {CHECKPOINT_FIX}") from e
    if not isinstance(checkpoint, dict):
        raise FinegrainError(f"{path} is not a training checkpoint (it holds a {type(checkpoint).__name__}); "
                             f"{CHECKPOINT_FIX}")  # fmt: skip
    return checkpoint
