"""Synthetic shapes: squares, circles and triangles on varied backgrounds, with exact masks.

Deterministic for (seed, index); no files. Random sizes, colours, backgrounds and overlaps; a
shape painted later occludes earlier ones, and instances left mostly hidden are dropped.
"""

from __future__ import annotations

import numpy as np

CLASS_NAMES = ("square", "circle", "triangle")


def _background(rng, size):
    base = rng.uniform(0, 255, 3)
    gy, gx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    tilt = rng.uniform(-60, 60, (2, 3))
    img = base + gy[..., None] * tilt[0] + gx[..., None] * tilt[1]
    img += rng.normal(0, rng.uniform(2, 12), (size, size, 3))
    return img, base


def _shape_mask(kind, cy, cx, r, size):
    yy, xx = np.ogrid[0:size, 0:size]
    yy = yy + 0.5 - cy
    xx = xx + 0.5 - cx
    if kind == 0:  # square
        return (np.abs(yy) <= r) & (np.abs(xx) <= r)
    if kind == 1:  # circle
        return yy ** 2 + xx ** 2 <= r ** 2
    # Upright equilateral triangle inscribed in the circle of radius r.
    top, bottom = -r, r / 2
    half_width = (yy - top) / (bottom - top) * (r * np.sqrt(3) / 2)
    return (yy >= top) & (yy <= bottom) & (np.abs(xx) <= half_width)


def make_example(seed: int, index: int, size: int = 128, max_shapes: int = 4) -> dict:
    """One image: ``image`` [S, S, 3] uint8, ``boxes`` [n, 4] float32 (y1, x1, y2, x2) tight
    around the visible mask, ``classes`` [n] int32 in 1..3, ``masks`` [n, S, S] uint8,
    ``image_id`` int64 (= index)."""
    rng = np.random.default_rng([int(seed), int(index)])
    img, bg = _background(rng, size)
    n = int(rng.integers(1, max_shapes + 1))
    masks, classes, full_area = [], [], []
    for _ in range(n):
        kind = int(rng.integers(0, 3))
        r = rng.uniform(0.08, 0.25) * size
        cy, cx = rng.uniform(r * 0.6, size - r * 0.6, 2)
        color = rng.uniform(0, 255, 3)
        while np.abs(color - bg).sum() < 120:  # keep shapes visible against the background
            color = rng.uniform(0, 255, 3)
        m = _shape_mask(kind, cy, cx, r, size)
        if not m.any():
            continue
        for prev in masks:  # occlusion by the new shape
            prev &= ~m
        img[m] = color + rng.normal(0, 4, (int(m.sum()), 3))
        masks.append(m)
        classes.append(kind + 1)
        full_area.append(m.sum())
    keep = [i for i, m in enumerate(masks) if m.sum() >= max(20, 0.3 * full_area[i])]
    boxes = []
    for i in keep:
        ys, xs = np.nonzero(masks[i])
        boxes.append([ys.min(), xs.min(), ys.max() + 1, xs.max() + 1])
    out_masks = np.stack([masks[i] for i in keep]).astype(np.uint8) if keep else np.zeros(
        (0, size, size), np.uint8)
    return {
        "image": np.clip(img, 0, 255).astype(np.uint8),
        "boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
        "classes": np.asarray([classes[i] for i in keep], np.int32),
        "masks": out_masks,
        "image_id": np.int64(index),
    }
