"""torchvision Mask R-CNN weights -> MaskRCNN: every layout change in one place.

``load_torchvision(model, state_dict_or_path)`` copies a ``maskrcnn_resnet50_fpn`` (v1) state dict
into a model built from ``configs/torchvision_r50_fpn.yaml`` (or any config with the same
architecture, e.g. a different depth or width). The layouts differ as follows, and nowhere else:

- conv kernels: torch [out, in, kh, kw] -> Keras [kh, kw, in, out];
- transposed conv (mask head): torch [in, out, kh, kw] -> Keras Conv2DTranspose [kh, kw, out, in]
  (both frameworks compute the gradient of a correlation, so no spatial flip);
- linear: torch [out, in] -> Keras [in, out];
- fc6's input: torch flattens the pooled [C, 7, 7] channel-major, we flatten [7, 7, C], so its
  rows are permuted from (c, y, x) to (y, x, c);
- box deltas, both the RPN's (per anchor) and the box predictor's (per class): torch orders each
  group of four (dx, dy, dw, dh), we order (dy, dx, dh, dw);
- FrozenBatchNorm2d / BatchNorm2d weight, bias, running_mean, running_var -> gamma, beta,
  moving_mean, moving_variance (eps 1e-5 in both; ``num_batches_tracked`` is ignored);
- key names of checkpoints older than torchvision 0.13 (the COCO release among them):
  ``fpn.inner_blocks.i.weight``, ``rpn.head.conv.weight`` and ``mask_head.mask_fcnK.weight`` are
  renamed to today's ``fpn.inner_blocks.i.0.weight``, ``rpn.head.conv.0.0.weight`` and
  ``mask_head.{K-1}.0.weight``; ``module.`` prefixes (DistributedDataParallel) are dropped and a
  ``{"model": state_dict}`` wrapper (torchvision's reference scripts) is unwrapped.

Anchor order, class order (0 = background, then torchvision's 91-label COCO ids) and mask channel
order need no change: the model uses torchvision's.
"""

from __future__ import annotations

import os
import re
import warnings

import numpy as np

from mrcnn_tf import rundir
from mrcnn_tf.layers.norm import BATCH_NORMS

# COCO 2017 category id -> name; torchvision's labels are these ids (gaps are unused labels).
COCO_CATEGORIES = {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus", 7: "train",
    8: "truck", 9: "boat", 10: "traffic light", 11: "fire hydrant", 13: "stop sign",
    14: "parking meter", 15: "bench", 16: "bird", 17: "cat", 18: "dog", 19: "horse", 20: "sheep",
    21: "cow", 22: "elephant", 23: "bear", 24: "zebra", 25: "giraffe", 27: "backpack",
    28: "umbrella", 31: "handbag", 32: "tie", 33: "suitcase", 34: "frisbee", 35: "skis",
    36: "snowboard", 37: "sports ball", 38: "kite", 39: "baseball bat", 40: "baseball glove",
    41: "skateboard", 42: "surfboard", 43: "tennis racket", 44: "bottle", 46: "wine glass",
    47: "cup", 48: "fork", 49: "knife", 50: "spoon", 51: "bowl", 52: "banana", 53: "apple",
    54: "sandwich", 55: "orange", 56: "broccoli", 57: "carrot", 58: "hot dog", 59: "pizza",
    60: "donut", 61: "cake", 62: "chair", 63: "couch", 64: "potted plant", 65: "bed",
    67: "dining table", 70: "toilet", 72: "tv", 73: "laptop", 74: "mouse", 75: "remote",
    76: "keyboard", 77: "cell phone", 78: "microwave", 79: "oven", 80: "toaster", 81: "sink",
    82: "refrigerator", 84: "book", 85: "clock", 86: "vase", 87: "scissors", 88: "teddy bear",
    89: "hair drier", 90: "toothbrush",
}


def coco_label_map(num_classes: int = 90):
    """(category_ids, class_names) of torchvision's COCO labels 1..num_classes."""
    ids = list(range(1, num_classes + 1))
    return ids, [COCO_CATEGORIES.get(i, "N/A") for i in ids]


class WeightsError(ValueError):
    """A state dict that does not fit the model; the message names the keys."""


# -- reading ------------------------------------------------------------------------------------

