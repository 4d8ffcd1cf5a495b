import numpy as np
import pytest
import tensorflow as tf

from mrcnn_tf.layers.proposals import ProposalGenerator
from mrcnn_tf.ops.anchors import multilevel_anchors
from tests.layers.contract import check_layer_contract, rand
from tests.ops import reference

# Two levels, four anchors each; image 100 x 100.
ANCHORS = [np.array([[0, 0, 20, 20], [1, 1, 21, 21], [50, 50, 70, 70], [90, 90, 130, 130]],
                    np.float32),
           np.array([[0, 0, 20, 20], [10, 60, 40, 90], [0, 0, 0.0005, 10], [30, 30, 60, 60]],
                    np.float32)]


def _inputs(batch=1):
    logits = [np.tile(np.array([[3.0, 2.0, 1.0, 0.0]], np.float32), [batch, 1]),
              np.tile(np.array([[2.5, 1.5, 4.0, -1.0]], np.float32), [batch, 1])]
    deltas = [np.zeros((batch, 4, 4), np.float32) for _ in range(2)]
    return logits, deltas, ANCHORS, np.full((batch, 2), 100, np.int32)


def test_contract():
    kw = dict(pre_nms_topk_test=3, post_nms_topk_test=5, nms_threshold=0.6, nms_per_level=False,
              min_box_size=0.01, score_threshold=0.1, box_coder_weights=(2.0, 2.0, 1.0, 1.0))
    check_layer_contract(ProposalGenerator, kw, _inputs(2),
                         expected_shapes={"boxes": (2, 5, 4), "scores": (2, 5), "valid": (2, 5)},
                         non_default=tuple(kw))


def test_hand_computed_per_level():
    gen = ProposalGenerator(pre_nms_topk_test=3, post_nms_topk_test=6, nms_threshold=0.7)
    out = {k: v.numpy()[0] for k, v in gen(*_inputs()).items()}
    # Level 0 top-3: anchors 0, 1, 2; anchor 1 (IoU 0.82 with 0) suppressed. Level 1 top-3:
    # anchor 2 is thinner than min_box_size (dropped), anchors 0 and 1 kept. The clipped
    # anchor 3 of level 0 is not in its top-3.
    sig = lambda v: 1 / (1 + np.exp(-v))
    np.testing.assert_allclose(out["scores"][:4], sig(np.array([3.0, 2.5, 1.5, 1.0])), rtol=1e-6)
    np.testing.assert_allclose(out["boxes"][:4], [[0, 0, 20, 20], [0, 0, 20, 20],
                                                 [10, 60, 40, 90], [50, 50, 70, 70]])
    np.testing.assert_array_equal(out["valid"], [True] * 4 + [False] * 2)
    assert (out["boxes"][4:] == 0).all() and (out["scores"][4:] == 0).all()


def test_across_levels_clipping_and_train_counts():
    gen = ProposalGenerator(pre_nms_topk_train=4, post_nms_topk_train=8, pre_nms_topk_test=1,
                            post_nms_topk_test=2, nms_per_level=False)
    out = gen(*_inputs(), training=True)
    boxes, valid = out["boxes"].numpy()[0], out["valid"].numpy()[0]
    assert boxes.shape == (8, 4)
    # Across levels the duplicate [0, 0, 20, 20] is suppressed; the clipped anchor stays.
    assert valid.sum() == 5
    assert [90, 90, 100, 100] in boxes[valid].tolist()
    assert gen(*_inputs(), training=False)["boxes"].shape == (1, 2, 4)


def test_softmax_objectness_and_no_gradient():
    logits = [tf.Variable(rand(1, 4, 2)) for _ in range(2)]
    deltas = [tf.Variable(rand(1, 4, 4) * 0.1) for _ in range(2)]
    gen = ProposalGenerator(pre_nms_topk_test=4, post_nms_topk_test=4)
    with tf.GradientTape() as tape:
        out = gen(logits, deltas, ANCHORS, np.array([[100, 100]]))
        total = tf.reduce_sum(out["boxes"]) + tf.reduce_sum(out["scores"])
    grads = tape.gradient(total, logits + deltas)
    assert all(g is None for g in grads)
    assert out["valid"].numpy().sum() >= 1


def test_min_box_size_zero_drops_empty_boxes_only():
    """min_box_size 0 is detectron2's Boxes.nonempty(): a box clipped to zero width (an anchor
    wholly outside the image) is dropped, a 0.0005 px-thin one is kept (1e-3 drops both)."""
    anchors = [np.array([[0, 0, 20, 20], [0, 0, 0.0005, 10], [-30, -30, -10, -10]], np.float32)]
    logits = [np.array([[3.0, 2.0, 1.0]], np.float32)]
    deltas = [np.zeros((1, 3, 4), np.float32)]
    sizes = np.full((1, 2), 100, np.int32)
    for min_size, kept in ((0.0, 2), (1e-3, 1)):
        gen = ProposalGenerator(pre_nms_topk_test=3, post_nms_topk_test=3, nms_threshold=0.7,
                                min_box_size=min_size)
        assert int(np.sum(gen(logits, deltas, anchors, sizes)["valid"])) == kept, min_size


