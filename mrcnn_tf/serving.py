"""SavedModel serving module: raw images in, original-resolution detections out.

preprocess (check, decode, pad a batch of different sizes) -> model -> postprocess (dataset
category ids, masks at each image's own resolution). The modelling code knows nothing of this.
Signatures (tag ``serve``):

* ``image_tensor``: uint8 [B, H, W, 3]. Declared with an unknown shape so that a wrong one
  (rank 3, 1 or 4 channels) is refused by an InvalidArgumentError that names the expected shape,
  even under TF Serving, which does not check shapes.
* ``image_bytes``: string [B] of JPEG/PNG/GIF/BMP/WebP bytes (what TF Serving's REST API passes
  for ``{"b64": ...}``); images may differ in size.
* ``tf_example``: string [B] of serialised tf.train.Example (one bytes value ``image/encoded``).

Outputs: ``num_detections`` [B] int32, ``detection_boxes`` [B, D, 4] float32 (y1, x1, y2, x2)
pixels of each original image, ``detection_scores`` [B, D], ``detection_classes`` [B, D] int32
dataset category ids, ``detection_masks``, ``image_shape`` [B, 2] int32 and ``errors`` [B]
string. ``detection_masks`` is, by ``mask_output``:

* ``full``: [B, D, H, W] uint8 0/1 at the original resolution, padded to the batch's largest
  image;
* ``box``: [B, D, 28, 28] float32 probabilities in each box;
* ``png``: [B, D] string, one 8-bit grayscale PNG (0 or 255) per detection at its image's own
  resolution, '' for an empty slot. Its key is ``detection_masks_bytes``: TF Serving's REST API
  base64-encodes ({"b64": ...}) only string outputs whose name ends in ``_bytes``.

``errors`` is '' for a served image, else the reason: empty bytes, an unknown format, a
truncated or corrupt file, an image over ``max_image_pixels`` (read from the header, before
decoding), a malformed Example. That image gets no detections and image_shape [0, 0]; the rest
of the batch is served exactly as if sent alone. An empty batch gives empty outputs.
"""

from __future__ import annotations

import os
import tempfile

import tensorflow as tf

from mrcnn_tf import rundir
from mrcnn_tf.config import MASK_OUTPUTS
from mrcnn_tf.ops.masks import paste_masks

INPUT_TYPES = ("image_tensor", "image_bytes", "tf_example")
FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WebP")  # index = the format code below
JPEG, PNG, GIF, BMP, WEBP = range(5)
_HEAD = 32  # header bytes read for the format and the size


# -- encoded images: checks that cannot fail, from the header and the tail ------------------------

def _contains(data: tf.Tensor, pattern: bytes) -> tf.Tensor:
    """Whether the byte string ``data`` (scalar) contains ``pattern``."""
    b = tf.cast(tf.io.decode_raw(data, tf.uint8), tf.int32)
    n = tf.shape(b)[0] - len(pattern) + 1
    hit = tf.ones(tf.maximum(n, 0), tf.bool)
    for i, c in enumerate(pattern):
        hit &= tf.equal(b[i: i + tf.maximum(n, 0)], c)
    return tf.reduce_any(hit)


def _head(data: tf.Tensor) -> tf.Tensor:
    """The first ``_HEAD`` bytes of ``data`` (scalar string), zero past its end."""
    return tf.strings.substr(tf.strings.join([tf.strings.substr(data, 0, _HEAD),
                                              b"\0" * _HEAD]), 0, _HEAD)


def _uint(b: tf.Tensor, offset: int, size: int, big_endian: bool = False) -> tf.Tensor:
    """Unsigned integer of ``size`` bytes at ``offset`` of the header bytes ``b`` (int64)."""
    order = range(size) if big_endian else reversed(range(size))
    value = tf.constant(0, tf.int64)
    for i in order:
        value = value * 256 + b[offset + i]
    return value


