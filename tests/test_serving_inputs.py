"""The serving module's request checks, on encoded images and Examples, without a model: the
size read from each format's header, the reasons given for bad bytes, and the isolation of an
input whose decoding fails."""

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from mrcnn_tf import serving


def _encode(array, fmt, **kwargs):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt, **kwargs)
    return buf.getvalue()


SIZES = [(1, 1), (5, 3), (37, 61), (480, 640), (641, 479), (1000, 17), (2, 3000)]
FORMATS = {  # name: (PIL format, options, expected code)
    "png": ("PNG", {}, serving.PNG),
    "gif": ("GIF", {}, serving.GIF),
    "bmp": ("BMP", {}, serving.BMP),
    "webp_lossy": ("WEBP", {"quality": 80}, serving.WEBP),
    "webp_lossless": ("WEBP", {"lossless": True}, serving.WEBP),
    "jpeg": ("JPEG", {}, serving.JPEG),
}


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_header_size_and_format_match_the_decoder(name):
    fmt, options, code = FORMATS[name]
    rng = np.random.default_rng(0)
    for h, w in SIZES:
        if name.startswith("webp") and max(h, w) > 16383:
            continue
        data = _encode(rng.integers(0, 255, (h, w, 3)).astype(np.uint8), fmt, **options)
        got_code, reason, hw = serving._check_bytes(tf.constant(data))
        assert int(got_code) == code and reason.numpy() == b"", (name, h, w, reason)
        status, header_hw, size, image = serving._decode_one(
            tf.constant(data), got_code, reason, hw, tf.constant(10 ** 9, tf.int64))
        assert int(status) == 0
        assert header_hw.numpy().tolist() == [h, w], (name, h, w)
        assert size.numpy().tolist() == [h, w] == list(image.shape[:2])


def test_webp_extended_and_bmp_top_down_headers():
    rng = np.random.default_rng(1)
    rgba = rng.integers(0, 255, (33, 70, 4)).astype(np.uint8)
    data = _encode(rgba, "WEBP", quality=90)  # alpha: the extended (VP8X) layout
    assert data[12:16] == b"VP8X"
    _, reason, hw = serving._check_bytes(tf.constant(data))
    assert reason.numpy() == b"" and hw.numpy().tolist() == [33, 70]
    bmp = bytearray(_encode(rgba[..., :3], "BMP"))
    height = int.from_bytes(bmp[22:26], "little")
    bmp[22:26] = (2 ** 32 - height).to_bytes(4, "little")  # negative height: top-down rows
    _, reason, hw = serving._check_bytes(tf.constant(bytes(bmp)))
    assert reason.numpy() == b"" and hw.numpy().tolist() == [33, 70]


