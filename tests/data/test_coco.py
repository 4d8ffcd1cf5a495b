import json
import logging

import numpy as np
import pytest

from mrcnn_tf.data.coco import CocoDataset, check_image_file, rasterize
from mrcnn_tf.data.report import DataError
from tests.data.fixtures import ann, make_coco, write_image


def _images(tmp_path, n=3, size=(40, 60)):
    out = []
    for i in range(1, n + 1):
        write_image(tmp_path / f"{i}.jpg", *size, seed=i)
        out.append({"id": i, "file_name": f"{i}.jpg", "height": size[0], "width": size[1]})
    return out


def test_category_mapping_and_crowd(tmp_path):
    images = _images(tmp_path, 1)
    anns = [ann(1, 1, 5, 5, 10, cat=7), ann(2, 1, 20, 5, 10, cat=1),
            ann(3, 1, 0, 0, 30, cat=1, iscrowd=1)]
    coco = CocoDataset(*make_coco(tmp_path, images, anns))
    assert coco.category_ids == [1, 7] and coco.class_names == ["a", "b"]
    rec = coco.records[0]
    np.testing.assert_array_equal(rec["classes"], [2, 1])  # 7 -> 2, 1 -> 1; crowd excluded
    np.testing.assert_allclose(rec["boxes"][0], [5, 5, 15, 15])
    with_crowd = CocoDataset(*make_coco(tmp_path, images, anns), include_crowd=True)
    np.testing.assert_array_equal(with_crowd.records[0]["is_crowd"], [0, 0, 1])


@pytest.mark.parametrize("bad,reason", [
    ({"bbox": [5, 5, 0, 10]}, "box of zero area"),
    ({"bbox": [100, 5, 10, 10]}, "box outside the image"),
    ({"segmentation": [[1, 2, 3, 4]]}, "polygon with fewer than 3 points"),
    ({"category_id": 99}, "category id not in categories: 99"),
    ({"segmentation": {"counts": "0T3", "size": [10, 10]}}, "RLE size [10, 10] differs"),
])
def test_bad_annotation_is_skipped_with_its_id(tmp_path, caplog, bad, reason):
    images = _images(tmp_path, 1)
    anns = [ann(1, 1, 5, 5, 10), {**ann(42, 1, 20, 5, 10), **bad}]
    with caplog.at_level(logging.WARNING, logger="mrcnn_tf.data"):
        coco = CocoDataset(*make_coco(tmp_path, images, anns))
    assert len(coco.records[0]["classes"]) == 1  # the good annotation stays
    assert any("annotation 42" in r.message and reason in r.message for r in caplog.records)
    assert "1 annotation" in coco.report.summary()


def test_bad_images_are_skipped_with_their_id(tmp_path, caplog):
    images = _images(tmp_path, 4)
    data = (tmp_path / "2.jpg").read_bytes()
    (tmp_path / "2.jpg").write_bytes(data[: len(data) // 2])  # truncated
    (tmp_path / "3.jpg").unlink()  # missing
    (tmp_path / "4.jpg").write_bytes(b"hello, not an image")
    anns = [ann(i, i, 5, 5, 10) for i in range(1, 5)]
    with caplog.at_level(logging.WARNING, logger="mrcnn_tf.data"):
        coco = CocoDataset(*make_coco(tmp_path, images, anns))
    assert [r["image_id"] for r in coco.records] == [1]
    msgs = " | ".join(r.message for r in caplog.records)
    assert "image 2: truncated JPEG" in msgs
    assert "image 3: missing image file" in msgs
    assert "image 4: not an image" in msgs
    assert coco.report.summary().startswith("ann.json: skipped 3 images")


def test_more_instances_than_max(tmp_path, caplog):
    images = _images(tmp_path, 1)
    anns = [ann(i, 1, i, i, 5) for i in range(1, 8)]
    with caplog.at_level(logging.WARNING, logger="mrcnn_tf.data"):
        coco = CocoDataset(*make_coco(tmp_path, images, anns), max_instances=4)
    assert len(coco.records[0]["classes"]) == 4
    assert any("image 1" in r.message and "kept the first 4 of 7" in r.message
               for r in caplog.records)


def test_empty_and_non_coco_files_are_errors_naming_the_file(tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    with pytest.raises(DataError, match=r"empty\.json: the annotation file has no images"):
        CocoDataset(str(empty), str(tmp_path))
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"foo": 1}))
    with pytest.raises(DataError, match=r"other\.json: not a COCO instances file \(missing keys: "
                                        r"images, annotations, categories\)"):
        CocoDataset(str(other), str(tmp_path))
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(DataError, match=r"broken\.json: not valid JSON"):
        CocoDataset(str(broken), str(tmp_path))
    with pytest.raises(FileNotFoundError, match="missing.json"):
        CocoDataset(str(tmp_path / "missing.json"), str(tmp_path))


