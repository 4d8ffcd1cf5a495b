"""detectron2 Mask R-CNN weights -> MaskRCNN: every layout change in one place.

``load_detectron2(model, path_or_state)`` copies a detectron2 ``GeneralizedRCNN`` (Mask R-CNN,
ResNet-FPN) state dict into a model built from ``configs/detectron2_r50_fpn.yaml`` (or the R101 /
X101 configs). The model-zoo files (``model_final_*.pkl``) are pickled dicts of numpy arrays; they
are read by :class:`ArraysOnlyUnpickler`, which builds numpy arrays, dicts, lists, strings and
numbers and refuses every other object, never by a plain ``pickle.load``. detectron2's own
``.pth`` checkpoints are read with ``torch.load(weights_only=True)``.

The layouts differ from ours as follows, and nowhere else:

- input: detectron2 takes BGR in 0..255 normalised with its pixel mean and std; the configs set
  our RGB ``pixel_mean``/``pixel_std`` to the same values in RGB order and 0..1 units, and the
  stem kernel's input channels are reversed (BGR -> RGB), so the model keeps taking RGB images;
- conv kernels [out, in, kh, kw] -> [kh, kw, in, out]; the mask head's transposed conv
  [in, out, kh, kw] -> [kh, kw, out, in]; linear [out, in] -> [in, out]; ``fc1``'s input rows
  from (c, y, x) to (y, x, c) (as torchvision's ``fc6``);
- classes: detectron2's classifier puts background last (K + 1 logits, background at K), ours
  first; its box regressor and mask predictor have no background slot (4K rows, K masks), ours
  do, so a zero slot is inserted at class 0 (never read: background is not detected);
- box deltas (RPN per anchor, box head per class): (dx, dy, dw, dh) -> (dy, dx, dh, dw);
- FrozenBN / BN ``weight, bias, running_mean, running_var`` -> gamma, beta, moving mean and
  variance (eps 1e-5 in both).

Class i (1..K) of the converted model is detectron2's contiguous class i - 1; for COCO that is
the i-th COCO category id in increasing order (``coco80_label_map``).
"""

from __future__ import annotations

import os
import pickle

import numpy as np

from mrcnn_tf.layers.norm import BATCH_NORMS
from mrcnn_tf.weights import (
    COCO_CATEGORIES,
    WeightsError,
    _assign_all,
    _conv,
    _deltas_first_axis,
    _fc6,
    _identity,
    _linear,
    _to_numpy,
    resnet_mapping,
)

# What a model-zoo pickle may hold: numpy arrays (and their dtypes and scalars) in dicts. Keys are
# (module, name) as the pickle names them; numpy 2 moved numpy.core to numpy._core.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"): ("numpy._core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"): ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"): ("numpy", "ndarray"),
    ("numpy", "dtype"): ("numpy", "dtype"),
    ("numpy.core.numeric", "_frombuffer"): ("numpy._core.numeric", "_frombuffer"),  # protocol 5
    ("numpy._core.numeric", "_frombuffer"): ("numpy._core.numeric", "_frombuffer"),
    ("collections", "OrderedDict"): ("collections", "OrderedDict"),
    ("_codecs", "encode"): ("_codecs", "encode"),  # bytes in protocol 2 (Python 3 writers)
}


class ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, dicts, lists, tuples, strings and numbers; any other global (a
    class or function a pickle would call) raises WeightsError naming it."""

    def __init__(self, file, path: str = "the pickle"):
        super().__init__(file, encoding="latin1")  # the model zoo's Python 2 pickles
        self._path = path

    def find_class(self, module, name):
        target = _ALLOWED.get((module, name))
        if target is None:
            raise WeightsError(
                f"{self._path}: refused to unpickle {module}.{name}: a weights file may hold "
                "only numpy arrays, dicts, lists, strings and numbers")
        import importlib

        return getattr(importlib.import_module(target[0]), target[1])

    def persistent_load(self, pid):
        raise WeightsError(f"{self._path}: refused a persistent reference ({pid!r}) in the "
                           "pickle: not a detectron2 model-zoo file")


def read_detectron2(source) -> dict[str, np.ndarray]:
    """A detectron2 state dict as {key: numpy array}.

    Args:
      source: a dict, or a path to a model-zoo ``.pkl`` (read with :class:`ArraysOnlyUnpickler`),
        a detectron2 ``.pth`` checkpoint (``torch.load(weights_only=True)``; needs torch) or an
        ``.npz`` of the state dict.
    """
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.exists(path):
            raise FileNotFoundError(f"detectron2 weights: no such file {path}")
        if path.endswith(".pkl"):
            try:
                with open(path, "rb") as f:
                    state = ArraysOnlyUnpickler(f, path).load()
            except WeightsError:
                raise
            except Exception as e:  # truncated or not a pickle
                raise WeightsError(f"{path}: not a readable pickle ({type(e).__name__}: {e})"
                                   ) from None
        else:
            from mrcnn_tf.weights import read_state_dict

            return read_state_dict(path)
    else:
        state = source
    if not isinstance(state, dict):
        raise WeightsError(f"detectron2 weights: expected a dict, got {type(state).__name__}")
    if isinstance(state.get("model"), dict):
        state = state["model"]
    out = {}
    for key, value in state.items():
        if not isinstance(key, str):
            raise WeightsError(f"detectron2 weights: key {key!r} is not a string")
        key = key[len("module."):] if key.startswith("module.") else key
        value = _to_numpy(value)
        if value.dtype == object:
            raise WeightsError(f"detectron2 weights: {key} is not a numeric array")
        out[key] = value
    return out


def coco80_label_map():
    """(category_ids, class_names) of detectron2's 80 contiguous COCO classes, in order."""
    ids = sorted(COCO_CATEGORIES)
    return ids, [COCO_CATEGORIES[i] for i in ids]


# -- layout changes -----------------------------------------------------------------------------

def _bgr_stem(w):
    return _conv(w)[:, :, ::-1, :]


def _background_first(w):
    """[K + 1, ...] with background last -> background first."""
    return np.concatenate([w[-1:], w[:-1]], axis=0)


def _with_background_slot(w, rows: int):
    """[K * rows, ...] -> [(K + 1) * rows, ...] with zero rows for class 0."""
    return np.concatenate([np.zeros((rows,) + w.shape[1:], w.dtype), w], axis=0)


