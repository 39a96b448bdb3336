"""Checkpoint files: read safely (tensors and plain types only, one line for every way a file can fail), written
atomically, never replaced by accident, and read in every format finegrain has written."""

from __future__ import annotations

import logging
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from finegrain.errors import FinegrainError

if TYPE_CHECKING:
    import pytorch_lightning as pl

log = logging.getLogger(__name__)

CHECKPOINT_FIX = "pass a .ckpt written by `finegrain fit` (checkpoints/<run_name>/last.ckpt) or a folder written by " \
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
                "`finegrain fit` kept for the run (last.ckpt, or best.ckpt where it wrote one)"
            ) from e
        raise FinegrainError(f"{path} is not a PyTorch checkpoint; {CHECKPOINT_FIX}") from e
    if not isinstance(checkpoint, dict):
        raise FinegrainError(f"{path} is not a training checkpoint (it holds a {type(checkpoint).__name__}); "
                             f"{CHECKPOINT_FIX}")  # fmt: skip
    return checkpoint


# Before networks were given by class_path (commit 90c476b and earlier), the task took the network's arguments
# itself, plus `method` and `method_args`.
_OLD_NETWORK_KEYS = ("backbone", "weights", "attention", "attention_stages", "drop_rate")


def network_spec(hparams: dict, source: Path | str) -> dict:
    """`{"class_path", "init_args"}` of the network a checkpoint's hyper-parameters (or a package config) describe,
    in today's form whichever finegrain wrote them."""
    from finegrain.models.registry import METHOD_CLASS_PATHS

    if isinstance(hparams.get("network"), dict) and "class_path" in hparams["network"]:
        spec = hparams["network"]
        return {"class_path": spec["class_path"], "init_args": dict(spec.get("init_args") or {})}
    method = hparams.get("method")
    if method not in METHOD_CLASS_PATHS:
        raise FinegrainError(f"{source} names no network this finegrain knows (method {method!r}); {CHECKPOINT_FIX}")
    init_args = {k: hparams[k] for k in ("num_classes", *_OLD_NETWORK_KEYS) if k in hparams}
    init_args.update(hparams.get("network") if isinstance(hparams.get("network"), dict) else {})  # packages v1
    init_args.update(hparams.get("method_args") or {})
    if init_args.pop("box_gradient", "autograd") != "autograd":
        raise FinegrainError(f"{source} was trained with box_gradient {hparams['method_args']['box_gradient']!r}, an "
                             "experiment that left finegrain (docs/benchmarks.md names the commit that has it); "
                             "train it again without")  # fmt: skip
    init_args.pop("box_step", None)
    return {"class_path": METHOD_CLASS_PATHS[method], "init_args": init_args}


RUN_CHECKPOINTS = ("best.ckpt", "last.ckpt")


def prepare_run_dir(folder: Path, run_name: str, ckpt_path: str | None, overwrite: bool) -> None:
    """Before `fit` writes anything: refuse to replace an earlier run's checkpoints unless resuming it or told to
    overwrite (then they are removed first, so no checkpoint of the old run survives beside the new run's)."""
    existing = [folder / name for name in RUN_CHECKPOINTS if (folder / name).is_file()]
    if not existing or os.environ.get("LOCAL_RANK", "0") != "0":  # DDP ranks > 0 re-run the command line
        return
    resuming = ckpt_path is not None and (ckpt_path in ("last", "best") or Path(ckpt_path).parent.resolve() ==
                                          folder.resolve())  # fmt: skip
    if resuming:
        return
    if not overwrite:
        names = " and ".join(path.name for path in existing)
        raise FinegrainError(f"run {run_name!r} already has {names} in {folder}: resume it with --ckpt_path last, "
                             "start another with --run_name NAME, or replace it with --overwrite true")  # fmt: skip
    for path in existing:
        path.unlink()
    log.warning("--overwrite: removed the earlier %s of run %r", " and ".join(p.name for p in existing), run_name)


def check_checkpoint_fits(ckpt_path: str, folder: Path, model: pl.LightningModule) -> None:
    """Before a run resumes from (or evaluates) a checkpoint and before it writes anything: the checkpoint must have
    been trained with the classes and network these settings give."""
    path = folder / f"{ckpt_path}.ckpt" if ckpt_path in ("last", "best") else Path(ckpt_path)
    if ckpt_path in ("last", "best") and not path.is_file():
        raise FinegrainError(f"--ckpt_path {ckpt_path}: there is no {path} to start from; train the run first, or "
                             "drop --ckpt_path to start a new one")  # fmt: skip
    checkpoint = load_checkpoint(path)
    theirs, hparams = checkpoint.get("state_dict"), checkpoint.get("hyper_parameters") or {}
    if not isinstance(theirs, dict):
        raise FinegrainError(f"{path} holds no state_dict; {CHECKPOINT_FIX}")
    ours, differences = model.state_dict(), []
    old_names, new_names = hparams.get("class_names"), model.hparams.get("class_names")
    if old_names is not None and new_names is not None and list(old_names) != list(new_names):
        differences.append(f"it was trained on {len(old_names)} classes ({', '.join(old_names[:2])}, ...), these "
                           f"settings give {len(new_names)} ({', '.join(new_names[:2])}, ...)")  # fmt: skip
    old, new = network_spec(hparams, path), model.hparams.get("network") or {}
    for key in ("class_path", "backbone", "attention"):
        before, now = old.get(key, old["init_args"].get(key)), new.get(key, new.get("init_args", {}).get(key))
        if before != now:
            differences.append(f"model.network's {key} was {before!r}, now {now!r}")
    unfit = [k for k in ours.keys() | theirs.keys() if k not in ours or k not in theirs or
             getattr(ours[k], "shape", None) != getattr(theirs[k], "shape", None)]  # fmt: skip
    if unfit and not differences:
        differences.append(f"{len(unfit)} of its tensors do not fit this network, e.g. {sorted(unfit)[:2]}")
    if differences:
        raise FinegrainError(
            f"{path} does not fit these settings: {'; '.join(differences)}. Use the settings the run was trained "
            f"with (its config.yaml under {folder}), or start a new --run_name"
        )
