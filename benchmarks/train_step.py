"""Seconds per training step (forward + backward + update) of our model, batch 1 by default.

    python benchmarks/train_step.py --config configs/coco_r50_fpn_1x.yaml --size 1024 \
        --set model.preprocess.resize=square model.preprocess.square_size=1024 data.image_size=1024

    python benchmarks/train_step.py --config configs/shapes.yaml --size 128 --batch 8 --steps 60 \
        --set train.mixed_precision=float32        # the main job's step (auto: its precision)

Uses synthetic shapes images at --size with their targets (no files needed); prints the first
step (trace) and the median of --steps timed steps, in the dtype policy that train.py would use
for the config's train.mixed_precision.
"""

import argparse
import statistics
import time

import keras
import tensorflow as tf

import mrcnn_tf
from mrcnn_tf.data import build_dataset
from mrcnn_tf.training import dtype_policy


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--set", nargs="*", default=[])
    args = p.parse_args()
    cfg = mrcnn_tf.load_config(args.config, [
        "data.train.source=shapes", "model.num_classes=3", f"train.batch_size={args.batch}",
        *args.set])
    policy = dtype_policy(cfg.train.mixed_precision)
    keras.mixed_precision.set_global_policy(policy)
    model = mrcnn_tf.build_model(cfg)
    model.compile()
    batch = next(iter(build_dataset(cfg, training=True)))
    step = tf.function(model.train_step)
    t0 = time.perf_counter()
    float(step(batch)["loss"])
    first = time.perf_counter() - t0
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        float(step(batch)["loss"])
        times.append(time.perf_counter() - t0)
    print(f"config={args.config} size={args.size} batch={args.batch} policy={policy} "
          f"first_step={first:.2f}s median={statistics.median(times):.3f}s "
          f"min={min(times):.3f}s max={max(times):.3f}s steps={args.steps}")


if __name__ == "__main__":
    main()