_OLD_NAMES = [
    (re.compile(r"^backbone\.fpn\.(inner_blocks|layer_blocks)\.(\d+)\.(weight|bias)$"),
     r"backbone.fpn.\1.\2.0.\3"),
    (re.compile(r"^rpn\.head\.conv\.(weight|bias)$"), r"rpn.head.conv.0.0.\1"),
    (re.compile(r"^roi_heads\.mask_head\.mask_fcn(\d+)\.(weight|bias)$"),
     lambda m: f"roi_heads.mask_head.{int(m.group(1)) - 1}.0.{m.group(2)}"),
]


def _to_numpy(value):
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach"):  # a torch tensor
        return value.detach().cpu().numpy()
    return np.asarray(value)


def read_state_dict(source) -> dict[str, np.ndarray]:
    """A torchvision state dict as {current torchvision key: numpy array}.

    Args:
      source: a dict of arrays or torch tensors, or a path to a ``.pth``/``.pt`` file (read with
        ``torch.load(weights_only=True)``; needs torch) or a ``.npz`` file (no torch needed).
    """
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.exists(path):
            raise FileNotFoundError(f"torchvision weights: no such file {path}")
        if path.endswith(".npz"):
            try:
                with np.load(path, allow_pickle=False) as f:
                    state = {k: f[k] for k in f.files}
            except (ValueError, OSError) as e:
                raise WeightsError(f"{path}: not a readable .npz of arrays ({e})") from e
        else:
            try:
                import torch
            except ImportError as e:
                raise ImportError(
                    f"reading {path} needs torch (pip install torch), or convert it to .npz "
                    "where torch is installed: np.savez(out, **{k: v.numpy() for k, v in "
                    "torch.load(path, weights_only=True).items()})") from e
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:
                raise WeightsError(f"{path}: not a readable PyTorch checkpoint "
                                   f"({type(e).__name__}: {e})") from e
    else:
        state = source
    if not isinstance(state, dict):
        raise WeightsError(f"torchvision weights: expected a state dict, got {type(state)}")
    for wrapper in ("model", "state_dict"):
        if wrapper in state and isinstance(state[wrapper], dict):
            state = state[wrapper]
    out = {}
    # Old torchvision names are renamed in torchvision state dicts only: detectron2's
    # mask_head.mask_fcnK is today's name there.
    torchvision = any(str(k).startswith(("backbone.body.", "module.backbone.body."))
                      for k in state)
    for key, value in state.items():
        key = key[len("module."):] if key.startswith("module.") else key
        if torchvision:
            for pattern, repl in _OLD_NAMES:
                key = pattern.sub(repl, key)
        out[key] = _to_numpy(value)
    return out


# -- layout changes ---------------------------------------------------------------------------

_DELTA_ORDER = [1, 0, 3, 2]  # (dx, dy, dw, dh) -> (dy, dx, dh, dw)


def _conv(w):
    """[out, in, kh, kw] -> [kh, kw, in, out]; the same permutation takes a transposed conv's
    [in, out, kh, kw] to Keras Conv2DTranspose's [kh, kw, out, in]."""
    return np.transpose(w, (2, 3, 1, 0))


def _linear(w):
    return np.transpose(w)


def _deltas_first_axis(w):
    """Reorders each group of four rows of a delta output from torch's to ours."""
    groups = w.reshape((-1, 4) + w.shape[1:])
    return groups[:, _DELTA_ORDER].reshape(w.shape)


def _fc6(size: int):
    def convert(w):
        out_dim, in_dim = w.shape
        channels = in_dim // (size * size)
        w = w.reshape(out_dim, channels, size, size)
        return np.transpose(w, (2, 3, 1, 0)).reshape(size * size * channels, out_dim)
    return convert


def _identity(w):
    return w


# -- the mapping ------------------------------------------------------------------------------

def _norm_entries(prefix, layer):
    names = (("weight", "gamma"), ("bias", "beta"), ("running_mean", "moving_mean"),
             ("running_var", "moving_variance"))
    return [(f"{prefix}.{t}", getattr(layer, k), _identity) for t, k in names]


# Key names of a ResNet's weights: stem conv, stem norm, block (stage s from 0, block b), block
# conv i, its norm, shortcut conv, shortcut norm.
RESNET_KEYS = {
    "torchvision": ("conv1.weight", "bn1", "layer{s1}.{b}", "conv{i}.weight", "bn{i}",
                    "downsample.0.weight", "downsample.1"),
    "detectron2": ("stem.conv1.weight", "stem.conv1.norm", "res{s2}.{b}", "conv{i}.weight",
                   "conv{i}.norm", "shortcut.weight", "shortcut.norm"),
}


