"""Test top-1 of two trained models with their log-probabilities added (issue 18's fused ceilings).

    python tools/fused_ceiling.py --root ../shared/data/CUB_200_2011 --classes 1-30 \
        checkpoints/ceil_whole224/last.ckpt checkpoints/ceil_context224/last.ckpt:use_boxes=true,box_context=0.15

Each checkpoint may carry data options after a colon (those it was trained with: use_boxes, box_context,
box_square); each model reads the test split with its own preprocessing. Prints each model's top-1 and the fused.
"""

from __future__ import annotations

import argparse

import torch
import yaml

from finegrain.data.datamodule import CUBDataModule
from finegrain.predict import Predictor


def test_log_probabilities(spec: str, root: str, classes: str) -> tuple[torch.Tensor, torch.Tensor]:
    path, _, options = spec.partition(":")
    data_options = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in options.split(",") if item)}
    predictor = Predictor.from_checkpoint(path, device="cpu")
    data = CUBDataModule(root=root, classes=classes, preprocessing=predictor.config.preprocessing, batch_size=64,
                         num_workers=2, **data_options)  # fmt: skip
    data.setup("test")
    outputs, labels = [], []
    with torch.inference_mode():
        for batch in data.test_dataloader():
            outputs.append(predictor.network(batch["image"]).logits.float().log_softmax(1))
            labels.append(batch["label"])
    return torch.cat(outputs), torch.cat(labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs=2, metavar="CKPT[:OPTIONS]")
    parser.add_argument("--root", required=True)
    parser.add_argument("--classes", required=True)
    args = parser.parse_args()
    (first, labels), (second, other_labels) = (test_log_probabilities(c, args.root, args.classes)
                                               for c in args.checkpoints)  # fmt: skip
    if not torch.equal(labels, other_labels):
        raise SystemExit("the two test splits differ: pass the same --root and --classes the models were tested on")
    for name, scores in (("first", first), ("second", second), ("fused", first + second)):
        print(f"{name}: test top-1 {100 * (scores.argmax(1) == labels).float().mean().item():.1f} % of {len(labels)}")


if __name__ == "__main__":
    main()
