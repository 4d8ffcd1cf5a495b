"""Pure-numpy references, written from the papers' and torchvision's documented semantics."""

import math

import numpy as np


def _bilinear(feat, y, x):
    """torchvision's bilinear_interpolate for one point of a [H, W, C] map."""
    h, w = feat.shape[:2]
    if y < -1.0 or y > h or x < -1.0 or x > w:
        return np.zeros(feat.shape[2], np.float64)
    y = max(y, 0.0)
    x = max(x, 0.0)
    y_low, x_low = int(y), int(x)
    if y_low >= h - 1:
        y_high = y_low = h - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= w - 1:
        x_high = x_low = w - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    hy, hx = 1.0 - ly, 1.0 - lx
    return (hy * hx * feat[y_low, x_low] + hy * lx * feat[y_low, x_high]
            + ly * hx * feat[y_high, x_low] + ly * lx * feat[y_high, x_high])


def roi_align(feat, box, out_h, out_w, spatial_scale, sampling_ratio, aligned):
    """RoIAlign of one box (y1, x1, y2, x2) on a [H, W, C] map -> [out_h, out_w, C] float64."""
    feat = np.asarray(feat, np.float64)
    offset = 0.5 if aligned else 0.0
    y1, x1, y2, x2 = (float(v) * spatial_scale - offset for v in box)
    roi_h, roi_w = y2 - y1, x2 - x1
    if not aligned:
        roi_h, roi_w = max(roi_h, 1.0), max(roi_w, 1.0)
    bin_h, bin_w = roi_h / out_h, roi_w / out_w
    gh = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_h / out_h)
    gw = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_w / out_w)
    count = max(gh * gw, 1)
    out = np.zeros((out_h, out_w, feat.shape[2]))
    for ph in range(out_h):
        for pw in range(out_w):
            acc = np.zeros(feat.shape[2])
            for iy in range(gh):
                y = y1 + ph * bin_h + (iy + 0.5) * bin_h / gh
                for ix in range(gw):
                    x = x1 + pw * bin_w + (ix + 0.5) * bin_w / gw
                    acc += _bilinear(feat, y, x)
            out[ph, pw] = acc / count
    return out


def iou_matrix(a, b):
    """IoU of [N, 4] x [M, 4] boxes (y1, x1, y2, x2), float64."""
    a = np.asarray(a, np.float64)[:, None]
    b = np.asarray(b, np.float64)[None]
    ih = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    iw = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = ih * iw
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    union = area_a + area_b - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def greedy_nms(boxes, scores, iou_threshold):
    """Indices kept by greedy NMS (suppress IoU > threshold), in decreasing score order."""
    order = np.argsort(-np.asarray(scores), kind="stable")
    iou = iou_matrix(boxes, boxes)
    keep, suppressed = [], np.zeros(len(order), bool)
    for i in order:
        if suppressed[i]:
            continue
        keep.append(int(i))
        suppressed |= iou[i] > iou_threshold
    return keep