def resnet_mapping(backbone, prefix: str = "", layout: str = "torchvision",
                   stem_transform=_conv) -> list[tuple[str, object, object]]:
    """(key, our variable, numpy transform) for every weight of a ResNet backbone, with the key
    names of ``layout`` (RESNET_KEYS: torchvision's ``conv1``, ``bn1``, ``layerS.B.convI``,
    ``layerS.B.bnI``, ``layerS.B.downsample.{0,1}``; or detectron2's) after ``prefix``."""
    stem, stem_norm, block_key, conv_key, norm_key, short, short_norm = RESNET_KEYS[layout]
    entries = [(f"{prefix}{stem}", backbone.stem_conv.kernel, stem_transform)]
    entries += _norm_entries(f"{prefix}{stem_norm}", backbone.stem_norm)
    for s, stage in enumerate(backbone.stages):
        for b, block in enumerate(stage):
            p = prefix + block_key.format(s1=s + 1, s2=s + 2, b=b)
            for i, (conv, norm) in enumerate(((block.conv1, block.norm1),
                                              (block.conv2, block.norm2),
                                              (block.conv3, block.norm3)), start=1):
                entries.append((f"{p}.{conv_key.format(i=i)}", conv.kernel, _conv))
                entries += _norm_entries(f"{p}.{norm_key.format(i=i)}", norm)
            if block.project:
                entries.append((f"{p}.{short}", block.shortcut.kernel, _conv))
                entries += _norm_entries(f"{p}.{short_norm}", block.shortcut_norm)
    return entries


def torchvision_version(model) -> str:
    """"v1" or "v2": which of torchvision's Mask R-CNNs ``model`` is built as, from its config
    (``configs/torchvision_r50_fpn.yaml`` or ``configs/torchvision_r50_fpn_v2.yaml``); a
    WeightsError naming every difference when it is neither."""
    bb, fpn, rpn = model.backbone, model.fpn, model.rpn_head
    bh, mh = model.box_head, model.mask_head
    common = []
    if bb.stride_in_1x1:
        common.append("model.backbone.stride_in_1x1 must be false (stride on the 3x3 conv)")
    if bb.norm not in BATCH_NORMS:
        common.append("model.backbone.norm must be frozen_bn (or bn)")
    if not rpn.share_heads or rpn.objectness != "sigmoid":
        common.append("model.rpn must share one head with sigmoid objectness")
    if rpn.conv_channels != fpn.channels:
        common.append("model.rpn.conv_channels must equal model.fpn.channels")
    if bh.class_agnostic or mh.class_agnostic:
        common.append("model.box_head and model.mask_head must be per class")
    if fpn.min_level != 2 or fpn.max_level != 6:
        common.append("model.fpn must have levels 2..6")
    v1 = ["fpn/box_head/mask_head norm must be none"] if (
        fpn.norm != "none" or mh.norm != "none" or bh.norm != "none") else []
    if bh.head_type != "2fc":
        v1.append("model.box_head.type must be 2fc")
    if rpn.num_convs != 1:
        v1.append("model.rpn.num_convs must be 1")
    v2 = []
    if any(n not in BATCH_NORMS for n in (fpn.norm, bh.norm, mh.norm)):
        v2.append("model.fpn, model.box_head and model.mask_head norm must be bn")
    if bh.head_type != "4conv1fc" or bh.num_convs != 4:
        v2.append("model.box_head.type must be 4conv1fc")
    if rpn.num_convs != 2:
        v2.append("model.rpn.num_convs must be 2")
    if not common and not v1:
        return "v1"
    if not common and not v2:
        return "v2"
    raise WeightsError(
        "the model is not torchvision's Mask R-CNN architecture: "
        + "; ".join(common + (v1 if len(v1) <= len(v2) else v2))
        + " (see configs/torchvision_r50_fpn.yaml and configs/torchvision_r50_fpn_v2.yaml)")


def _conv_norm(prefix, conv, norm):
    """A torchvision Conv2dNormActivation: ``prefix.0`` the bias-free conv, ``prefix.1`` its BN."""
    return [(f"{prefix}.0.weight", conv.kernel, _conv)] + _norm_entries(f"{prefix}.1", norm)


def _conv_bias(prefix, conv, convert_kernel=_conv, convert_bias=_identity):
    return [(f"{prefix}.weight", conv.kernel, convert_kernel),
            (f"{prefix}.bias", conv.bias, convert_bias)]


