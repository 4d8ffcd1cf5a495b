"""Typed, validated configuration.

The whole system is described by one tree of frozen dataclasses (:class:`Config`). Every option is
declared with :func:`opt`, which records the default, a one-line description saying why that
default, and the allowed values. :func:`load_config` reads YAML with a ``yaml.SafeLoader``, applies
dotted overrides (``"model.rpn.conv_channels=512"``) and validates; any unknown key, wrong type or
out-of-range value raises :class:`ConfigError` naming the dotted key and what is allowed.
Descriptions that name "the design notes" mean docs/design.md.

Layers never see this tree: a factory (``factory.py``) reads it and passes plain keyword
arguments, so a layer can be built and tested without a config.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml


class ConfigError(ValueError):
    """An invalid configuration: the message names the dotted key and the allowed values.
    ``key``: that dotted key, where one key is at fault."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


def opt(default: Any, doc: str, *, choices: tuple | None = None, min: float | None = None,
        max: float | None = None, min_exclusive: bool = False):
    """Declares one option: its default, why that default, and its allowed values.

    ``min``/``max`` bound numbers (and every element of a tuple of numbers).
    """
    if isinstance(default, list):
        default = tuple(default)
    meta = {"doc": doc, "choices": choices, "min": min, "max": max, "min_exclusive": min_exclusive}
    return field(default=default, metadata=meta)


def section(cls):
    """A nested section whose default is the section's own defaults."""
    return field(default_factory=cls, metadata={"doc": cls.__doc__ or ""})


# Allowed values read outside this file too (one list each).
MASK_OUTPUTS = ("full", "box", "png")  # export.mask_output, export --mask_output, serving
STRATEGIES = ("default", "one_device", "mirrored", "multi_worker", "tpu")  # train --strategy


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BackboneConfig:
    """ResNet backbone producing C2..C5."""

    name: str = opt("resnet50", "ResNet depth, or ResNeXt-101 32x8d (detectron2's X101); the"
                    " _small ones are narrow 1-block-per-stage nets for CPU tests and the shapes"
                    " job", choices=("resnet50", "resnet101", "resnext101_32x8d", "resnet_small",
                                     "resnext_small"))
    norm: str = opt("frozen_bn", "normalisation: frozen BN as every reference fine-tunes"
                    " ImageNet weights with batch 2/GPU",
                    choices=("frozen_bn", "bn", "sync_bn", "group_norm"))
    stride_in_1x1: bool = opt(False, "stride on the first 1x1 conv (Keras Applications/MSRA)"
                              " instead of the 3x3 (torchvision)")
    freeze_at: int = opt(2, "stem + stages below this (2 = stem and res2) are not trained, as in"
                         " detectron2 and torchvision (trainable_layers=3)", min=0, max=5)
    input_channels: int = opt(3, "image channels: 1 grayscale, 3 RGB, 4 RGB-D, any multispectral",
                              min=1)
    group_norm_groups: int = opt(32, "groups when norm=group_norm (Wu & He, 2018)", min=1)
    weights: str | None = opt(None, "ImageNet weights to start a new run from: torchvision's"
                              " resnet50/101 state dict (.pth/.npz) or Keras Applications'"
                              " ResNet-50 .h5; nothing is downloaded")


@dataclass(frozen=True)
class FPNConfig:
    """Feature pyramid P2..P6 (P6 = max-pool stride 2 of P5)."""

    channels: int = opt(256, "FPN width; 256 in the paper and every reference", min=1)
    min_level: int = opt(2, "finest level (P2, stride 4)", min=2, max=5)
    max_level: int = opt(6, "coarsest level (P6 from max-pooling P5, used by the RPN only)",
                         min=3, max=7)
    norm: str = opt("none", "optional normalisation in lateral/output convs",
                    choices=("none", "bn", "sync_bn", "group_norm"))


@dataclass(frozen=True)
class AnchorConfig:
    """Anchors: one size per level x aspect ratios x scales, ordered ratio-major per position."""

    sizes: tuple[float, ...] = opt((32.0, 64.0, 128.0, 256.0, 512.0),
                                   "anchor size per level P2..P6 (FPN paper, torchvision)", min=1)
    aspect_ratios: tuple[float, ...] = opt((0.5, 1.0, 2.0), "height/width ratios (FPN paper)",
                                           min=0.0, min_exclusive=True)
    scales: tuple[float, ...] = opt((1.0,), "size multipliers per level (detectron2 style octave"
                                    " scales); one scale as in the paper", min=0.0,
                                    min_exclusive=True)
    offset: float = opt(0.0, "anchor centre offset in strides: 0 = torchvision/detectron2, 0.5 ="
                        " Model Garden", min=0.0, max=1.0)
    round_to_int: bool = opt(True, "round base anchor corners to integers as torchvision does")
    level_strides: bool = opt(False, "stride of level l is 2**l (detectron2, Model Garden), not"
                              " the input size // the grid size (torchvision)")


