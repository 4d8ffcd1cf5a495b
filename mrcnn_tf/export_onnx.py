"""ONNX export (``export_saved_model.py --format onnx``): the serving graph's ``image_tensor`` path
converted by tf2onnx, for onnxruntime and other ONNX runtimes.

The graph takes ``images``: uint8 [B, H, W, 3] (any size; the images of a batch share one size)
and returns the SavedModel's outputs for that input: ``num_detections`` [B],
``detection_boxes`` [B, D, 4] (y1, x1, y2, x2) in input pixels, ``detection_scores`` [B, D],
``detection_classes`` [B, D] dataset category ids and ``detection_masks`` ([B, D, 28, 28]
probabilities in each box with ``mask_output: box``, or [B, D, H, W] uint8 0/1 with ``full``).
What tf2onnx cannot convert stays out: no encoded images (``DecodeImage``), no Example parsing, no
``errors`` strings, no shape ``Assert``, no png masks. Proposal and detection NMS must be the
static implementation (``model.nms_impl: static``; the export CLI sets it): tf2onnx has no
conversion of TensorFlow's ``CombinedNonMaxSuppression`` with per-class boxes.

Needs the ``export`` extra: ``pip install -e ".[export]"`` (tf2onnx, onnxruntime).
"""

from __future__ import annotations

import json
import os
import tempfile

import tensorflow as tf

OPSET = 17


def export_onnx(model, category_ids, class_names, path: str, mask_output: str = "box",
                max_detections: int | None = None, mask_threshold: float = 0.5,
                mask_paste: str = "detectron2") -> str:
    """Writes ``path`` (a ``.onnx`` file) and ``labels.json`` beside it; returns ``path``.

    Args: as :func:`mrcnn_tf.serving.export_saved_model`; ``mask_output`` "box" or "full".
    """
    try:
        import tf2onnx
    except ImportError as e:
        raise ImportError("ONNX export needs tf2onnx: pip install -e \".[export]\"") from e
    from mrcnn_tf.serving import ServingModule

    if mask_output not in ("box", "full"):
        raise ValueError(f"ONNX export: mask_output must be 'box' or 'full' (png needs "
                         f"EncodePng, which ONNX lacks); got {mask_output!r}")
    impls = {model.proposal_generator.nms_impl, model.detection_generator.nms_impl}
    if impls != {"static"}:
        raise ValueError("ONNX export needs model.nms_impl=static (tf2onnx cannot convert "
                         "CombinedNonMaxSuppression with per-class boxes)")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    labels = [{"class": i + 1, "id": int(c), "name": n}
              for i, (c, n) in enumerate(zip(category_ids, class_names))]
    with tempfile.TemporaryDirectory(prefix="mrcnn_labels_") as tmp:
        labels_path = os.path.join(tmp, "labels.json")
        with open(labels_path, "w") as f:
            json.dump(labels, f)
        module = ServingModule(model, labels_path, category_ids, mask_output, max_detections,
                               mask_threshold, mask_paste)

    ids = [0] + [int(c) for c in category_ids]

    def detect(images):
        # A constant of this graph: tf2onnx would make a captured eager tensor an input.
        module.category_ids = tf.constant(ids, tf.int32)
        shape = tf.shape(images)
        sizes = tf.tile(shape[1:3][None], tf.stack([shape[0], 1]))
        ok = tf.ones(shape[:1], tf.bool)
        out = module._detect(images, sizes, tf.fill(shape[:1], ""), ok, uniform=True)
        return {k: v for k, v in out.items() if k not in ("errors", "image_shape")}

    spec = (tf.TensorSpec([None, None, None, 3], tf.uint8, name="images"),)
    tf2onnx.convert.from_function(tf.function(detect), input_signature=spec, opset=OPSET,
                                  output_path=path)
    with open(os.path.join(folder, "labels.json"), "w") as f:
        json.dump(labels, f, indent=1)
    return path
