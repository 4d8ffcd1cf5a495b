"""SavedModel serving module: raw images in, original-resolution detections out.

preprocess (decode, pad a batch of different sizes) -> model -> postprocess (dataset category
ids, masks pasted at each image's own resolution). The modelling code knows nothing of this.
Signatures (tag ``serve``):

* ``image_tensor``: uint8 [B, H, W, 3].
* ``image_bytes``: string [B] of JPEG/PNG/GIF/BMP bytes (what TF Serving's REST API passes for
  ``{"b64": ...}``); images may differ in size.
* ``tf_example``: string [B] of serialised tf.train.Example (``image/encoded``).

Outputs: ``num_detections`` [B] int32, ``detection_boxes`` [B, D, 4] float32 (y1, x1, y2, x2)
pixels of each original image, ``detection_scores`` [B, D], ``detection_classes`` [B, D] int32
dataset category ids, ``detection_masks`` ([B, D, H, W] uint8 0/1 at the original resolution,
padded to the batch's largest image, or [B, D, 28, 28] float32 probabilities with
``mask_output="box"``), ``image_shape`` [B, 2] int32, and ``errors`` [B] string: empty for a
good image; for bytes that are empty, not an image of a known format, or truncated, the reason —
that image gets no detections and image_shape [0, 0] while the rest of the batch is served.
Bytes that look like an image but fail to decode fail the whole request with an
InvalidArgumentError naming the problem.
"""

from __future__ import annotations

import json
import os
import tempfile

import tensorflow as tf

from mrcnn_tf.ops.masks import paste_masks

INPUT_TYPES = ("image_tensor", "image_bytes", "tf_example")


def _contains(data: tf.Tensor, pattern: bytes) -> tf.Tensor:
    """Whether the byte string ``data`` (scalar) contains ``pattern``."""
    b = tf.cast(tf.io.decode_raw(data, tf.uint8), tf.int32)
    n = tf.shape(b)[0] - len(pattern) + 1
    hit = tf.ones(tf.maximum(n, 0), tf.bool)
    for i, c in enumerate(pattern):
        hit &= tf.equal(b[i: i + tf.maximum(n, 0)], c)
    return tf.reduce_any(hit)


def _check_bytes(data: tf.Tensor) -> tf.Tensor:
    """Reason why encoded bytes cannot be an image ('' when they can). Scalar string.

    Cheap checks of the header and of the last 4 KiB (JPEG end marker, PNG IEND chunk).
    """
    n = tf.strings.length(data)
    head = tf.strings.substr(data, 0, 8)
    tail = tf.strings.substr(data, tf.maximum(n - 4096, 0), 4096)
    is_jpeg = tf.strings.substr(head, 0, 2) == b"\xff\xd8"
    is_png = head == b"\x89PNG\r\n\x1a\n"
    known = is_jpeg | is_png | (tf.strings.substr(head, 0, 4) == b"GIF8") | (
        tf.strings.substr(head, 0, 2) == b"BM")
    return tf.case([(n == 0, lambda: tf.constant("empty image bytes")),
                    (~known, lambda: tf.constant("not a JPEG, PNG, GIF or BMP image")),
                    (is_jpeg & ~_contains(tail, b"\xff\xd9"),
                     lambda: tf.constant("truncated JPEG (no end marker)")),
                    (is_png & ~_contains(tail, b"IEND"),
                     lambda: tf.constant("truncated PNG (no IEND chunk)"))],
                   default=lambda: tf.constant(""), exclusive=False)


