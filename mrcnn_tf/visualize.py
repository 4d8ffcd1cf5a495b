"""Drawing detections: translucent masks and boxes blended with numpy; class names and scores
drawn with Pillow's ImageDraw on a box of the instance's colour (any Unicode name the font has)."""

from __future__ import annotations

import functools

import numpy as np
import tensorflow as tf
from PIL import Image, ImageDraw, ImageFont

from mrcnn_tf.ops.masks import paste_masks

# Well-separated colours (tab10-like), cycled over instances.
PALETTE = np.array([[31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40],
                    [148, 103, 189], [140, 86, 75], [227, 119, 194], [127, 127, 127],
                    [188, 189, 34], [23, 190, 207]], np.uint8)


# TrueType fonts tried in order for labels (DejaVu covers Latin, Greek and Cyrillic); Pillow's
# own default font otherwise.
FONT_FILES = ("DejaVuSans.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
              "Arial.ttf", "/Library/Fonts/Arial Unicode.ttf")


@functools.lru_cache(maxsize=16)
def label_font(size: int):
    """A Pillow font of ``size`` pixels for labels."""
    for name in FONT_FILES:
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default(size=size)


def _draw_labels(img: np.ndarray, labels, size: int) -> np.ndarray:
    """Draws each (y, x, text, colour) as white text on a box of its colour, above (y, x) where
    there is room, inside the image. Returns a new [H, W, 3] uint8 array."""
    canvas = Image.fromarray(img)
    draw = ImageDraw.Draw(canvas)
    font = label_font(size)
    h, w = img.shape[:2]
    pad = max(1, size // 6)
    for y, x, text, color in labels:
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        bw, bh = right - left + 2 * pad, bottom - top + 2 * pad
        y0 = int(np.clip(y - bh, 0, max(h - bh, 0)))
        x0 = int(np.clip(x, 0, max(w - bw, 0)))
        draw.rectangle([x0, y0, x0 + bw - 1, y0 + bh - 1], fill=tuple(int(c) for c in color))
        draw.text((x0 + pad - left, y0 + pad - top), text, fill=(255, 255, 255), font=font)
    return np.asarray(canvas).copy()


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
    font_size = max(11, min(h, w) // 40)
    out = img.astype(np.float32)
    for j in range(len(keep)):
        color = PALETTE[j % len(PALETTE)].astype(np.float32)
        if masks is not None:
            m = masks[j] > 0
            out[m] = (1 - alpha) * out[m] + alpha * color
    img = out.astype(np.uint8)
    labels = []
    for j, i in enumerate(keep):
        color = PALETTE[j % len(PALETTE)]
        _draw_box(img, boxes[j], color, scale + 1)
        cls = int(det["detection_classes"][i])
        labels.append((boxes[j][0], boxes[j][1],
                       f"{names.get(cls, cls)} {det['detection_scores'][i]:.2f}", color))
    return _draw_labels(img, labels, font_size) if labels else img


def save_png(path: str, image: np.ndarray) -> None:
    """Writes a [H, W, 3] uint8 image as PNG."""
    tf.io.write_file(path, tf.io.encode_png(np.asarray(image, np.uint8)))


def draw_pr_curves(curves: dict, size: tuple[int, int] = (480, 360)) -> np.ndarray:
    """A precision-recall plot: ``curves`` maps a name to precisions at equally spaced recalls
    0..1 (COCO's 101). Returns [height, width, 3] uint8 (``size`` is width, height)."""
    w, h = size
    canvas = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = label_font(12)
    left, right, top, bottom = 48, w - 12, 26, h - 40
    for i in range(6):  # grid and tick labels at 0, 0.2, ..., 1
        v = i / 5
        x = left + v * (right - left)
        y = bottom - v * (bottom - top)
        draw.line([(x, top), (x, bottom)], fill=(225, 225, 225))
        draw.line([(left, y), (right, y)], fill=(225, 225, 225))
        draw.text((x - 8, bottom + 4), f"{v:.1f}", fill=(0, 0, 0), font=font)
        draw.text((left - 30, y - 7), f"{v:.1f}", fill=(0, 0, 0), font=font)
    draw.rectangle([left, top, right, bottom], outline=(0, 0, 0))
    draw.text(((left + right) // 2 - 18, bottom + 20), "recall", fill=(0, 0, 0), font=font)
    draw.text((4, 4), "precision", fill=(0, 0, 0), font=font)
    for j, (name, precision) in enumerate(curves.items()):
        color = tuple(int(c) for c in PALETTE[j % len(PALETTE)])
        p = np.asarray(precision, np.float64)
        r = np.linspace(0, 1, len(p))
        points = [(left + ri * (right - left), bottom - pi * (bottom - top))
                  for ri, pi in zip(r, np.clip(p, 0, 1))]
        draw.line(points, fill=color, width=2)
        draw.rectangle([right - 150, top + 6 + 16 * j, right - 140, top + 16 + 16 * j],
                       fill=color)
        draw.text((right - 134, top + 4 + 16 * j), name, fill=(0, 0, 0), font=font)
    return np.asarray(canvas).copy()