def _format_and_header_size(data: tf.Tensor):
    """Format code (``FORMATS`` index, -1 unknown), and (height, width) from the header for the
    formats whose header gives them at a fixed offset (0 for JPEG: read by libjpeg later).
    Also the BMP's bits per pixel (0 for other formats). All int64 scalars but the code."""
    head = _head(data)
    b = tf.cast(tf.io.decode_raw(head, tf.uint8), tf.int64)
    is_jpeg = tf.strings.substr(head, 0, 2) == b"\xff\xd8"
    is_png = tf.strings.substr(head, 0, 8) == b"\x89PNG\r\n\x1a\n"
    is_gif = tf.strings.substr(head, 0, 4) == b"GIF8"
    is_bmp = tf.strings.substr(head, 0, 2) == b"BM"
    is_webp = (tf.strings.substr(head, 0, 4) == b"RIFF") & (
        tf.strings.substr(head, 8, 4) == b"WEBP")
    code = tf.case([(is_jpeg, lambda: tf.constant(JPEG)), (is_png, lambda: tf.constant(PNG)),
                    (is_gif, lambda: tf.constant(GIF)), (is_bmp, lambda: tf.constant(BMP)),
                    (is_webp, lambda: tf.constant(WEBP))], default=lambda: tf.constant(-1))
    # BMP: BITMAPCOREHEADER (12 bytes) has 16-bit sizes; the others 32-bit, height signed
    # (negative: top-down rows).
    core = _uint(b, 14, 4) == 12
    bmp_w = tf.where(core, _uint(b, 18, 2), _signed32(_uint(b, 18, 4)))
    bmp_h = tf.abs(tf.where(core, _uint(b, 20, 2), _signed32(_uint(b, 22, 4))))
    bpp = tf.where(is_bmp, tf.where(core, _uint(b, 24, 2), _uint(b, 28, 2)), 0)
    # WebP: simple lossy "VP8 ", lossless "VP8L" or extended "VP8X" layout.
    chunk = tf.strings.substr(head, 12, 4)
    vp8l = _uint(b, 21, 4)
    webp_w = tf.case([(chunk == b"VP8 ", lambda: _uint(b, 26, 2) % 16384),
                      (chunk == b"VP8L", lambda: vp8l % 16384 + 1)],
                     default=lambda: _uint(b, 24, 3) + 1)
    webp_h = tf.case([(chunk == b"VP8 ", lambda: _uint(b, 28, 2) % 16384),
                      (chunk == b"VP8L", lambda: vp8l // 16384 % 16384 + 1)],
                     default=lambda: _uint(b, 27, 3) + 1)
    hw = tf.case([(is_png, lambda: tf.stack([_uint(b, 20, 4, True), _uint(b, 16, 4, True)])),
                  (is_gif, lambda: tf.stack([_uint(b, 8, 2), _uint(b, 6, 2)])),
                  (is_bmp, lambda: tf.stack([bmp_h, bmp_w])),
                  (is_webp, lambda: tf.stack([webp_h, webp_w]))],
                 default=lambda: tf.zeros([2], tf.int64))
    return code, hw, bpp


def _signed32(v: tf.Tensor) -> tf.Tensor:
    return tf.where(v >= 2 ** 31, v - 2 ** 32, v)


def _check_bytes(data: tf.Tensor):
    """Format code and the reason why encoded bytes cannot be served ('' when they may be).

    Cheap checks that cannot fail: the header (format, BMP depth) and the last 4 KiB (JPEG end
    marker, PNG IEND chunk). Returns (code int32, reason string, header (height, width) int64).
    """
    n = tf.strings.length(data)
    code, hw, bpp = _format_and_header_size(data)
    tail = tf.strings.substr(data, tf.maximum(n - 4096, 0), 4096)
    reason = tf.case(
        [(n == 0, lambda: tf.constant("empty image bytes")),
         (code < 0, lambda: tf.constant("not a JPEG, PNG, GIF, BMP or WebP image")),
         ((code == JPEG) & ~_contains(tail, b"\xff\xd9"),
          lambda: tf.constant("truncated JPEG (no end marker)")),
         ((code == PNG) & ~_contains(tail, b"IEND"),
          lambda: tf.constant("truncated PNG (no IEND chunk)")),
         ((code == BMP) & (bpp != 24) & (bpp != 32),
          lambda: tf.strings.format("{}-bit BMP: only 24- and 32-bit BMPs are decoded (palette "
                                    "colours would be lost); send PNG or JPEG", bpp)),
         ((code != JPEG) & (hw[0] * hw[1] <= 0),
          lambda: tf.strings.join(["invalid ", tf.gather(FORMATS, tf.maximum(code, 0)),
                                   " header: size ", tf.strings.as_string(hw[0]), "x",
                                   tf.strings.as_string(hw[1])]))],
        default=lambda: tf.constant(""), exclusive=False)
    return code, reason, hw


# -- the graph's one way to survive an op's error: a tf.data map that drops failures ---------------

def _guarded_map(fn, elems: tuple, n: tf.Tensor):
    """Applies ``fn`` to each row of ``elems`` (tensors of [n, ...]) in a tf.data pipeline that
    drops the rows on which an op of ``fn`` fails (``ignore_errors``), so that one bad input
    cannot fail the request. Returns (ok [n] bool, outputs): ``fn``'s outputs stacked to
    [n, ...], zero-padded to the largest, zeros on failed rows."""
    rows = tf.data.Dataset.from_tensor_slices((tf.range(n),) + tuple(elems))
    rows = rows.map(lambda i, *args: (i,) + tuple(fn(*args))).ignore_errors()
    batches = rows.padded_batch(tf.cast(tf.maximum(n, 1), tf.int64))
    # When every row fails there is no batch: fall back on an empty one.
    empty = tf.data.Dataset.from_tensors(tuple(
        tf.zeros([0 if d is None else d for d in s.shape], s.dtype)
        for s in batches.element_spec))
    index, *outputs = batches.concatenate(empty).take(1).get_single_element()
    where = index[:, None]
    ok = tf.scatter_nd(where, tf.ones_like(index), [n]) > 0
    outputs = [tf.scatter_nd(where, o, tf.concat([[n], tf.shape(o)[1:]], 0)) for o in outputs]
    return ok, outputs


def _decode_one(data, code, reason, header_hw, max_pixels):
    """Decodes one image unless it has a reason not to, or is over ``max_pixels`` by its header.

    Returns (status int32: 0 decoded, 1 skipped for ``reason``, 2 over the pixel limit,
    3 a JPEG whose decoder ran out of data; (height, width) int64 from the header; the decoded
    (height, width) int32; image uint8 [h, w, 3]). Runs inside :func:`_guarded_map`: a decoder
    error drops the row.
    """
    hw = tf.cond(code == JPEG, lambda: tf.cast(tf.io.extract_jpeg_shape(data)[:2], tf.int64),
                 lambda: header_hw)
    skip = tf.strings.length(reason) > 0
    too_big = hw[0] * hw[1] > max_pixels

    def decode():
        image = tf.io.decode_image(data, channels=3, expand_animations=False)
        # A JPEG cut short but ending in an end marker decodes without error: libjpeg fills the
        # missing blocks, down to the bottom-right corner, with exact gray 128. No intact photo of
        # coco128 has that corner.
        gray_fill = (code == JPEG) & tf.reduce_all(image[-4:, -4:] == 128)
        return tf.where(gray_fill, 3, 0), image

    def skipped():
        return tf.where(skip, 1, 2), tf.zeros([1, 1, 3], tf.uint8)

    status, image = tf.cond(skip | too_big, skipped, decode)
    return status, hw, tf.shape(image)[:2], image


class ServingModule(tf.Module):
    """Wraps a built MaskRCNN for export.

    Args:
      model: the Keras model.
      labels_path: a labels.json, stored as ``assets/labels.json``.
      category_ids: dataset category id of each class 1..N.
      mask_output: "full", "box" or "png".
      max_detections: detections per image D (at most the model's; None: the model's).
      mask_threshold, mask_paste: how 28x28 masks become full-resolution ones
        (model.detection.mask_threshold and mask_paste).
      max_image_pixels: images with more pixels (height x width, read from the encoded header
        before decoding) are refused with an ``errors`` entry.
    """

    def __init__(self, model, labels_path, category_ids, mask_output: str = "full",
                 max_detections: int | None = None, mask_threshold: float = 0.5,
                 mask_paste: str = "detectron2", max_image_pixels: int = 25_000_000):
        super().__init__()
        if mask_output not in MASK_OUTPUTS:
            raise ValueError(f"export.mask_output must be one of {', '.join(MASK_OUTPUTS)}; got "
                             f"{mask_output!r}")
        limit = model.detection_generator.max_detections
        if max_detections is not None and max_detections > limit:
            raise ValueError(f"export.max_detections ({max_detections}) cannot exceed the "
                             f"model's model.detection.max_detections ({limit})")
        if int(max_image_pixels) < 1:
            raise ValueError(f"export.max_image_pixels must be positive; got {max_image_pixels}")
        self.max_detections = max_detections or limit
        self.mask_threshold, self.mask_paste = float(mask_threshold), mask_paste
        self.max_image_pixels = tf.constant(int(max_image_pixels), tf.int64)
        # Only the underlying tf.Variables are saved, not the Keras objects around them: with
        # both in the object graph, TF1-style loaders (TF Serving, saved_model_cli run) restore
        # one copy of each weight while the functions read the other.
        object.__setattr__(self, "model", model)
        self.model_variables = [v.value for v in model.variables]
        self.mask_output = mask_output
        self.category_ids = tf.constant([0] + [int(c) for c in category_ids], tf.int32)
        self.label_map = tf.saved_model.Asset(labels_path)

    # -- shared core ---------------------------------------------------------------------------

    def _run(self, images, sizes, errors):
        """Detections of a padded uint8 batch; images with an error get none. The model runs
        only when at least one image has no error."""
        ok = tf.strings.length(errors) == 0
        return tf.cond(tf.reduce_any(ok), lambda: self._detect(images, sizes, errors, ok),
                       lambda: self._nothing(tf.shape(errors)[0], errors))

    def _nothing(self, n, errors):
        """Outputs for a batch of n images none of which is served."""
        d = self.max_detections
        masks = {"full": lambda: tf.zeros([n, d, 0, 0], tf.uint8),
                 "box": lambda: tf.zeros([n, d, 28, 28], tf.float32),
                 "png": lambda: tf.fill([n, d], "")}[self.mask_output]()
        key = "detection_masks_bytes" if self.mask_output == "png" else "detection_masks"
        return {"num_detections": tf.zeros([n], tf.int32),
                "detection_boxes": tf.zeros([n, d, 4]),
                "detection_scores": tf.zeros([n, d]),
                "detection_classes": tf.zeros([n, d], tf.int32),
                "image_shape": tf.zeros([n, 2], tf.int32),
                "errors": errors,
                key: masks}

    def _detect(self, images, sizes, errors, ok, uniform: bool = False):
        """``uniform``: every image fills ``images`` (sizes are its size), so the model is
        called without image sizes (one batched resize; the ONNX export's path)."""
        inputs = images if uniform else {"images": images, "image_sizes": sizes}
        det = self.model(inputs, training=False)
        # Detections come sorted by score: keeping the first D keeps the best D.
        det = {k: v if k == "num_detections" else v[:, : self.max_detections]
               for k, v in det.items()}
        det["num_detections"] = tf.minimum(det["num_detections"], self.max_detections)
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
        threshold, method = self.mask_threshold, self.mask_paste

        def paste(m, b, size):  # one detection: bounded memory
            return paste_masks(m[None, None], b[None, None], size[0], size[1], threshold,
                               method)[0, 0]

        if self.mask_output == "png":
            def encode_one(args):
                m, b, size, count = args
                return tf.map_fn(
                    lambda a: tf.cond(a[2] < count, lambda: tf.io.encode_png(
                        paste(a[0], a[1], size)[..., None] * 255), lambda: tf.constant("")),
                    (m, b, tf.range(tf.shape(m)[0])), fn_output_signature=tf.string,
                    parallel_iterations=1)

            out["detection_masks_bytes"] = tf.map_fn(
                encode_one, (masks, boxes, sizes, num), fn_output_signature=tf.string,
                parallel_iterations=1)
            return out
        height = tf.reduce_max(out["image_shape"][:, 0])
        width = tf.reduce_max(out["image_shape"][:, 1])

        def paste_one(args):  # one image at a time, one detection at a time
            m, b, size = args
            full = tf.map_fn(lambda mb: paste(mb[0], mb[1], size), (m, b),
                             fn_output_signature=tf.TensorSpec([None, None], tf.uint8),
                             parallel_iterations=1)
            full = full[:, : height, : width]  # an image with an error has no pixels
            return tf.pad(full, [[0, 0], [0, height - tf.shape(full)[1]],
                                 [0, width - tf.shape(full)[2]]])

        out["detection_masks"] = tf.map_fn(
            paste_one, (masks, boxes, sizes), parallel_iterations=1,
            fn_output_signature=tf.TensorSpec([None, None, None], tf.uint8))
        return out

    def _decode_batch(self, encoded, reasons=None):
        """Checks and decodes [B] encoded images into a zero-padded uint8 batch, sizes [B, 2] and
        errors [B]. ``reasons``: earlier errors ([B] string, '' for none), kept first."""
        n = tf.shape(encoded)[0]
        codes, checked, header_hw = tf.map_fn(
            _check_bytes, encoded, fn_output_signature=(tf.int32, tf.string, tf.int64))
        if reasons is not None:
            checked = tf.where(tf.strings.length(reasons) > 0, reasons, checked)
        limit = self.max_image_pixels
        decoded, (status, hw, size, images) = _guarded_map(
            lambda data, code, reason, header: _decode_one(data, code, reason, header, limit),
            (encoded, codes, checked, header_hw), n)
        names = tf.gather(FORMATS, tf.maximum(codes, 0))
        errors = tf.where(
            tf.strings.length(checked) > 0, checked, tf.where(
                ~decoded, tf.strings.join(["corrupt ", names, " data: the decoder failed"]),
                tf.where(status == 2, tf.strings.join([
                    "image of ", tf.strings.as_string(hw[:, 0]), "x",
                    tf.strings.as_string(hw[:, 1]), " pixels is over export.max_image_pixels (",
                    tf.strings.as_string(limit), ")"]),
                    tf.where(status == 3, "truncated JPEG: the decoder ran out of data (its "
                             "bottom rows are the decoder's gray fill)", ""))))
        ok = tf.strings.length(errors) == 0
        sizes = tf.where(ok[:, None], size, 1)
        return images, sizes, errors

    # -- signatures ----------------------------------------------------------------------------

    @tf.function(input_signature=[tf.TensorSpec(None, tf.uint8, name="images")])
    def image_tensor(self, images):
        shape = tf.shape(images)
        rank4 = tf.size(shape) == 4
        padded = tf.concat([shape, tf.zeros([4], tf.int32)], 0)
        check = tf.debugging.Assert(
            rank4 & tf.equal(padded[3], 3),
            ["image_tensor: images must be uint8 [batch, height, width, 3]; got shape", shape],
            summarize=8)
        with tf.control_dependencies([check]):
            images = tf.ensure_shape(tf.identity(images), [None, None, None, 3])
        shape = tf.shape(images)
        n = shape[0]
        check = tf.debugging.Assert(
            (n == 0) | (shape[1] * shape[2] > 0),
            ["image_tensor: images must have a positive height and width; got shape", shape],
            summarize=8)
        with tf.control_dependencies([check]):
            images = tf.identity(images)
        pixels = tf.cast(shape[1], tf.int64) * tf.cast(shape[2], tf.int64)
        error = tf.cond(pixels > self.max_image_pixels, lambda: tf.strings.format(
            "image of {}x{} pixels is over export.max_image_pixels ({})",
            (shape[1], shape[2], self.max_image_pixels)), lambda: tf.constant(""))
        sizes = tf.tile(shape[None, 1:3], [n, 1])
        return self._run(images, sizes, tf.fill([n], error))

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="images")])
    def image_bytes(self, images):
        return self._run(*self._decode_batch(images))

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="examples")])
    def tf_example(self, examples):
        encoded, reasons = _parse_examples(examples)
        return self._run(*self._decode_batch(encoded, reasons))


