import base64
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import mrcnn_tf
from mrcnn_tf.checkpoint import make_checkpoint
from mrcnn_tf.data.tfrecord import make_example
from mrcnn_tf.rundir import write_config, write_labels
from tests.conftest import REPO

SHAPES = str(REPO / "configs" / "shapes.yaml")
IDS, NAMES = [11, 12, 13], ["square", "circle", "triangle"]


def _jpeg(img):
    return tf.io.encode_jpeg(img, quality=95).numpy()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A trained-looking run directory (random weights) exported with the CLI."""
    root = tmp_path_factory.mktemp("serving")
    cfg = mrcnn_tf.load_config(SHAPES, ["model.detection.score_threshold=0.0"])
    model = mrcnn_tf.build_model(cfg)
    run = root / "run"
    os.makedirs(run / "checkpoints")
    make_checkpoint(model).save(str(run / "checkpoints" / "ckpt"))
    write_config(str(run), cfg)
    write_labels(str(run), IDS, NAMES)
    res = subprocess.run([sys.executable, str(REPO / "export" / "export_saved_model.py"),
                          "--model_dir", str(run), "--output", str(root / "export")],
                         capture_output=True, text=True, timeout=600, cwd=REPO,
                         env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "serving_default = image_tensor" in res.stdout
    return model, str(root / "export" / "1"), root


def _serve(export_dir, requests, tmp):
    inp, out = str(tmp / "req.npz"), str(tmp / "res.npz")
    np.savez(inp, **requests)
    res = subprocess.run([sys.executable, str(REPO / "tests" / "scripts" / "serving_client.py"),
                          export_dir, inp, out], capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert res.returncode == 0, res.stderr[-3000:]
    meta = json.loads(res.stdout.strip().splitlines()[-1])
    assert meta["mrcnn_tf_imported"] is False
    return dict(np.load(out)), meta


def _mask_iou(a, b):
    a, b = a > 0, b > 0
    union = (a | b).sum()
    return 1.0 if union == 0 else (a & b).sum() / union


def _keras_reference(model, image):
    det = {k: v.numpy()[0] for k, v in model(image[None]).items()}
    n = det["num_detections"]
    full = mrcnn_tf.paste_masks(det["detection_masks"][None, :n], det["detection_boxes"][None, :n],
                                image.shape[0], image.shape[1]).numpy()[0]
    return det, full


def test_every_signature_matches_the_keras_model(exported, tmp_path):
    model, export_dir, _ = exported
    rng = np.random.default_rng(0)
    a = rng.integers(0, 255, (90, 120, 3)).astype(np.uint8)
    b = rng.integers(0, 255, (130, 70, 3)).astype(np.uint8)
    png_a = tf.io.encode_png(a).numpy()
    png_b = tf.io.encode_png(b).numpy()
    example = make_example(png_b, "png", 130, 70, 1, "b.png", np.zeros((0, 4)), [], [], [],
                           np.zeros((0, 130, 70), np.uint8))
    out, meta = _serve(export_dir, {
        "image_tensor__a": a[None], "image_bytes__ab": np.array([png_a, png_b], object),
        "tf_example__b": np.array([example], object), "serving_default__a": a[None]},
        tmp_path)
    print("load seconds:", round(meta["load_seconds"], 2))
    refs = {"a": _keras_reference(model, a), "b": _keras_reference(model, b)}
    cases = [("image_tensor__a", 0, "a"), ("serving_default__a", 0, "a"),
             ("image_bytes__ab", 0, "a"), ("image_bytes__ab", 1, "b"), ("tf_example__b", 0, "b")]
    for key, row, name in cases:
        det, full = refs[name]
        n = int(det["num_detections"])
        assert out[f"{key}__num_detections"][row] == n > 0
        np.testing.assert_allclose(out[f"{key}__detection_scores"][row, :n],
                                   det["detection_scores"][:n], atol=1e-4)
        np.testing.assert_array_equal(out[f"{key}__detection_classes"][row, :n],
                                      np.array(IDS)[det["detection_classes"][:n] - 1])
        np.testing.assert_allclose(out[f"{key}__detection_boxes"][row, :n],
                                   det["detection_boxes"][:n], atol=1e-2)
        h, w = out[f"{key}__image_shape"][row]
        assert (h, w) == full.shape[1:]
        masks = out[f"{key}__detection_masks"][row, :n, :h, :w]
        assert masks.dtype == np.uint8
        ious = [_mask_iou(masks[i], full[i]) for i in range(n)]
        assert min(ious) >= 0.99, min(ious)
    # A batch of different sizes is padded to the largest; image_shape gives each size.
    assert out["image_bytes__ab__detection_masks"].shape[2:] == (130, 120)
    np.testing.assert_array_equal(out["image_bytes__ab__image_shape"], [[90, 120], [130, 70]])


def test_bad_requests(exported, tmp_path):
    _, export_dir, _ = exported
    rng = np.random.default_rng(1)
    good = rng.integers(0, 255, (60, 80, 3)).astype(np.uint8)
    jpeg = _jpeg(good)
    corrupt = bytearray(jpeg)
    corrupt[2:-2] = b"\x00" * (len(corrupt) - 4)
    gray = tf.io.encode_png(rng.integers(0, 255, (40, 50, 1)).astype(np.uint8)).numpy()
    rgba = tf.io.encode_png(rng.integers(0, 255, (40, 50, 4)).astype(np.uint8)).numpy()
    tiny = tf.io.encode_png(np.zeros((1, 1, 3), np.uint8)).numpy()
    huge = _jpeg(np.full((4000, 6000, 3), 128, np.uint8))
    reqs = {
        "image_bytes__mixed": np.array([jpeg, b"not an image", b"", jpeg[: len(jpeg) // 2],
                                        gray, rgba, tiny], object),
        "image_bytes__huge": np.array([huge], object),
        "image_bytes__corrupt": np.array([bytes(corrupt)], object),
        "image_tensor__zero": np.zeros((1, 0, 5, 3), np.uint8),
    }
    out, meta = _serve(export_dir, reqs, tmp_path)
    errors = [e.decode() for e in out["image_bytes__mixed__errors"]]
    assert errors == ["", "not a JPEG, PNG, GIF or BMP image", "empty image bytes",
                      "truncated JPEG (no end marker)", "", "", ""]
    shapes = out["image_bytes__mixed__image_shape"].tolist()
    assert shapes == [[60, 80], [0, 0], [0, 0], [0, 0], [40, 50], [40, 50], [1, 1]]
    num = out["image_bytes__mixed__num_detections"]
    assert num[0] > 0 and (num[1:4] == 0).all() and (num[4:] > 0).all()
    assert out["image_bytes__huge__image_shape"].tolist() == [[4000, 6000]]
    assert out["image_bytes__huge__detection_masks"].shape[2:] == (4000, 6000)
    assert "image_bytes__corrupt__error" in out  # the whole request fails, with a reason
    assert "jpeg" in str(out["image_bytes__corrupt__error"]).lower()
    assert "positive height and width" in str(out["image_tensor__zero__error"])
    print("timings:", {k: round(v, 2) for k, v in meta["timings"].items()})


def _tf_serving_request_to_tensors(body, signature):
    """TF Serving's REST rules: {"b64": ...} is base64 bytes; "instances" (row format) lists one
    value per example for a single-input signature (or dicts of named inputs); "inputs"
    (columnar) gives the whole batch per input name, or the batch itself for one input."""
    def decode(v):
        if isinstance(v, dict) and set(v) == {"b64"}:
            return base64.b64decode(v["b64"])
        if isinstance(v, list):
            return [decode(x) for x in v]
        return v

    specs = signature.structured_input_signature[1]
    names = list(specs)
    if "instances" in body:
        rows = [decode(r) for r in body["instances"]]
        if len(names) == 1 and not (rows and isinstance(rows[0], dict)):
            columns = {names[0]: rows}
        else:
            columns = {n: [r[n] for r in rows] for n in names}
    else:
        inputs = body["inputs"]
        columns = {n: decode(inputs[n]) for n in names} if isinstance(inputs, dict) else {
            names[0]: decode(inputs)}
    return {n: tf.constant(np.array(columns[n], dtype=specs[n].dtype.as_numpy_dtype)
                           if specs[n].dtype != tf.string else columns[n], specs[n].dtype)
            for n in names}


def test_rest_request_bodies(exported):
    _, export_dir, _ = exported
    loaded = tf.saved_model.load(export_dir)
    img = np.random.default_rng(2).integers(0, 255, (48, 64, 3)).astype(np.uint8)
    b64 = base64.b64encode(tf.io.encode_png(img).numpy()).decode()
    rows = {"signature_name": "image_bytes", "instances": [{"b64": b64}, {"b64": b64}]}
    columnar = {"signature_name": "image_bytes", "inputs": {"images": [{"b64": b64}]}}
    tensor_rows = {"signature_name": "image_tensor", "instances": [img.tolist()]}
    outs = []
    for body in (rows, columnar, tensor_rows):
        body = json.loads(json.dumps(body))  # exactly what travels over HTTP
        sig = loaded.signatures[body["signature_name"]]
        outs.append(sig(**_tf_serving_request_to_tensors(body, sig)))
    assert outs[0]["num_detections"].shape == (2,)
    np.testing.assert_allclose(outs[0]["detection_scores"][0], outs[1]["detection_scores"][0],
                               atol=1e-6)
    np.testing.assert_allclose(outs[1]["detection_scores"][0], outs[2]["detection_scores"][0],
                               atol=1e-6)


def test_saved_model_cli(exported, tmp_path):
    _, export_dir, _ = exported
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    show = subprocess.run([cli, "show", "--dir", export_dir, "--all"], capture_output=True,
                          text=True, timeout=300)
    assert show.returncode == 0, show.stderr[-2000:]
    for name in ("serving_default", "image_tensor", "image_bytes", "tf_example"):
        assert f"signature_def['{name}']" in show.stdout
    assert "detection_masks" in show.stdout and "tensorflow/serving/predict" in show.stdout
    np.save(tmp_path / "img.npy", np.zeros((1, 32, 48, 3), np.uint8))
    run = subprocess.run([cli, "run", "--dir", export_dir, "--tag_set", "serve",
                          "--signature_def", "image_tensor", "--inputs",
                          f"images={tmp_path / 'img.npy'}", "--outdir", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "out" / "detection_boxes.npy").exists()


def test_label_map_asset_and_versioned_layout(exported):
    _, export_dir, root = exported
    with open(os.path.join(export_dir, "assets", "labels.json")) as f:
        labels = json.load(f)
    assert [(e["id"], e["name"]) for e in labels] == list(zip(IDS, NAMES))
    assert sorted(os.listdir(root / "export")) == ["1"]


def test_box_mask_output(exported, tmp_path):
    from mrcnn_tf.serving import export_saved_model

    model, _, _ = exported
    # export.max_detections: the best 5 of the model's 20 (score threshold 0: all 20 are real).
    path = export_saved_model(model, IDS, NAMES, str(tmp_path / "box" / "1"), ("image_tensor",),
                              mask_output="box", max_detections=5)
    loaded = tf.saved_model.load(path)
    assert sorted(loaded.signatures) == ["image_tensor", "serving_default"]
    img = np.random.default_rng(3).integers(0, 255, (1, 50, 70, 3)).astype(np.uint8)
    out = loaded.signatures["serving_default"](images=tf.constant(img))
    det = model(img)
    n = int(out["num_detections"][0])
    assert n == min(5, int(det["num_detections"][0])) == 5
    assert out["detection_masks"].shape == (1, 5, 28, 28)
    assert out["detection_masks"].dtype == tf.float32
    np.testing.assert_allclose(out["detection_masks"][0, :n], det["detection_masks"][0, :n],
                               atol=1e-4)
    np.testing.assert_allclose(out["detection_scores"][0], det["detection_scores"][0, :5],
                               atol=1e-6)
    with pytest.raises(ValueError, match="input types must be among"):
        export_saved_model(model, IDS, NAMES, str(tmp_path / "bad"), ("jpeg",))
    with pytest.raises(ValueError, match=r"export.max_detections \(21\) cannot exceed"):
        export_saved_model(model, IDS, NAMES, str(tmp_path / "bad2"), max_detections=21)
