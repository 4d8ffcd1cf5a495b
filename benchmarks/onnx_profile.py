"""Where an ONNX model spends its time in onnxruntime: kernel time per operator type and per
node, from onnxruntime's own profiler, over a few calls on one photo.

    python benchmarks/onnx_profile.py /tmp/onnx_bench/ours_onnx/1/model.onnx \\
        ../shared/data/coco_tiny16/train2017/000000060623.jpg

The model takes uint8 [1, H, W, 3] (ours) or, with --float_chw, float [3, H, W] in 0..1
(torchvision's export). Prints the seconds per call, then the top operator types and nodes.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile
import time

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("photo")
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--float_chw", action="store_true")
    p.add_argument("--top", type=int, default=15)
    args = p.parse_args(argv)
    import onnxruntime as ort
    from PIL import Image

    options = ort.SessionOptions()
    options.enable_profiling = True
    options.intra_op_num_threads = args.threads
    options.profile_file_prefix = os.path.join(tempfile.mkdtemp(prefix="ort_profile_"), "ort")
    session = ort.InferenceSession(args.model, options, providers=["CPUExecutionProvider"])
    image = np.asarray(Image.open(args.photo).convert("RGB"))
    x = (image.astype(np.float32) / 255).transpose(2, 0, 1) if args.float_chw else image[None]
    feed = {session.get_inputs()[0].name: x}
    seconds = []
    for _ in range(args.calls):
        t0 = time.perf_counter()
        session.run(None, feed)
        seconds.append(time.perf_counter() - t0)
    print("seconds per call:", [round(s, 2) for s in seconds])
    with open(session.end_profiling()) as f:
        events = json.load(f)
    by_type, by_node = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by_type[e["args"]["op_name"]] += e["dur"]
            by_node[e["name"].removesuffix("_kernel_time")] += e["dur"]
    total = sum(by_type.values())
    print(f"kernel time over {args.calls} calls: {total / 1e6:.2f} s")
    for name, us in by_type.most_common(args.top):
        print(f"  {name:28s} {us / 1e6:8.2f} s {100 * us / total:5.1f}%")
    print("nodes:")
    for name, us in by_node.most_common(args.top):
        print(f"  {name[:80]:80s} {us / 1e6:8.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