def test_all_images_unusable_is_an_error(tmp_path):
    images = _images(tmp_path, 1)
    (tmp_path / "1.jpg").unlink()
    with pytest.raises(DataError, match="no usable images"):
        CocoDataset(*make_coco(tmp_path, images, [ann(1, 1, 5, 5, 10)]))


def test_empty_images_kept_or_dropped(tmp_path):
    images = _images(tmp_path, 2)
    args = make_coco(tmp_path, images, [ann(1, 1, 5, 5, 10)])
    assert len(CocoDataset(*args, keep_empty_images=True).records) == 2
    assert len(CocoDataset(*args, keep_empty_images=False).records) == 1


def test_rasterize_polygon_and_rle(tmp_path):
    from pycocotools import mask as mask_utils

    square = rasterize([[[2, 2, 6, 2, 6, 6, 2, 6]]], 10, 10)[0]
    assert square.sum() == 16
    full = np.zeros((10, 10), np.uint8, order="F")
    full[1:4, 2:9] = 1
    compressed = mask_utils.encode(full)
    # Column-major runs: 21 zeros, then 3 ones / 7 zeros for columns 2..8, then 16 zeros.
    uncompressed = {"size": [10, 10], "counts": [21, 3, 7, 3, 7, 3, 7, 3, 7, 3, 7, 3, 7, 3, 16]}
    out = rasterize([compressed, uncompressed], 10, 10)
    np.testing.assert_array_equal(out[0], full)
    np.testing.assert_array_equal(out[1], full)


def test_check_image_file_png(tmp_path):
    write_image(tmp_path / "a.png", 8, 8, fmt="png")
    assert check_image_file(str(tmp_path / "a.png")) is None
    data = (tmp_path / "a.png").read_bytes()
    (tmp_path / "b.png").write_bytes(data[:-12])
    assert "truncated PNG" in check_image_file(str(tmp_path / "b.png"))
    (tmp_path / "c.png").write_bytes(b"")
    assert "empty image file" in check_image_file(str(tmp_path / "c.png"))


def _coco_dict(tmp_path):
    images = _images(tmp_path, 2)
    return {"images": images, "annotations": [ann(1, 1, 5, 5, 10), ann(2, 2, 5, 5, 10)],
            "categories": [{"id": 1, "name": "a"}, {"id": 7, "name": "b"}]}


def _rle(size=(40, 60)):
    from pycocotools import mask as mask_utils

    m = np.zeros(size, np.uint8)
    m[5:15, 5:15] = 1
    rle = mask_utils.encode(np.asfortranarray(m))
    return {"counts": rle["counts"].decode(), "size": list(size)}


@pytest.mark.parametrize("edit, match", [
    (lambda d: d.update(annotations=None), r"annotations: expected a list, got NoneType"),
    (lambda d: d.update(images={"1": d["images"][0]}), r"images: expected a list, got dict"),
    (lambda d: d["categories"][0].pop("id"), r"categories\[0\]: needs an integer 'id'"),
    (lambda d: d["annotations"][0].update(image_id=[1]),
     r"annotation 1: 'image_id' must be an integer, got \[1\]"),
    (lambda d: d["images"][0].update(height="abc"),
     r"image 1: 'height' must be a positive integer, got 'abc'"),
    (lambda d: d["annotations"][1].update(bbox=[5, "5", 10, 10]),
     r"annotation 2: 'bbox' must be four finite numbers"),
    (lambda d: d["annotations"][1].update(bbox=[5, 5, float("nan"), 10]),
     r"annotation 2: 'bbox' must be four finite numbers"),
    (lambda d: d["annotations"][1].update(bbox=[5, 5, float("inf"), 10]),
     r"annotation 2: 'bbox' must be four finite numbers"),
    (lambda d: d["annotations"][0].update(segmentation=dict(_rle(), counts="5220003")),
     r"annotation 1: corrupt RLE 'counts': runs cover 20 pixels, the 40x60 mask has 2400"),
    (lambda d: d["annotations"][0].update(segmentation=dict(_rle(), counts="\x7f\x7f")),
     r"annotation 1: corrupt RLE 'counts': character"),
    (lambda d: d["images"].append(dict(d["images"][0])),
     r"image 1: duplicate image id \(also images\[0\]\)"),
    (lambda d: d["images"][1].update(file_name="../outside.jpg"),
     r"image 2: 'file_name' '\.\./outside\.jpg' points outside the image folder"),
    (lambda d: d["images"][1].update(file_name="/etc/passwd"),
     r"image 2: 'file_name' '/etc/passwd' points outside the image folder"),
])
def test_malformed_annotation_files_are_errors_naming_file_and_field(tmp_path, edit, match):
    data = _coco_dict(tmp_path)
    edit(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=rf"bad\.json: {match}"):
        CocoDataset(str(path), str(tmp_path))


