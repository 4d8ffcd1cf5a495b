import json

import numpy as np
import pytest
import tensorflow as tf

from mrcnn_tf.config import ConfigError, load_config
from mrcnn_tf.data import build_dataset, source_info
from tests.conftest import REPO
from tests.data.fixtures import ann, make_coco, write_image

SHAPES = str(REPO / "configs" / "shapes.yaml")


def coco_config(ann_file, image_dir, size=256, extra=()):
    return load_config(SHAPES, [
        "data.eval.source=coco", f"data.eval.annotation_file={ann_file}",
        f"data.eval.image_dir={image_dir}", "data.train.source=coco",
        f"data.train.annotation_file={ann_file}", f"data.train.image_dir={image_dir}",
        f"data.image_size={size}", f"model.preprocess.square_size={size}", *extra])


def _collect(ds):
    out = []
    for images, t in ds:
        for b in range(images.shape[0]):
            out.append((images[b].numpy(), {k: v[b].numpy() for k, v in t.items()
                                            if k != "image_info"},
                        {k: v[b].numpy() for k, v in t["image_info"].items()}))
    return out


def test_color_modes_become_rgb_and_corrupt_files_are_skipped(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (30, 40), np.uint8), "L").save(tmp_path / "1.jpg")
    Image.fromarray(rng.integers(0, 255, (30, 40, 4), np.uint8), "CMYK").save(tmp_path / "2.jpg")
    write_image(tmp_path / "3.png", 30, 40, fmt="png", channels=4)
    write_image(tmp_path / "4.png", 30, 40, fmt="png", channels=1)
    write_image(tmp_path / "5.jpg", 30, 40)
    data = bytearray((tmp_path / "5.jpg").read_bytes())
    data[2:-2] = b"\x00" * (len(data) - 4)  # framed like a JPEG, garbage inside
    (tmp_path / "5.jpg").write_bytes(bytes(data))
    names = ["1.jpg", "2.jpg", "3.png", "4.png", "5.jpg"]
    images = [{"id": i + 1, "file_name": n, "height": 30, "width": 40}
              for i, n in enumerate(names)]
    anns = [ann(i + 1, i + 1, 2, 2, 10) for i in range(5)]
    cfg = coco_config(*make_coco(tmp_path, images, anns), size=64,
                      extra=["model.num_classes=2", "eval.batch_size=2"])
    out = _collect(build_dataset(cfg, training=False))
    assert sorted(info["image_id"] for _, _, info in out) == [1, 2, 3, 4]
    for image, t, _ in out:
        assert image.shape == (64, 64, 3)
        assert image[:48].std() > 10  # real pixels in the content area, all three channels
        assert t["gt_classes"][0] == 1


def test_num_classes_must_match(tmp_path):
    write_image(tmp_path / "1.jpg", 30, 40)
    images = [{"id": 1, "file_name": "1.jpg", "height": 30, "width": 40}]
    cfg = coco_config(*make_coco(tmp_path, images, [ann(1, 1, 2, 2, 10)]))
    with pytest.raises(ConfigError, match="has 2 categories but model.num_classes is 3"):
        build_dataset(cfg, training=False)


def test_required_paths_and_canvas_size():
    cfg = load_config(SHAPES, ["data.eval.source=coco"])
    with pytest.raises(ConfigError, match="data.eval.annotation_file is required"):
        build_dataset(cfg, training=False)
    cfg = load_config(SHAPES, ["data.image_size=64"])
    with pytest.raises(ConfigError, match=r"data.image_size \(64\) is smaller"):
        build_dataset(cfg, training=True)


def test_shapes_static_shapes_and_determinism():
    cfg = load_config(SHAPES, ["data.eval.num_images=6", "eval.batch_size=3",
                               "train.batch_size=2"])
    train = build_dataset(cfg, training=True)
    spec = train.element_spec
    assert spec[0].shape == (2, 128, 128, 3)
    assert spec[1]["gt_masks"].shape == (2, 8, 128, 128)
    a = _collect(build_dataset(cfg, training=False))
    b = _collect(build_dataset(cfg, training=False))
    assert len(a) == 6
    for (ia, ta, _), (ib, tb, _) in zip(a, b):
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(ta["gt_masks"], tb["gt_masks"])
    other = _collect(build_dataset(load_config(SHAPES, ["data.eval.num_images=6",
                                                        "data.eval.seed=5"]), training=False))
    assert not np.array_equal(a[0][0], other[0][0])


