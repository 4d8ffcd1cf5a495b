import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from mrcnn_tf.data import build_dataset
from mrcnn_tf.data.create_tfrecord import convert
from mrcnn_tf.data.tfrecord import encode_png_gray, make_example, parse_example
from tests.data.test_pipeline import _collect, coco_config


def test_png_encoder_round_trip():
    mask = (np.random.default_rng(0).random((13, 7)) > 0.5).astype(np.uint8)
    np.testing.assert_array_equal(tf.io.decode_png(encode_png_gray(mask))[..., 0].numpy(), mask)


def test_example_schema_and_parse():
    img = np.random.default_rng(1).integers(0, 255, (20, 30, 3)).astype(np.uint8)
    masks = np.zeros((3, 20, 30), np.uint8)
    masks[0, 2:8, 3:9] = 1
    masks[1, 10:20, 0:30] = 1
    masks[2, :, :] = 1
    boxes = np.array([[2, 3, 8, 9], [10, 0, 20, 30], [0, 0, 20, 30]], np.float32)
    ser = make_example(tf.io.encode_png(img).numpy(), "png", 20, 30, 123, "x.png", boxes,
                       [18, 1, 18], ["dog", "person", "dog"], [0, 0, 1], masks)
    keys = set(tf.train.Example.FromString(ser).features.feature)
    assert {"image/encoded", "image/source_id", "image/object/bbox/ymin",
            "image/object/class/label", "image/object/is_crowd", "image/object/mask"} <= keys
    out = parse_example(tf.constant(ser), category_ids=[1, 18])
    np.testing.assert_array_equal(out["image"].numpy(), img)
    np.testing.assert_array_equal(out["classes"].numpy(), [2, 1])  # crowd dropped, ids mapped
    np.testing.assert_allclose(out["boxes"].numpy(), boxes[:2], atol=1e-4)
    np.testing.assert_array_equal(out["masks"].numpy(), masks[:2])
    assert int(out["image_id"]) == 123


@pytest.mark.slow
def test_converter_cli_and_round_trip_equal_the_json_path(shared_data, tmp_path):
    ann_file = str(shared_data / "coco_tiny16" / "instances_train2017.json")
    image_dir = str(shared_data / "coco_tiny16" / "train2017")
    prefix = str(tmp_path / "rec" / "train")
    res = subprocess.run([sys.executable, "-m", "mrcnn_tf.data.create_tfrecord", "--annotations",
                          ann_file, "--images", image_dir, "--output", prefix, "--shards", "2",
                          "--workers", "2"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "wrote 16 images to 2 shard(s)" in res.stdout
    # Progress from the two worker processes, counted in the parent (a log: one line a tenth).
    lines = [line for line in res.stderr.splitlines() if line.startswith("create_tfrecord: ")]
    assert lines and lines[-1].startswith("create_tfrecord: 16/16 images") and len(lines) <= 11
    extra = ["model.num_classes=80", "data.max_instances=64", "eval.batch_size=4"]
    json_out = _collect(build_dataset(coco_config(ann_file, image_dir, 320, extra), False))
    rec_cfg = coco_config(ann_file, image_dir, 320, extra + [
        "data.eval.source=tfrecord", f"data.eval.tfrecord_pattern={prefix}-*.tfrecord"])
    rec_out = _collect(build_dataset(rec_cfg, False))
    by_id = {info["image_id"]: (img, t) for img, t, info in rec_out}
    assert sorted(by_id) == sorted(info["image_id"] for _, _, info in json_out)
    for img, t, info in json_out:
        r_img, r_t = by_id[info["image_id"]]
        np.testing.assert_allclose(r_img, img, atol=1e-3)
        np.testing.assert_array_equal(r_t["gt_classes"], t["gt_classes"])
        np.testing.assert_allclose(r_t["gt_boxes"], t["gt_boxes"], atol=1e-2)
        np.testing.assert_array_equal(r_t["gt_masks"], t["gt_masks"])


def test_convert_rejects_bad_shards(tmp_path):
    import pytest

    with pytest.raises(ValueError, match="--shards must be >= 1"):
        convert("a.json", "imgs", str(tmp_path / "x"), shards=0)


def test_the_annotation_file_is_read_once_whatever_the_shards(shared_data, tmp_path, monkeypatch):
    from mrcnn_tf.data import create_tfrecord

    reads = []
    original = create_tfrecord.CocoDataset

    def counting(*args, **kwargs):
        reads.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(create_tfrecord, "CocoDataset", counting)
    n = convert(str(shared_data / "coco_tiny16" / "instances_train2017.json"),
                str(shared_data / "coco_tiny16" / "train2017"), str(tmp_path / "x"), shards=3,
                workers=1)
    assert n == 16 and len(reads) == 1
    assert sum(1 for _ in tf.data.TFRecordDataset(
        [str(p) for p in tmp_path.glob("x-*.tfrecord")])) == 16