def test_valid_rle_passes_and_decodes_like_pycocotools(tmp_path):
    data = _coco_dict(tmp_path)
    data["annotations"][0].update(segmentation=_rle(), iscrowd=0)
    path = tmp_path / "ok.json"
    path.write_text(json.dumps(data))
    coco = CocoDataset(str(path), str(tmp_path))
    mask = rasterize(coco.records[0]["segmentations"], 40, 60)[0]
    assert mask.sum() == 100 and mask[5:15, 5:15].all()


def test_image_whose_size_differs_from_the_json_is_skipped_and_named(tmp_path, caplog):
    images = _images(tmp_path, 3)
    write_image(tmp_path / "2.jpg", 50, 60, seed=9)  # the JSON says 40x60
    write_image(tmp_path / "3.png", 40, 60, fmt="png")
    images[2]["file_name"] = "3.png"
    images[2]["width"] = 61
    with caplog.at_level(logging.WARNING, logger="mrcnn_tf.data"):
        coco = CocoDataset(*make_coco(tmp_path, images, [ann(i, i, 5, 5, 10)
                                                         for i in range(1, 4)]))
    assert [r["image_id"] for r in coco.records] == [1]
    msgs = " | ".join(r.message for r in caplog.records)
    assert "image 2: image size differs from the annotation file's: 60x50 in the file, " \
           "60x40 in the JSON" in msgs
    assert "image 3: image size differs from the annotation file's: 60x40 in the file, " \
           "61x40 in the JSON" in msgs
    assert "2 x image size differs from the annotation file's" in coco.report.summary()


def test_header_sizes_of_real_photos_match_their_annotations(shared_data):
    from mrcnn_tf.data.coco import image_header_size

    data = json.loads((shared_data / "coco128" / "annotations" /
                       "instances_train2017.json").read_text())
    for im in data["images"]:
        with open(shared_data / "coco128" / "train2017" / im["file_name"], "rb") as f:
            assert image_header_size(f) == (im["height"], im["width"]), im["file_name"]


def test_jpeg_cut_short_with_an_end_marker_is_skipped_and_named(tmp_path, caplog):
    """A truncated JPEG with an end marker appended passes the header check and decodes
    without an error (libjpeg fills the rest with grey): the pipeline skips it, naming it."""
    import shutil

    from mrcnn_tf.config import load_config
    from mrcnn_tf.data import build_dataset
    from tests.conftest import REPO, SHARED_DATA

    src = SHARED_DATA / "coco_tiny16"
    if not src.is_dir():
        pytest.skip(f"real COCO data not found at {SHARED_DATA}")
    data = json.loads((src / "instances_train2017.json").read_text())
    data["images"] = data["images"][:3]
    ids = {im["id"] for im in data["images"]}
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in ids]
    for im in data["images"]:
        shutil.copy(src / "train2017" / im["file_name"], tmp_path / im["file_name"])
    cut = data["images"][1]
    raw = (tmp_path / cut["file_name"]).read_bytes()
    (tmp_path / cut["file_name"]).write_bytes(raw[: int(len(raw) * 0.6)] + b"\xff\xd9")
    (tmp_path / "ann.json").write_text(json.dumps(data))
    cfg = load_config(REPO / "configs" / "shapes.yaml", [
        "model.num_classes=80", "data.eval.source=coco",
        f"data.eval.annotation_file={tmp_path / 'ann.json'}", f"data.eval.image_dir={tmp_path}",
        "data.image_size=640", "model.preprocess.square_size=640", "eval.batch_size=1",
        "data.max_instances=64"])
    with caplog.at_level(logging.WARNING, logger="mrcnn_tf.data"):
        seen = [int(t["image_info"]["image_id"][0]) for _, t in build_dataset(cfg, False)]
    assert sorted(seen) == sorted(ids - {cut["id"]})
    assert any(f"image {cut['id']}: truncated JPEG" in r.message for r in caplog.records)