def torchvision_mapping(model) -> list[tuple[str, object, object]]:
    """(torchvision key, our variable, numpy transform) for every weight of ``model``, a v1
    (``maskrcnn_resnet50_fpn``) or v2 (``maskrcnn_resnet50_fpn_v2``) model.

    v2 differs from v1 in its keys only where its layers differ: BN after every FPN conv
    (``fpn.inner_blocks.i.{0,1}``), two RPN convs (``rpn.head.conv.{0,1}.0``), a 4conv1fc box
    head (``box_head.{0..3}.{0,1}``, then ``box_head.5``, its fc, after a Flatten) and BN in the
    mask head (``mask_head.i.{0,1}``)."""
    version = torchvision_version(model)
    entries = resnet_mapping(model.backbone, "backbone.body.")
    fpn = model.fpn
    for i in range(len(fpn.lateral)):
        for torch_name, layer, norm in (
                ("inner_blocks", fpn.lateral[i], fpn.lateral_norms[i]),
                ("layer_blocks", fpn.output_convs[i], fpn.output_norms[i])):
            prefix = f"backbone.fpn.{torch_name}.{i}"
            entries += (_conv_norm(prefix, layer, norm) if version == "v2"
                        else _conv_bias(f"{prefix}.0", layer))
    rpn = model.rpn_head
    for k, conv in enumerate(rpn.convs):
        entries += _conv_bias(f"rpn.head.conv.{k}.0", conv)
    entries += _conv_bias("rpn.head.cls_logits", rpn.cls_convs[0])
    entries += _conv_bias("rpn.head.bbox_pred", rpn.box_convs[0],
                          lambda w: _conv(_deltas_first_axis(w)), _deltas_first_axis)
    bh = model.box_head
    size = model.box_roi_align.output_size
    if version == "v2":
        for k, (conv, norm) in enumerate(zip(bh.convs, bh.conv_norms)):
            entries += _conv_norm(f"roi_heads.box_head.{k}", conv, norm)
        fc = len(bh.convs) + 1  # after the Flatten
        entries += _conv_bias(f"roi_heads.box_head.{fc}", bh.fcs[0], _fc6(size))
    else:
        entries += _conv_bias("roi_heads.box_head.fc6", bh.fcs[0], _fc6(size))
        entries += _conv_bias("roi_heads.box_head.fc7", bh.fcs[1], _linear)
    entries += _conv_bias("roi_heads.box_predictor.cls_score", bh.class_logits, _linear)
    entries += _conv_bias("roi_heads.box_predictor.bbox_pred", bh.box_deltas,
                          lambda w: _linear(_deltas_first_axis(w)), _deltas_first_axis)
    mh = model.mask_head
    for i, (conv, norm) in enumerate(zip(mh.convs, mh.norms)):
        entries += (_conv_norm(f"roi_heads.mask_head.{i}", conv, norm) if version == "v2"
                    else _conv_bias(f"roi_heads.mask_head.{i}.0", conv))
    entries += _conv_bias("roi_heads.mask_predictor.conv5_mask", mh.deconv)
    entries += _conv_bias("roi_heads.mask_predictor.mask_fcn_logits", mh.predictor)
    return entries


def _assign_all(entries, state: dict, what: str, ignored=lambda key: False, hint=None) -> int:
    """Copies ``state`` into the variables of ``entries`` (key, variable, transform), all or
    nothing: every entry's key must be present with a fitting shape and every key of ``state``
    used (or ``ignored``); otherwise a WeightsError lists the keys and nothing is assigned."""
    used = {key for key, _, _ in entries}
    missing = sorted(used - set(state))
    unexpected = sorted(k for k in set(state) - used if not ignored(k))
    errors = []
    if missing:
        errors.append(f"missing from the state dict: {', '.join(missing[:10])}"
                      + (f" and {len(missing) - 10} more" if len(missing) > 10 else ""))
    if unexpected:
        errors.append(f"not used by the model: {', '.join(unexpected[:10])}"
                      + (f" and {len(unexpected) - 10} more" if len(unexpected) > 10 else ""))
    values = []
    if not missing:
        for key, var, convert in entries:
            value = convert(np.asarray(state[key], np.float32))
            expected = tuple(var.shape)
            if value.shape != expected:
                errors.append(f"{key}: shape {tuple(state[key].shape)} does not fit "
                              f"{var.path} {expected}{hint(key) if hint else ''}")
            values.append((var, value))
    if errors:
        raise WeightsError(f"{what} do not fit the model: " + "; ".join(errors))
    for var, value in values:
        var.assign(value)
    return len(values)


