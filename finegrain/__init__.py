"""finegrain: fine-grained bird classification with attention you can see."""

import os

# albumentations checks PyPI for updates at import unless told not to; nothing here touches the network.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"

__all__ = ["Predictor", "__version__"]


def __getattr__(name: str):
    # Lazily, so that `import finegrain` stays cheap (no torch) until a Predictor is asked for.
    if name == "Predictor":
        from finegrain.predict import Predictor

        return Predictor
    raise AttributeError(f"module 'finegrain' has no attribute {name!r}")
