"""COCO instances JSON read directly: validation, category mapping, and mask rasterisation."""

from __future__ import annotations

import json
import math
import os
import struct

import numpy as np
from pycocotools import mask as mask_utils

from mrcnn_tf.data.report import DataError, DataReport

_JPEG_SOI, _JPEG_EOI = b"\xff\xd8", b"\xff\xd9"
_PNG_SIG = b"\x89PNG\r\n\x1a\n"


def image_header_size(f) -> tuple[int, int] | None:
    """(height, width) from the header of a JPEG, PNG, GIF or BMP file (a binary file object
    at its start), or None.

    JPEG: the frame header (SOFn), reached by skipping from marker segment to marker segment
    (metadata before it can be any size); PNG: IHDR; GIF: the logical screen; BMP: the info
    header.
    """
    head = f.read(26)
    if head.startswith(_PNG_SIG) and len(head) >= 24:
        width, height = struct.unpack(">II", head[16:24])
        return height, width
    if head.startswith(b"GIF8") and len(head) >= 10:
        width, height = struct.unpack("<HH", head[6:10])
        return height, width
    if head.startswith(b"BM") and len(head) >= 26:
        width, height = struct.unpack("<ii", head[18:26])
        return abs(height), width
    if not head.startswith(_JPEG_SOI):
        return None
    f.seek(2)
    while True:
        byte = f.read(1)
        while byte == b"\xff":  # fill bytes before a marker
            marker = f.read(1)
            if marker != b"\xff":
                break
        else:
            return None
        if not marker:
            return None
        code = marker[0]
        if code == 0x01 or 0xD0 <= code <= 0xD8:  # markers without a segment
            continue
        raw = f.read(2)
        if len(raw) < 2:
            return None
        length = struct.unpack(">H", raw)[0]
        if 0xC0 <= code <= 0xCF and code not in (0xC4, 0xC8, 0xCC):
            frame = f.read(5)
            if len(frame) < 5:
                return None
            height, width = struct.unpack(">HH", frame[1:5])
            return height, width
        if code in (0xD9, 0xDA) or length < 2:  # end, or scan data before any frame
            return None
        f.seek(length - 2, os.SEEK_CUR)


