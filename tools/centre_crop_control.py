"""Test top-1 with a fixed centre crop as the second view (issue 18's control: does the found box matter?).

    python tools/centre_crop_control.py --root ../shared/data/CUB_200_2011 --classes 1-30 --side 0.78 \
        checkpoints/plain_rep_s0/last.ckpt checkpoints/zoom_s0/last.ckpt

In the object zoom recipe's geometry: a 448 px input, the whole view its 224 px copy, the second view the centre
square of `--side` of the input cropped at 224 px from the 448 px input; the two views' logits averaged. A plain
Classifier sees both views as images; an ObjectZoom classifies them as its whole and object views, its found box
replaced by the fixed one. Prints, per checkpoint, the whole view's, the centre view's and the fused top-1.
"""

from __future__ import annotations

import argparse

import torch

from finegrain.data.datamodule import CUBDataModule
from finegrain.geometry import box_to_transform, crop, square_copy
from finegrain.models import ObjectZoom
from finegrain.predict import Predictor


def view_logits(network: torch.nn.Module, images: torch.Tensor, side: float, size: int) -> dict[str, torch.Tensor]:
    box = torch.tensor([[0.5 - side / 2, 0.5 - side / 2, 0.5 + side / 2, 0.5 + side / 2]]).expand(len(images), 4)
    views = {"whole": square_copy(images, size), "centre": crop(images, box_to_transform(box), (size, size))}
    if isinstance(network, ObjectZoom):  # the centre crop takes the object view's place (and its own network)
        return {name: network.classify_view(view, "object" if name == "centre" else name, {})[1]
                for name, view in views.items()}  # fmt: skip
    return {name: network(view).logits for name, view in views.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", metavar="CKPT")
    parser.add_argument("--root", required=True)
    parser.add_argument("--classes", required=True)
    parser.add_argument("--side", type=float, default=0.78, help="the centre square's side, of the input's")
    parser.add_argument("--input-size", type=int, default=448)
    parser.add_argument("--view-size", type=int, default=224)
    args = parser.parse_args()
    for path in args.checkpoints:
        predictor = Predictor.from_checkpoint(path, device="cpu")
        network = predictor.network.eval()
        # the checkpoint's own normalisation and resize, at the zoom recipe's input size
        data = CUBDataModule(root=args.root, classes=args.classes, preprocessing=predictor.config.preprocessing,
                             img_size=args.input_size, batch_size=50, num_workers=1)  # fmt: skip
        data.setup("test")
        hits, count = {"whole": 0, "centre": 0, "fused": 0}, 0
        with torch.inference_mode():
            for batch in data.test_dataloader():
                logits = view_logits(network, batch["image"], args.side, args.view_size)
                logits["fused"] = (logits["whole"] + logits["centre"]) / 2
                for name, value in logits.items():
                    hits[name] += int((value.argmax(1) == batch["label"]).sum())
                count += len(batch["label"])
        print(path, " ".join(f"{name} {100 * hit / count:.2f} %" for name, hit in hits.items()), f"({count} photos)")


if __name__ == "__main__":
    main()