@dataclass(frozen=True)
class RPNConfig:
    """Region proposal network: head, targets, proposals and losses."""

    conv_channels: int = opt(256, "3x3 conv width; references use 256, the design notes 512",
                             min=1)
    num_convs: int = opt(1, "3x3 conv + ReLU layers before the predictors: 1 (paper,"
                         " torchvision v1, detectron2) or 2 (torchvision v2)", min=1)
    share_heads: bool = opt(True, "one head shared by all levels, as every reference does")
    dropout: float = opt(0.0, "dropout after the 3x3 conv (the design notes); none in references",
                         min=0.0, max=1.0)
    objectness: str = opt("sigmoid", "k sigmoid logits (references) or 2k two-way softmax logits"
                          " (the design notes)", choices=("sigmoid", "softmax"))
    box_coder_weights: tuple[float, ...] = opt((1.0, 1.0, 1.0, 1.0), "(wy, wx, wh, ww) delta"
                                               " weights; torchvision RPN uses 1s", min=0.0,
                                               min_exclusive=True)
    pre_nms_topk_train: int = opt(2000, "proposals kept per level before NMS in training"
                                  " (torchvision)", min=1)
    post_nms_topk_train: int = opt(1000, "proposals per image after NMS in training (detectron2;"
                                   " torchvision uses 2000)", min=1)
    pre_nms_topk_test: int = opt(1000, "proposals kept per level before NMS at test", min=1)
    post_nms_topk_test: int = opt(1000, "proposals per image after NMS at test", min=1)
    nms_threshold: float = opt(0.7, "proposal NMS IoU (all references)", min=0.0, max=1.0)
    nms_per_level: bool = opt(True, "NMS within each level (torchvision/detectron2) or across all",)
    min_box_size: float = opt(1e-3, "proposals smaller than this (pixels) are dropped"
                              " (torchvision); 0 drops empty ones only (detectron2's"
                              " nonempty)", min=0.0)
    score_threshold: float = opt(0.0, "proposals with objectness probability <= this are"
                                 " dropped (torchvision)", min=0.0, max=1.0)
    positive_iou: float = opt(0.7, "anchors with IoU >= this are positive (all references; the"
                              " design notes)", min=0.0, max=1.0)
    negative_iou: float = opt(0.3, "anchors with IoU < this are negative", min=0.0, max=1.0)
    allow_low_quality_matches: bool = opt(True, "the best anchor of each object is positive too,"
                                          " so every instance gets one")
    batch_size_per_image: int | None = opt(256, "anchors sampled per image for the loss; null ="
                                           " no sampling: every positive and negative anchor",
                                           min=1)
    positive_fraction: float = opt(0.5, "at most this fraction positive (1:1, the design notes)",
                                   min=0.0, max=1.0, min_exclusive=True)
    objectness_loss: str = opt("bce", "log loss (references) or focal loss (the design notes)",
                               choices=("bce", "focal"))
    focal_alpha: float = opt(0.25, "focal loss alpha (RetinaNet)", min=0.0, max=1.0)
    focal_gamma: float = opt(2.0, "focal loss gamma (RetinaNet)", min=0.0)
    box_loss: str = opt("smooth_l1", "smooth L1 (references); weighted smooth L1 or GIoU (the"
                        " design notes)", choices=("smooth_l1", "weighted_smooth_l1", "giou"))
    box_loss_weights: tuple[float, ...] = opt((1.0, 1.0, 1.0, 1.0), "per-coordinate weights of"
                                              " weighted_smooth_l1 (dy, dx, dh, dw)", min=0.0)
    smooth_l1_beta: float = opt(1.0 / 9.0, "smooth L1 transition of loss_rpn_box: 1/9 as"
                                " torchvision's RPN; 0 = L1, detectron2's RPN.SMOOTH_L1_BETA",
                                min=0.0)
    loss_normalizer: str = opt("sampled", "what both RPN losses are divided by: the anchors"
                               " sampled (torchvision), or batch_size_per_image x images, the"
                               " count asked for (detectron2's RPN); equal whenever the sampler"
                               " fills its quota", choices=("sampled", "requested"))
    objectness_loss_weight: float = opt(1.0, "weight of loss_rpn_objectness", min=0.0)
    box_loss_weight: float = opt(1.0, "weight of loss_rpn_box", min=0.0)