class ServingModule(tf.Module):
    """Wraps a built MaskRCNN for export.

    Args:
      model: the Keras model.
      category_ids: dataset category id of each class 1..N.
      class_names: names, stored as ``assets/labels.json``.
      mask_output: "full" or "box".
      max_detections: detections per image D (at most the model's; None: the model's).
      mask_threshold, mask_paste: how 28x28 masks become full-resolution ones
        (model.detection.mask_threshold and mask_paste).
    """

    def __init__(self, model, category_ids, class_names, mask_output: str = "full",
                 max_detections: int | None = None, mask_threshold: float = 0.5,
                 mask_paste: str = "detectron2"):
        super().__init__()
        if mask_output not in ("full", "box"):
            raise ValueError(f"mask_output must be 'full' or 'box', got {mask_output!r}")
        limit = model.detection_generator.max_detections
        if max_detections is not None and max_detections > limit:
            raise ValueError(f"export.max_detections ({max_detections}) cannot exceed the "
                             f"model's model.detection.max_detections ({limit})")
        self.max_detections = max_detections or limit
        self.mask_threshold, self.mask_paste = float(mask_threshold), mask_paste
        # Only the underlying tf.Variables are saved, not the Keras objects around them: with
        # both in the object graph, TF1-style loaders (TF Serving, saved_model_cli run) restore
        # one copy of each weight while the functions read the other.
        object.__setattr__(self, "model", model)
        self.model_variables = [v.value for v in model.variables]
        self.mask_output = mask_output
        self.category_ids = tf.constant([0] + [int(c) for c in category_ids], tf.int32)
        tmp = tempfile.mkdtemp(prefix="mrcnn_labels_")
        path = os.path.join(tmp, "labels.json")
        with open(path, "w") as f:
            json.dump([{"class": i + 1, "id": int(c), "name": n}
                       for i, (c, n) in enumerate(zip(category_ids, class_names))], f, indent=1)
        self.label_map = tf.saved_model.Asset(path)

    # -- shared core ---------------------------------------------------------------------------

    def _run(self, images, sizes, errors):
        det = self.model({"images": images, "image_sizes": sizes}, training=False)
        # Detections come sorted by score: keeping the first D keeps the best D.
        det = {k: v if k == "num_detections" else v[:, : self.max_detections]
               for k, v in det.items()}
        det["num_detections"] = tf.minimum(det["num_detections"], self.max_detections)
        ok = tf.strings.length(errors) == 0
        num = tf.where(ok, det["num_detections"], 0)
        d = tf.shape(det["detection_scores"])[1]
        real = tf.range(d)[None, :] < num[:, None]
        boxes = tf.where(real[..., None], det["detection_boxes"], 0.0)
        out = {
            "num_detections": num,
            "detection_boxes": boxes,
            "detection_scores": tf.where(real, det["detection_scores"], 0.0),
            "detection_classes": tf.where(
                real, tf.gather(self.category_ids, det["detection_classes"]), 0),
            "image_shape": tf.where(ok[:, None], sizes, 0),
            "errors": errors,
        }
        masks = tf.where(real[..., None, None], det["detection_masks"], 0.0)
        if self.mask_output == "box":
            out["detection_masks"] = masks
            return out
        height = tf.reduce_max(sizes[:, 0])
        width = tf.reduce_max(sizes[:, 1])

        threshold, method = self.mask_threshold, self.mask_paste

        def paste_one(args):  # one image at a time, one detection at a time: bounded memory
            m, b, size = args
            full = tf.map_fn(lambda mb: paste_masks(mb[0][None, None], mb[1][None, None],
                                                    size[0], size[1], threshold,
                                                    method)[0, 0],
                             (m, b), fn_output_signature=tf.TensorSpec([None, None], tf.uint8),
                             parallel_iterations=1)
            return tf.pad(full, [[0, 0], [0, height - size[0]], [0, width - size[1]]])

        out["detection_masks"] = tf.map_fn(
            paste_one, (masks, boxes, sizes), parallel_iterations=1,
            fn_output_signature=tf.TensorSpec([None, None, None], tf.uint8))
        return out

    def _decode_batch(self, encoded):
        """Decodes [B] encoded images into a zero-padded uint8 batch, sizes and errors."""
        errors = tf.map_fn(_check_bytes, encoded, fn_output_signature=tf.string)

        n = tf.shape(encoded)[0]
        decoded = tf.TensorArray(tf.uint8, size=n, infer_shape=False,
                                 element_shape=tf.TensorShape([None, None, 3]))
        sizes = tf.TensorArray(tf.int32, size=n)
        for i in tf.range(n):
            data = encoded[i]
            image = tf.cond(tf.strings.length(errors[i]) == 0,
                            lambda d=data: tf.io.decode_image(d, channels=3,
                                                              expand_animations=False),
                            lambda: tf.zeros([1, 1, 3], tf.uint8))
            decoded = decoded.write(i, image)
            sizes = sizes.write(i, tf.shape(image)[:2])
        sizes = sizes.stack()
        height, width = tf.reduce_max(sizes[:, 0]), tf.reduce_max(sizes[:, 1])
        padded = tf.TensorArray(tf.uint8, size=n)
        for i in tf.range(n):
            image = decoded.read(i)
            padded = padded.write(i, tf.pad(image, [[0, height - tf.shape(image)[0]],
                                                    [0, width - tf.shape(image)[1]], [0, 0]]))
        dense = tf.reshape(padded.stack(), tf.stack([n, height, width, 3]))
        return dense, sizes, errors

    # -- signatures ----------------------------------------------------------------------------

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")])
    def image_tensor(self, images):
        shape = tf.shape(images)
        tf.debugging.assert_positive(shape[1] * shape[2],
                                     message="images must have a positive height and width")
        sizes = tf.tile(shape[None, 1:3], [shape[0], 1])
        return self._run(images, sizes, tf.fill([shape[0]], ""))

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="images")])
    def image_bytes(self, images):
        dense, sizes, errors = self._decode_batch(images)
        return self._run(dense, sizes, errors)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="examples")])
    def tf_example(self, examples):
        parsed = tf.io.parse_example(
            examples, {"image/encoded": tf.io.FixedLenFeature([], tf.string, default_value="")})
        dense, sizes, errors = self._decode_batch(parsed["image/encoded"])
        return self._run(dense, sizes, errors)