def check_image_file(path: str, expected_size: tuple[int, int] | None = None) -> str | None:
    """Why an image file cannot be used, or None. Cheap: reads the first bytes, the header
    segments and the last 4 KiB only.

    Catches a missing or empty file, a file that is not a JPEG/PNG/GIF/BMP, a truncated JPEG
    or PNG (no end marker in its last 4 KiB), and, with ``expected_size`` (height, width), a
    header whose size differs from it (the annotations would not fit the image). Corrupt data
    inside a well-framed file is caught when the pipeline decodes it.
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
        found = None
        if expected_size is not None:
            f.seek(0)
            found = image_header_size(f)
    if head.startswith(_JPEG_SOI):
        if _JPEG_EOI not in tail:
            return f"truncated JPEG (no end marker): {path}"
    elif head.startswith(_PNG_SIG):
        if b"IEND" not in tail:
            return f"truncated PNG (no IEND chunk): {path}"
    elif not (head.startswith(b"GIF8") or head.startswith(b"BM")):
        return f"not an image (unknown format): {path}"
    if expected_size is not None:
        if found is not None and tuple(found) != tuple(expected_size):
            return (f"image size differs from the annotation file's: {found[1]}x{found[0]} in "
                    f"the file, {expected_size[1]}x{expected_size[0]} in the JSON: {path}")
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
      json_category_ids: the file's own category ids, in increasing order.
      report: what was skipped and why.

    ``label_ids``: the model's classes 1..N as category ids (a run's ``labels.json``, or
    torchvision's class = category id), when they are not the file's categories in id order;
    annotations of a category outside them are skipped, named.
    """

    def __init__(self, annotation_file: str, image_dir: str, keep_empty_images: bool = True,
                 max_instances: int | None = None, check_files: bool = True,
                 include_crowd: bool = False, label_ids=None):
        self.annotation_file, self.image_dir = annotation_file, image_dir
        self.include_crowd = include_crowd
        self.report = DataReport(os.path.basename(annotation_file))
        data = _load_json(annotation_file)
        cats = sorted(data["categories"], key=lambda c: c["id"])
        names = {int(c["id"]): str(c.get("name", c["id"])) for c in cats}
        self.json_category_ids = [int(c["id"]) for c in cats]
        self.category_ids = ([int(i) for i in label_ids] if label_ids is not None
                             else list(self.json_category_ids))
        self.class_names = [names.get(i, "N/A") for i in self.category_ids]
        self.contiguous = {cid: i + 1 for i, cid in enumerate(self.category_ids)}

        anns_by_image: dict[int, list] = {}
        images = {}
        for im in data["images"]:
            images[im["id"]] = im
        for ann in data["annotations"]:
            if ann.get("image_id") not in images:
                self.report.warn("annotation", ann.get("id"),
                                 f"unknown image_id: {ann.get('image_id')}")
                continue
            anns_by_image.setdefault(ann["image_id"], []).append(ann)

        self.records = []
        missing = []  # (image id, reason): warned unless every image is missing
        for image_id in sorted(images):
            im = images[image_id]
            path = os.path.join(image_dir, im["file_name"])
            if check_files:
                if not os.path.isfile(path):
                    missing.append((image_id, f"missing image file: {path}"))
                    continue
                problem = check_image_file(path, (int(im["height"]), int(im["width"])))
                if problem:
                    self.report.warn("image", image_id, problem)
                    continue
            rec = self._record(im, path, anns_by_image.get(image_id, []), max_instances)
            if not rec["classes"].size and not keep_empty_images:
                continue
            self.records.append(rec)
        if missing and len(missing) == len(images):
            example = os.path.join(image_dir, images[missing[0][0]]["file_name"])
            raise DataError(f"{annotation_file}: no usable images: none of its {len(images)} "
                            f"images is in the image folder {image_dir!r} ({example} does not "
                            "exist); point image_dir at the folder of the file names the JSON "
                            "lists")
        for image_id, reason in missing:
            self.report.warn("image", image_id, reason)
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
            return (f"category id not in categories: {ann.get('category_id')}"
                    if ann.get("category_id") not in self.json_category_ids else
                    f"category id not among the model's classes: {ann.get('category_id')}")
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
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, not a COCO annotation file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: not a COCO instances file (the top level is not an object)")
    missing = [k for k in ("images", "annotations", "categories") if k not in data]
    if missing:
        raise DataError(f"{path}: not a COCO instances file (missing keys: {', '.join(missing)})")
    validate_coco(data, path)
    if not data["images"]:
        raise DataError(f"{path}: the annotation file has no images")
    if not data["categories"]:
        raise DataError(f"{path}: the annotation file has no categories")
    return data


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(float(v)))