@dataclass(frozen=True)
class RoIAlignConfig:
    """Multilevel RoIAlign on tf.image.crop_and_resize (same numbers as torchvision's roi_align)."""

    box_output_size: int = opt(7, "box-head RoI size; references 7, the design notes 14", min=1)
    mask_output_size: int = opt(14, "mask-head RoI size (all references and the design notes)",
                                min=1)
    sampling_ratio: int = opt(2, "bilinear samples per bin side (2 = the design notes' 4 per bin);"
                              " 0 = adaptive, ceil(RoI size / output size) per RoI (detectron2's"
                              " model zoo)", min=0)
    level_sampling_ratios: tuple[int, ...] | None = opt(None, "optional sampling ratio per level"
                                                        " P2..P5, overriding sampling_ratio", min=0)
    aligned: bool = opt(True, "half-pixel shift (detectron2 default); torchvision uses False")
    impl: str = opt("crop_and_resize", "tf.image.crop_and_resize per level (the design's"
                    " choice), or gathers from the flattened pyramid (same numbers, no"
                    " crop_and_resize or dynamic_partition: XLA compiles it; one fixed sampling"
                    " ratio; the mask targets then use static shapes too)",
                    choices=("crop_and_resize", "gather"))
    canonical_size: float = opt(224.0, "level = floor(canonical_level + log2(sqrt(wh) /"
                                " canonical_size)) (FPN paper eq. 1)", min=1.0)
    canonical_level: int = opt(4, "level of a canonical-size RoI (FPN paper)", min=2, max=5)
    min_level: int = opt(2, "finest level RoIs are pooled from", min=2, max=5)
    max_level: int = opt(5, "coarsest level RoIs are pooled from (P6 is RPN-only)", min=2, max=6)


@dataclass(frozen=True)
class BoxHeadConfig:
    """Box head (RCNN in the design notes): features, targets and losses."""

    type: str = opt("2fc", "two fc layers (paper, torchvision v1) or 4 conv + 1 fc with norm"
                    " (torchvision v2)", choices=("2fc", "4conv1fc"))
    fc_dim: int = opt(1024, "fc width (paper and the design notes)", min=1)
    conv_dim: int = opt(256, "conv width of the 4conv1fc head", min=1)
    norm: str = opt("none", "normalisation in the 4conv1fc head (v2 uses group_norm/bn)",
                    choices=("none", "bn", "sync_bn", "group_norm"))
    dropout: float = opt(0.0, "dropout after each fc (the design notes); none in references",
                         min=0.0, max=1.0)
    class_agnostic: bool = opt(False, "one set of deltas for all classes instead of one per class")
    box_coder_weights: tuple[float, ...] = opt((10.0, 10.0, 5.0, 5.0), "(wy, wx, wh, ww);"
                                               " every reference uses 10, 10, 5, 5", min=0.0,
                                               min_exclusive=True)
    foreground_iou: float = opt(0.5, "RoIs with IoU >= this are foreground (references; the"
                                " design notes use 0.7)", min=0.0, max=1.0)
    background_iou: float = opt(0.5, "RoIs with IoU < this are background (references; the"
                                " design notes use 0.3)", min=0.0, max=1.0)
    batch_size_per_image: int | None = opt(512, "RoIs sampled per image (references); null = no"
                                           " sampling: every proposal and ground-truth box",
                                           min=1)
    positive_fraction: float = opt(0.25, "foreground fraction (references; the design notes' 1:1"
                                   " is 0.5)", min=0.0, max=1.0, min_exclusive=True)
    smooth_l1_beta: float = opt(0.0, "smooth L1 transition of loss_box_reg: 0 = L1 (detectron2);"
                                " torchvision's fastrcnn_loss uses 1/9", min=0.0)
    class_loss_weight: float = opt(1.0, "weight of loss_box_class", min=0.0)
    box_loss_weight: float = opt(1.0, "weight of loss_box_reg", min=0.0)


@dataclass(frozen=True)
class MaskHeadConfig:
    """Mask head: 4 x conv3x3, stride-2 deconv, 1x1 conv to 28x28 logits per class."""

    num_convs: int = opt(4, "conv3x3 layers (paper)", min=0)
    conv_dim: int = opt(256, "conv width (paper)", min=1)
    norm: str = opt("none", "optional normalisation after each conv",
                    choices=("none", "bn", "sync_bn", "group_norm"))
    class_agnostic: bool = opt(False, "one mask for all classes (paper: nearly as good)")
    loss: str = opt("bce", "per-pixel sigmoid BCE (paper) or dice (the design notes)",
                    choices=("bce", "dice"))
    static_rois: bool = opt(False, "run the mask head on a static int(box_head."
                            "batch_size_per_image * positive_fraction) RoIs per image, positive"
                            " or not (static shapes for XLA/TPUs), instead of on the batch's"
                            " positives only (the references' cost; a dynamic size)")
    target: str = opt("binary", "mask targets: the RoIAlign of the ground-truth mask (adaptive"
                      " sampling, model.roi_align.aligned) thresholded at 0.5 (detectron2), or"
                      " kept soft (torchvision)", choices=("binary", "soft"))
    loss_weight: float = opt(1.0, "weight of loss_mask", min=0.0)