def _parse_examples(examples):
    """``image/encoded`` of each serialised tf.train.Example ([B] string) and the reason why an
    Example has none usable ([B] string, '' when it has): one malformed Example cannot fail the
    batch."""
    n = tf.shape(examples)[0]

    def parse(kind):
        return lambda e: tf.io.parse_single_example(
            e, {"image/encoded": tf.io.VarLenFeature(kind)})["image/encoded"].values

    def first_bytes(e):
        values = parse(tf.string)(e)
        return tf.size(values), tf.concat([values, [""]], 0)[0]

    as_bytes, (count, encoded) = _guarded_map(first_bytes, (examples,), n)
    as_int, _ = _guarded_map(lambda e: (tf.size(parse(tf.int64)(e)),), (examples,), n)
    as_float, _ = _guarded_map(lambda e: (tf.size(parse(tf.float32)(e)),), (examples,), n)
    reasons = tf.where(
        as_bytes, tf.where(
            count == 0, "tf.train.Example has no image/encoded bytes (or the bytes are not a "
            "tf.train.Example)", tf.where(count > 1, tf.strings.join([
                "image/encoded has ", tf.strings.as_string(count),
                " values; expected one encoded image"]), "")),
        tf.where(as_int, "image/encoded is an int64 list; expected a bytes list",
                 tf.where(as_float, "image/encoded is a float list; expected a bytes list",
                          "not a serialized tf.train.Example")))
    return encoded, reasons