def _tight_box(mask):
    ys, xs = np.nonzero(mask)
    return np.array([ys.min(), xs.min(), ys.max() + 1, xs.max() + 1], np.float32)


def test_flip_is_consistent_for_image_boxes_and_masks():
    cfg = load_config(SHAPES, ["data.eval.num_images=8", "data.train.num_images=8",
                               "data.train.seed=1", "train.batch_size=8", "data.hflip=true"])
    plain = {info["image_id"]: (img, t) for img, t, info in
             _collect(build_dataset(cfg, training=False))}
    flipped = 0
    for img, t, info in _collect(build_dataset(cfg, training=True).take(3)):
        ref_img, ref_t = plain[info["image_id"]]
        is_flipped = not np.allclose(img, ref_img)
        flipped += is_flipped
        want = ref_img[:, ::-1] if is_flipped else ref_img
        np.testing.assert_allclose(img, want, atol=1e-3)
        for k in range(int((t["gt_classes"] >= 0).sum())):
            ref_mask = ref_t["gt_masks"][k][:, ::-1] if is_flipped else ref_t["gt_masks"][k]
            np.testing.assert_array_equal(t["gt_masks"][k], ref_mask)
            np.testing.assert_allclose(t["gt_boxes"][k], _tight_box(t["gt_masks"][k]))
    assert 0 < flipped < 24


def test_scale_jitter_crops_to_canvas():
    cfg = load_config(SHAPES, ["data.aug_scale_min=1.5", "data.aug_scale_max=2.0",
                               "train.batch_size=4", "data.train.num_images=8"])
    images, t = next(iter(build_dataset(cfg, training=True)))
    assert images.shape == (4, 128, 128, 3)
    sizes = t["image_info"]["image_size"].numpy()
    assert (sizes == 128).all()  # content fills the canvas after the crop
    scale = t["image_info"]["resize_factor"].numpy()
    assert (scale >= 1.49).all() and (scale <= 2.01).all()
    boxes, classes = t["gt_boxes"].numpy(), t["gt_classes"].numpy()
    valid = classes >= 0
    assert (boxes[valid] >= 0).all() and (boxes[valid] <= 128).all()
    assert ((boxes[valid][:, 2] - boxes[valid][:, 0]) > 0).all()


def test_distributed_input_context_shards():
    cfg = load_config(SHAPES, ["data.train.num_images=10", "train.batch_size=4"])
    ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=1,
                                     num_replicas_in_sync=2)
    ds = build_dataset(cfg, training=True, input_context=ctx)
    assert ds.element_spec[0].shape[0] == 2  # per-replica batch
    ids = set()
    for _, t in ds.take(10):
        ids.update(t["image_info"]["image_id"].numpy().tolist())
    assert ids == {1, 3, 5, 7, 9}  # this pipeline's shard only


# ------------------------------------------------------------------- real COCO data


def _coco_paths(shared_data, name):
    if name == "coco_tiny16":
        return (str(shared_data / name / "instances_train2017.json"),
                str(shared_data / name / "train2017"))
    return (str(shared_data / name / "annotations" / "instances_train2017.json"),
            str(shared_data / name / "train2017"))


@pytest.mark.parametrize("name", ["coco_tiny16", "coco128"])
def test_instance_counts_match_the_json(shared_data, name):
    ann_file, image_dir = _coco_paths(shared_data, name)
    with open(ann_file) as f:
        data = json.load(f)
    non_crowd = sum(1 for a in data["annotations"] if not a["iscrowd"])
    cfg = coco_config(ann_file, image_dir, 256, ["model.num_classes=80",
                                                 "data.max_instances=100",
                                                 "data.mask_mode=mini", "eval.batch_size=16"])
    out = _collect(build_dataset(cfg, training=False))
    assert len(out) == len(data["images"])
    assert sum(int((t["gt_classes"] >= 0).sum()) for _, t, _ in out) == non_crowd