def _reference_proposals(gen, logits, deltas, anchors, image_sizes, pre, post):
    """torchvision's filter_proposals for one batch, level by level in numpy (the sigmoid and
    the box decoding are the layer's own elementwise ops, tested elsewhere)."""
    out = []
    for b in range(logits[0].shape[0]):
        cands = []  # (probability, level, box), level-major, each level in NMS order
        all_boxes, all_probs = [], []
        for lv, (lg, dl, anc) in enumerate(zip(logits, deltas, anchors)):
            top = np.argsort(-lg[b], kind="stable")[:min(pre, lg.shape[1])]
            probs = tf.sigmoid(lg[b][top]).numpy()
            boxes = gen.coder.decode(dl[b][top], anc[top]).numpy()
            h, w = image_sizes[b]
            boxes = np.stack([np.clip(boxes[:, 0], 0, h), np.clip(boxes[:, 1], 0, w),
                              np.clip(boxes[:, 2], 0, h), np.clip(boxes[:, 3], 0, w)], 1)
            bh, bw = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
            big = ((bh >= gen.min_box_size) & (bw >= gen.min_box_size) if gen.min_box_size > 0
                   else (bh > 0) & (bw > 0))
            keep = big & (probs >= gen.score_threshold)
            boxes, probs = boxes[keep], probs[keep]
            if gen.nms_per_level:
                kept = reference.greedy_nms(boxes, probs, gen.nms_threshold)
                cands += [(probs[i], lv, tuple(boxes[i])) for i in kept]
            else:
                all_boxes.append(boxes)
                all_probs.append(probs)
        if not gen.nms_per_level:
            boxes, probs = np.concatenate(all_boxes), np.concatenate(all_probs)
            cands = [(probs[i], 0, tuple(boxes[i]))
                     for i in reference.greedy_nms(boxes, probs, gen.nms_threshold)]
        order = sorted(range(len(cands)), key=lambda i: -cands[i][0])  # stable: level-major
        out.append([cands[i] for i in order[:post]])
    return out


@pytest.mark.parametrize("nms_impl", ["tf", "static"])
def test_matches_a_level_by_level_reference_on_many_inputs(nms_impl):
    """The stacked levels ([B, L, K], one NMS) keep torchvision's proposals level by level: five
    levels of real anchors (two shorter than the top-k, so padded), saturated logits (tied
    probabilities of 1.0), both NMS modes, both size rules, training and test counts, batch 2
    with different image sizes."""
    rng = np.random.default_rng(7)
    canvas = (160, 224)
    grids = {lv: (-(-canvas[0] // 2 ** lv), -(-canvas[1] // 2 ** lv)) for lv in range(2, 7)}
    anchors_by_level = multilevel_anchors(canvas, grids, (32, 64, 128, 256, 512),
                                          (0.5, 1.0, 2.0))
    anchors = [anchors_by_level[lv].numpy() for lv in grids]
    for case in range(8):
        per_level, min_size = case % 2 == 0, (1e-3, 0.0)[case // 2 % 2]
        training, score_threshold = case // 4 == 1, (0.0, 0.3)[case % 3 == 0]
        pre, post = (300, 200) if training else (150, 400)
        gen = ProposalGenerator(pre_nms_topk_train=300, post_nms_topk_train=200,
                                pre_nms_topk_test=150, post_nms_topk_test=400,
                                nms_threshold=0.7, nms_per_level=per_level,
                                min_box_size=min_size, score_threshold=score_threshold,
                                nms_impl=nms_impl)
        logits, deltas = [], []
        for anc in anchors:
            lg = rng.normal(0.0, 3.0, (2, len(anc))).astype(np.float32)
            saturated = rng.random((2, len(anc))) < 0.05
            lg[saturated] = 20.0 + rng.random(int(saturated.sum())).astype(np.float32)
            logits.append(lg)
            deltas.append(rng.normal(0.0, 0.5, (2, len(anc), 4)).astype(np.float32))
        sizes = np.array([[160, 224], [rng.integers(60, 160), rng.integers(60, 224)]], np.int32)
        got = gen(logits, deltas, anchors, sizes, training=training)
        want = _reference_proposals(gen, logits, deltas, anchors, sizes, pre, post)
        for b in range(2):
            n = len(want[b])
            valid = got["valid"].numpy()[b]
            assert valid.sum() == n and valid[:n].all(), (case, b)
            # Elementwise ops on differently shaped arrays may round 1 ulp apart.
            np.testing.assert_allclose(got["scores"].numpy()[b, :n], [c[0] for c in want[b]],
                                       rtol=1e-6, err_msg=f"case {case} image {b}")
            np.testing.assert_allclose(got["boxes"].numpy()[b, :n], [c[2] for c in want[b]],
                                       rtol=1e-6, atol=1e-4, err_msg=f"case {case} image {b}")
            assert (got["boxes"].numpy()[b, n:] == 0).all()
