"""COCO instances JSON read directly: validation, category mapping, and mask rasterisation."""

from __future__ import annotations

import json
import os

import numpy as np
from pycocotools import mask as mask_utils

from mrcnn_tf.data.report import DataError, DataReport

_JPEG_SOI, _JPEG_EOI = b"\xff\xd8", b"\xff\xd9"
_PNG_SIG = b"\x89PNG\r\n\x1a\n"


def check_image_file(path: str) -> str | None:
    """Why an image file cannot be used, or None. Cheap: reads the first and last bytes only.

    Catches a missing or empty file, a file that is not a JPEG/PNG/GIF/BMP, and a truncated JPEG
    or PNG (no end marker in its last 4 KiB). Corrupt data inside a well-framed file is caught
    when the pipeline decodes it.
    """
    if not os.path.isfile(path):
        return f"missing image file: {path}"
    size = os.path.getsize(path)
    if size == 0:
        return f"empty image file: {path}"
    with open(path, "rb") as f:
        head = f.read(8)
        f.seek(max(0, size - 4096))
        tail = f.read()
    if head.startswith(_JPEG_SOI):
        if _JPEG_EOI not in tail:
            return f"truncated JPEG (no end marker): {path}"
    elif head.startswith(_PNG_SIG):
        if b"IEND" not in tail:
            return f"truncated PNG (no IEND chunk): {path}"
    elif not (head.startswith(b"GIF8") or head.startswith(b"BM")):
        return f"not an image (unknown format): {path}"
    return None


