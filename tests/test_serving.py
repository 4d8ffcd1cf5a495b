import base64
import importlib.util
import io
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import mrcnn_tf
from mrcnn_tf.checkpoint import make_checkpoint
from mrcnn_tf.data.tfrecord import make_example
from mrcnn_tf.rundir import write_config, write_labels
from tests.conftest import REPO

# Each test serves a SavedModel exported in a process (export/export_saved_model.py): the slow
# tier. The fast tier checks the signatures' decoding and limits in test_serving_inputs.py.
pytestmark = pytest.mark.slow

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
                          "--model_dir", str(run), "--output", str(root / "export"),
                          "--max_image_pixels", "1000000"],
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


def _photos(shared_data, n, start=0):
    """Real COCO photos of different sizes: their JPEG bytes and decoded pixels."""
    paths = sorted((shared_data / "coco128").rglob("*.jpg"))[start: start + n]
    data = [p.read_bytes() for p in paths]
    return data, [tf.io.decode_jpeg(d, channels=3).numpy() for d in data]


def _same_detections(out, key, row, alone, alone_key, atol=1e-3):
    """Row ``row`` of request ``key`` equals row 0 of ``alone_key``: count, classes, scores,
    boxes (within ``atol`` px: a batch is padded to a larger canvas, which changes the float
    summation order) and masks (IoU >= 0.99)."""
    n = int(alone[f"{alone_key}__num_detections"][0])
    assert n > 0 and int(out[f"{key}__num_detections"][row]) == n
    for k in ("detection_classes", "detection_scores", "detection_boxes"):
        np.testing.assert_allclose(out[f"{key}__{k}"][row, :n], alone[f"{alone_key}__{k}"][0, :n],
                                   atol=atol)
    h, w = alone[f"{alone_key}__image_shape"][0]
    assert out[f"{key}__image_shape"][row].tolist() == [h, w]
    a = out[f"{key}__detection_masks"][row, :n, :h, :w]
    b = alone[f"{alone_key}__detection_masks"][0, :n, :h, :w]
    assert min(_mask_iou(a[i], b[i]) for i in range(n)) >= 0.99


def _pil_bytes(array, fmt, **options):
    buf = io.BytesIO()
    (Image.fromarray(array) if isinstance(array, np.ndarray) else array).save(buf, fmt, **options)
    return buf.getvalue()


def _example(feature):
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


# The requests of the tests below, one builder per test, all served by one client process (one
# model load). Keys: "<signature>__<test>_<name>"; their order is the order they are served.
def _limit_requests(data):
    (good,), _ = _photos(data, 1)
    bomb = _pil_bytes(np.zeros((10000, 10000), np.uint8), "PNG")  # 97 KB
    big = np.full((1000, 1001, 3), 90, np.uint8)  # 1 001 000 pixels: just over the limit
    over = [_pil_bytes(big, f) for f in ("JPEG", "PNG", "GIF", "BMP", "WEBP")]
    return {"image_bytes__limit_alone": [good], "image_bytes__limit_bomb": [bomb],
            "image_bytes__limit_mixed": [bomb, good] + over}


def _corrupt_requests(data):
    (a, b), _ = _photos(data, 2, start=3)
    corrupt = a[:2] + bytes(len(a) - 4) + a[-2:]  # a JPEG's bytes [2:-2] zeroed
    garbage_png = b"\x89PNG\r\n\x1a\n" + bytes(64) + b"IEND\xaeB`\x82"
    return {"image_bytes__corrupt_a": [a], "image_bytes__corrupt_b": [b],
            "image_bytes__corrupt_mixed": [a, corrupt, b, garbage_png]}