def test_masks_map_back_to_the_original_annotations(shared_data):
    from pycocotools.coco import COCO

    ann_file, image_dir = _coco_paths(shared_data, "coco_tiny16")
    coco = COCO(ann_file)
    cfg = coco_config(ann_file, image_dir, 800, ["model.num_classes=80", "data.max_instances=64",
                                                 "eval.batch_size=1"])
    info = source_info(cfg, training=False)
    ious, box_err = [], []
    for _, t, img_info in _collect(build_dataset(cfg, training=False, info=info)):
        image_id = int(img_info["image_id"])
        anns = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id)) if not a["iscrowd"]]
        h, w = img_info["original_size"]
        ch, cw = img_info["image_size"]
        n = int((t["gt_classes"] >= 0).sum())
        assert n == len(anns)
        for k, a in enumerate(anns):
            assert info.category_ids[t["gt_classes"][k] - 1] == a["category_id"]
            m = t["gt_masks"][k][:ch, :cw].astype(np.float32)
            back = tf.image.resize(m[..., None], (h, w), method="bilinear")[..., 0].numpy() >= 0.5
            ref = coco.annToMask(a) > 0
            ious.append((back & ref).sum() / max((back | ref).sum(), 1))
            box_err.append(np.abs(t["gt_boxes"][k] - _tight_box(t["gt_masks"][k])).max())
    ious = np.array(ious)
    print(f"{len(ious)} masks: min IoU {ious.min():.3f}, mean {ious.mean():.4f}; "
          f"box vs mask max {max(box_err):.2f} px")
    assert ious.min() >= 0.9
    assert np.percentile(box_err, 95) <= 2.5  # COCO boxes hug the polygons within ~1 px


def test_mask_resize_nearest_picks_torchvisions_rows_and_columns(shared_data):
    """data.mask_resize=nearest: each resized mask is the original (pycocotools) mask sampled at
    rows and columns floor(i * in / out), torchvision's interpolate(mode="nearest"); bilinear
    differs from it at the boundaries."""
    from pycocotools.coco import COCO

    ann_file, image_dir = _coco_paths(shared_data, "coco_tiny16")
    coco = COCO(ann_file)
    outs = {}
    for method in ("nearest", "bilinear"):
        cfg = coco_config(ann_file, image_dir, 800, [
            "model.num_classes=80", "data.max_instances=64", "eval.batch_size=1",
            f"data.mask_resize={method}", "model.preprocess.resize=short_long",
            "model.preprocess.short_size=600", "model.preprocess.long_size=800"])
        outs[method] = _collect(build_dataset(cfg, training=False).take(4))
    differing = 0
    for (_, t, info), (_, tb, _) in zip(outs["nearest"], outs["bilinear"]):
        anns = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=int(info["image_id"])))
                if not a["iscrowd"]]
        (h, w), (ch, cw) = info["original_size"], info["image_size"]
        rows = np.minimum(np.floor(np.arange(ch, dtype=np.float32) * np.float32(h / ch)), h - 1)
        cols = np.minimum(np.floor(np.arange(cw, dtype=np.float32) * np.float32(w / cw)), w - 1)
        for k, a in enumerate(anns):
            expected = coco.annToMask(a)[rows.astype(int)][:, cols.astype(int)]
            np.testing.assert_array_equal(t["gt_masks"][k][:ch, :cw], expected)
            differing += int((tb["gt_masks"][k] != t["gt_masks"][k]).sum())
    assert differing > 0


def test_canvases_by_aspect_ratio_and_their_validation():
    from mrcnn_tf.data.pipeline import canvases
    from mrcnn_tf.data.transforms import choose_canvas

    tv = str(REPO / "configs" / "torchvision_r50_fpn.yaml")
    cfg = load_config(tv, ["data.canvas_long_sides=[800, 1088, 1344]"])
    got = canvases(cfg)
    assert got == ((800, 800), (800, 1088), (1088, 800), (800, 1344), (1344, 800))
    for size, index in (((800, 1066), 1), ((1066, 800), 2), ((750, 1333), 3), ((800, 800), 0),
                        ((800, 1089), 3), ((1333, 454), 4)):
        assert int(choose_canvas(tf.constant(size), got)) == index, size
    assert canvases(load_config(SHAPES)) == ((128, 128),)
    for sides, match in (("[800, 1088, 1216]", "must hold the longest resized side"),
                         ("[1088, 800, 1344]", "increasing multiples"),
                         ("[800, 1000, 1344]", "increasing multiples"),
                         ("[640, 1344]", r"each >= 800")):
        with pytest.raises(ConfigError, match=match):
            canvases(load_config(tv, [f"data.canvas_long_sides={sides}"]))
    with pytest.raises(ConfigError, match="needs model.preprocess.resize=short_long"):
        canvases(load_config(SHAPES, ["data.canvas_long_sides=[128]"]))