def validate_coco(data: dict, path: str) -> None:
    """Checks the structure of a COCO instances file: every field the loader reads has its
    type (ids integers, sizes positive integers, boxes four finite numbers, polygons lists of
    finite numbers, RLE counts that decode to the image's pixel count), image ids are unique
    and file names stay inside the image folder. Raises DataError naming the file, the entry
    and the field.
    """
    def fail(where, message):
        raise DataError(f"{path}: {where}: {message}")

    for key in ("images", "annotations", "categories"):
        if not isinstance(data[key], list):
            fail(key, f"expected a list, got {type(data[key]).__name__} {str(data[key])[:40]}")
    seen = set()
    for i, cat in enumerate(data["categories"]):
        where = f"categories[{i}]"
        if not isinstance(cat, dict) or not _is_int(cat.get("id")):
            fail(where, f"needs an integer 'id' (got {str(cat)[:60]})")
        if cat["id"] in seen:
            fail(where, f"duplicate category id {cat['id']}")
        seen.add(cat["id"])
    seen = {}
    for i, im in enumerate(data["images"]):
        where = f"images[{i}]"
        if not isinstance(im, dict):
            fail(where, f"expected an object, got {str(im)[:60]}")
        for key in ("id", "file_name", "height", "width"):
            if key not in im:
                fail(f"image {im.get('id', where)}", f"no {key!r}")
        if not _is_int(im["id"]):
            fail(where, f"'id' must be an integer, got {im['id']!r}")
        if im["id"] in seen:
            fail(f"image {im['id']}", f"duplicate image id (also images[{seen[im['id']]}])")
        seen[im["id"]] = i
        for key in ("height", "width"):
            if not _is_int(im[key]) or im[key] <= 0:
                fail(f"image {im['id']}", f"{key!r} must be a positive integer, got {im[key]!r}")
        name = im["file_name"]
        if not isinstance(name, str) or not name:
            fail(f"image {im['id']}", f"'file_name' must be a non-empty string, got {name!r}")
        if os.path.isabs(name) or ".." in name.replace("\\", "/").split("/"):
            fail(f"image {im['id']}", f"'file_name' {name!r} points outside the image folder "
                                      "(absolute, or with '..')")
    for i, ann in enumerate(data["annotations"]):
        where = f"annotation {ann.get('id', f'[{i}]') if isinstance(ann, dict) else f'[{i}]'}"
        if not isinstance(ann, dict):
            fail(f"annotations[{i}]", f"expected an object, got {str(ann)[:60]}")
        for key in ("image_id", "category_id"):
            if not _is_int(ann.get(key)):
                fail(where, f"{key!r} must be an integer, got {ann.get(key)!r}")
        bbox = ann.get("bbox")
        if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4
                and all(_is_number(v) for v in bbox)):
            fail(where, f"'bbox' must be four finite numbers [x, y, w, h], got {bbox!r}")
        _validate_segmentation(ann.get("segmentation"), lambda m, w=where: fail(w, m))


def _validate_segmentation(seg, fail) -> None:
    if isinstance(seg, list):
        for poly in seg:
            if not isinstance(poly, list) or not all(_is_number(v) for v in poly):
                fail(f"'segmentation' polygons must be lists of finite numbers, got "
                     f"{str(poly)[:60]}")
        return
    if not isinstance(seg, dict) or "counts" not in seg or "size" not in seg:
        fail(f"'segmentation' must be polygons or an RLE {{counts, size}}, got {str(seg)[:60]}")
    size = seg["size"]
    if not (isinstance(size, list) and len(size) == 2 and all(_is_int(v) and v > 0
                                                              for v in size)):
        fail(f"RLE 'size' must be [height, width], got {size!r}")
    counts = seg["counts"]
    if isinstance(counts, list):
        if not all(_is_int(c) and c >= 0 for c in counts):
            fail("RLE 'counts' must be non-negative integers")
    elif isinstance(counts, str):
        try:
            counts = decode_rle_counts(counts)
        except ValueError as e:
            fail(f"corrupt RLE 'counts': {e}")
        if any(c < 0 for c in counts):
            fail("corrupt RLE 'counts': a negative run")
    else:
        fail(f"RLE 'counts' must be a list or a string, got {type(counts).__name__}")
    if sum(counts) != size[0] * size[1]:
        fail(f"corrupt RLE 'counts': runs cover {sum(counts)} pixels, the {size[0]}x{size[1]} "
             f"mask has {size[0] * size[1]}")


def decode_rle_counts(text: str) -> list[int]:
    """The run lengths of a compressed COCO RLE string (pycocotools' rleFrString): 6-bit
    characters from '0', 5 bits of value each, a continuation bit, a sign bit on the last; from
    the third run on, each is a difference to the run two before.

    Example: a 4x5 mask with rows 1-2, columns 1-3 on is "5220003": runs (column-major)
    [5, 2, 2, 2, 2, 2, 5].
    """
    counts, p = [], 0
    while p < len(text):
        value, k, more = 0, 0, True
        while more:
            if p >= len(text):
                raise ValueError("the string ends inside a number")
            c = ord(text[p]) - 48
            if not 0 <= c < 64:
                raise ValueError(f"character {text[p]!r} is not an RLE digit")
            value |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p, k = p + 1, k + 1
            if not more and c & 0x10:
                value |= -1 << (5 * k)
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


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