@dataclass(frozen=True)
class DetectionConfig:
    """Inference post-processing."""

    score_threshold: float = opt(0.05, "detections with score <= this are dropped (torchvision,"
                                 " detectron2)", min=0.0, max=1.0)
    nms_threshold: float = opt(0.5, "per-class NMS IoU (references)", min=0.0, max=1.0)
    max_detections: int = opt(100, "detections per image (COCO protocol)", min=1)
    min_box_size: float = opt(1e-2, "boxes smaller than this (pixels) are dropped (torchvision)",
                              min=0.0)
    mask_threshold: float = opt(0.5, "pasted mask probability threshold (references)", min=0.0,
                                max=1.0)
    mask_paste: str = opt("detectron2", "how 28x28 masks are pasted into the image: bilinear at"
                          " each pixel centre (detectron2) or torchvision's resize into the"
                          " integer box", choices=("detectron2", "torchvision"))


@dataclass(frozen=True)
class PreprocessConfig:
    """Resize, normalise and pad inside the model so that serving takes raw images."""

    resize: str = opt("short_long", "short side to short_size capped by long_size (references),"
                      " or long side to square_size then pad square (Model Garden, the design"
                      " notes' 1024)", choices=("short_long", "square"))
    short_size: int = opt(800, "target short side (references)", min=1)
    long_size: int = opt(1333, "maximum long side (references)", min=1)
    square_size: int = opt(1024, "square canvas side for resize=square", min=1)
    size_divisibility: int = opt(32, "pad to a multiple of the coarsest backbone stride", min=1)
    pixel_mean: tuple[float, ...] = opt((0.485, 0.456, 0.406), "ImageNet mean on 0..1 RGB"
                                        " (torchvision)")
    pixel_std: tuple[float, ...] = opt((0.229, 0.224, 0.225), "ImageNet std on 0..1 RGB"
                                       " (torchvision)", min=0.0, min_exclusive=True)


@dataclass(frozen=True)
class ModelConfig:
    """The Mask R-CNN model."""

    num_classes: int = opt(80, "foreground classes (COCO: 80); class 0 is background", min=1)
    init_from: str | None = opt(None, "start a new run from an earlier model: a run directory,"
                                " a checkpoint or a .weights.h5; class-dependent layers whose"
                                " shape differs are re-initialised (fine-tuning)")
    backbone: BackboneConfig = section(BackboneConfig)
    fpn: FPNConfig = section(FPNConfig)
    anchors: AnchorConfig = section(AnchorConfig)
    rpn: RPNConfig = section(RPNConfig)
    roi_align: RoIAlignConfig = section(RoIAlignConfig)
    box_head: BoxHeadConfig = section(BoxHeadConfig)
    mask_head: MaskHeadConfig = section(MaskHeadConfig)
    detection: DetectionConfig = section(DetectionConfig)
    preprocess: PreprocessConfig = section(PreprocessConfig)
    nms_impl: str = opt("tf", "proposal and detection NMS: TensorFlow's kernels, or the same"
                        " greedy rule on static shapes (top_k, IoU rows, a while loop), which"
                        " XLA compiles", choices=("tf", "static"))


# ----------------------------------------------------------------------------------------------
# Data, training, evaluation, export
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceConfig:
    """One dataset source."""

    source: str = opt("shapes", "where images come from", choices=("coco", "tfrecord", "shapes"))
    annotation_file: str | None = opt(None, "COCO instances JSON (source=coco)")
    image_dir: str | None = opt(None, "folder of the COCO images (source=coco)")
    tfrecord_pattern: str | None = opt(None, "glob of TFRecord shards (source=tfrecord)")
    num_images: int = opt(1000, "images in a synthetic shapes split", min=1)
    seed: int = opt(0, "seed of a synthetic shapes split", min=0)


def _eval_source() -> SourceConfig:
    return SourceConfig(num_images=100, seed=1)


