"""Training step and inference with and without XLA (``train.jit_compile``), side by side.

    python benchmarks/xla_step.py                        # the main job's config (shapes)
    python benchmarks/xla_step.py --config configs/torchvision_r50_fpn.yaml --coco128 \\
        --steps 4 --warmup 1 --name r50

Three variants, each in a fresh process, one after the other:
  ``default``  the config as it is (crop_and_resize RoIAlign, TensorFlow's NMS kernels, the mask
               head on the batch's positives): what train.py runs without XLA;
  ``static``   the settings XLA needs (model.roi_align.impl=gather, model.nms_impl=static,
               model.mask_head.static_rois=true), without XLA;
  ``xla``      the same settings with ``train.jit_compile=true``.
Each builds what train.py builds (``build_dataset`` and the model's ``make_train_function``),
times the first step (trace and, for XLA, compilation), ``--warmup`` more steps, then the median
of ``--steps`` steps. Inference: the model on a batch of ``--infer_batch`` pipeline images
(``tf.function``, with ``jit_compile`` for ``xla``), median of ``--infer_runs`` calls. Results go
to benchmarks/results/DATE-xla-NAME.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import statistics
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
COCO128 = REPO.parent / "shared" / "data" / "coco128"
XLA = ["model.roi_align.impl=gather", "model.nms_impl=static", "model.mask_head.static_rois=true"]
VARIANTS = {"default": [], "static": XLA, "xla": XLA + ["train.jit_compile=true"]}


def worker(args) -> dict:
    import resource

    import tensorflow as tf

    sys.path.insert(0, str(REPO))
    import mrcnn_tf
    from mrcnn_tf.data import build_dataset

    overrides = list(args.set) + VARIANTS[args.variant]
    if args.coco128:
        overrides += ["model.num_classes=80", "data.class_ids=contiguous",
                      "data.train.source=coco", "data.cache=false",
                      f"data.train.annotation_file={COCO128}/annotations/instances_train2017.json",
                      f"data.train.image_dir={COCO128}/train2017"]
    cfg = mrcnn_tf.load_config(REPO / args.config, overrides)
    it = iter(build_dataset(cfg, training=True).repeat())
    model = mrcnn_tf.build_model(cfg)
    model.compile(jit_compile=cfg.train.jit_compile)
    fn = model.make_train_function()
    times = []
    shapes = set()
    for _ in range(1 + args.warmup + args.steps):
        batch = next(it)
        shapes.add(tuple(batch[0].shape))
        t = time.perf_counter()
        float(fn(iter([batch]))["loss"])
        times.append(time.perf_counter() - t)
    images = batch[0][: args.infer_batch]
    infer = tf.function(lambda x: model(x, training=False), jit_compile=cfg.train.jit_compile)
    t = time.perf_counter()
    infer(images)
    first_infer = time.perf_counter() - t
    infer_times = []
    for _ in range(args.infer_runs):
        t = time.perf_counter()
        infer(images)["num_detections"].numpy()
        infer_times.append(time.perf_counter() - t)
    return {"variant": args.variant, "overrides": overrides, "batch": cfg.train.batch_size,
            "input_shapes": sorted(shapes), "first_step_s": times[0],
            "median_step_s": statistics.median(times[1 + args.warmup:]),
            "steps_s": times, "first_inference_s": first_infer,
            "median_inference_s": statistics.median(infer_times),
            "inference_input": list(images.shape),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/shapes.yaml")
    p.add_argument("--set", nargs="*", default=[], help="extra config overrides (all variants)")
    p.add_argument("--coco128", action="store_true",
                   help="train on ../shared/data/coco128 (80 classes) instead of the config's data")
    p.add_argument("--steps", type=int, default=20, help="timed steps (median)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps after the first")
    p.add_argument("--infer_batch", type=int, default=1)
    p.add_argument("--infer_runs", type=int, default=10)
    p.add_argument("--variants", default="default,static,xla")
    p.add_argument("--name", default="shapes")
    p.add_argument("--variant", help=argparse.SUPPRESS)  # internal: one worker
    args = p.parse_args(argv)
    if args.variant:
        print("RESULT " + json.dumps(worker(args)))
        return 0
    results = []
    for variant in args.variants.split(","):
        cmd = [sys.executable, __file__, "--variant", variant] + [
            a for a in (argv if argv is not None else sys.argv[1:])]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO).stdout
        line = next(x for x in out.splitlines() if x.startswith("RESULT "))
        results.append(json.loads(line[len("RESULT "):]))
        r = results[-1]
        print(f"{variant:8s} first step {r['first_step_s']:.1f} s, median step "
              f"{r['median_step_s']:.3f} s, inference {r['median_inference_s']:.3f} s "
              f"(first {r['first_inference_s']:.1f} s), peak RSS {r['peak_rss_mib']:.0f} MiB",
              flush=True)
    base = next((r for r in results if r["variant"] == "default"), None)
    if base:
        for r in results:
            step = r["median_step_s"] / base["median_step_s"]
            infer = r["median_inference_s"] / base["median_inference_s"]
            print(f"{r['variant']:8s} / default: step {step:.2f}x, inference {infer:.2f}x")
    path = REPO / "benchmarks" / "results" / (
        f"{datetime.date.today().isoformat()}-xla-{args.name}.json")
    path.write_text(json.dumps({"command": " ".join(["python", "benchmarks/xla_step.py"]
                                                    + (argv or sys.argv[1:])),
                                "results": results}, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