def _format_requests(data):
    (jpeg,), (pixels,) = _photos(data, 1, start=7)
    return {"image_bytes__format_png": [_pil_bytes(pixels, "PNG")],
            # lossless: the same pixels as the PNG
            "image_bytes__format_webp": [_pil_bytes(pixels, "WEBP", lossless=True)],
            "image_bytes__format_bad": [
                _pil_bytes(Image.fromarray(pixels).convert("P"), "BMP"),
                jpeg[: len(jpeg) // 2] + b"\xff\xd9"]}


def _tensor_requests(data):
    return {"image_tensor__tensor_rank3": np.zeros((40, 50, 3), np.uint8),
            "image_tensor__tensor_gray": np.zeros((1, 40, 50, 1), np.uint8),
            "image_tensor__tensor_rgba": np.zeros((1, 40, 50, 4), np.uint8),
            "image_tensor__tensor_zero": np.zeros((1, 0, 5, 3), np.uint8),
            "image_tensor__tensor_empty": np.zeros((0, 40, 50, 3), np.uint8),
            "image_bytes__tensor_empty": [],
            "tf_example__tensor_empty": []}


def _example_requests(data):
    (jpeg,), (pixels,) = _photos(data, 1, start=9)
    h, w = pixels.shape[:2]
    good = make_example(jpeg, "jpeg", h, w, 1, "a.jpg", np.zeros((0, 4)), [], [], [],
                        np.zeros((0, h, w), np.uint8))
    as_int = _example({"image/encoded": tf.train.Feature(
        int64_list=tf.train.Int64List(value=[1, 2]))})
    two = _example({"image/encoded": tf.train.Feature(
        bytes_list=tf.train.BytesList(value=[jpeg, jpeg]))})
    not_image = _example({"image/encoded": tf.train.Feature(
        bytes_list=tf.train.BytesList(value=[b"xyz"]))})
    return {"tf_example__example_good": [good], "image_bytes__example_good": [jpeg],
            "tf_example__example_mixed": [as_int, good, b"\x0a\xff\xff\xff\xff", _example({}),
                                          two, not_image]}


def _png_requests(data):  # the full-resolution masks the png export must reproduce
    photos, _ = _photos(data, 2, start=12)
    return {"image_bytes__png_ab": photos + [b"junk"]}


@pytest.fixture(scope="module")
def served(exported, tmp_path_factory, shared_data):
    """The requests of the builders above, served by the exported model in one client."""
    requests = {}
    for build in (_limit_requests, _corrupt_requests, _format_requests, _tensor_requests,
                  _example_requests, _png_requests):
        for key, value in build(shared_data).items():
            requests[key] = value if isinstance(value, np.ndarray) else np.array(value, object)
    out, meta = _serve(exported[1], requests, tmp_path_factory.mktemp("served"))
    print("timings:", {k: round(v, 2) for k, v in meta["timings"].items()})
    return out, meta


def test_pixel_limit_is_checked_from_the_header(served):
    """A 10000x10000 PNG of 97 KB (and images over the export's 1 MP limit, in each format) get
    an errors entry without being decoded; the rest of the batch is served as if alone."""
    out, meta = served
    errors = [e.decode() for e in out["image_bytes__limit_mixed__errors"]]
    assert errors[0] == ("image of 10000x10000 pixels is over export.max_image_pixels "
                         "(1000000)")
    assert errors[1] == ""
    assert errors[2:] == ["image of 1000x1001 pixels is over export.max_image_pixels "
                          "(1000000)"] * 5
    assert (out["image_bytes__limit_mixed__num_detections"][[0, 2, 3, 4, 5, 6]] == 0).all()
    _same_detections(out, "image_bytes__limit_mixed", 1, out, "image_bytes__limit_alone")
    # Refusing the bomb costs no memory beyond what serving the photo before it took.
    peak = meta["peak_mb"]
    print("peak RSS MB:", {k: round(v) for k, v in peak.items()})
    assert peak["image_bytes__limit_bomb"] - peak["image_bytes__limit_alone"] < 20


def test_a_corrupt_image_affects_only_itself(served):
    out, _ = served
    errors = [e.decode() for e in out["image_bytes__corrupt_mixed__errors"]]
    assert errors[0] == errors[2] == ""
    assert errors[1] == "corrupt JPEG data: the decoder failed"
    assert errors[3].startswith("invalid PNG header") or errors[3].startswith("corrupt PNG")
    assert out["image_bytes__corrupt_mixed__image_shape"][[1, 3]].tolist() == [[0, 0], [0, 0]]
    _same_detections(out, "image_bytes__corrupt_mixed", 0, out, "image_bytes__corrupt_a")
    _same_detections(out, "image_bytes__corrupt_mixed", 2, out, "image_bytes__corrupt_b")


def test_formats_webp_palette_bmp_and_jpeg_cut_short(served):
    out, _ = served
    assert out["image_bytes__format_webp__errors"][0] == b""
    _same_detections(out, "image_bytes__format_webp", 0, out, "image_bytes__format_png", atol=0)
    errors = [e.decode() for e in out["image_bytes__format_bad__errors"]]
    assert errors[0].startswith("8-bit BMP: only 24- and 32-bit BMPs are decoded")
    assert errors[1].startswith("truncated JPEG: the decoder ran out of data")
    assert (out["image_bytes__format_bad__num_detections"] == 0).all()


def test_bad_tensors_are_refused_at_the_signature_and_an_empty_batch_is_served(served):
    out, _ = served
    expected = "image_tensor: images must be uint8 [batch, height, width, 3]; got shape"
    for name, shape in (("rank3", "[40 50 3]"), ("gray", "[1 40 50 1]"),
                        ("rgba", "[1 40 50 4]")):
        message = str(out[f"image_tensor__tensor_{name}__error"])
        assert message.startswith("InvalidArgumentError") and expected in message, message
        assert shape in message
    assert "positive height and width" in str(out["image_tensor__tensor_zero__error"])
    for key in ("image_tensor__tensor_empty", "image_bytes__tensor_empty",
                "tf_example__tensor_empty"):
        assert out[f"{key}__num_detections"].shape == (0,)
        assert out[f"{key}__detection_boxes"].shape == (0, 20, 4)
        assert out[f"{key}__errors"].shape == (0,)


def test_malformed_examples_get_their_reason_and_the_rest_is_served(served):
    out, _ = served
    assert [e.decode() for e in out["tf_example__example_mixed__errors"]] == [
        "image/encoded is an int64 list; expected a bytes list",
        "",
        "not a serialized tf.train.Example",
        "tf.train.Example has no image/encoded bytes (or the bytes are not a tf.train.Example)",
        "image/encoded has 2 values; expected one encoded image",
        "not a JPEG, PNG, GIF, BMP or WebP image",
    ]
    _same_detections(out, "tf_example__example_mixed", 1, out, "tf_example__example_good")
    _same_detections(out, "tf_example__example_good", 0, out, "image_bytes__example_good",
                     atol=0)


def _rest():
    """benchmarks/serving_rest.py: the one implementation here of TF Serving's REST rules."""
    spec = importlib.util.spec_from_file_location("serving_rest",
                                                  REPO / "benchmarks" / "serving_rest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rest_request_bodies(exported):
    _, export_dir, _ = exported
    loaded = tf.saved_model.load(export_dir)
    img = np.random.default_rng(2).integers(0, 255, (48, 64, 3)).astype(np.uint8)
    b64 = base64.b64encode(tf.io.encode_png(img).numpy()).decode()
    rows = {"signature_name": "image_bytes", "instances": [{"b64": b64}, {"b64": b64}]}
    columnar = {"signature_name": "image_bytes", "inputs": {"images": [{"b64": b64}]}}
    tensor_rows = {"signature_name": "image_tensor", "instances": [img.tolist()]}
    outs, rest = [], _rest()
    for body in (rows, columnar, tensor_rows):
        body = json.loads(json.dumps(body))  # exactly what travels over HTTP
        sig = loaded.signatures[body["signature_name"]]
        outs.append(sig(**rest.request_to_tensors(body, sig)))
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


def test_png_masks_and_the_export_section_of_the_run_config(exported, served, tmp_path,
                                                            shared_data):
    """A run whose config sets export.mask_output=png, export.max_detections=5 and
    export.input_types, exported by the CLI without flags but with its post-processing set at
    export (--set model.detection.score_threshold=0.0, a key that changes no weight): the
    SavedModel follows the config, and each PNG decodes to exactly the full-resolution mask
    of the ``full`` export."""
    model = exported[0]
    cfg = mrcnn_tf.load_config(SHAPES, ["export.mask_output=png", "export.max_detections=5",
                                        "export.input_types=[image_bytes, image_tensor]"])
    run = tmp_path / "run"
    os.makedirs(run / "checkpoints")
    make_checkpoint(model).save(str(run / "checkpoints" / "ckpt"))
    write_config(str(run), cfg)
    write_labels(str(run), IDS, NAMES)
    before = set(os.listdir(tempfile.gettempdir()))
    res = subprocess.run([sys.executable, str(REPO / "export" / "export_saved_model.py"),
                          "--model_dir", str(run), "--output", str(tmp_path / "export"),
                          "--set", "model.detection.score_threshold=0.0"],
                         capture_output=True, text=True, timeout=600, cwd=REPO,
                         env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "image_bytes, image_tensor; serving_default = image_bytes" in res.stdout
    left = {d for d in set(os.listdir(tempfile.gettempdir())) - before
            if d.startswith("mrcnn_labels_")}
    assert left == set()
    request = _png_requests(shared_data)
    png, _ = _serve(str(tmp_path / "export" / "1"),
                    {k: np.array(v, object) for k, v in request.items()}, tmp_path)
    full, _ = served
    _, pixels = _photos(shared_data, 2, start=12)
    assert "image_bytes__png_ab__detection_masks" not in png
    masks = png["image_bytes__png_ab__detection_masks_bytes"]
    assert masks.shape == (3, 5)
    for row, image in enumerate(pixels):
        h, w = image.shape[:2]
        assert int(png["image_bytes__png_ab__num_detections"][row]) == 5
        for i in range(5):
            decoded = tf.io.decode_png(masks[row, i]).numpy()
            assert decoded.shape == (h, w, 1) and set(np.unique(decoded)) <= {0, 255}
            np.testing.assert_array_equal(decoded[..., 0] // 255,
                                          full["image_bytes__png_ab__detection_masks"][row, i,
                                                                                       :h, :w])
    assert (masks[2] == b"").all() and png["image_bytes__png_ab__errors"][2] != b""


def test_tf1_session_loader_serves_a_batch_with_bad_images(exported, shared_data):
    """TF Serving runs the SavedModel's graph in a session (no Python): the tf.data decoding of
    image_bytes and the checks of image_tensor work there too."""
    _, export_dir, _ = exported
    (good,), _ = _photos(shared_data, 1, start=20)
    corrupt = good[:2] + bytes(len(good) - 4) + good[-2:]
    with tf.Graph().as_default() as graph, tf.compat.v1.Session(graph=graph) as session:
        meta = tf.compat.v1.saved_model.loader.load(session, ["serve"], export_dir)

        def run(name, value):
            sig = meta.signature_def[name]
            outputs = {k: v.name for k, v in sig.outputs.items()}
            return session.run(outputs, {next(iter(sig.inputs.values())).name: value})

        out = run("image_bytes", np.array([good, corrupt, b"junk"], object))
        assert out["num_detections"][0] > 0 and (out["num_detections"][1:] == 0).all()
        assert [e.decode() for e in out["errors"]] == [
            "", "corrupt JPEG data: the decoder failed", "not a JPEG, PNG, GIF, BMP or WebP image"]
        empty = run("image_tensor", np.zeros((0, 8, 8, 3), np.uint8))
        assert empty["num_detections"].shape == (0,)
        with pytest.raises(tf.errors.InvalidArgumentError, match="got shape"):
            run("image_tensor", np.zeros((1, 8, 8, 4), np.uint8))
