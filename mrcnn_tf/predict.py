"""Run a trained model on images: one PNG overlay per image and a COCO results JSON.

    python -m mrcnn_tf.predict --model_dir runs/shapes photos/ more/*.jpg one.png --output_dir out
    mrcnn-predict --saved_model exports/shapes/1 'photos/**/*.jpg' --output_dir out \
        --annotations instances_val2017.json --batch_size 4 --score_threshold 0.3

Inputs are image files, directories (searched recursively for .jpg, .jpeg, .png, .bmp, .gif and
.webp) and glob patterns (quoted, so that this program expands them; ``**`` recurses). Each
overlay keeps the image's path relative to the inputs' common folder (``a/1.jpg`` and
``b/1.jpg`` give ``out/a/1.png`` and ``out/b/1.png``). Image ids in ``results.json``: with
``--annotations``, the COCO file's id of the image of the same file name (so that
``mrcnn_tf.evaluation.coco.evaluate_results_json`` scores them); otherwise the file names'
numbers when every name is a distinct number (COCO's ``000000000009.jpg`` -> 9), else 1, 2, ...
in path order. ``image_ids.json`` lists the id given to each path. Classes are the dataset's
category ids. ``--set`` changes a run's post-processing (``model.detection.*``, the test-time
proposal counts; nothing that changes a weight). Exit codes: 0 done, 2 an input, flag or model
that cannot be used, named with the fix (also when no input was a usable image).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


def find_images(inputs: list[str]) -> list[str]:
    """Image files named by ``inputs`` (files, directories searched recursively, glob patterns),
    in sorted order without duplicates. Raises FileNotFoundError naming an input that names
    nothing."""
    found = []
    for item in inputs:
        if os.path.isdir(item):
            hits = [os.path.join(root, f) for root, _, files in os.walk(item) for f in files
                    if f.lower().endswith(IMAGE_EXTENSIONS)]
            if not hits:
                raise FileNotFoundError(f"{item}: a directory with no image file "
                                        f"({', '.join(IMAGE_EXTENSIONS)})")
        elif os.path.isfile(item):
            hits = [item]
        elif glob.has_magic(item):
            hits = [p for p in glob.glob(item, recursive=True)
                    if os.path.isfile(p) and p.lower().endswith(IMAGE_EXTENSIONS)]
            if not hits:
                raise FileNotFoundError(f"{item}: the pattern matches no image file")
        else:
            raise FileNotFoundError(f"{item}: no such file or directory")
        found.extend(os.path.abspath(p) for p in hits)
    return sorted(set(found))


def output_names(paths: list[str]) -> list[str]:
    """Overlay file names: each path relative to the paths' common folder, with ``.png`` for its
    extension (its extension kept before ``.png`` where two images would share a name)."""
    if not paths:
        return []
    root = os.path.commonpath([os.path.dirname(p) for p in paths])
    rel = [os.path.relpath(p, root) for p in paths]
    stems = [os.path.splitext(r)[0] for r in rel]
    return [(s if stems.count(s) == 1 else r) + ".png" for s, r in zip(stems, rel)]


def image_ids(paths: list[str], annotations: str | None = None) -> list[int]:
    """COCO image ids of ``paths`` (see the module docstring)."""
    if annotations:
        with open(annotations, encoding="utf-8") as f:
            images = json.load(f).get("images", [])
        by_name = {}
        for im in images:
            by_name.setdefault(os.path.basename(im["file_name"]), im["id"])
        missing = [p for p in paths if os.path.basename(p) not in by_name]
        if missing:
            raise ValueError(f"--annotations {annotations}: no image named "
                             f"{os.path.basename(missing[0])} ({len(missing)} of the "
                             f"{len(paths)} images are not in it)")
        return [int(by_name[os.path.basename(p)]) for p in paths]
    stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    if all(s.isdigit() for s in stems) and len({int(s) for s in stems}) == len(stems):
        return [int(s) for s in stems]
    return list(range(1, len(paths) + 1))


def load_model_dir(model_dir: str, overrides=()):
    """(predict_batch, category_ids, class_names) of a training run's newest finite
    checkpoint, with ``overrides`` of what changes no weight (``model.detection.*``, ...).
    predict_batch: list of uint8 [H, W, 3] images -> one dict per image with ``boxes`` [n, 4]
    in its pixels, ``scores`` [n], ``classes`` [n] (1..N) and ``masks`` [n, H, W] uint8."""
    import tensorflow as tf

    from mrcnn_tf.ops.masks import paste_masks
    from mrcnn_tf.rundir import load_run

    model = load_run(model_dir, overrides)
    ids, names = list(model.category_ids), list(model.class_names)
    det_cfg = model.config.model.detection
    fn = tf.function(lambda x, s: model({"images": x, "image_sizes": s}, training=False),
                     reduce_retracing=True)

    def predict_batch(images):
        sizes = np.array([im.shape[:2] for im in images], np.int32)
        batch = np.zeros((len(images), *sizes.max(0), 3), np.uint8)
        for i, im in enumerate(images):
            batch[i, : im.shape[0], : im.shape[1]] = im
        det = {k: v.numpy() for k, v in fn(batch, sizes).items()}
        out = []
        for i, (h, w) in enumerate(sizes):
            n = int(det["num_detections"][i])
            boxes = det["detection_boxes"][i, :n]
            masks = paste_masks(det["detection_masks"][i, :n], boxes, int(h), int(w),
                                det_cfg.mask_threshold, det_cfg.mask_paste).numpy()
            out.append({"boxes": boxes, "scores": det["detection_scores"][i, :n],
                        "classes": det["detection_classes"][i, :n], "masks": masks})
        return out

    return predict_batch, ids, names


def load_saved_model(path: str):
    """(predict_batch, category_ids, class_names) of an exported SavedModel (a version
    directory, or a TF Serving base folder: its highest version), as :func:`load_model_dir` (a
    string in place of an image's dict: the reason the SavedModel
    refused it, its ``errors`` entry). Batches go through its ``image_bytes`` signature when it
    has one (images of different sizes, its own decoding); otherwise ``image_tensor``, one image
    at a time. Masks come in the export's mode (full, box or png) and are returned full-size."""
    import tensorflow as tf

    from mrcnn_tf.ops.masks import paste_masks
    from mrcnn_tf.serving import saved_model_dir

    path = saved_model_dir(path)
    loaded = tf.saved_model.load(path)
    with open(os.path.join(path, "assets", "labels.json"), encoding="utf-8") as f:
        labels = json.load(f)
    ids = [e["id"] for e in labels]
    to_class = {cid: i + 1 for i, cid in enumerate(ids)}

    def unpack(out, row, h, w):
        n = int(out["num_detections"][row])
        boxes = out["detection_boxes"][row, :n]
        if "detection_masks_bytes" in out:
            masks = np.stack([tf.io.decode_png(b).numpy()[..., 0] // 255
                              for b in out["detection_masks_bytes"][row, :n]]
                             ) if n else np.zeros((0, h, w), np.uint8)
        elif out["detection_masks"].dtype == np.uint8:
            masks = out["detection_masks"][row, :n, :h, :w]
        else:  # box: 28x28 probabilities
            masks = paste_masks(out["detection_masks"][row, :n], boxes, h, w).numpy()
        classes = np.array([to_class.get(int(c), 0) for c in out["detection_classes"][row, :n]])
        return {"boxes": boxes, "scores": out["detection_scores"][row, :n], "classes": classes,
                "masks": masks}

    def predict_batch(images, encoded=None):
        if encoded is not None and "image_bytes" in loaded.signatures:
            out = loaded.signatures["image_bytes"](images=tf.constant(encoded, tf.string))
            out = {k: v.numpy() for k, v in out.items()}
            # An image the SavedModel refused (its errors entry) gives its reason instead.
            return [e.decode() if e else unpack(out, row, *im.shape[:2])
                    for row, (im, e) in enumerate(zip(images, out["errors"]))]
        results = []
        for im in images:
            out = loaded.signatures["image_tensor"](images=tf.constant(im[None], tf.uint8))
            results.append(unpack({k: v.numpy() for k, v in out.items()}, 0, *im.shape[:2]))
        return results

    return predict_batch, ids, [e["name"] for e in labels]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Inputs: files, directories (recursive) and quoted glob patterns.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model_dir", help="a train.py run directory: its latest checkpoint")
    src.add_argument("--saved_model", help="an exported SavedModel: a version directory "
                                           "(EXPORT_BASE/N), or the base folder (its highest "
                                           "version, as TF Serving serves it)")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR_OR_GLOB",
                   help="image files, directories searched recursively, or glob patterns")
    p.add_argument("--output_dir", required=True,
                   help="where the overlays (same relative paths, .png), results.json and "
                        "image_ids.json go")
    p.add_argument("--annotations", default=None,
                   help="a COCO annotation file: image ids come from it, by file name")
    p.add_argument("--batch_size", type=int, default=1,
                   help="images per model call (default 1)")
    p.add_argument("--score_threshold", type=float, default=0.5,
                   help="keep detections with at least this score, in the overlays and in "
                        "results.json (default 0.5; 0 keeps all the model returns)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="with --model_dir: post-processing overrides that change no weight, "
                        "e.g. model.detection.score_threshold=0.01 "
                        "model.detection.max_detections=50 (a SavedModel's are fixed at export)")
    args = p.parse_args(argv)
    from mrcnn_tf.cli import quiet

    quiet()
    if args.batch_size < 1:
        p.error(f"--batch_size must be at least 1, got {args.batch_size}")
    if args.set and args.saved_model:
        p.error("--set applies to --model_dir; a SavedModel's post-processing was fixed when it "
                "was exported (export again with --set, or filter here with --score_threshold)")
    try:
        paths = find_images(args.inputs)
        ids_of = image_ids(paths, args.annotations)
    except (FileNotFoundError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    import tensorflow as tf

    from mrcnn_tf.config import ConfigError
    from mrcnn_tf.evaluation.coco import CocoEvaluator
    from mrcnn_tf.visualize import draw_detections, save_png

    try:
        if args.model_dir:
            predict_batch, ids, names = load_model_dir(args.model_dir, args.set)
        else:
            predict_batch, ids, names = load_saved_model(args.saved_model)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.makedirs(args.output_dir, exist_ok=True)
    ev = CocoEvaluator(ids, names)
    names_out = output_names(paths)
    done, skipped = {}, 0
    for start in range(0, len(paths), args.batch_size):
        batch = []
        for k in range(start, min(start + args.batch_size, len(paths))):
            try:
                data = tf.io.read_file(paths[k])
                image = tf.io.decode_image(data, channels=3, expand_animations=False).numpy()
            except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError) as e:
                print(f"skipped {paths[k]}: not a readable image "
                      f"({e.message.splitlines()[0]})", file=sys.stderr)
                skipped += 1
                continue
            batch.append((k, image, data.numpy()))
        if not batch:
            continue
        images = [im for _, im, _ in batch]
        if args.saved_model:
            results = predict_batch(images, [d for _, _, d in batch])
        else:
            results = predict_batch(images)
        for (k, image, _), det in zip(batch, results):
            if isinstance(det, str):
                print(f"skipped {paths[k]}: {det}", file=sys.stderr)
                skipped += 1
                continue
            keep = det["scores"] >= args.score_threshold
            det = {key: v[keep] for key, v in det.items()}
            ev.add_original_frame(ids_of[k], det["boxes"], det["scores"], det["classes"],
                                  det["masks"])
            drawn = draw_detections(image, {"detection_boxes": det["boxes"],
                                            "detection_scores": det["scores"],
                                            "detection_classes": det["classes"],
                                            "detection_masks": det["masks"]},
                                    names, args.score_threshold)
            out = os.path.join(args.output_dir, names_out[k])
            os.makedirs(os.path.dirname(out), exist_ok=True)
            save_png(out, drawn)
            done[paths[k]] = ids_of[k]
            print(f"[{len(done) + skipped}/{len(paths)}] {paths[k]}: "
                  f"{len(det['scores'])} detections -> {out}", flush=True)
    ev.write_results(os.path.join(args.output_dir, "results.json"))
    with open(os.path.join(args.output_dir, "image_ids.json"), "w", encoding="utf-8") as f:
        json.dump(done, f, indent=1)
    print(f"wrote {len(ev.results)} detections of {len(done)} images to "
          f"{args.output_dir}/results.json" + (f"; {skipped} skipped" if skipped else ""))
    if not done:
        print(f"error: none of the {len(paths)} input files could be used (each is named "
              "above with its reason); give image files (JPEG, PNG, BMP, GIF, WebP)",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
