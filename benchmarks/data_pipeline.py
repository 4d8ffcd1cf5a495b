"""Images/s of the COCO JSON input pipeline (training mode: decode, rasterise masks, resize,
flip, pad) over ../shared/data/coco128 at 1024 px.

    python benchmarks/data_pipeline.py [--data ../shared/data/coco128] [--mask_mode mini]
        [--batches 40] [--batch_size 8]

The first batches (warm-up: tracing, thread-pool start) are not timed.
"""

import argparse
import os
import pathlib
import time

import mrcnn_tf
from mrcnn_tf.data import build_dataset

REPO = pathlib.Path(__file__).resolve().parents[1]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "coco128"))
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--mask_mode", default="mini", choices=("mini", "full"))
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args()
    ann = os.path.join(args.data, "annotations", "instances_train2017.json")
    cfg = mrcnn_tf.load_config(str(REPO / "configs" / "coco_r50_fpn_1x.yaml"), [
        f"data.train.annotation_file={ann}", f"data.train.image_dir={args.data}/train2017",
        "model.preprocess.resize=square", f"model.preprocess.square_size={args.size}",
        f"data.image_size={args.size}", f"data.mask_mode={args.mask_mode}",
        f"train.batch_size={args.batch_size}", "data.keep_empty_images=true"])
    it = iter(build_dataset(cfg, training=True))
    for _ in range(args.warmup):
        next(it)
    t0 = time.perf_counter()
    for _ in range(args.batches):
        next(it)
    dt = time.perf_counter() - t0
    n = args.batches * args.batch_size
    print(f"coco128 pipeline at {args.size} px, masks={args.mask_mode}: {n} images in "
          f"{dt:.1f} s = {n / dt:.1f} images/s (batch {args.batch_size}, {os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
