"""Shared test fixtures: the real CUB subset beside the checkout, and a small synthetic CUB folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"
CUB_ROOT = SHARED / "data" / "CUB_200_2011"

needs_cub = pytest.mark.skipif(not (CUB_ROOT / "images.txt").is_file(), reason=f"real CUB subset not at {CUB_ROOT}")


@pytest.fixture(autouse=True)
def own_cache(tmp_path_factory, monkeypatch):
    """Image-check results go to a folder of the test session's own, never the user's cache; W&B stays offline."""
    monkeypatch.setenv("FINEGRAIN_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "finegrain-cache"))
    # configs/base.yaml gives every fit a W&B logger: tests never send runs online, whatever the machine's login
    monkeypatch.setenv("WANDB_MODE", "offline")


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """A small synthetic bird dataset in the CUB layout, shared by the tests of one session."""
    from finegrain.data.synth import synthesize_birds

    return synthesize_birds(tmp_path_factory.mktemp("synth") / "birds", num_classes=4, per_class=12, seed=0)


@pytest.fixture
def one_thread():
    """One CPU thread: deterministic reductions, and tiny models run fastest that way (two threads slow down many
    times over on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
