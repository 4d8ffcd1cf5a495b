"""Forward (inference) time and parameter count of our model for one config and input size.

    python benchmarks/model_forward.py --config configs/shapes.yaml --size 128
    python benchmarks/model_forward.py --config configs/coco_r50_fpn_1x.yaml --size 1024 \
        --set model.preprocess.resize=square model.preprocess.square_size=1024

Prints the parameter count, the first (trace) call and the median of --runs timed calls of the
tf.function-wrapped model on one random uint8 image of --size x --size, batch 1.
"""

import argparse
import statistics
import time

import numpy as np
import tensorflow as tf

import mrcnn_tf


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--set", nargs="*", default=[])
    args = p.parse_args()
    cfg = mrcnn_tf.load_config(args.config, args.set)
    model = mrcnn_tf.build_model(cfg)
    image = np.random.default_rng(0).integers(0, 255, (1, args.size, args.size, 3), np.uint8)
    fn = tf.function(lambda x: model(x, training=False))
    t0 = time.perf_counter()
    fn(image)["num_detections"].numpy()
    first = time.perf_counter() - t0
    times = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        fn(image)["num_detections"].numpy()
        times.append(time.perf_counter() - t0)
    print(f"config={args.config} size={args.size} params={model.count_params():,} "
          f"first_call={first:.2f}s median={statistics.median(times):.3f}s "
          f"min={min(times):.3f}s max={max(times):.3f}s runs={args.runs} "
          f"threads={tf.config.threading.get_intra_op_parallelism_threads() or 'default'}")


if __name__ == "__main__":
    main()
