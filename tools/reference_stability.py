"""How stable is the phone bench's reference top-5 itself? (issue 22: "the same top-5 on every photo")

    python tools/reference_stability.py --checkpoint checkpoints/plain_rep_s4/last.ckpt PHOTO.jpg ...

Every photo is made a 12-megapixel JPEG as `finegrain bench speed --only phone` makes it (`phone_jpegs`), then
classified by the bench's reference (PIL full decode, timm's eval transform) and by other pipelines a user could
write in an afternoon from the same full decode: torchvision v2 on a uint8 tensor (antialiased bicubic, as
PIL's filter), OpenCV (imdecode, INTER_AREA), and PIL with the resize done in float32 instead of 8 bits; and by
finegrain's Predictor (reduced DCT decode). Prints, for each pipeline against the reference, on how many photos
the top-1, the top-5 in order and the five species agree, the largest score difference, and the reference's
smallest gap between neighbours in its top-5.
"""

from __future__ import annotations

import argparse
import io
import json
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2

from finegrain.bench.speed import phone_jpegs, reference_transform
from finegrain.predict import Predictor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("photos", nargs="+", type=Path)
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--json", type=Path, help="also write the counts and every photo's top-5 here")
    args = parser.parse_args()

    predictor = Predictor.from_checkpoint(args.checkpoint, device="cpu")
    network, prep = predictor.network, predictor.config.preprocessing
    size, mean, std = prep["img_size"], prep["mean"], prep["std"]
    resize = int(size / prep["crop_pct"])
    bench_transform = reference_transform(prep)  # the bench's own reference, not a copy of it
    tv2 = v2.Compose([v2.Resize(resize, InterpolationMode.BICUBIC, antialias=True), v2.CenterCrop(size),
                      v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])  # fmt: skip
    crop_and_normalize = v2.Compose([v2.CenterCrop(size), v2.Normalize(mean, std)])

    def target(width: int, height: int) -> tuple[int, int]:
        """(width, height) with the shorter side `resize`, the longer rounded down as torchvision's Resize(int)."""
        return (resize, int(resize * height / width)) if width <= height else (int(resize * width / height), resize)

    def reference(data: bytes) -> torch.Tensor:
        return bench_transform(Image.open(io.BytesIO(data)).convert("RGB"))

    def torchvision(data: bytes) -> torch.Tensor:
        return tv2(torch.from_numpy(np.array(Image.open(io.BytesIO(data)).convert("RGB"))).permute(2, 0, 1))

    def opencv(data: bytes) -> torch.Tensor:
        bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        small = cv2.resize(
            cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), target(bgr.shape[1], bgr.shape[0]), interpolation=cv2.INTER_AREA
        )
        return crop_and_normalize(torch.from_numpy(small).permute(2, 0, 1).float() / 255)

    def pil_float(data: bytes) -> torch.Tensor:
        image = Image.open(io.BytesIO(data)).convert("RGB")
        pixels = np.asarray(image, dtype=np.float32)
        channels = [np.asarray(Image.fromarray(pixels[..., c], mode="F").resize(target(*image.size),
                                                                                Image.Resampling.BICUBIC))
                    for c in range(3)]  # fmt: skip
        return crop_and_normalize(torch.from_numpy(np.stack(channels)) / 255)

    def scores_of(make: Callable[[bytes], torch.Tensor]) -> Callable[[bytes], torch.Tensor]:
        def run(data: bytes) -> torch.Tensor:
            with torch.inference_mode():
                return network(make(data)[None]).logits.float().softmax(1)[0]

        return run

    def predictor_scores(data: bytes) -> torch.Tensor:
        scores = torch.zeros(len(predictor.class_names))
        for p in predictor.predict(data, top_k=len(predictor.class_names)):
            scores[p["class_id"]] = p["score"]
        return scores

    pipelines = {"reference": scores_of(reference), "torchvision v2": scores_of(torchvision),
                 "OpenCV INTER_AREA": scores_of(opencv), "PIL in float32": scores_of(pil_float),
                 "finegrain Predictor": predictor_scores}  # fmt: skip
    jpegs = phone_jpegs(len(args.photos), args.photos)
    scores = {name: [run(data) for data in jpegs] for name, run in pipelines.items()}
    theirs = scores["reference"]
    gaps = [float(s.topk(5).values.diff().abs().min()) for s in theirs]
    print(f"{args.checkpoint}: {len(jpegs)} photos, reference's smallest top-5 gap per photo: "
          + " ".join(f"{g:.4f}" for g in gaps))  # fmt: skip
    report = {"checkpoint": str(args.checkpoint), "photos": [str(p) for p in args.photos], "gaps": gaps,
              "pipelines": {}, "top5": {name: [[[int(i), round(float(v), 5)] for v, i in zip(*s.topk(5), strict=True)]
                                               for s in photos] for name, photos in scores.items()}}  # fmt: skip
    for name, ours in scores.items():
        if name == "reference":
            continue
        top = [(o.topk(5).indices.tolist(), t.topk(5).indices.tolist()) for o, t in zip(ours, theirs, strict=True)]
        row = {"same_top1": sum(a[0] == b[0] for a, b in top), "same_top5": sum(a == b for a, b in top),
               "same_top5_set": sum(set(a) == set(b) for a, b in top),
               "max_score_difference": max(float((o - t).abs().max()) for o, t in zip(ours, theirs, strict=True)),
               }  # fmt: skip
        report["pipelines"][name] = row
        print(f"  {name:20s} top-1 {row['same_top1']}/{len(top)}  top-5 in order {row['same_top5']}/{len(top)}  "
              f"five species {row['same_top5_set']}/{len(top)}  largest score difference "
              f"{row['max_score_difference']:.4f}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
