"""SavedModel, ONNX and LiteRT side by side: file size, CPU latency and the differences in
detections.

    python benchmarks/export_formats.py --model_dir runs/shapes --name shapes-trained
    python benchmarks/export_formats.py --checkpoint /tmp/torchvision_maskrcnn_full.npz \\
        --name r50-random            # converted first (a torchvision state dict, .npz or .pth)

The exports come from the export CLI: ``--format saved_model`` (``--input_type image_tensor``),
``--format onnx`` and ``--format litert --image_size H,W``, all with box masks (LiteRT has no
other). Each runs on the same real photos, one image per call, after two warm-up calls; the
median over ``--runs`` passes is reported. LiteRT takes one fixed size, so the photos are those of
the most common size among the first 32 of ../shared/data/coco128/train2017 (at most 4; or
``--images`` of one size). The detections of ONNX and LiteRT are compared with the SavedModel's
per photo: same count and classes, the largest box and mask-probability differences. Results go to
benchmarks/results/DATE-export-formats-NAME.json.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
COCO128 = REPO.parent / "shared" / "data" / "coco128"


def _size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _export(run: str, out: str, fmt: str, size) -> str:
    extra = ["--image_size", f"{size[0]},{size[1]}"] if fmt == "litert" else []
    subprocess.run([sys.executable, str(REPO / "export" / "export_saved_model.py"),
                    "--model_dir", run, "--output", out, "--format", fmt, "--version", "1",
                    "--input_type", "image_tensor", "--mask_output", "box"] + extra,
                   check=True, cwd=REPO)
    name = {"onnx": "model.onnx", "litert": "model.tflite"}.get(fmt)
    return os.path.join(out, "1", name) if name else os.path.join(out, "1")


def _time(fn, images, runs: int):
    for image in images[:2]:
        fn(image)
    times = []
    for _ in range(runs):
        for image in images:
            t = time.perf_counter()
            fn(image)
            times.append(time.perf_counter() - t)
    return statistics.median(times), [fn(image) for image in images]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model_dir", help="a run directory")
    src.add_argument("--checkpoint", help="a checkpoint mrcnn_tf.tools.convert reads")
    p.add_argument("--name", required=True, help="names the result file")
    p.add_argument("--images", nargs="*", default=None)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args(argv)
    import collections

    import onnxruntime as ort
    import tensorflow as tf
    from ai_edge_litert.interpreter import Interpreter
    from PIL import Image

    images = args.images or sorted(glob.glob(str(COCO128 / "train2017" / "*.jpg")))[:32]
    pixels = [np.asarray(Image.open(path).convert("RGB")) for path in images]
    size = collections.Counter(p.shape[:2] for p in pixels).most_common(1)[0][0]
    keep = [i for i, p in enumerate(pixels) if p.shape[:2] == size][:4]
    images, pixels = [images[i] for i in keep], [pixels[i] for i in keep]
    with tempfile.TemporaryDirectory() as tmp:
        run = args.model_dir
        if run is None:
            from mrcnn_tf.tools.convert import convert

            run = os.path.join(tmp, "run")
            convert(args.checkpoint, run)
        paths = {fmt: _export(run, os.path.join(tmp, fmt), fmt, size)
                 for fmt in ("saved_model", "onnx", "litert")}
        signature = tf.saved_model.load(paths["saved_model"]).signatures["image_tensor"]
        session = ort.InferenceSession(paths["onnx"], providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        lite = Interpreter(model_path=paths["litert"]).get_signature_runner()

        def run_saved(image):
            out = signature(images=tf.constant(image[None]))
            return {k: v.numpy()[0] for k, v in out.items()}

        def run_onnx(image):
            return {k: v[0] for k, v in zip(names, session.run(None, {"images": image[None]}))}

        def run_litert(image):
            return {k: v[0] for k, v in lite(images=image[None]).items()}

        timed = {fmt: _time(fn, pixels, args.runs) for fmt, fn in (
            ("saved_model", run_saved), ("onnx", run_onnx), ("litert", run_litert))}
        sizes = {f"{fmt}_bytes": _size(path) for fmt, path in paths.items()}
    differences = {}
    for fmt in ("onnx", "litert"):
        rows = []
        for a, b in zip(timed["saved_model"][1], timed[fmt][1]):
            n = int(a["num_detections"])
            same = n == int(b["num_detections"]) and np.array_equal(
                a["detection_classes"][:n], b["detection_classes"][:n])

            def diff(key, a=a, b=b, n=n):
                return float(np.abs(a[key][:n] - b[key][:n]).max()) if n else 0.0

            rows.append({"detections": n, "same_classes": bool(same),
                         "box_max_abs_diff": diff("detection_boxes"),
                         "score_max_abs_diff": diff("detection_scores"),
                         "mask_prob_max_abs_diff": diff("detection_masks")})
        differences[fmt] = rows
    seconds = {fmt: t for fmt, (t, _) in timed.items()}
    result = {"name": args.name, "image_size": list(size),
              "images": [os.path.basename(i) for i in images], "runs": args.runs,
              "median_seconds": seconds,
              "over_saved_model": {f: seconds[f] / seconds["saved_model"]
                                   for f in ("onnx", "litert")},
              **sizes, "differences_from_saved_model": differences}
    print(json.dumps(result, indent=1))
    out = REPO / "benchmarks" / "results" / (
        f"{datetime.date.today().isoformat()}-export-formats-{args.name}.json")
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
