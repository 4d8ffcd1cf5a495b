"""Drawing detections: translucent masks, boxes, class names and scores (numpy only; a built-in
5x7 bitmap font, so no imaging library is needed)."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from mrcnn_tf.ops.masks import paste_masks

_FONT = {
    "A": (14, 17, 17, 31, 17, 17, 17), "B": (30, 17, 17, 30, 17, 17, 30),
    "C": (14, 17, 16, 16, 16, 17, 14), "D": (30, 17, 17, 17, 17, 17, 30),
    "E": (31, 16, 16, 30, 16, 16, 31), "F": (31, 16, 16, 30, 16, 16, 16),
    "G": (14, 17, 16, 23, 17, 17, 15), "H": (17, 17, 17, 31, 17, 17, 17),
    "I": (14, 4, 4, 4, 4, 4, 14), "J": (7, 2, 2, 2, 2, 18, 12),
    "K": (17, 18, 20, 24, 20, 18, 17), "L": (16, 16, 16, 16, 16, 16, 31),
    "M": (17, 27, 21, 21, 17, 17, 17), "N": (17, 17, 25, 21, 19, 17, 17),
    "O": (14, 17, 17, 17, 17, 17, 14), "P": (30, 17, 17, 30, 16, 16, 16),
    "Q": (14, 17, 17, 17, 21, 18, 13), "R": (30, 17, 17, 30, 20, 18, 17),
    "S": (15, 16, 16, 14, 1, 1, 30), "T": (31, 4, 4, 4, 4, 4, 4),
    "U": (17, 17, 17, 17, 17, 17, 14), "V": (17, 17, 17, 17, 17, 10, 4),
    "W": (17, 17, 17, 21, 21, 21, 10), "X": (17, 17, 10, 4, 10, 17, 17),
    "Y": (17, 17, 17, 10, 4, 4, 4), "Z": (31, 1, 2, 4, 8, 16, 31),
    "0": (14, 17, 19, 21, 25, 17, 14), "1": (4, 12, 4, 4, 4, 4, 14),
    "2": (14, 17, 1, 2, 4, 8, 31), "3": (31, 2, 4, 2, 1, 17, 14),
    "4": (2, 6, 10, 18, 31, 2, 2), "5": (31, 16, 30, 1, 1, 17, 14),
    "6": (6, 8, 16, 30, 17, 17, 14), "7": (31, 1, 2, 4, 8, 8, 8),
    "8": (14, 17, 17, 14, 17, 17, 14), "9": (14, 17, 17, 15, 1, 2, 12),
    ".": (0, 0, 0, 0, 0, 12, 12), ":": (0, 12, 12, 0, 12, 12, 0), "-": (0, 0, 0, 31, 0, 0, 0),
    "_": (0, 0, 0, 0, 0, 0, 31), "%": (24, 25, 2, 4, 8, 19, 3), " ": (0,) * 7,
    "?": (14, 17, 1, 2, 4, 0, 4),
}

# Well-separated colours (tab10-like), cycled over instances.
PALETTE = np.array([[31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40],
                    [148, 103, 189], [140, 86, 75], [227, 119, 194], [127, 127, 127],
                    [188, 189, 34], [23, 190, 207]], np.uint8)


def _text_bitmap(text: str, scale: int) -> np.ndarray:
    """[7 * scale, 6 * len * scale] bool pixels of ``text`` (upper-cased)."""
    cols = []
    for ch in text.upper():
        rows = _FONT.get(ch, _FONT["?"])
        glyph = np.array([[(r >> (4 - i)) & 1 for i in range(5)] + [0] for r in rows], bool)
        cols.append(glyph)
    bitmap = np.concatenate(cols, axis=1) if cols else np.zeros((7, 0), bool)
    return np.kron(bitmap, np.ones((scale, scale), bool)).astype(bool)


def _draw_label(img, y, x, text, color, scale):
    bits = _text_bitmap(text, scale)
    h, w = bits.shape[0] + 2 * scale, bits.shape[1] + 2 * scale
    y = int(np.clip(y - h, 0, max(img.shape[0] - h, 0)))
    x = int(np.clip(x, 0, max(img.shape[1] - w, 0)))
    region = img[y: y + h, x: x + w]
    region[...] = color
    sub = region[scale: scale + bits.shape[0], scale: scale + bits.shape[1]]
    sub[bits[: sub.shape[0], : sub.shape[1]]] = 255


def _draw_box(img, box, color, thickness):
    h, w = img.shape[:2]
    y1, x1, y2, x2 = (int(round(v)) for v in box)
    y1, y2 = np.clip([y1, y2 - 1], 0, h - 1)
    x1, x2 = np.clip([x1, x2 - 1], 0, w - 1)
    t = thickness
    img[y1: y1 + t, x1: x2 + 1] = color
    img[max(y2 - t + 1, 0): y2 + 1, x1: x2 + 1] = color
    img[y1: y2 + 1, x1: x1 + t] = color
    img[y1: y2 + 1, max(x2 - t + 1, 0): x2 + 1] = color


def draw_detections(image, detections: dict, class_names, score_threshold: float = 0.5,
                    alpha: float = 0.45) -> np.ndarray:
    """Draws one image's detections.

    Args:
      image: [H, W, 3] uint8 (or float 0..255).
      detections: ``detection_boxes`` [D, 4] (y1, x1, y2, x2) in this image's pixels,
        ``detection_scores`` [D], ``detection_classes`` [D] (1..N), optional
        ``detection_masks`` ([D, H, W] binary or [D, m, m] probabilities inside each box),
        optional ``num_detections``.
      class_names: list (index 0 = class 1) or {class: name}.
      score_threshold: detections with lower scores are not drawn.
    Returns:
      [H, W, 3] uint8.
    """
    img = np.clip(np.asarray(image, np.float32), 0, 255).astype(np.uint8).copy()
    h, w = img.shape[:2]
    det = {k: np.asarray(v) for k, v in detections.items()}
    n = int(det.get("num_detections", len(det["detection_scores"])))
    keep = [i for i in range(n) if det["detection_scores"][i] >= score_threshold]
    boxes = det["detection_boxes"][keep]
    masks = det.get("detection_masks")
    if masks is not None and len(keep):
        masks = masks[keep]
        if masks.shape[1:] != (h, w):
            masks = paste_masks(masks[None].astype(np.float32), boxes[None], h, w).numpy()[0]
    names = class_names if isinstance(class_names, dict) else {
        i + 1: n for i, n in enumerate(class_names)}
    scale = max(1, min(h, w) // 300)
    out = img.astype(np.float32)
    for j in range(len(keep)):
        color = PALETTE[j % len(PALETTE)].astype(np.float32)
        if masks is not None:
            m = masks[j] > 0
            out[m] = (1 - alpha) * out[m] + alpha * color
    img = out.astype(np.uint8)
    for j, i in enumerate(keep):
        color = PALETTE[j % len(PALETTE)]
        _draw_box(img, boxes[j], color, scale + 1)
        cls = int(det["detection_classes"][i])
        label = f"{names.get(cls, cls)} {det['detection_scores'][i]:.2f}"
        _draw_label(img, boxes[j][0], boxes[j][1], label, color, scale)
    return img


def save_png(path: str, image: np.ndarray) -> None:
    """Writes a [H, W, 3] uint8 image as PNG."""
    tf.io.write_file(path, tf.io.encode_png(np.asarray(image, np.uint8)))
