"""ONNX and LiteRT exports (``export_saved_model.py --format onnx|litert``): the serving graph's
``image_tensor`` path, converted by tf2onnx or by TensorFlow's LiteRT (TFLite) converter with
builtin ops only.

Both take ``images``: uint8 [B, H, W, 3] (ONNX: any batch and size, the images of a batch sharing
one size; LiteRT: [1, H, W, 3] at the size given at export) and return the SavedModel's outputs
for that input: ``num_detections`` [B], ``detection_boxes`` [B, D, 4] (y1, x1, y2, x2) in input
pixels, ``detection_scores`` [B, D], ``detection_classes`` [B, D] dataset category ids and
``detection_masks`` ([B, D, 28, 28] probabilities in each box with ``mask_output: box``; ONNX
also takes ``full``: [B, D, H, W] uint8 0/1). What the converters cannot take stays out: no
encoded images (``DecodeImage``), no Example parsing, no ``errors`` strings, no shape ``Assert``,
no png masks.

The model must use the implementations that convert (the numbers do not change, ``tests/ops``):
``model.nms_impl: static`` (tf2onnx has no conversion of ``CombinedNonMaxSuppression`` with
per-class boxes, LiteRT no builtin for either NMS kernel) and, for LiteRT,
``model.roi_align.impl: gather`` (no builtin ``CropAndResize``; ONNX takes it too, where it runs
faster than tf2onnx's loop over RoIs). :func:`converter_config` gives a config those settings;
build the model to export from it (the export CLI does). Images are
resized as one batch (no ``map_fn``, whose TensorList LiteRT lacks).

Needs the ``export`` extra: ``pip install -e ".[export]"`` (tf2onnx, onnxruntime, ai-edge-litert).
"""

from __future__ import annotations

import os
import tempfile

import tensorflow as tf

from mrcnn_tf import rundir

OPSET = 17


def _detector(model, category_ids, class_names, mask_output, max_detections, mask_threshold,
              mask_paste):
    """(detect(images) -> outputs, module): the serving module's image path without the parts
    converters cannot take."""
    from mrcnn_tf.serving import ServingModule

    with tempfile.TemporaryDirectory(prefix="mrcnn_labels_") as tmp:
        labels_path = rundir.write_labels(tmp, category_ids, class_names)
        module = ServingModule(model, labels_path, list(category_ids), mask_output,
                               max_detections, mask_threshold, mask_paste)
    ids = [0] + [int(c) for c in category_ids]

    def detect(images):
        # A constant of this graph: converters would make a captured eager tensor an input.
        module.category_ids = tf.constant(ids, tf.int32)
        shape = tf.shape(images)
        sizes = tf.tile(shape[1:3][None], tf.stack([shape[0], 1]))
        ok = tf.ones(shape[:1], tf.bool)
        out = module._detect(images, sizes, tf.fill(shape[:1], ""), ok, uniform=True)
        return {k: v for k, v in out.items() if k not in ("errors", "image_shape")}

    return detect, module


def converter_config(config, fmt: str):
    """``config`` with the implementations ``fmt`` ("onnx" or "litert") converts fastest: static
    NMS and the gather RoIAlign (ONNX: where the sampling ratio is fixed). Same numbers
    (``tests/ops``), so a run's weights load into the model built from it::

        model = build_model(converter_config(config, "onnx")); restore(model, checkpoint)
        export_onnx(model, ...)
    """
    import dataclasses

    if fmt not in ("onnx", "litert"):
        raise ValueError(f"converter_config: fmt must be onnx or litert, got {fmt!r}")
    m = config.model
    roi_align = m.roi_align
    # tf2onnx turns crop_and_resize into a loop over the RoIs, most of a photo's time in
    # onnxruntime; the gather RoIAlign is plain gathers. It needs one fixed sampling ratio:
    # adaptive sampling (detectron2's 0) keeps its own implementation.
    if fmt == "litert" or (roi_align.sampling_ratio >= 1 and not roi_align.level_sampling_ratios):
        roi_align = dataclasses.replace(roi_align, impl="gather")
    return dataclasses.replace(config, model=dataclasses.replace(
        m, nms_impl="static", roi_align=roi_align))


def _check(model, fmt: str, mask_output: str, masks_allowed):
    if mask_output not in masks_allowed:
        raise ValueError(f"{fmt} export: mask_output must be {' or '.join(masks_allowed)}; got "
                         f"{mask_output!r}")
    built = f"build the model from export_formats.converter_config(config, {fmt.lower()!r})"
    if {model.proposal_generator.nms_impl, model.detection_generator.nms_impl} != {"static"}:
        raise ValueError(f"{fmt} export needs model.nms_impl=static: {built}")
    if fmt == "LiteRT" and model.box_roi_align.impl != "gather":
        raise ValueError(f"LiteRT export needs model.roi_align.impl=gather: {built}")


def _write_labels(path: str, category_ids, class_names) -> None:
    """``labels.json`` beside the exported file ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    rundir.write_labels(folder, category_ids, class_names)


def export_onnx(model, category_ids, class_names, path: str, mask_output: str = "box",
                max_detections: int | None = None, mask_threshold: float = 0.5,
                mask_paste: str = "detectron2") -> str:
    """Writes ``path`` (a ``.onnx`` file, opset 17) and ``labels.json`` beside it; returns
    ``path``. Arguments as :func:`mrcnn_tf.serving.export_saved_model`; ``mask_output`` "box"
    or "full" (png needs EncodePng, which ONNX lacks)."""
    try:
        import tf2onnx
    except ImportError as e:
        raise ImportError("ONNX export needs tf2onnx: pip install -e \".[export]\"") from e
    _check(model, "ONNX", mask_output, ("box", "full"))
    detect, _ = _detector(model, category_ids, class_names, mask_output, max_detections,
                          mask_threshold, mask_paste)
    _write_labels(path, category_ids, class_names)
    spec = (tf.TensorSpec([None, None, None, 3], tf.uint8, name="images"),)
    tf2onnx.convert.from_function(tf.function(detect), input_signature=spec, opset=OPSET,
                                  output_path=path)
    return path


def export_litert(model, category_ids, class_names, path: str, image_size,
                  max_detections: int | None = None, mask_threshold: float = 0.5,
                  mask_paste: str = "detectron2", mask_output: str = "box") -> str:
    """Writes ``path`` (a ``.tflite`` file of builtin ops only) for uint8 [1, H, W, 3] images of
    ``image_size`` (H, W), and ``labels.json`` beside it; returns ``path``. Its signature
    ``serving_default`` takes ``images``. Masks: ``box`` only (the full-size paste needs ops
    LiteRT lacks)."""
    _check(model, "LiteRT", mask_output, ("box",))
    height, width = (int(v) for v in image_size)
    detect, module = _detector(model, category_ids, class_names, "box", max_detections,
                               mask_threshold, mask_paste)
    fn = tf.function(detect, input_signature=[
        tf.TensorSpec([1, height, width, 3], tf.uint8, name="images")])
    converter = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()],
                                                                module)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    data = converter.convert()
    _write_labels(path, category_ids, class_names)
    with open(path, "wb") as f:
        f.write(data)
    return path
