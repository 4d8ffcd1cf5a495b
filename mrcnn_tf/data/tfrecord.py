"""tf.train.Example records in the schema of the TF Object Detection API and Model Garden.

Keys: ``image/encoded`` (JPEG/PNG bytes), ``image/format``, ``image/height``, ``image/width``,
``image/source_id`` (the image id as a string), ``image/filename``,
``image/object/bbox/{ymin,xmin,ymax,xmax}`` normalised to [0, 1], ``image/object/class/label``
(dataset category ids), ``image/object/class/text``, ``image/object/is_crowd``,
``image/object/area``, ``image/object/mask`` (one PNG per instance, 0/1 or 0/255).
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
import tensorflow as tf


def encode_png_gray(mask: np.ndarray) -> bytes:
    """A 2-D uint8 array as an 8-bit grayscale PNG (stdlib only, so converter workers stay
    light)."""
    mask = np.ascontiguousarray(mask, np.uint8)
    h, w = mask.shape

    def chunk(tag, data):
        return (struct.pack(">I", len(data)) + tag + data
                + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))

    raw = b"".join(b"\x00" + mask[y].tobytes() for y in range(h))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def _bytes(values):
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=list(values)))


def _ints(values):
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v) for v in values]))


def _floats(values):
    return tf.train.Feature(float_list=tf.train.FloatList(value=[float(v) for v in values]))


def make_example(encoded: bytes, fmt: str, height: int, width: int, image_id: int,
                 filename: str, boxes: np.ndarray, category_ids, class_names, is_crowd,
                 masks: np.ndarray) -> bytes:
    """A serialised Example. ``boxes`` [n, 4] (y1, x1, y2, x2) pixels; ``masks`` [n, H, W]."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    area = [float(m.sum()) for m in masks]
    feature = {
        "image/encoded": _bytes([encoded]),
        "image/format": _bytes([fmt.encode()]),
        "image/height": _ints([height]),
        "image/width": _ints([width]),
        "image/source_id": _bytes([str(image_id).encode()]),
        "image/filename": _bytes([filename.encode()]),
        "image/object/bbox/ymin": _floats(boxes[:, 0] / height),
        "image/object/bbox/xmin": _floats(boxes[:, 1] / width),
        "image/object/bbox/ymax": _floats(boxes[:, 2] / height),
        "image/object/bbox/xmax": _floats(boxes[:, 3] / width),
        "image/object/class/label": _ints(category_ids),
        "image/object/class/text": _bytes([n.encode() for n in class_names]),
        "image/object/is_crowd": _ints(is_crowd),
        "image/object/area": _floats(area),
        "image/object/mask": _bytes([encode_png_gray(m) for m in masks]),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


FEATURES = {
    "image/encoded": tf.io.FixedLenFeature([], tf.string),
    "image/height": tf.io.FixedLenFeature([], tf.int64),
    "image/width": tf.io.FixedLenFeature([], tf.int64),
    "image/source_id": tf.io.FixedLenFeature([], tf.string, default_value="0"),
    "image/object/bbox/ymin": tf.io.VarLenFeature(tf.float32),
    "image/object/bbox/xmin": tf.io.VarLenFeature(tf.float32),
    "image/object/bbox/ymax": tf.io.VarLenFeature(tf.float32),
    "image/object/bbox/xmax": tf.io.VarLenFeature(tf.float32),
    "image/object/class/label": tf.io.VarLenFeature(tf.int64),
    "image/object/is_crowd": tf.io.VarLenFeature(tf.int64),
    "image/object/mask": tf.io.VarLenFeature(tf.string),
}


def parse_example(serialized, category_ids=None) -> dict:
    """Serialised Example -> decoded example dict (see transforms.py); crowd instances dropped.

    ``category_ids``: the dataset's category id of each contiguous class 1..N (from the COCO
    annotation file); None when the labels already are 1..N.
    """
    f = tf.io.parse_single_example(serialized, FEATURES)
    dense = {k: tf.sparse.to_dense(v) if isinstance(v, tf.SparseTensor) else v
             for k, v in f.items()}
    image = tf.io.decode_image(dense["image/encoded"], channels=3, expand_animations=False)
    h = tf.cast(dense["image/height"], tf.float32)
    w = tf.cast(dense["image/width"], tf.float32)
    boxes = tf.stack([dense["image/object/bbox/ymin"] * h, dense["image/object/bbox/xmin"] * w,
                      dense["image/object/bbox/ymax"] * h, dense["image/object/bbox/xmax"] * w],
                     axis=-1)
    labels = dense["image/object/class/label"]
    n = tf.shape(labels)[0]
    crowd = dense["image/object/is_crowd"]
    crowd = tf.cond(tf.shape(crowd)[0] == n, lambda: crowd, lambda: tf.zeros([n], tf.int64))
    if category_ids is not None:
        table = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(tf.constant(category_ids, tf.int64),
                                                tf.range(1, len(category_ids) + 1,
                                                         dtype=tf.int64)), default_value=-1)
        classes = table.lookup(labels)
    else:
        classes = labels
    keep = tf.equal(crowd, 0) & (classes > 0)
    size = tf.shape(image)[:2]
    masks = tf.map_fn(lambda s: tf.io.decode_png(s, channels=1)[..., 0],
                      dense["image/object/mask"],
                      fn_output_signature=tf.TensorSpec([None, None], tf.uint8))
    with tf.control_dependencies([tf.debugging.assert_equal(
            tf.shape(masks)[0], n, message="image/object/mask: one PNG per instance is needed "
            "(the count differs from image/object/class/label)")]):
        masks = tf.reshape(masks, tf.concat([[-1], size], 0))
    masks = tf.cast(masks > 0, tf.uint8)
    return {
        "image": image,
        "boxes": tf.boolean_mask(boxes, keep),
        "classes": tf.cast(tf.boolean_mask(classes, keep), tf.int32),
        "masks": tf.boolean_mask(masks, keep),
        "image_id": tf.strings.to_number(dense["image/source_id"], tf.int64),
    }