def detectron2_mapping(model) -> list[tuple[str, object, object]]:
    """(detectron2 key, our variable, numpy transform) for every weight of ``model``."""
    bb, fpn, rpn = model.backbone, model.fpn, model.rpn_head
    bh, mh = model.box_head, model.mask_head
    problems = []
    if bb.norm not in BATCH_NORMS:
        problems.append("model.backbone.norm must be frozen_bn (or bn)")
    if fpn.norm != "none" or mh.norm != "none":
        problems.append("model.fpn.norm and model.mask_head.norm must be none")
    if not rpn.share_heads or rpn.objectness != "sigmoid" or rpn.num_convs != 1:
        problems.append("model.rpn must share one one-conv head with sigmoid objectness")
    if bh.head_type != "2fc" or bh.class_agnostic or mh.class_agnostic:
        problems.append("model.box_head must be type 2fc with per-class deltas and masks")
    if fpn.min_level != 2 or fpn.max_level != 6:
        problems.append("model.fpn must have levels 2..6")
    if problems:
        raise WeightsError("the model is not detectron2's Mask R-CNN R-FPN architecture: "
                           + "; ".join(problems) + " (see configs/detectron2_r50_fpn.yaml)")
    entries = resnet_mapping(bb, "backbone.bottom_up.", "detectron2", _bgr_stem)
    for i, level in enumerate(range(fpn.min_level, 6)):
        for name, layer in (("lateral", fpn.lateral[i]), ("output", fpn.output_convs[i])):
            entries += [(f"backbone.fpn_{name}{level}.weight", layer.kernel, _conv),
                        (f"backbone.fpn_{name}{level}.bias", layer.bias, _identity)]
    q = "proposal_generator.rpn_head."
    entries += [
        (f"{q}conv.weight", rpn.convs[0].kernel, _conv),
        (f"{q}conv.bias", rpn.convs[0].bias, _identity),
        (f"{q}objectness_logits.weight", rpn.cls_convs[0].kernel, _conv),
        (f"{q}objectness_logits.bias", rpn.cls_convs[0].bias, _identity),
        (f"{q}anchor_deltas.weight", rpn.box_convs[0].kernel,
         lambda w: _conv(_deltas_first_axis(w))),
        (f"{q}anchor_deltas.bias", rpn.box_convs[0].bias, _deltas_first_axis),
    ]
    q = "roi_heads."
    entries += [
        (f"{q}box_head.fc1.weight", bh.fcs[0].kernel, _fc6(model.box_roi_align.output_size)),
        (f"{q}box_head.fc1.bias", bh.fcs[0].bias, _identity),
        (f"{q}box_head.fc2.weight", bh.fcs[1].kernel, _linear),
        (f"{q}box_head.fc2.bias", bh.fcs[1].bias, _identity),
        (f"{q}box_predictor.cls_score.weight", bh.class_logits.kernel,
         lambda w: _linear(_background_first(w))),
        (f"{q}box_predictor.cls_score.bias", bh.class_logits.bias, _background_first),
        (f"{q}box_predictor.bbox_pred.weight", bh.box_deltas.kernel,
         lambda w: _linear(_deltas_first_axis(_with_background_slot(w, 4)))),
        (f"{q}box_predictor.bbox_pred.bias", bh.box_deltas.bias,
         lambda w: _deltas_first_axis(_with_background_slot(w, 4))),
    ]
    for i, conv in enumerate(mh.convs):
        entries += [(f"{q}mask_head.mask_fcn{i + 1}.weight", conv.kernel, _conv),
                    (f"{q}mask_head.mask_fcn{i + 1}.bias", conv.bias, _identity)]
    entries += [
        (f"{q}mask_head.deconv.weight", mh.deconv.kernel, _conv),
        (f"{q}mask_head.deconv.bias", mh.deconv.bias, _identity),
        (f"{q}mask_head.predictor.weight", mh.predictor.kernel,
         lambda w: _conv(_with_background_slot(w, 1))),
        (f"{q}mask_head.predictor.bias", mh.predictor.bias,
         lambda w: _with_background_slot(w, 1)),
    ]
    return entries


def _ignored(key: str) -> bool:
    """Keys a detectron2 file may hold that are not weights of the model."""
    return (key in ("pixel_mean", "pixel_std") or key.endswith("num_batches_tracked")
            or ".cell_anchors." in key)


def load_detectron2(model, state_dict_or_path) -> int:
    """Copies detectron2 Mask R-CNN R-FPN weights into a built ``model``.

    Every weight of the model must be in the state dict and every key of the state dict used
    (buffers such as ``pixel_mean`` aside); otherwise nothing is assigned and a WeightsError lists
    the keys. Returns the number of tensors copied.
    """
    from mrcnn_tf.weights import family_of

    state = read_detectron2(state_dict_or_path)
    try:
        found = family_of(state)
    except WeightsError:
        found = None  # neither family: the key lists below say what differs
    if found in ("torchvision", "torchvision_v2"):
        raise WeightsError(f"the state dict is torchvision's ({found}, keys backbone.body.*), "
                           "not detectron2's: load it with mrcnn_tf.weights.load_torchvision, "
                           "or convert it with python -m mrcnn_tf.tools.convert, which picks "
                           "the config")
    return _assign_all(
        detectron2_mapping(model), state, "detectron2 weights", ignored=_ignored,
        hint=lambda k: (" (detectron2's COCO models have 80 classes: model.num_classes=80)"
                        if "predictor" in k else ""))
