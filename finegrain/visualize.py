"""One picture per prediction: the photo with every branch's box, the zoomed crops beside it, the top-k as bars.

Drawn with PIL alone (its built-in scalable font), so the picture needs no plotting library.
"""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from finegrain.explain import Explanation

PHOTO_HEIGHT = 420  # the photo is scaled to this height (or to PHOTO_MAX_WIDTH when that is smaller)
PHOTO_MAX_WIDTH = 640
MARGIN = 16
GAP = 10
BAR_HEIGHT = 22
BACKGROUND = (255, 255, 255)
TEXT = (30, 30, 30)
MUTED = (120, 120, 120)
BAR = (120, 160, 200)
TOP_BAR = (31, 119, 180)
# one colour per box, distinct on photos of birds in foliage, sky and water (Tableau 10 without its greys)
PALETTE = [(214, 39, 40), (255, 127, 14), (148, 103, 189), (23, 190, 207), (227, 119, 194), (188, 189, 34),
           (44, 160, 44), (140, 86, 75)]  # fmt: skip


def render(explanation: Explanation) -> Image.Image:
    """The picture of one explanation: title, photo with boxes, crops beside it, top-k bars below."""
    title_font, font, small = _font(20), _font(16), _font(14)
    photo, factor = _scaled_photo(explanation)
    crops = _crop_panel(explanation, photo.height, small)
    bars = _bar_chart(explanation.predictions, font)

    top1 = explanation.predictions[0]
    title = f"{top1['label']}  {100 * top1['score']:.1f}%"
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    width = max(MARGIN * 2 + photo.width + (GAP + crops.width if crops else 0), MARGIN * 2 + bars.width,
                MARGIN * 2 + round(probe.textlength(title, font=title_font)))  # fmt: skip
    title_height = 48  # title, then the file name below it
    height = MARGIN + title_height + photo.height + GAP * 2 + bars.height + MARGIN
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    draw.text((MARGIN, MARGIN), title, font=title_font, fill=TEXT)
    draw.text((MARGIN, MARGIN + 26), Path(explanation.source).name, font=small, fill=MUTED)

    top = MARGIN + title_height
    box_factor = factor * explanation.image_scale  # boxes are in the photo's own pixels
    canvas.paste(_dim_outside_input(photo, explanation, box_factor), (MARGIN, top))
    _draw_boxes(draw, explanation, box_factor, (MARGIN, top), font)
    if crops:
        canvas.paste(crops, (MARGIN + photo.width + GAP, top))
    canvas.paste(bars, (MARGIN, top + photo.height + GAP * 2))
    return canvas


def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _scaled_photo(explanation: Explanation) -> tuple[Image.Image, float]:
    photo = Image.fromarray(explanation.image)
    factor = min(PHOTO_HEIGHT / photo.height, PHOTO_MAX_WIDTH / photo.width)
    size = (max(1, round(photo.width * factor)), max(1, round(photo.height * factor)))
    return photo.resize(size, Image.Resampling.LANCZOS), factor


def _dim_outside_input(photo: Image.Image, explanation: Explanation, factor: float) -> Image.Image:
    """Fade the margins the eval centre crop cut off towards white: the network never saw them."""
    mask = Image.new("L", photo.size, 150)  # 150/255 of the way to white outside the input region
    ImageDraw.Draw(mask).rectangle([v * factor for v in explanation.input_box], fill=0)
    return Image.composite(Image.new("RGB", photo.size, BACKGROUND), photo, mask)


def _draw_boxes(draw: ImageDraw.ImageDraw, explanation: Explanation, factor: float, origin: tuple[int, int],
                font: ImageFont.FreeTypeFont) -> None:  # fmt: skip
    """Each box in its colour, 3 px wide, with its name on a tag of the same colour at its top-left corner."""
    ox, oy = origin
    for i, (name, box) in enumerate(explanation.boxes.items()):
        colour = PALETTE[i % len(PALETTE)]
        x1, y1, x2, y2 = (ox + box[0] * factor, oy + box[1] * factor, ox + box[2] * factor, oy + box[3] * factor)
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=3)
        tag = draw.textbbox((0, 0), name, font=font)
        tag_w, tag_h = tag[2] - tag[0] + 8, tag[3] - tag[1] + 6
        # inside the box, so a box at the photo's top edge keeps its tag on the photo
        draw.rectangle((x1, y1, x1 + tag_w, y1 + tag_h), fill=colour)
        draw.text((x1 + 4 - tag[0], y1 + 3 - tag[1]), name, font=font, fill=(255, 255, 255))


def _crop_panel(explanation: Explanation, height: int, font: ImageFont.FreeTypeFont) -> Image.Image | None:
    """The crops as square thumbnails in a grid as tall as the photo, each framed in its box's colour."""
    crops = list(explanation.crops.items())
    if not crops:
        return None
    caption = 20
    rows = len(crops) if len(crops) <= 2 else math.ceil(len(crops) / 2)
    columns = math.ceil(len(crops) / rows)
    side = min(300, (height - (rows - 1) * GAP) // rows - caption)
    panel = Image.new("RGB", (columns * (side + GAP) - GAP, height), BACKGROUND)
    draw = ImageDraw.Draw(panel)
    for i, (name, crop) in enumerate(crops):
        colour = PALETTE[i % len(PALETTE)]
        x, y = (i % columns) * (side + GAP), (i // columns) * (side + caption + GAP)
        thumb = crop.copy()
        thumb.thumbnail((side - 6, side - 6), Image.Resampling.LANCZOS)
        if max(thumb.size) < side - 6:  # a small crop is zoomed up, not shown tiny
            scale = (side - 6) / max(thumb.size)
            thumb = crop.resize((round(crop.width * scale), round(crop.height * scale)), Image.Resampling.LANCZOS)
        draw.rectangle((x, y, x + side - 1, y + side - 1), outline=colour, width=3)
        panel.paste(thumb, (x + (side - thumb.width) // 2, y + (side - thumb.height) // 2))
        draw.text((x + side // 2, y + side + 2), name, font=font, fill=TEXT, anchor="ma")
    return panel


def _bar_chart(predictions: list[dict], font: ImageFont.FreeTypeFont, bar_width: int = 360) -> Image.Image:
    """Horizontal bars of the top-k scores (0 to 100%), the species name left of each, the percentage right."""
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_width = max(probe.textlength(p["label"], font=font) for p in predictions)
    number_width = probe.textlength("100.0%", font=font)
    width = round(label_width + GAP + bar_width + GAP + number_width)
    chart = Image.new("RGB", (width, len(predictions) * (BAR_HEIGHT + 6)), BACKGROUND)
    draw = ImageDraw.Draw(chart)
    for rank, p in enumerate(predictions):
        y = rank * (BAR_HEIGHT + 6)
        middle = y + BAR_HEIGHT / 2
        draw.text((label_width, middle), p["label"], font=font, fill=TEXT, anchor="rm")
        x0 = label_width + GAP
        draw.rectangle((x0, y, x0 + bar_width, y + BAR_HEIGHT), fill=(240, 240, 240))
        draw.rectangle((x0, y, x0 + max(1.0, bar_width * p["score"]), y + BAR_HEIGHT),
                       fill=TOP_BAR if rank == 0 else BAR)  # fmt: skip
        draw.text((x0 + bar_width + GAP, middle), f"{100 * p['score']:.1f}%", font=font, fill=TEXT, anchor="lm")
    return chart
