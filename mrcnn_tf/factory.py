"""The one place that reads the model's configuration: it turns ``config.model`` (and the two
settings of other sections the model needs: ``data.mask_mode`` for its mask targets, and
``train`` for its default optimiser and gradient clipping) into the parts MaskRCNN is made of,
each taking plain keyword arguments.

Read ``MaskRCNN.call`` for how the parts connect, then this module for how the config sets them.
"""

from __future__ import annotations

from mrcnn_tf.config import Config, ModelConfig
from mrcnn_tf.layers.backbone import ResNet
from mrcnn_tf.layers.detection import DetectionGenerator
from mrcnn_tf.layers.fpn import FPN
from mrcnn_tf.layers.heads import BoxHead, MaskHead
from mrcnn_tf.layers.preprocess import Preprocessor
from mrcnn_tf.layers.proposals import ProposalGenerator
from mrcnn_tf.layers.roi_align import MultilevelRoIAlign
from mrcnn_tf.layers.rpn_head import RPNHead
from mrcnn_tf.losses import Losses
from mrcnn_tf.ops.anchors import AnchorGenerator
from mrcnn_tf.targets import TargetAssigner


def build_layers(m: ModelConfig) -> dict:
    """The Keras layers of a Mask R-CNN, keyed by the model attribute that holds them."""
    bb, fpn, rpn, ra = m.backbone, m.fpn, m.rpn, m.roi_align
    bh, mh, det, pp = m.box_head, m.mask_head, m.detection, m.preprocess
    fpn_levels = tuple(range(fpn.min_level, fpn.max_level + 1))
    sampling = list(ra.level_sampling_ratios) if ra.level_sampling_ratios else ra.sampling_ratio
    roi_kwargs = dict(sampling_ratio=sampling, aligned=ra.aligned, min_level=ra.min_level,
                      max_level=ra.max_level, canonical_size=ra.canonical_size,
                      canonical_level=ra.canonical_level, impl=ra.impl)
    return {
        "preprocessor": Preprocessor(
            resize=pp.resize, short_size=pp.short_size, long_size=pp.long_size,
            square_size=pp.square_size, size_divisibility=pp.size_divisibility,
            pixel_mean=pp.pixel_mean, pixel_std=pp.pixel_std, name="preprocessor"),
        "backbone": ResNet(bb.name, norm=bb.norm, stride_in_1x1=bb.stride_in_1x1,
                           freeze_at=bb.freeze_at, input_channels=bb.input_channels,
                           group_norm_groups=bb.group_norm_groups, name="backbone"),
        "fpn": FPN(fpn.channels, fpn.min_level, fpn.max_level, fpn.norm,
                   group_norm_groups=bb.group_norm_groups, name="fpn"),
        "rpn_head": RPNHead(
            num_anchors=anchor_generator(m).num_anchors, conv_channels=rpn.conv_channels,
            share_heads=rpn.share_heads, dropout=rpn.dropout, objectness=rpn.objectness,
            levels=fpn_levels, num_convs=rpn.num_convs, name="rpn_head"),
        "proposal_generator": ProposalGenerator(
            pre_nms_topk_train=rpn.pre_nms_topk_train, post_nms_topk_train=rpn.post_nms_topk_train,
            pre_nms_topk_test=rpn.pre_nms_topk_test, post_nms_topk_test=rpn.post_nms_topk_test,
            nms_threshold=rpn.nms_threshold, nms_per_level=rpn.nms_per_level,
            min_box_size=rpn.min_box_size, score_threshold=rpn.score_threshold,
            box_coder_weights=rpn.box_coder_weights, nms_impl=m.nms_impl,
            name="proposal_generator"),
        "box_roi_align": MultilevelRoIAlign(ra.box_output_size, name="box_roi_align",
                                            **roi_kwargs),
        "box_head": BoxHead(m.num_classes, head_type=bh.type, fc_dim=bh.fc_dim,
                            conv_dim=bh.conv_dim, norm=bh.norm, dropout=bh.dropout,
                            class_agnostic=bh.class_agnostic,
                            group_norm_groups=bb.group_norm_groups, name="box_head"),
        "mask_roi_align": MultilevelRoIAlign(ra.mask_output_size, name="mask_roi_align",
                                             **roi_kwargs),
        "mask_head": MaskHead(m.num_classes, num_convs=mh.num_convs, conv_dim=mh.conv_dim,
                              norm=mh.norm, class_agnostic=mh.class_agnostic,
                              group_norm_groups=bb.group_norm_groups, name="mask_head"),
        "detection_generator": DetectionGenerator(
            score_threshold=det.score_threshold, nms_threshold=det.nms_threshold,
            max_detections=det.max_detections, min_box_size=det.min_box_size,
            box_coder_weights=bh.box_coder_weights, nms_impl=m.nms_impl,
            name="detection_generator"),
    }


def anchor_generator(m: ModelConfig) -> AnchorGenerator:
    a = m.anchors
    return AnchorGenerator(a.sizes, a.aspect_ratios, a.scales, a.offset, a.round_to_int,
                           a.level_strides)


def target_assigner(config: Config) -> TargetAssigner:
    m = config.model
    return TargetAssigner(
        rpn_iou=(m.rpn.negative_iou, m.rpn.positive_iou),
        rpn_low_quality=m.rpn.allow_low_quality_matches,
        rpn_batch_size=m.rpn.batch_size_per_image,
        rpn_positive_fraction=m.rpn.positive_fraction,
        rpn_coder_weights=m.rpn.box_coder_weights,
        roi_iou=(m.box_head.background_iou, m.box_head.foreground_iou),
        roi_batch_size=m.box_head.batch_size_per_image,
        roi_positive_fraction=m.box_head.positive_fraction,
        roi_coder_weights=m.box_head.box_coder_weights,
        static_foreground=m.mask_head.static_rois,
        mini_masks=config.data.mask_mode == "mini", mask_aligned=m.roi_align.aligned,
        soft_masks=m.mask_head.target == "soft", static_masks=m.roi_align.impl == "gather")


def losses(m: ModelConfig) -> Losses:
    r = m.rpn
    return Losses(
        rpn_objectness=r.objectness_loss, focal_alpha=r.focal_alpha, focal_gamma=r.focal_gamma,
        rpn_box=r.box_loss, rpn_beta=r.smooth_l1_beta, rpn_box_weights=r.box_loss_weights,
        rpn_requested=r.batch_size_per_image if r.loss_normalizer == "requested" else None,
        box_beta=m.box_head.smooth_l1_beta, mask=m.mask_head.loss,
        weights={"loss_rpn_objectness": r.objectness_loss_weight,
                 "loss_rpn_box": r.box_loss_weight,
                 "loss_box_class": m.box_head.class_loss_weight,
                 "loss_box_reg": m.box_head.box_loss_weight,
                 "loss_mask": m.mask_head.loss_weight})


def model_parts(config: Config) -> dict:
    """Every constructor argument of MaskRCNN for ``config``."""
    from mrcnn_tf.optim import build_optimizer

    return {**build_layers(config.model), "anchor_generator": anchor_generator(config.model),
            "targets": target_assigner(config), "loss_terms": losses(config.model),
            "clip_norm": config.train.clip_norm,
            "optimizer_factory": lambda: build_optimizer(config.train), "config": config}