def next_version(base: str) -> int:
    """The next free version number under a TF Serving export base (1 for a new base)."""
    versions = [int(d) for d in os.listdir(base) if d.isdigit()] if os.path.isdir(base) else []
    return max(versions, default=0) + 1


def export_saved_model(model, category_ids, class_names, export_dir: str,
                       input_types=INPUT_TYPES, mask_output: str = "full",
                       max_detections: int | None = None, mask_threshold: float = 0.5,
                       mask_paste: str = "detectron2") -> str:
    """Writes a SavedModel with one signature per input type plus ``serving_default`` (the first
    input type); the other arguments as :class:`ServingModule`'s (``serving_options(config)``
    gives them from a configuration). Returns ``export_dir``."""
    unknown = [t for t in input_types if t not in INPUT_TYPES]
    if unknown or not input_types:
        raise ValueError(f"input types must be among {', '.join(INPUT_TYPES)}; got "
                         f"{list(input_types)}")
    module = ServingModule(model, category_ids, class_names, mask_output, max_detections,
                           mask_threshold, mask_paste)
    signatures = {t: getattr(module, t).get_concrete_function() for t in input_types}
    signatures["serving_default"] = signatures[input_types[0]]
    tf.saved_model.save(module, export_dir, signatures=signatures)
    return export_dir


def serving_options(config) -> dict:
    """The keyword arguments of :func:`export_saved_model` that a configuration sets:
    ``export.input_types``, ``export.mask_output``, ``export.max_detections`` and the model's
    mask threshold and paste method."""
    det = config.model.detection
    return {"input_types": tuple(config.export.input_types),
            "mask_output": config.export.mask_output,
            "max_detections": config.export.max_detections,
            "mask_threshold": det.mask_threshold, "mask_paste": det.mask_paste}
