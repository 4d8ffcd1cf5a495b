"""SavedModel and ONNX side by side: file size, CPU latency and the difference in detections.

    python benchmarks/export_formats.py --model_dir runs/shapes --name shapes-trained
    python benchmarks/export_formats.py --checkpoint /tmp/torchvision_maskrcnn_full.npz \\
        --name r50-random            # converted first (a torchvision state dict, .npz or .pth)

Both exports come from the export CLI (``--format saved_model`` with ``--input_type
image_tensor``, and ``--format onnx``), with full-size masks. Each runs on the same real
photos (``--images``, default: the first 4 of ../shared/data/coco128/train2017), one image per
call, after two warm-up calls; the median over ``--runs`` passes is reported. The detections are
compared per photo: same count and classes, the largest box difference, and the lowest mask IoU.
Results go to benchmarks/results/DATE-export-formats-NAME.json.
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


def _export(run: str, out: str, fmt: str) -> str:
    subprocess.run([sys.executable, str(REPO / "export" / "export_saved_model.py"),
                    "--model_dir", run, "--output", out, "--format", fmt, "--version", "1",
                    "--input_type", "image_tensor", "--mask_output", "full"],
                   check=True, cwd=REPO)
    return os.path.join(out, "1", "model.onnx") if fmt == "onnx" else os.path.join(out, "1")


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
    import onnxruntime as ort
    import tensorflow as tf
    from PIL import Image

    images = args.images or sorted(glob.glob(str(COCO128 / "train2017" / "*.jpg")))[:4]
    pixels = [np.asarray(Image.open(path).convert("RGB")) for path in images]
    with tempfile.TemporaryDirectory() as tmp:
        run = args.model_dir
        if run is None:
            from mrcnn_tf.tools.convert import convert

            run = os.path.join(tmp, "run")
            convert(args.checkpoint, run)
        saved = _export(run, os.path.join(tmp, "saved"), "saved_model")
        onnx = _export(run, os.path.join(tmp, "onnx"), "onnx")
        signature = tf.saved_model.load(saved).signatures["image_tensor"]
        session = ort.InferenceSession(onnx, providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]

        def run_saved(image):
            out = signature(images=tf.constant(image[None]))
            return {k: v.numpy()[0] for k, v in out.items()}

        def run_onnx(image):
            return {k: v[0] for k, v in zip(names, session.run(None, {"images": image[None]}))}

        t_saved, out_saved = _time(run_saved, pixels, args.runs)
        t_onnx, out_onnx = _time(run_onnx, pixels, args.runs)
        sizes = {"saved_model_bytes": _size(saved), "onnx_bytes": _size(onnx)}
    per_image = []
    for a, b in zip(out_saved, out_onnx):
        n = int(a["num_detections"])
        same = n == int(b["num_detections"]) and np.array_equal(
            a["detection_classes"][:n], b["detection_classes"][:n])
        box = float(np.abs(a["detection_boxes"][:n] - b["detection_boxes"][:n]).max()) if n else 0
        ma, mb = a["detection_masks"][:n].astype(bool), b["detection_masks"][:n].astype(bool)
        inter, union = (ma & mb).sum(axis=(1, 2)), (ma | mb).sum(axis=(1, 2))
        iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
        per_image.append({"detections": n, "same_classes": bool(same), "box_max_abs_diff": box,
                          "mask_iou_min": float(iou.min()) if n else 1.0})
    result = {"name": args.name, "images": [os.path.basename(i) for i in images],
              "runs": args.runs, "median_seconds": {"saved_model": t_saved, "onnx": t_onnx},
              "onnx_over_saved_model": t_onnx / t_saved, **sizes, "per_image": per_image}
    print(json.dumps(result, indent=1))
    out = REPO / "benchmarks" / "results" / (
        f"{datetime.date.today().isoformat()}-export-formats-{args.name}.json")
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
