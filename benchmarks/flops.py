"""FLOPs of our R50-FPN inference at 800x1333 and the GFLOP/s it achieves on this CPU.

    python benchmarks/flops.py [--config configs/torchvision_r50_fpn.yaml] [--runs 5]

FLOPs are TensorFlow's own count (tf.compat.v1.profiler float_operation: 2 per multiply-add) of
the graphs of the dense parts with static shapes: backbone + FPN on the padded 800x1344 input,
the RPN head on P2..P6, the box head on the 1000 proposals, the mask head on the 100 detections.
Proposal selection, RoIAlign, NMS and mask gathering are not counted (they are not multiply-adds;
their time is in the latency). The achieved rate divides those FLOPs by the median end-to-end
latency of the whole model (so it is a lower bound on the dense parts' rate); the peaks are this
CPU's theoretical FP32 rate (cores x clock x FLOPs per cycle, given with the assumption) and a
measured 4096x4096 matmul.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import tensorflow as tf

import mrcnn_tf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def graph_flops(fn, *specs) -> int:
    graph = tf.function(fn).get_concrete_function(*specs).graph
    opts = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    opts["output"] = "none"
    return int(tf.compat.v1.profiler.profile(graph=graph, options=opts).total_float_ops)


def model_flops(model, height: int, width: int, proposals: int, detections: int) -> dict:
    c = model.config.model
    d = c.preprocess.size_divisibility
    ph, pw = -(-height // d) * d, -(-width // d) * d
    spec = tf.TensorSpec([1, ph, pw, c.backbone.input_channels], tf.float32)
    ch = c.fpn.channels
    levels = range(c.fpn.min_level, c.fpn.max_level + 1)
    feat_specs = {f"p{lv}": tf.TensorSpec([1, -(-ph // 2 ** lv), -(-pw // 2 ** lv), ch])
                  for lv in levels}
    s_box, s_mask = c.roi_align.box_output_size, c.roi_align.mask_output_size
    return {
        "backbone+fpn": graph_flops(lambda x: model.fpn(model.backbone(x)), spec),
        "rpn_head": graph_flops(lambda f: model.rpn_head(f), feat_specs),
        "box_head": graph_flops(lambda r: model.box_head(r),
                                tf.TensorSpec([1, proposals, s_box, s_box, ch])),
        "mask_head": graph_flops(lambda r: model.mask_head(r),
                                 tf.TensorSpec([1, detections, s_mask, s_mask, ch])),
    }


def matmul_gflops(n: int = 4096, runs: int = 5) -> float:
    a = tf.random.normal([n, n])
    b = tf.random.normal([n, n])
    mm = tf.function(lambda: tf.reduce_sum(tf.matmul(a, b)))
    float(mm())
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        float(mm())
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / min(times) / 1e9


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=os.path.join(REPO, "configs", "torchvision_r50_fpn.yaml"))
    p.add_argument("--height", type=int, default=800)
    p.add_argument("--width", type=int, default=1333)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--flops_per_cycle", type=int, default=32,
                   help="FP32 FLOPs per cycle per core (32: two 256-bit FMA pipes, e.g. AMD Zen "
                        "4 running AVX-512 as 2x256; 64 for two 512-bit FMA units)")
    args = p.parse_args()
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    cfg = mrcnn_tf.load_config(args.config, ["model.detection.score_threshold=0.0"])
    model = mrcnn_tf.build_model(cfg)
    parts = model_flops(model, args.height, args.width, cfg.model.rpn.post_nms_topk_test,
                        cfg.model.detection.max_detections)
    total = sum(parts.values())
    image = tf.constant(np.random.default_rng(0).integers(0, 255, (1, args.height, args.width, 3),
                                                          dtype=np.uint8))
    fn = tf.function(lambda x: model(x, training=False))
    fn(image)
    times = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        int(fn(image)["num_detections"][0])
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    mhz = None
    for line in open("/proc/cpuinfo"):
        if line.startswith("cpu MHz"):
            mhz = float(line.split(":")[1])
            break
    cores = args.threads
    peak = cores * (mhz or 0) / 1000 * args.flops_per_cycle
    measured = matmul_gflops()
    for k, v in parts.items():
        print(f"{k:>14}: {v / 1e9:8.1f} GFLOP")
    print(f"{'total':>14}: {total / 1e9:8.1f} GFLOP at {args.height}x{args.width}")
    print(f"median latency {median:.3f} s over {args.runs} runs -> {total / median / 1e9:.1f} "
          f"GFLOP/s")
    print(f"theoretical FP32 peak {peak:.0f} GFLOP/s ({cores} cores x {mhz} MHz x "
          f"{args.flops_per_cycle} FLOP/cycle) -> {100 * total / median / 1e9 / peak:.0f}% of it")
    print(f"measured 4096x4096 matmul: {measured:.0f} GFLOP/s -> model at "
          f"{100 * total / median / 1e9 / measured:.0f}% of it")


if __name__ == "__main__":
    main()
