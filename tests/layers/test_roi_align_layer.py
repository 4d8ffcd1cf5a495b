import numpy as np

from mrcnn_tf.layers.roi_align import MultilevelRoIAlign
from mrcnn_tf.ops.roi_align import multilevel_roi_align
from tests.layers.contract import check_layer_contract


def test_contract_and_equals_op():
    rng = np.random.default_rng(0)
    feats = {f"p{lv}": rng.random((2, 128 >> lv, 128 >> lv, 3)).astype(np.float32)
             for lv in range(2, 7)}
    boxes = np.array([[[0, 0, 30, 30], [10, 10, 120, 100]], [[5, 5, 60, 90], [0, 0, 128, 128]]],
                     np.float32)
    kw = dict(output_size=5, sampling_ratio=[1, 2, 3, 4], aligned=False, canonical_size=112.0,
              canonical_level=3)
    _, out = check_layer_contract(MultilevelRoIAlign, kw, (feats, boxes),
                                  expected_shapes=(2, 2, 5, 5, 3), non_default=tuple(kw))
    ref = multilevel_roi_align({lv: feats[f"p{lv}"] for lv in range(2, 6)}, boxes, 5,
                               [1, 2, 3, 4], False, 2, 5, 112.0, 3)
    np.testing.assert_allclose(out.numpy(), ref.numpy())
