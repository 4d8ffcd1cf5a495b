import numpy as np

from mrcnn_tf.visualize import draw_detections, save_png


def test_draws_masks_boxes_and_labels(tmp_path):
    image = np.full((120, 160, 3), 100, np.uint8)
    masks = np.zeros((2, 120, 160), np.uint8)
    masks[0, 40:80, 40:100] = 1
    det = {"detection_boxes": np.array([[40, 40, 80, 100], [5, 5, 20, 20]], np.float32),
           "detection_scores": np.array([0.9, 0.3], np.float32),
           "detection_classes": np.array([2, 1]), "detection_masks": masks,
           "num_detections": 2}
    out = draw_detections(image, det, ["circle", "square"], score_threshold=0.5)
    assert out.dtype == np.uint8 and out.shape == image.shape
    inside = out[60, 70].astype(int)
    assert (inside != 100).any() and (np.abs(inside - 100) < 100).all()  # translucent tint
    assert (out[40, 60] != out[60, 70]).any()  # box outline differs from the fill
    assert (out[36:39, 40:80] == 255).any()  # white label text above the box
    assert (out[10, 10] == 100).all()  # the 0.3 detection is not drawn
    save_png(str(tmp_path / "x.png"), out)
    assert (tmp_path / "x.png").read_bytes()[:4] == b"\x89PNG"


def test_box_masks_are_pasted():
    image = np.zeros((50, 50, 3), np.uint8)
    det = {"detection_boxes": np.array([[10, 10, 30, 30]], np.float32),
           "detection_scores": np.array([0.8], np.float32), "detection_classes": np.array([1]),
           "detection_masks": np.ones((1, 28, 28), np.float32)}
    out = draw_detections(image, det, {1: "thing"})
    assert out[20, 20].any() and not out[40, 40].any()


def test_labels_keep_case_spaces_and_non_ascii_names():
    """Names are drawn as written (Pillow text), not upper-cased or replaced by '?'."""
    image = np.full((200, 300, 3), 60, np.uint8)
    det = {"detection_boxes": np.array([[100, 20, 180, 200]], np.float32),
           "detection_scores": np.array([0.9], np.float32), "detection_classes": np.array([1])}

    def draw(name):
        return draw_detections(image, det, [name])

    lower, upper = draw("traffic light"), draw("TRAFFIC LIGHT")
    assert (lower != upper).any()
    accented, plain = draw("café"), draw("caf?")
    assert (accented != plain).any()
    label = lower[70:100, 20:200]  # above the box: white text on the instance colour
    assert (label == 255).all(axis=-1).sum() > 30
    assert (draw("traffic light") == lower).all()  # deterministic


def test_precision_recall_plot():
    from mrcnn_tf.visualize import PALETTE, draw_pr_curves

    flat = [1.0] * 51 + [0.0] * 50
    img = draw_pr_curves({"bbox IoU=0.50": flat, "segm IoU=0.50": np.linspace(1, 0, 101)})
    assert img.shape == (360, 480, 3) and img.dtype == np.uint8
    for j in range(2):  # each curve is drawn in its colour
        assert (img == PALETTE[j]).all(axis=-1).sum() > 100
    # The first curve is at precision 1 (the plot's top edge, y = 26) over the left half.
    assert (img[25:29, 60:250] == PALETTE[0]).all(axis=-1).any(axis=0).mean() > 0.9
