"""Our ONNX export against torchvision's own, side by side in onnxruntime: the same weights, the
same photos, the same detections.

    P=benchmarks/.venvs/torch/bin/python          # bash benchmarks/setup_peers.sh makes it
    $P benchmarks/onnx_vs_torchvision.py torch --weights /tmp/onnx_bench/weights.npz \\
        --out /tmp/onnx_bench/torchvision.onnx
    python benchmarks/onnx_vs_torchvision.py run --weights /tmp/onnx_bench/weights.npz \\
        --torchvision_onnx /tmp/onnx_bench/torchvision.onnx --work /tmp/onnx_bench --name r50

``torch`` (the torch venv) writes --weights if it does not exist: ``maskrcnn_resnet50_fpn`` with
the parity scripts' seeded weights (spread-out scores, so that a photo has detections above the
0.05 threshold), calibrated on the first photo; then exports it as ``torch.onnx.export`` does
(TorchScript exporter, opset 17, one [3, H, W] float image).
``run`` (our venv) converts the same state dict (``mrcnn_tf.tools.convert``), exports it with
the export CLI (``--format onnx``; the export is timed), and also exports the SavedModel
(``image_tensor``), both with ``--mask_output full`` (default; torchvision's ONNX pastes its
masks on the image too) or ``box``. Each model runs in onnxruntime with 2 threads (or
TensorFlow, all cores: 2 here) on the same photos (``--photos``, default the first 4 of
../shared/data/coco_tiny16), one photo per call, after a warm-up call, in alternating rounds; the
median seconds per photo of each is reported with their ratios. The detections are compared per
photo: count, classes and the largest box difference in pixels (both keep torchvision's score
threshold 0.05 and its 100). Results go to
benchmarks/results/DATE-onnx-vs-torchvision-NAME.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
TINY16 = os.path.join(os.path.dirname(REPO), "shared", "data", "coco_tiny16", "train2017")


def export_torch(weights: str, out: str, photo: str) -> None:
    import torch

    from tests.scripts import torchvision_parity as tp

    model = tp._torch_model(small=False)
    if not os.path.exists(weights):
        tp._randomise(model, 0)
        model.eval()
        x = torch.from_numpy(_photos([photo])[0].copy()).permute(2, 0, 1).float() / 255
        tp._calibrate(model, x)
        os.makedirs(os.path.dirname(os.path.abspath(weights)), exist_ok=True)
        np.savez(weights, **{k: v.numpy() for k, v in model.state_dict().items()
                             if not k.endswith("num_batches_tracked")})
    with np.load(weights) as f:
        state = {k: torch.from_numpy(f[k]) for k in f.files}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing), missing
    model.eval()
    x = torch.rand(3, 480, 640)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    t0 = time.perf_counter()
    torch.onnx.export(model, ([x],), out, opset_version=17, input_names=["image"],
                      output_names=["boxes", "labels", "scores", "masks"],
                      dynamic_axes={"image": [1, 2], "boxes": [0], "labels": [0], "scores": [0],
                                    "masks": [0, 2, 3]}, dynamo=False)
    print(f"torchvision ONNX export {time.perf_counter() - t0:.1f} s -> {out}")


def _photos(paths):
    from PIL import Image

    return [np.asarray(Image.open(p).convert("RGB")) for p in paths]


def run(weights: str, torchvision_onnx: str, work: str, name: str, photos, rounds: int,
        mask_output: str) -> int:
    import onnxruntime as ort
    import tensorflow as tf

    from mrcnn_tf.tools.convert import convert

    run_dir = os.path.join(work, "run")
    if not os.path.exists(os.path.join(run_dir, "config.yaml")):
        with np.load(weights) as f:
            convert({k: f[k] for k in f.files}, run_dir)
    exports = {}
    for fmt in ("onnx", "saved_model"):
        out = os.path.join(work, f"ours_{fmt}")
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, os.path.join(REPO, "export", "export_saved_model.py"),
                        "--model_dir", run_dir, "--output", out, "--format", fmt,
                        "--version", "1", "--mask_output", mask_output, "--input_type",
                        "image_tensor"], check=True, cwd=REPO)
        exports[fmt] = time.perf_counter() - t0
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    ours = ort.InferenceSession(os.path.join(work, "ours_onnx", "1", "model.onnx"), options,
                                providers=["CPUExecutionProvider"])
    theirs = ort.InferenceSession(torchvision_onnx, options, providers=["CPUExecutionProvider"])
    saved = tf.saved_model.load(os.path.join(work, "ours_saved_model", "1"))
    serve = saved.signatures["serving_default"]
    images = _photos(photos)

    def run_ours(image):
        o = dict(zip([x.name for x in ours.get_outputs()],
                     ours.run(None, {ours.get_inputs()[0].name: image[None]})))
        n = int(o["num_detections"][0])
        return o["detection_boxes"][0, :n][:, [1, 0, 3, 2]], o["detection_classes"][0, :n]

    def run_theirs(image):
        x = (image.astype(np.float32) / 255.0).transpose(2, 0, 1)
        boxes, labels, scores, masks = theirs.run(None, {"image": x})
        return boxes, labels

    def run_saved(image):
        o = serve(tf.constant(image[None]))
        n = int(o["num_detections"][0])
        return o["detection_boxes"][0, :n].numpy()[:, [1, 0, 3, 2]], o[
            "detection_classes"][0, :n].numpy()

    sides = {"ours_onnx": run_ours, "torchvision_onnx": run_theirs, "ours_saved_model": run_saved}
    compared = []
    for i, image in enumerate(images):
        (a_boxes, a_cls), (b_boxes, b_cls) = run_ours(image), run_theirs(image)
        same = len(a_cls) == len(b_cls) and (np.asarray(a_cls) == np.asarray(b_cls)).all()
        compared.append({"photo": os.path.basename(photos[i]), "ours": int(len(a_cls)),
                         "torchvision": int(len(b_cls)), "same_classes": bool(same),
                         "max_box_px": float(np.abs(a_boxes - b_boxes).max())
                         if same and len(a_cls) else None})
        run_saved(image)  # warm-up
    times = {k: [] for k in sides}
    for _ in range(rounds):
        for k, fn in sides.items():
            for image in images:
                t0 = time.perf_counter()
                fn(image)
                times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"benchmark": "onnx_vs_torchvision", "name": name,
              "date": datetime.date.today().isoformat(), "cpus": os.cpu_count(),
              "photos": [os.path.basename(p) for p in photos], "rounds": rounds,
              "mask_output": mask_output,
              "median_s_per_photo": {k: round(v, 3) for k, v in med.items()},
              "ours_onnx_over_torchvision_onnx": round(med["ours_onnx"] /
                                                       med["torchvision_onnx"], 3),
              "ours_onnx_over_ours_saved_model": round(med["ours_onnx"] /
                                                       med["ours_saved_model"], 3),
              "export_s": {k: round(v, 1) for k, v in exports.items()},
              "detections": compared}
    print(json.dumps(result, indent=1))
    out = os.path.join(REPO, "benchmarks", "results",
                       f"{result['date']}-onnx-vs-torchvision-{name}.json")
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    return 0 if all(c["same_classes"] for c in compared) else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("torch", help="(torch venv) torchvision's own ONNX export")
    t.add_argument("--weights", required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--photos", nargs="*", default=None)
    r = sub.add_parser("run", help="(our venv) our exports, then both timed in onnxruntime")
    r.add_argument("--weights", required=True)
    r.add_argument("--torchvision_onnx", required=True)
    r.add_argument("--work", required=True)
    r.add_argument("--name", default="r50")
    r.add_argument("--photos", nargs="*", default=None)
    r.add_argument("--rounds", type=int, default=3)
    r.add_argument("--mask_output", choices=("full", "box"), default="full")
    args = p.parse_args(argv)
    photos = args.photos or [os.path.join(TINY16, n) for n in sorted(os.listdir(TINY16))[:4]]
    if args.cmd == "torch":
        export_torch(args.weights, args.out, photos[0])
        return 0
    return run(args.weights, args.torchvision_onnx, args.work, args.name, photos, args.rounds,
               args.mask_output)


if __name__ == "__main__":
    sys.exit(main())
