"""What `Predictor.explain` returns: one image's prediction and where the network looked."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass
class Explanation:
    """One image's prediction and where the network looked.

    image: the decoded photo, HxWx3 uint8 RGB, upright.
    predictions: the top-k, as `Predictor.predict` returns them.
    boxes: per branch (scale, part), (x1, y1, x2, y2) in pixels of `image`; empty for a network without boxes.
    crops: the photo inside each box, at the photo's own resolution (for a sheared affine part, the box around
        the region it sampled).
    attention_maps: CBAM spatial maps (h, w) in [0, 1], keyed as the network names them; each lies in the input
        of its branch (see the method's docstring), so a part's map covers that part's crop.
    source: what the image came from (its path, "<bytes>", ...), for titles and messages.
    input_box: the part of the photo the network saw (the eval resize and centre crop), in pixels of `image`.
    """

    image: np.ndarray
    predictions: list[dict]
    boxes: dict[str, tuple[float, float, float, float]]
    crops: dict[str, Image.Image]
    attention_maps: dict[str, np.ndarray]
    source: str
    input_box: tuple[float, float, float, float]