@pytest.mark.parametrize("training", [False, True])
def test_real_photos_batch_on_the_smallest_canvas_that_holds_them(shared_data, training):
    """coco_tiny16 through the torchvision recipe (800/1333, canvases 800 x {800, 1088, 1216,
    1344}): every batch is one canvas, every image sits on the smallest canvas that holds its
    resized size (COCO's 640x480 -> 800x1066 on 800x1088, not a 1344 square), its boxes and
    masks inside its content; evaluation keeps every image."""
    from mrcnn_tf.data.pipeline import canvases

    ann_file, image_dir = _coco_paths(shared_data, "coco_tiny16")
    cfg = load_config(str(REPO / "configs" / "torchvision_r50_fpn.yaml"), [
        f"data.train.annotation_file={ann_file}",
        f"data.train.image_dir={image_dir}", f"data.eval.annotation_file={ann_file}",
        f"data.eval.image_dir={image_dir}", "data.max_instances=32", "eval.batch_size=2",
        "train.batch_size=2"])
    allowed = canvases(cfg)
    ds = build_dataset(cfg, training=training)
    seen, shapes, pixels = set(), set(), []
    for images, t in (ds.take(12) if training else ds):
        h, w = images.shape[1:3]
        shapes.add((h, w))
        assert (h, w) in allowed and t["gt_masks"].shape[2:] == (h, w)
        for b in range(images.shape[0]):
            ch, cw = t["image_info"]["image_size"][b].numpy()
            smallest = next(c for c in allowed if c[0] >= ch and c[1] >= cw)
            assert (h, w) == smallest, ((h, w), (ch, cw))
            n = int((t["gt_classes"][b].numpy() >= 0).sum())
            boxes = t["gt_boxes"][b, :n].numpy()
            assert (boxes[:, 2] <= ch + 1e-3).all() and (boxes[:, 3] <= cw + 1e-3).all()
            masks = t["gt_masks"][b, :n].numpy()
            assert not masks[:, ch:].any() and not masks[:, :, cw:].any()
            assert masks.reshape(n, -1).any(axis=1).all()
            seen.add(int(t["image_info"]["image_id"][b]))
            pixels.append(h * w)
    if not training:
        assert len(seen) == 16
    # Against the 1344 square: about 0.6 of the pixels.
    assert len(shapes) >= 2 and np.mean(pixels) / (1344 * 1344) < 0.7


@pytest.mark.parametrize("name", ["coco_tiny16", "coco128"])
def test_classes_follow_the_models_label_map(shared_data, name):
    """torchvision's configs (class i = COCO category id i, 90 classes) train on a COCO JSON
    of 80 categories: every instance's class is its category id, where the contiguous mapping
    (detectron2's configs) gives the rank of the id. A run's label map (its labels.json, e.g.
    in another order) decides the classes of its data when it resumes."""
    ann_file, image_dir = _coco_paths(shared_data, name)
    sources = [f"data.train.annotation_file={ann_file}", f"data.train.image_dir={image_dir}"]
    torchvision = load_config(str(REPO / "configs" / "torchvision_r50_fpn.yaml"), sources)
    by_id = source_info(torchvision, training=True)
    assert by_id.category_ids == list(range(1, 91)) and len(by_id.class_names) == 90
    assert by_id.class_names[0] == "person" and by_id.class_names[11] == "N/A"  # id 12: unused
    contiguous = source_info(load_config(str(REPO / "configs" / "detectron2_r50_fpn.yaml"),
                                         sources), training=True)
    ids = contiguous.category_ids
    assert len(ids) == 80 and ids != list(range(1, 81))
    records = {r["image_id"]: r for r in by_id.coco.records}
    n = 0
    for r in contiguous.coco.records:
        np.testing.assert_array_equal(records[r["image_id"]]["classes"],
                                      [ids[c - 1] for c in r["classes"]])
        n += len(r["classes"])
    assert n > 100
    # A run's own label map: the classes are positions in it.
    shuffled = list(reversed(ids))
    resumed = source_info(torchvision, training=True,
                          labels=(shuffled, [str(i) for i in shuffled]))
    for r in resumed.coco.records[:20]:
        np.testing.assert_array_equal(
            [shuffled[c - 1] for c in r["classes"]],
            [ids[c - 1] for c in contiguous.coco.records[
                [x["image_id"] for x in contiguous.coco.records].index(r["image_id"])]["classes"]])
    batch = next(iter(build_dataset(load_config(
        str(REPO / "configs" / "torchvision_r50_fpn.yaml"),
        [*sources, "data.max_instances=32", "train.batch_size=1",
         "model.preprocess.short_size=256", "model.preprocess.long_size=416",
         "data.canvas_long_sides=[256, 320, 416]"]), training=True)))
    classes = batch[1]["gt_classes"].numpy()
    assert set(classes[classes > 0]) <= set(ids)