def family_of(state: dict) -> str:
    """``torchvision`` (v1), ``torchvision_v2`` or ``detectron2``, from a state dict's keys; a
    WeightsError naming the keys looked for when it is none of them."""
    if "roi_heads.box_head.fc6.weight" in state:
        return "torchvision"
    if "roi_heads.box_head.0.0.weight" in state and "rpn.head.conv.1.0.weight" in state:
        return "torchvision_v2"
    if "backbone.bottom_up.stem.conv1.weight" in state and "roi_heads.box_head.fc1.weight" in (
            state):
        return "detectron2"
    sample = ", ".join(sorted(state)[:5])
    raise WeightsError(
        "not a checkpoint of a known Mask R-CNN family: torchvision v1 has "
        "roi_heads.box_head.fc6.weight, v2 has roi_heads.box_head.0.0.weight and "
        "rpn.head.conv.1.0.weight, detectron2 has backbone.bottom_up.stem.conv1.weight and "
        f"roi_heads.box_head.fc1.weight; this one has {len(state)} keys ({sample}, ...)")


def load_torchvision(model, state_dict_or_path) -> int:
    """Copies torchvision ``maskrcnn_resnet50_fpn`` weights into a built ``model``.

    Every weight of the model must be in the state dict and every (non-counter) key of the state
    dict must be used; otherwise nothing is assigned and a WeightsError lists the keys. Returns
    the number of tensors copied. To fine-tune on other classes, load into the 90-class model
    and then call ``mrcnn_tf.with_num_classes``.
    """
    state = read_state_dict(state_dict_or_path)
    entries = torchvision_mapping(model)
    version = torchvision_version(model)
    try:
        found = family_of(state)
    except WeightsError:
        found = None  # neither family: the key lists below say what differs
    if found == "detectron2":
        raise WeightsError("the state dict is detectron2's (it has backbone.bottom_up.*): load it "
                           "with mrcnn_tf.weights_detectron2.load_detectron2 into a model built "
                           "from configs/detectron2_r50_fpn.yaml, or convert it with python -m "
                           "mrcnn_tf.tools.convert, which picks the config")
    if found is not None and found != {"v1": "torchvision", "v2": "torchvision_v2"}[version]:
        key = ("roi_heads.box_head.fc6.weight" if found == "torchvision"
               else "roi_heads.box_head.0.0.weight")
        config = "torchvision_r50_fpn.yaml" if found == "torchvision" else (
            "torchvision_r50_fpn_v2.yaml")
        raise WeightsError(f"the state dict is torchvision {'v1' if version == 'v2' else 'v2'} "
                           f"(it has {key}) but the model is {version}: build it from "
                           f"configs/{config}, or convert with python -m mrcnn_tf.tools.convert, "
                           "which picks the config")
    return _assign_all(
        entries, state, "torchvision weights",
        ignored=lambda k: k.endswith("num_batches_tracked"),
        hint=lambda k: (" (torchvision's COCO head has 91 logits: model.num_classes=90)"
                        if "predictor" in k else ""))


# -- initial weights: an ImageNet backbone, or a whole earlier model --------------------------

# Keras Applications' ResNet50 takes BGR images with the "caffe" mean and no std.
CAFFE_MEAN_RGB = (123.68 / 255.0, 116.779 / 255.0, 103.939 / 255.0)
CAFFE_STD = (1.0 / 255.0,) * 3