def saved_model_dir(path: str) -> str:
    """The SavedModel that ``path`` names: ``path`` itself when it holds ``saved_model.pb``,
    else, for a TF Serving base folder (``EXPORT_BASE`` holding versions ``1/``, ``2/``, ...),
    its highest version, as TF Serving serves it.

    Raises FileNotFoundError naming ``path`` and what it holds."""
    if os.path.isfile(os.path.join(path, "saved_model.pb")):
        return path
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--saved_model {path}: no such directory (an export of "
                                "export_saved_model.py: EXPORT_BASE or EXPORT_BASE/N)")
    versions = sorted((int(d) for d in os.listdir(path) if d.isdigit()
                       and os.path.isfile(os.path.join(path, d, "saved_model.pb"))), reverse=True)
    if not versions:
        raise FileNotFoundError(f"--saved_model {path}: neither a SavedModel (no saved_model.pb) "
                                "nor a TF Serving base folder of numbered versions holding one")
    return os.path.join(path, str(versions[0]))


def next_version(base: str) -> int:
    """The next free version number under a TF Serving export base (1 for a new base)."""
    versions = [int(d) for d in os.listdir(base) if d.isdigit()] if os.path.isdir(base) else []
    return max(versions, default=0) + 1


def export_saved_model(model, category_ids, class_names, export_dir: str,
                       input_types=INPUT_TYPES, mask_output: str = "full",
                       max_detections: int | None = None, mask_threshold: float = 0.5,
                       mask_paste: str = "detectron2",
                       max_image_pixels: int = 25_000_000) -> str:
    """Writes a SavedModel with one signature per input type plus ``serving_default`` (the first
    input type); the other arguments as :class:`ServingModule`'s (``serving_options(config)``
    gives them from a configuration). Returns ``export_dir``."""
    unknown = [t for t in input_types if t not in INPUT_TYPES]
    if unknown or not input_types:
        raise ValueError(f"input types must be among {', '.join(INPUT_TYPES)}; got "
                         f"{list(input_types)}")
    with tempfile.TemporaryDirectory(prefix="mrcnn_labels_") as tmp:
        labels = rundir.write_labels(tmp, category_ids, class_names)
        module = ServingModule(model, labels, category_ids, mask_output, max_detections,
                               mask_threshold, mask_paste, max_image_pixels)
        signatures = {t: getattr(module, t).get_concrete_function() for t in input_types}
        signatures["serving_default"] = signatures[input_types[0]]
        tf.saved_model.save(module, export_dir, signatures=signatures)
    return export_dir


def serving_options(config) -> dict:
    """The keyword arguments of :func:`export_saved_model` that a configuration sets:
    ``export.input_types``, ``export.mask_output``, ``export.max_detections``,
    ``export.max_image_pixels`` and the model's mask threshold and paste method."""
    det = config.model.detection
    return {"input_types": tuple(config.export.input_types),
            "mask_output": config.export.mask_output,
            "max_detections": config.export.max_detections,
            "max_image_pixels": config.export.max_image_pixels,
            "mask_threshold": det.mask_threshold, "mask_paste": det.mask_paste}