def test_classes_that_do_not_fit_the_model_name_the_fix(shared_data):
    ann_file, image_dir = _coco_paths(shared_data, "coco_tiny16")
    sources = [f"data.train.annotation_file={ann_file}", f"data.train.image_dir={image_dir}"]
    with pytest.raises(ConfigError, match=r"category ids above model\.num_classes \(50\).*set "
                                          r"model\.num_classes=90, or data\.class_ids="
                                          r"contiguous"):
        source_info(load_config(str(REPO / "configs" / "torchvision_r50_fpn.yaml"),
                                [*sources, "model.num_classes=50"]), training=True)
    with pytest.raises(ConfigError, match=r"80 categories but model\.num_classes is 3: set "
                                          r"model\.num_classes=80"):
        source_info(load_config(str(REPO / "configs" / "shapes.yaml"),
                                [*sources, "data.train.source=coco"]), training=True)
    with pytest.raises(ConfigError, match=r"the model's classes \(its run's labels\.json\) do "
                                          r"not include: 1, 2"):
        source_info(load_config(str(REPO / "configs" / "torchvision_r50_fpn.yaml"), sources),
                    training=True, labels=(list(range(3, 93)), ["x"] * 90))


def test_multi_scale_short_sides_are_drawn_uniformly_from_the_list():
    """data.train_short_sizes: in training each image's short side is drawn uniformly from the
    list (detectron2's ResizeShortestEdge 'choice'), its long side still capped at
    model.preprocess.long_size; evaluation keeps model.preprocess.short_size. A chi-square test
    over 600 draws on images of many sizes and aspect ratios rejects a biased draw."""
    from mrcnn_tf.data.pipeline import transform_params
    from mrcnn_tf.data.transforms import transform

    sizes = (64, 96, 128)
    cfg = load_config(SHAPES, ["model.preprocess.resize=short_long",
                               "model.preprocess.short_size=128", "model.preprocess.long_size=213",
                               "data.canvas_long_sides=[128, 160, 192, 224]",
                               f"data.train_short_sizes={list(sizes)}"])
    p = transform_params(cfg)
    rng = np.random.default_rng(0)
    tf.random.set_seed(0)
    counts = dict.fromkeys(sizes, 0)
    for i in range(600):
        h, w = (int(v) for v in rng.integers(40, 300, 2))
        example = {"image": tf.zeros([h, w, 3], tf.uint8), "boxes": [[0.0, 0.0, h, w]],
                   "classes": [1], "masks": tf.ones([1, h, w], tf.uint8), "image_id": i}
        for training in (True, False) if i < 20 else (True,):
            _, t = transform(example, p, training=training)
            got = tuple(int(v) for v in t["image_info"]["image_size"])
            # The sizes each short side gives, torchvision's rule: floor(dim * min(s / short,
            # long_size / long)).
            options = {s: tuple(int(np.floor(d * min(s / min(h, w), 213 / max(h, w))))
                                for d in (h, w)) for s in sizes}
            if not training:
                assert got == options[128], (h, w, got)
                continue
            drawn = [s for s, size in options.items() if size == got]
            assert drawn, (h, w, got, options)
            # Counted where the long-side cap leaves all three sizes apart (a property of the
            # image, not of the draw: counting every unambiguous draw would favour 64).
            if len(set(options.values())) == len(sizes):
                counts[drawn[0]] += 1
    n = sum(counts.values())
    assert n > 300, counts
    chi2 = sum((c - n / 3) ** 2 / (n / 3) for c in counts.values())
    assert chi2 < 13.8, counts  # p = 0.001 at 2 degrees of freedom


def test_multi_scale_sizes_above_the_canvas_short_side_are_refused():
    with pytest.raises(ConfigError, match="data.train_short_sizes .* at most model.preprocess"):
        load_config(SHAPES, ["model.preprocess.resize=short_long",
                             "model.preprocess.short_size=128",
                             "model.preprocess.long_size=213",
                             "data.canvas_long_sides=[128, 224]",
                             "data.train_short_sizes=[128, 160]"])
