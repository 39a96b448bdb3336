"""What `Predictor.explain` returns: one image's prediction and where the network looked."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass
class Explanation:
    """One image's prediction and where the network looked.

    image: the decoded photo, HxWx3 uint8 RGB, upright; a large JPEG decodes at a reduced size (1/2, 1/4 or 1/8
        of its side, never below what the network's input needs), so `photo_size` may be larger.
    predictions: the top-k, as `Predictor.predict` returns them.
    boxes: per branch (scale, part), (x1, y1, x2, y2) in pixels of the photo itself (`photo_size`, upright);
        empty for a network without boxes. `image_scale` maps them onto `image`.
    crops: `image` inside each box (for a sheared affine part, the box around the region it sampled).
    attention_maps: CBAM spatial maps, or the object zoom's activation map, (h, w) in [0, 1], keyed as the network
        names them; each lies in the input of its branch (see the method's docstring), so a part's map covers
        that part's crop.
    source: what the image came from (its path, "<bytes>", ...), for titles and messages.
    input_box: the part of the photo the network saw (the eval resize and centre crop), in photo pixels.
    photo_size: the photo's own upright (width, height).
    """

    image: np.ndarray
    predictions: list[dict]
    boxes: dict[str, tuple[float, float, float, float]]
    crops: dict[str, Image.Image]
    attention_maps: dict[str, np.ndarray]
    source: str
    input_box: tuple[float, float, float, float]
    photo_size: tuple[int, int]

    @property
    def image_scale(self) -> float:
        """Pixels of `image` per photo pixel (1.0 unless the photo decoded at a reduced size)."""
        return self.image.shape[1] / self.photo_size[0]
