"""Small COCO folders written by the tests themselves."""

import json

import numpy as np
import tensorflow as tf


def write_image(path, h, w, seed=0, fmt="jpeg", channels=3):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 255, (h, w, channels)).astype(np.uint8)
    data = tf.io.encode_png(img) if fmt == "png" else tf.io.encode_jpeg(img)
    path.write_bytes(data.numpy())
    return img


def square_polygon(x, y, s):
    return [[x, y, x + s, y, x + s, y + s, x, y + s]]


def make_coco(root, images, annotations, categories=None):
    """Writes root/ann.json and returns (ann_path, image_dir)."""
    categories = categories or [{"id": 1, "name": "a"}, {"id": 7, "name": "b"}]
    ann = {"images": images, "annotations": annotations, "categories": categories}
    path = root / "ann.json"
    path.write_text(json.dumps(ann))
    return str(path), str(root)


def ann(ann_id, image_id, x, y, s, cat=1, **extra):
    return {"id": ann_id, "image_id": image_id, "category_id": cat, "iscrowd": 0,
            "bbox": [x, y, s, s], "area": s * s, "segmentation": square_polygon(x, y, s),
            **extra}