class CocoDataset:
    """A COCO instances file and its image folder, validated once.

    Attributes:
      records: list of dicts, one per usable image: ``image_id``, ``file_name`` (full path),
        ``height``, ``width``, ``boxes`` [n, 4] float32 (y1, x1, y2, x2) pixels,
        ``classes`` [n] int32 contiguous 1..N, ``segmentations`` (n COCO segmentations).
        ``is_crowd`` [n] int32. Crowd regions are excluded unless ``include_crowd`` (the
        TFRecord converter keeps them, flagged, as Model Garden's converter does).
      category_ids: COCO category id of each contiguous class (index 0 = class 1).
      class_names: their names.
      report: what was skipped and why.
    """

    def __init__(self, annotation_file: str, image_dir: str, keep_empty_images: bool = True,
                 max_instances: int | None = None, check_files: bool = True,
                 include_crowd: bool = False):
        self.annotation_file, self.image_dir = annotation_file, image_dir
        self.include_crowd = include_crowd
        self.report = DataReport(os.path.basename(annotation_file))
        data = _load_json(annotation_file)
        cats = sorted(data["categories"], key=lambda c: c["id"])
        self.category_ids = [int(c["id"]) for c in cats]
        self.class_names = [str(c.get("name", c["id"])) for c in cats]
        self.contiguous = {cid: i + 1 for i, cid in enumerate(self.category_ids)}

        anns_by_image: dict[int, list] = {}
        images = {}
        for im in data["images"]:
            for key in ("id", "file_name", "height", "width"):
                if key not in im:
                    raise DataError(f"{annotation_file}: image entry {im.get('id', '?')} has no "
                                    f"{key!r}")
            images[im["id"]] = im
        for ann in data["annotations"]:
            if ann.get("image_id") not in images:
                self.report.warn("annotation", ann.get("id"),
                                 f"unknown image_id: {ann.get('image_id')}")
                continue
            anns_by_image.setdefault(ann["image_id"], []).append(ann)

        self.records = []
        for image_id in sorted(images):
            im = images[image_id]
            path = os.path.join(image_dir, im["file_name"])
            if check_files:
                problem = check_image_file(path)
                if problem:
                    self.report.warn("image", image_id, problem)
                    continue
            rec = self._record(im, path, anns_by_image.get(image_id, []), max_instances)
            if not rec["classes"].size and not keep_empty_images:
                continue
            self.records.append(rec)
        if not self.records:
            raise DataError(f"{annotation_file}: no usable images (images in file: "
                            f"{len(images)}; {self.report.summary()})")

    def _record(self, im, path, anns, max_instances):
        h, w = int(im["height"]), int(im["width"])
        boxes, classes, segs, crowd = [], [], [], []
        for ann in anns:
            if ann.get("iscrowd", 0) and not self.include_crowd:
                continue  # crowd regions are not targets
            reason = self._check_annotation(ann, h, w)
            if reason:
                self.report.warn("annotation", ann.get("id"), reason)
                continue
            x, y, bw, bh = (float(v) for v in ann["bbox"])
            y1, x1 = max(y, 0.0), max(x, 0.0)
            y2, x2 = min(y + bh, float(h)), min(x + bw, float(w))
            boxes.append([y1, x1, y2, x2])
            classes.append(self.contiguous[ann["category_id"]])
            segs.append(_clean_segmentation(ann["segmentation"]))
            crowd.append(int(bool(ann.get("iscrowd", 0))))
        if max_instances is not None and len(classes) > max_instances:
            self.report.warn("instances of image", im["id"],
                             f"more instances than max_instances: kept the first "
                             f"{max_instances} of {len(classes)}")
            boxes, classes, segs, crowd = (v[:max_instances] for v in (boxes, classes, segs,
                                                                       crowd))
        return {"image_id": int(im["id"]), "file_name": path, "height": h, "width": w,
                "boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
                "classes": np.asarray(classes, np.int32), "segmentations": segs,
                "is_crowd": np.asarray(crowd, np.int32)}

    def _check_annotation(self, ann, h, w) -> str | None:
        if ann.get("category_id") not in self.contiguous:
            return f"category id not in categories: {ann.get('category_id')}"
        bbox = ann.get("bbox")
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
            return f"malformed bbox: {bbox!r}"
        x, y, bw, bh = (float(v) for v in bbox)
        if bw <= 0 or bh <= 0:
            return f"box of zero area: {bbox}"
        if min(x + bw, w) - max(x, 0) <= 0 or min(y + bh, h) - max(y, 0) <= 0:
            return f"box outside the image: {bbox} in {w}x{h}"
        seg = ann.get("segmentation")
        if isinstance(seg, list):
            if not _clean_segmentation(seg):
                return "polygon with fewer than 3 points"
        elif not (isinstance(seg, dict) and "counts" in seg and "size" in seg):
            return f"malformed segmentation: {str(seg)[:60]}"
        elif list(seg["size"]) != [h, w]:
            return f"RLE size {seg['size']} differs from the image's {[h, w]}"
        return None

    def class_name_map(self) -> dict:
        """{contiguous class: name}."""
        return {i + 1: n for i, n in enumerate(self.class_names)}


def _clean_segmentation(seg):
    """Polygons with at least 3 points (6 numbers); RLE dicts unchanged."""
    if isinstance(seg, list):
        return [p for p in seg if isinstance(p, list) and len(p) >= 6]
    return seg


def _load_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"annotation file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: not a COCO instances file (the top level is not an object)")
    missing = [k for k in ("images", "annotations", "categories") if k not in data]
    if missing:
        raise DataError(f"{path}: not a COCO instances file (missing keys: {', '.join(missing)})")
    if not data["images"]:
        raise DataError(f"{path}: the annotation file has no images")
    if not data["categories"]:
        raise DataError(f"{path}: the annotation file has no categories")
    return data


def rasterize(segmentations, height: int, width: int) -> np.ndarray:
    """COCO segmentations (polygons, compressed or uncompressed RLE) -> [n, H, W] uint8."""
    out = np.zeros((len(segmentations), height, width), np.uint8)
    for i, seg in enumerate(segmentations):
        if isinstance(seg, list):
            rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
        elif isinstance(seg["counts"], list):
            rle = mask_utils.frPyObjects(seg, height, width)
        else:
            rle = seg
        out[i] = mask_utils.decode(rle)
    return out