@dataclass(frozen=True)
class DataConfig:
    """Input pipelines (tf.data)."""

    train: SourceConfig = section(SourceConfig)
    eval: SourceConfig = field(default_factory=_eval_source, metadata={"doc": "evaluation split"})
    class_ids: str = opt("contiguous", "what a new model's classes 1..N are: the training"
                         " JSON's categories in id order (detectron2, Model Garden), or the"
                         " category ids themselves, 1..model.num_classes (torchvision's COCO"
                         " labels: 90 classes, ids with gaps). A resumed run keeps its"
                         " labels.json", choices=("contiguous", "category_id"))
    image_size: int = opt(1024, "side S of the one square canvas [B, S, S, 3] when"
                          " data.canvas_long_sides is null; images are resized as"
                          " model.preprocess says, then padded", min=32)
    canvas_long_sides: tuple[int, ...] | None = opt(
        None, "batch images by aspect ratio onto canvases S x L (landscape) and L x S"
        " (portrait), S = model.preprocess.short_size rounded up to size_divisibility, one per"
        " long side L listed; each image goes to the smallest that holds it, so a batch computes"
        " about the pixels torchvision's padded batch does. null: one square canvas of"
        " data.image_size (Model Garden's recipe; TPUs)", min=32)
    image_dtype: str = opt("float32", "dtype of the pipeline's images (values 0..255)",
                           choices=("float32", "uint8"))
    max_instances: int = opt(100, "ground-truth rows per image M (padded with class -1)", min=1)
    mask_mode: str = opt("full", "full-frame masks or box-cropped mini-masks (saves memory)",
                         choices=("full", "mini"))
    mask_resize: str = opt("bilinear", "how masks follow their image's resize: bilinear then >= 0.5"
                           " (close to re-rasterising the polygon), or torchvision's nearest"
                           " (row floor(i * in / out))", choices=("bilinear", "nearest"))
    mini_mask_size: int = opt(56, "side of mini-masks", min=1)
    hflip: bool = opt(True, "random horizontal flip in training (references)")
    train_short_sizes: tuple[int, ...] | None = opt(
        None, "multi-scale training: each training image's short side drawn uniformly from this"
        " list (detectron2's ResizeShortestEdge(MIN_SIZE_TRAIN, 'choice'), torchvision's"
        " multiscale preset), its long side still at most model.preprocess.long_size; each at"
        " most model.preprocess.short_size (the canvases' short side). null: the model's short"
        " size", min=1)
    aug_scale_min: float = opt(1.0, "scale jitter lower bound (1.0 = off, the 1x recipe)",
                               min=0.0, min_exclusive=True)
    aug_scale_max: float = opt(1.0, "scale jitter upper bound", min=0.0, min_exclusive=True)
    keep_empty_images: bool = opt(False, "keep training images without annotations (torchvision"
                                  " drops them)")
    shuffle_buffer: int = opt(1000, "shuffle buffer in images, of TFRecord examples and of a"
                              " cached source (a COCO JSON source shuffles all its images)", min=1)
    deterministic: bool = opt(False, "deterministic element order (slower)")
    cache: bool = opt(False, "cache decoded images in memory (small sets only)")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation (the 1x recipe: 90k steps at batch 16, lr 0.02, x0.1 at 60k and 80k)."""

    batch_size: int = opt(16, "global batch size (references)", min=1)
    steps: int = opt(90000, "training steps (1x schedule)", min=1)
    optimizer: str = opt("sgd", "SGD with momentum (references) or AdamW",
                         choices=("sgd", "adamw"))
    base_learning_rate: float = opt(0.02, "learning rate at reference_batch_size (references)",
                                    min=0.0, min_exclusive=True)
    reference_batch_size: int = opt(16, "lr is scaled by batch_size / this (linear scaling rule)",
                                    min=1)
    momentum: float = opt(0.9, "SGD momentum (references)", min=0.0, max=1.0)
    weight_decay: float = opt(1e-4, "L2 weight decay (references); SGD adds it to the gradient"
                              " as torch.optim.SGD does, AdamW decouples it", min=0.0)
    weight_decay_params: str = opt("no_norm", "what is decayed: every trainable weight"
                                   " (torchvision's reference), all but norm gammas/betas"
                                   " (detectron2), or conv/dense kernels only",
                                   choices=("all", "no_norm", "kernels"))
    warmup_steps: int = opt(1000, "linear warmup steps (detectron2)", min=0)
    warmup_factor: float = opt(0.001, "lr multiplier at step 0 of warmup (detectron2)", min=0.0,
                               max=1.0)
    decay_steps: tuple[int, ...] = opt((60000, 80000), "steps at which lr is multiplied by"
                                       " decay_rate (1x; the design notes: 120k)", min=1)
    decay_rate: float = opt(0.1, "step decay factor (references)", min=0.0, max=1.0)
    clip_norm: float | None = opt(None, "global gradient norm clip; none in references", min=0.0,
                                  min_exclusive=True)
    mixed_precision: str = opt("float32", "Keras dtype policy; auto: mixed_bfloat16 on a CPU"
                               " that computes bfloat16 natively (avx512_bf16 or amx_bf16) and"
                               " no GPU, float32 elsewhere",
                               choices=("float32", "mixed_float16", "mixed_bfloat16", "auto"))
    jit_compile: bool = opt(False, "compile each training and evaluation step with XLA (needs"
                            " model.roi_align.impl=gather, model.nms_impl=static and"
                            " model.mask_head.static_rois=true; always on under --strategy"
                            " tpu)")
    checkpoint_every: int = opt(1000, "steps between checkpoints", min=1)
    log_every: int = opt(20, "steps between log lines", min=1)
    seed: int = opt(42, "random seed", min=0)


@dataclass(frozen=True)
class EvalConfig:
    """COCO evaluation."""

    batch_size: int = opt(8, "evaluation batch size", min=1)
    every_n_steps: int = opt(5000, "evaluate during fit every this many steps", min=1)
    num_images: int | None = opt(None, "evaluate at most this many images (None = all)", min=1)
    tensorboard_images: int = opt(4, "prediction overlays of the first validation images written "
                                  "to TensorBoard at each evaluation during fit (0: none)", min=0)


@dataclass(frozen=True)
class ExportConfig:
    """SavedModel export for TF Serving."""

    input_types: tuple[str, ...] = opt(("image_tensor", "image_bytes", "tf_example"),
                                       "serving signatures to write",
                                       choices=("image_tensor", "image_bytes", "tf_example"))
    max_detections: int | None = opt(None, "detections per image in the exported model, at most"
                                     " model.detection.max_detections (null: that many)",
                                     min=1)
    mask_output: str = opt("full", "full: masks pasted at the original resolution (uint8 "
                           "[B, D, H, W]); box: 28x28 probabilities per box; png: one PNG per "
                           "detection at the original resolution (compact over REST)",
                           choices=MASK_OUTPUTS)
    max_image_pixels: int = opt(25_000_000, "encoded images with more pixels (read from the "
                                "header, before decoding) get an errors entry instead of being "
                                "served", min=1)


@dataclass(frozen=True)
class Config:
    """The whole configuration."""

    model: ModelConfig = section(ModelConfig)
    data: DataConfig = section(DataConfig)
    train: TrainConfig = section(TrainConfig)
    eval: EvalConfig = section(EvalConfig)
    export: ExportConfig = section(ExportConfig)

    def __post_init__(self):
        _check_consistency(self)


# Settings that change no weight: how a trained model's outputs are post-processed at test time,
# and implementations with the same numbers. A run's model may change them wherever it is used
# (evaluation, export, predict, mrcnn_tf.load_run, and a resumed run); every other model key is
# what its weights were trained with.
INFERENCE_KEYS = ("model.detection.", "model.rpn.pre_nms_topk_test",
                  "model.rpn.post_nms_topk_test", "model.nms_impl", "model.roi_align.impl")


def is_inference_key(key: str) -> bool:
    """Whether the dotted ``key`` changes no weight (see INFERENCE_KEYS)."""
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in INFERENCE_KEYS)


# ----------------------------------------------------------------------------------------------
# Validation and loading
# ----------------------------------------------------------------------------------------------


def _check_consistency(cfg: Config) -> None:
    """Rules that relate several options."""
    m = cfg.model
    n_levels = m.fpn.max_level - m.fpn.min_level + 1
    if m.fpn.min_level >= m.fpn.max_level:
        raise ConfigError(f"model.fpn.min_level ({m.fpn.min_level}) must be below"
                          f" model.fpn.max_level ({m.fpn.max_level})")
    if len(m.anchors.sizes) != n_levels:
        raise ConfigError(f"model.anchors.sizes has {len(m.anchors.sizes)} entries; it needs one"
                          f" per FPN level P{m.fpn.min_level}..P{m.fpn.max_level} ({n_levels})")
    ra = m.roi_align
    if not (m.fpn.min_level <= ra.min_level <= ra.max_level <= m.fpn.max_level):
        raise ConfigError(f"model.roi_align levels P{ra.min_level}..P{ra.max_level} must lie"
                          f" within the FPN levels P{m.fpn.min_level}..P{m.fpn.max_level}")
    if not ra.min_level <= ra.canonical_level <= ra.max_level:
        raise ConfigError(f"model.roi_align.canonical_level ({ra.canonical_level}) must lie in"
                          f" [{ra.min_level}, {ra.max_level}]")
    if ra.level_sampling_ratios is not None and (
            len(ra.level_sampling_ratios) != ra.max_level - ra.min_level + 1):
        raise ConfigError(f"model.roi_align.level_sampling_ratios needs one entry per level"
                          f" P{ra.min_level}..P{ra.max_level}")
    if ra.impl == "gather" and (ra.sampling_ratio == 0 or ra.level_sampling_ratios):
        raise ConfigError("model.roi_align.impl=gather needs one fixed sampling_ratio >= 1 (no"
                          " adaptive 0, no level_sampling_ratios)")
    if m.rpn.negative_iou > m.rpn.positive_iou:
        raise ConfigError("model.rpn.negative_iou must be <= model.rpn.positive_iou")
    if m.box_head.background_iou > m.box_head.foreground_iou:
        raise ConfigError("model.box_head.background_iou must be <= model.box_head.foreground_iou")
    for name in ("box_coder_weights", "box_loss_weights"):
        if len(getattr(m.rpn, name)) != 4:
            raise ConfigError(f"model.rpn.{name} needs 4 values (y, x, h, w)")
    if len(m.box_head.box_coder_weights) != 4:
        raise ConfigError("model.box_head.box_coder_weights needs 4 values (y, x, h, w)")
    pp = m.preprocess
    if len(pp.pixel_mean) != len(pp.pixel_std):
        raise ConfigError("model.preprocess.pixel_mean and pixel_std need the same length")
    if len(pp.pixel_mean) not in (1, m.backbone.input_channels):
        raise ConfigError(f"model.preprocess.pixel_mean needs 1 or"
                          f" model.backbone.input_channels ({m.backbone.input_channels}) values")
    if pp.short_size > pp.long_size:
        raise ConfigError("model.preprocess.short_size must be <= model.preprocess.long_size")
    if cfg.data.aug_scale_min > cfg.data.aug_scale_max:
        raise ConfigError("data.aug_scale_min must be <= data.aug_scale_max")
    sizes = cfg.data.train_short_sizes
    if sizes is not None:
        if pp.resize != "short_long":
            raise ConfigError("data.train_short_sizes needs model.preprocess.resize=short_long "
                              "(it draws the short side); set it to null")
        if not sizes or max(sizes) > pp.short_size:
            raise ConfigError(f"data.train_short_sizes {list(sizes)}: each must be at most "
                              f"model.preprocess.short_size ({pp.short_size}), the short side "
                              "of the canvases; raise that or lower these")
    if list(cfg.train.decay_steps) != sorted(cfg.train.decay_steps):
        raise ConfigError("train.decay_steps must be increasing")
    if m.init_from and m.backbone.weights:
        raise ConfigError("model.init_from and model.backbone.weights both initialise the"
                          " backbone: set one of them")
    if m.rpn.loss_normalizer == "requested" and m.rpn.batch_size_per_image is None:
        raise ConfigError("model.rpn.loss_normalizer=requested divides by"
                          " model.rpn.batch_size_per_image, which is null (no sampling): set"
                          " it, or loss_normalizer=sampled")
    if m.rpn.objectness_loss == "focal" and m.rpn.objectness != "sigmoid":
        raise ConfigError("model.rpn.objectness_loss=focal needs model.rpn.objectness=sigmoid")


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp, key: str, meta: dict) -> Any:
    """Checks ``value`` against the annotation ``tp`` and the option's bounds; returns it."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(value, inner, key, meta)
    if origin is tuple:
        (elem, _) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list of {_type_name(elem)}, got {value!r}",
                              key)
        return tuple(_convert(v, elem, f"{key}[{i}]", meta) for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}", key)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}", key)
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}", key)
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}", key)
    elif tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}", key)
    else:  # pragma: no cover - the schema only uses the types above
        raise TypeError(f"unsupported option type {tp} for {key}")
    choices, lo, hi = meta.get("choices"), meta.get("min"), meta.get("max")
    if choices is not None and value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, choices))}",
                          key)
    if lo is not None and (value < lo or (meta.get("min_exclusive") and value == lo)):
        rel = ">" if meta.get("min_exclusive") else ">="
        bound = f"{rel} {lo}" + (f" and <= {hi}" if hi is not None else "")
        raise ConfigError(f"{key}: {value!r} is out of range; allowed: {bound}", key)
    if hi is not None and value > hi:
        raise ConfigError(f"{key}: {value!r} is out of range; allowed: <= {hi}"
                          + (f" and >= {lo}" if lo is not None else ""), key)
    return value