def test_reasons_for_bytes_that_cannot_be_served():
    rng = np.random.default_rng(2)
    img = rng.integers(0, 255, (40, 50, 3)).astype(np.uint8)
    jpeg, png = _encode(img, "JPEG"), _encode(img, "PNG")
    buf = io.BytesIO()
    Image.fromarray(img).convert("P").save(buf, "BMP")
    palette = buf.getvalue()
    cases = {
        b"": "empty image bytes",
        b"x": "not a JPEG, PNG, GIF, BMP or WebP image",
        b"not an image at all": "not a JPEG, PNG, GIF, BMP or WebP image",
        jpeg[: len(jpeg) // 2]: "truncated JPEG (no end marker)",
        png[:-20]: "truncated PNG (no IEND chunk)",
        palette: "8-bit BMP: only 24- and 32-bit BMPs are decoded",
        png[:16] + b"\0" * 8 + png[24:]: "invalid PNG header: size 0x0",
    }
    for data, expected in cases.items():
        _, reason, _ = serving._check_bytes(tf.constant(data))
        assert reason.numpy().decode().startswith(expected), (data[:20], reason)


def test_pixel_limit_is_read_from_the_header_without_decoding():
    data = _encode(np.zeros((3000, 4000), np.uint8), "PNG")  # 12 MP in a few KB
    code, reason, hw = serving._check_bytes(tf.constant(data))
    status, header_hw, _, image = serving._decode_one(
        tf.constant(data), code, reason, hw, tf.constant(12_000_000 - 1, tf.int64))
    assert int(status) == 2 and header_hw.numpy().tolist() == [3000, 4000]
    assert image.shape == (1, 1, 3)  # nothing decoded
    status, *_ = serving._decode_one(tf.constant(data), code, reason, hw,
                                     tf.constant(12_000_000, tf.int64))
    assert int(status) == 0


def test_a_jpeg_cut_short_with_an_end_marker_is_flagged_and_no_real_photo_is(shared_data):
    """libjpeg decodes such a file without error, filling the missing blocks with gray 128; the
    check must flag it on real photos cut at many points, and flag no intact photo."""
    photos = sorted((shared_data / "coco128").rglob("*.jpg"))
    assert len(photos) >= 100
    flagged_intact, missed = [], []
    for k, path in enumerate(photos):
        data = path.read_bytes()
        cuts = [data] + ([data[: int(len(data) * f)] + b"\xff\xd9" for f in (0.3, 0.6, 0.9)]
                         if k % 4 == 0 else [])
        for i, d in enumerate(cuts):
            code, reason, hw = serving._check_bytes(tf.constant(d))
            assert reason.numpy() == b""
            status, *_ = serving._decode_one(tf.constant(d), code, reason, hw,
                                             tf.constant(10 ** 9, tf.int64))
            if i == 0 and int(status) != 0:
                flagged_intact.append(path.name)
            if i > 0 and int(status) != 3:
                missed.append((path.name, i))
    assert flagged_intact == []
    assert missed == [], missed


def test_guarded_map_isolates_the_row_that_fails():
    good = _encode(np.full((6, 9, 3), 200, np.uint8), "PNG")
    corrupt = good[:8] + bytes(len(good) - 16) + good[-8:]
    data = tf.constant([good, corrupt, good, b"\x89PNG\r\n\x1a\n"])
    ok, (images,) = serving._guarded_map(
        lambda d: (tf.io.decode_png(d, channels=3),), (data,), tf.constant(4))
    assert ok.numpy().tolist() == [True, False, True, False]
    assert images.shape == (4, 6, 9, 3)
    assert (images.numpy()[[0, 2]] == 200).all() and (images.numpy()[[1, 3]] == 0).all()
    ok, (images,) = serving._guarded_map(lambda d: (tf.io.decode_png(d, channels=3),),
                                         (data[1:2],), tf.constant(1))
    assert ok.numpy().tolist() == [False] and images.shape[0] == 1


def _example(feature):
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def test_each_malformed_example_gets_its_reason():
    def b(values):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=values))

    examples = [
        _example({"image/encoded": b([b"abc"])}),
        _example({}),
        _example({"image/encoded": tf.train.Feature(int64_list=tf.train.Int64List(value=[1]))}),
        _example({"image/encoded": tf.train.Feature(
            float_list=tf.train.FloatList(value=[1.0, 2.0]))}),
        _example({"image/encoded": b([b"a", b"b"])}),
        b"\x0a\xff\xff\xff\xff",  # a length prefix past the end: not a protocol buffer
    ]
    encoded, reasons = serving._parse_examples(tf.constant(examples))
    assert encoded.numpy()[0] == b"abc"
    assert [r.decode() for r in reasons.numpy()] == [
        "",
        "tf.train.Example has no image/encoded bytes (or the bytes are not a tf.train.Example)",
        "image/encoded is an int64 list; expected a bytes list",
        "image/encoded is a float list; expected a bytes list",
        "image/encoded has 2 values; expected one encoded image",
        "not a serialized tf.train.Example",
    ]