def load_backbone_weights(model, path: str) -> int:
    """Initialises ``model.backbone`` from ImageNet weights (``model.backbone.weights``).

    Accepted files:
      - torchvision's ``resnet50``/``resnet101`` state dict (``.pth``/``.pt``, read with
        ``torch.load(weights_only=True)``; or an ``.npz`` of it): every backbone weight is
        copied, the classifier (``fc.*``) is ignored, and anything missing or left over is an
        error naming the keys. Needs ``stride_in_1x1: false`` and a BN-type norm.
      - Keras Applications' ResNet-50 ``.h5``: needs ``stride_in_1x1: true`` and Keras'
        "caffe" preprocessing, which our RGB preprocessor expresses as ``pixel_mean`` =
        CAFFE_MEAN_RGB and ``pixel_std`` = CAFFE_STD; the stem kernel's input channels are
        reversed so that the model keeps taking RGB images.
    Returns the number of tensors copied.
    """
    from mrcnn_tf.layers.backbone import load_keras_applications_resnet50

    bb, pp = model.backbone, model.preprocessor
    if path.endswith(".h5"):
        if not (np.allclose(pp.pixel_mean, CAFFE_MEAN_RGB) and np.allclose(pp.pixel_std,
                                                                           CAFFE_STD)):
            raise WeightsError(
                f"{path}: Keras Applications weights expect Keras' 'caffe' preprocessing; set "
                f"model.preprocess.pixel_mean={[round(v, 8) for v in CAFFE_MEAN_RGB]} and "
                f"model.preprocess.pixel_std={[round(v, 8) for v in CAFFE_STD]}")
        try:
            load_keras_applications_resnet50(model.backbone, path)
        except ValueError as e:
            raise WeightsError(f"model.backbone.weights: {e}") from None
        stem = model.backbone.stem_conv.kernel
        stem.assign(stem.numpy()[:, :, ::-1, :])  # BGR -> RGB input channels
        return len(model.backbone.weights)
    problems = []
    if bb.stride_in_1x1:
        problems.append("model.backbone.stride_in_1x1 must be false (torchvision's ResNet has "
                        "its stride on the 3x3 conv)")
    if bb.norm not in BATCH_NORMS:
        problems.append(f"model.backbone.norm={bb.norm} cannot take batch-norm "
                        "statistics; use frozen_bn or bn")
    if problems:
        raise WeightsError(f"{path}: " + "; ".join(problems))
    state = read_state_dict(path)
    return _assign_all(resnet_mapping(model.backbone), state,
                       f"ImageNet ResNet weights from {path}",
                       ignored=lambda k: k.startswith("fc.")
                       or k.endswith("num_batches_tracked"))


def load_initial_weights(model, path: str) -> list[str]:
    """Initialises every weight of ``model`` from an earlier model (``model.init_from``): a run
    directory (its latest checkpoint), a training checkpoint prefix, or a ``.weights.h5`` file.

    Class-dependent layers whose shape differs (fine-tuning on other classes) keep their fresh
    initialisation; any other difference is an error naming the weights. The optimiser state
    and the step are not taken: training starts at step 0. Returns the paths of the weights
    left freshly initialised.
    """
    import tensorflow as tf

    from mrcnn_tf.checkpoint import weight_tensor_name
    from mrcnn_tf.model import CLASS_DEPENDENT, weight_key

    if path.endswith(".weights.h5") and os.path.isfile(path):
        class_weights = [w for w in model.weights
                         if weight_key(w.path).startswith(CLASS_DEPENDENT)]
        before = [w.numpy().copy() for w in class_weights]
        with warnings.catch_warnings():  # Keras lists the skipped layers; we return them
            warnings.simplefilter("ignore", UserWarning)
            model.load_weights(path, skip_mismatch=True)
        return [w.path for w, b in zip(class_weights, before) if np.array_equal(w.numpy(), b)]
    if not (os.path.isdir(path) or os.path.exists(path + ".index")):
        raise FileNotFoundError(f"model.init_from: {path} is not a run directory, a checkpoint "
                                "(no .index file) or a .weights.h5 file")
    checkpoint = path
    if os.path.isdir(path):
        checkpoint = tf.train.latest_checkpoint(os.path.join(path, rundir.CHECKPOINTS))
        if checkpoint is None:
            raise FileNotFoundError(f"model.init_from: {path} has no checkpoints/ with a "
                                    "checkpoint (a train.py or mrcnn_tf.tools.convert run "
                                    "directory, a checkpoint prefix or a .weights.h5 file)")
    try:
        reader = tf.train.load_checkpoint(checkpoint)
    except (tf.errors.NotFoundError, tf.errors.DataLossError, ValueError) as e:
        raise WeightsError(f"model.init_from: {checkpoint} is not a readable checkpoint "
                           f"({type(e).__name__})") from None
    shapes = reader.get_variable_to_shape_map()
    values, skipped, errors = [], [], []
    for w in model.weights:
        rel = weight_key(w.path)
        name = weight_tensor_name(rel)
        if name not in shapes:
            errors.append(f"{rel} is not in the checkpoint")
        elif tuple(shapes[name]) != tuple(w.shape):
            if rel.startswith(CLASS_DEPENDENT):
                skipped.append(w.path)
            else:
                errors.append(f"{rel}: {tuple(shapes[name])} in the checkpoint, "
                              f"{tuple(w.shape)} in the model")
        else:
            values.append((w, name))
    if errors:
        raise WeightsError(f"model.init_from: {checkpoint} does not fit the model: "
                           + "; ".join(errors[:10])
                           + (f" and {len(errors) - 10} more" if len(errors) > 10 else ""))
    for w, name in values:
        w.assign(reader.get_tensor(name))
    return skipped