def _build(cls, data: Any, prefix: str):
    """Builds dataclass ``cls`` from a mapping, validating every key."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of options, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = _join(prefix, unknown[0])
        raise ConfigError(f"unknown key {key!r}{_did_you_mean(unknown[0], fields, prefix)} in "
                          f"{prefix or 'the top level'}; allowed keys: "
                          f"{', '.join(sorted(fields))}", key)
    kwargs = {}
    for name, f in fields.items():
        key = _join(prefix, name)
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else tp()
            sub = dataclasses.asdict(default)
            value = data.get(name)
            if value is not None and not isinstance(value, dict):
                raise ConfigError(f"{key}: is a section; expected a mapping of its options, got "
                                  f"{value!r}")
            _deep_update(sub, value or {}, key)
            kwargs[name] = _build(tp, sub, key)
        elif name in data:
            if isinstance(data[name], dict):
                raise ConfigError(f"{key}: is an option, not a section (got {data[name]!r})")
            kwargs[name] = _convert(data[name], tp, key, dict(f.metadata))
    return cls(**kwargs)


def _did_you_mean(name: str, allowed, prefix: str) -> str:
    """"; did you mean 'train.steps'?" for the allowed name closest to ``name``, or ""."""
    import difflib

    close = difflib.get_close_matches(name, list(allowed), n=1, cutoff=0.6)
    return f" (did you mean {_join(prefix, close[0])!r}?)" if close else ""


def _deep_update(base: dict, new: Any, prefix: str) -> None:
    if not isinstance(new, dict):
        raise ConfigError(f"{prefix}: expected a mapping of options, got {new!r}")
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_update(base[k], v, _join(prefix, k))
        else:
            base[k] = v


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` (no Python objects) that reads 1e5 as a number, as YAML 1.2 and
    JSON do (PyYAML's YAML 1.1 resolver wants a dot: 1.0e5), and refuses a key given twice in
    one mapping instead of keeping the last silently."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: key {key!r} is given "
                                  "twice in the same mapping")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def _apply_override(tree: dict, override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like section.key=value")
    key, _, raw = override.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"override {override!r}: empty key part")
    try:
        value = yaml.load(raw, Loader=_Loader) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}: cannot parse value {raw!r}: {e}") from None
    _check_key(key, override)
    node = tree
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {p}: is an option, not a section", key)
        node = child
    node[parts[-1]] = value


def _check_key(key: str, override: str) -> None:
    """Raises ConfigError, naming the override and the closest key, when ``key`` is not an
    option of the schema."""
    cls, prefix = Config, ""
    parts = key.split(".")
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(cls)
        if part not in hints:
            raise ConfigError(f"override {override!r}: unknown key {_join(prefix, part)!r}"
                              f"{_did_you_mean(part, hints, prefix)} in "
                              f"{prefix or 'the top level'}; allowed keys: "
                              f"{', '.join(sorted(hints))}", key)
        prefix = _join(prefix, part)
        if not dataclasses.is_dataclass(hints[part]):
            if i != len(parts) - 1:
                raise ConfigError(f"override {override!r}: {prefix}: is an option, not a "
                                  "section", key)
            return
        cls = hints[part]
    first = sorted(typing.get_type_hints(cls))[0]
    raise ConfigError(f"override {override!r}: {key}: is a section; expected a mapping of its "
                      f"options: set one of them, e.g. {key}.{first}=...", key)


def config_from_dict(data: dict | None, overrides: list[str] | tuple[str, ...] | None = None
                     ) -> Config:
    """Builds and validates a :class:`Config` from a plain mapping plus dotted overrides."""
    tree = _plain(data or {})
    for o in overrides or ():
        _apply_override(tree, o)
    return _build(Config, tree, "")


def _plain(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _plain(v) for k, v in data.items()}
    return data


def packaged_config(path: str) -> str:
    """``path`` if it exists; else, when its file name is one of the configs shipped with the
    package (``configs/*.yaml``: beside the package in a source tree, ``mrcnn_tf/configs`` in a
    wheel), that config's path; else ``path`` unchanged (loading it then names it as missing)."""
    if os.path.exists(path):
        return path
    here = os.path.dirname(os.path.abspath(__file__))
    for folder in (os.path.join(here, "configs"), os.path.join(os.path.dirname(here), "configs")):
        candidate = os.path.join(folder, os.path.basename(path))
        if os.path.isfile(candidate):
            return candidate
    return path


def _read_yaml(path: str, chain: tuple[str, ...]) -> dict:
    """One YAML file as a mapping, its ``_base_`` (if any) merged underneath."""
    if os.path.isdir(path):
        raise ConfigError(f"{path}: is a directory; --config takes a YAML file")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_Loader)
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a UTF-8 text file ({e})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    if "_base_" not in data:
        return data
    base_name = data.pop("_base_")
    if not isinstance(base_name, str) or not base_name:
        raise ConfigError(f"{path}: _base_ must be the path of a YAML file, got {base_name!r}")
    base_path = os.path.join(os.path.dirname(os.path.abspath(path)), base_name)
    if os.path.abspath(base_path) in chain + (os.path.abspath(path),):
        raise ConfigError(f"{path}: _base_ {base_name} includes itself")
    if not os.path.exists(base_path):
        raise FileNotFoundError(f"{path}: _base_ {base_name} not found (looked for {base_path})")
    base = _read_yaml(base_path, chain + (os.path.abspath(path),))
    try:
        _deep_update(base, data, "")
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return base


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] | None = None
                ) -> Config:
    """Reads a YAML config (a ``yaml.SafeLoader``), applies dotted overrides and validates.

    A file may start from another: ``_base_: other.yaml`` (a path relative to the file) reads
    that one first and overrides it section by section, as detectron2's ``_BASE_``.

    Args:
      path: YAML file, or None for the built-in defaults (the COCO R50-FPN 1x recipe).
      overrides: strings like ``"train.steps=100"``; values are parsed as YAML scalars/lists.

    Raises:
      ConfigError: unknown key, wrong type or out-of-range value, naming the dotted key.
      FileNotFoundError: ``path`` does not exist.
    """
    data: Any = {}
    if path is not None:
        path = os.fspath(path)
        data = _read_yaml(path, ())
    try:
        return config_from_dict(data, overrides)
    except ConfigError as e:
        given = {o.partition("=")[0].strip(): o for o in overrides or ()}
        if str(e).startswith("override "):  # the override is at fault, not the file
            raise
        if e.key in given:
            raise ConfigError(f"override {given[e.key]!r}: {e}", e.key) from None
        where = f"{path}: " if path else ""
        raise ConfigError(f"{where}{e}", e.key) from None


def to_dict(cfg) -> dict:
    """The configuration as plain Python data (tuples become lists), ready for YAML."""

    def plain(v):
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def describe(cls=Config, prefix: str = "") -> list[tuple[str, Any, str]]:
    """Every option as (dotted key, default, doc): the schema as a table."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = _join(prefix, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            rows.extend(describe(hints[f.name], key))
        else:
            rows.append((key, f.default, f.metadata.get("doc", "")))
    return rows
