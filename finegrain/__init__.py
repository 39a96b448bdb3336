"""finegrain: fine-grained bird classification with attention you can see."""

import os

# albumentations checks PyPI for updates at import unless told not to; nothing here touches the network.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"
