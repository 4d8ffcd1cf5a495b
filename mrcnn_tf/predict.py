"""Run a trained model on image files: one PNG overlay per image and a COCO results JSON.

    python -m mrcnn_tf.predict --model_dir runs/shapes IMAGE [IMAGE ...] --output_dir out/
    python -m mrcnn_tf.predict --saved_model export/1 IMAGE ... --output_dir out/

Image ids in the JSON are the file names' numbers where they are numeric (COCO's
000000000009.jpg -> 9), otherwise 1, 2, ... in the order given; classes are the dataset's
category ids.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import tensorflow as tf


def _image_id(path: str, index: int) -> int:
    stem = os.path.splitext(os.path.basename(path))[0]
    return int(stem) if stem.isdigit() else index + 1


def load_model_dir(model_dir: str):
    """(predict_fn, category_ids, class_names, mask_paste) of a training run's latest
    checkpoint. predict_fn: uint8 [1, H, W, 3] -> detections in that image's pixels, masks
    [1, D, 28, 28] to paste with ``mask_paste``."""
    from mrcnn_tf.checkpoint import restore
    from mrcnn_tf.model import build_model
    from mrcnn_tf.rundir import read_run

    config, latest, ids, names = read_run(model_dir)
    model = build_model(config)
    restore(model, latest)
    fn = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
    return ((lambda x: {k: v.numpy() for k, v in fn(x).items()}), ids, names,
            config.model.detection.mask_paste)


def load_saved_model(path: str):
    """(predict_fn, category_ids, class_names, None) of an exported SavedModel (its
    ``image_tensor`` signature returns dataset category ids and full-size masks, pasted as the
    exported model's config says)."""
    loaded = tf.saved_model.load(path)
    sig = loaded.signatures["image_tensor"]
    with open(os.path.join(path, "assets", "labels.json")) as f:
        labels = json.load(f)
    ids = [e["id"] for e in labels]
    to_class = {cid: i + 1 for i, cid in enumerate(ids)}

    def fn(x):
        out = {k: v.numpy() for k, v in sig(images=tf.constant(x, tf.uint8)).items()}
        out["detection_classes"] = np.vectorize(lambda c: to_class.get(int(c), 0))(
            out["detection_classes"])
        return out

    return fn, ids, [e["name"] for e in labels], None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model_dir", help="a train.py run (latest checkpoint)")
    src.add_argument("--saved_model", help="an exported SavedModel version directory")
    p.add_argument("images", nargs="+")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--score_threshold", type=float, default=0.5, help="drawing threshold")
    args = p.parse_args(argv)

    from mrcnn_tf.evaluation.coco import CocoEvaluator
    from mrcnn_tf.ops.masks import paste_masks
    from mrcnn_tf.visualize import draw_detections, save_png

    if args.model_dir:
        predict, ids, names, mask_paste = load_model_dir(args.model_dir)
    else:
        predict, ids, names, mask_paste = load_saved_model(args.saved_model)
    os.makedirs(args.output_dir, exist_ok=True)
    ev = CocoEvaluator(ids, names)
    for index, path in enumerate(args.images):
        try:
            image = tf.io.decode_image(tf.io.read_file(path), channels=3,
                                       expand_animations=False).numpy()
        except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError) as e:
            print(f"skipped {path}: not a readable image ({e.message.splitlines()[0]})",
                  file=sys.stderr)
            continue
        det = {k: v[0] for k, v in predict(image[None]).items()}
        h, w = image.shape[:2]
        n = int(det["num_detections"])
        masks = det["detection_masks"][:n]
        if masks.shape[1:] != (h, w):
            masks = paste_masks(masks[None], det["detection_boxes"][None, :n], h, w,
                                method=mask_paste or "detectron2").numpy()[0]
        ev.add_original_frame(_image_id(path, index), det["detection_boxes"][:n],
                              det["detection_scores"][:n], det["detection_classes"][:n], masks)
        drawn = draw_detections(image, {**det, "detection_masks": masks}, names,
                                args.score_threshold)
        out = os.path.join(args.output_dir,
                           os.path.splitext(os.path.basename(path))[0] + ".png")
        save_png(out, drawn)
        print(f"{path}: {n} detections -> {out}")
    ev.write_results(os.path.join(args.output_dir, "results.json"))
    print(f"wrote {len(ev.results)} detections to {args.output_dir}/results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
