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
    ({"segmentation": {"counts": "abc", "size": [10, 10]}}, "RLE size [10, 10] differs"),
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
