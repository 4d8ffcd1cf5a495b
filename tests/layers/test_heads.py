import numpy as np
import pytest
import tensorflow as tf

from mrcnn_tf.layers.heads import BoxHead, MaskHead
from tests.layers.contract import check_layer_contract, rand


def test_box_head_contract_2fc():
    x = rand(2, 3, 7, 7, 8)
    check_layer_contract(BoxHead, dict(num_classes=4, fc_dim=16, dropout=0.5), (x,),
                         expected_shapes={"class_logits": (2, 3, 5), "box_deltas": (2, 3, 5, 4)},
                         non_default=("num_classes", "fc_dim", "dropout"))


def test_box_head_contract_4conv1fc_agnostic():
    x = rand(1, 2, 14, 14, 8)
    kw = dict(num_classes=3, head_type="4conv1fc", fc_dim=16, conv_dim=8, norm="group_norm",
              class_agnostic=True, group_norm_groups=4)
    head, _ = check_layer_contract(BoxHead, kw, (x,),
                                   expected_shapes={"class_logits": (1, 2, 4),
                                                    "box_deltas": (1, 2, 1, 4)},
                                   non_default=tuple(kw))
    assert len(head.convs) == 4 and len(head.fcs) == 1


def test_box_head_flattens_row_major_and_param_count():
    head = BoxHead(num_classes=2, fc_dim=4)
    x = rand(1, 1, 7, 7, 3)
    head(x)
    fc1 = head.fcs[0]
    manual = tf.nn.relu(x.reshape(1, -1) @ fc1.kernel.numpy() + fc1.bias.numpy())
    manual = tf.nn.relu(manual @ head.fcs[1].kernel.numpy() + head.fcs[1].bias.numpy())
    logits = manual @ head.class_logits.kernel.numpy() + head.class_logits.bias.numpy()
    np.testing.assert_allclose(head(x)["class_logits"].numpy()[0], logits, rtol=1e-5, atol=1e-6)
    assert head.count_params() == (147 * 4 + 4) + (4 * 4 + 4) + (4 * 3 + 3) + (4 * 12 + 12)


def test_mask_head_contract():
    x = rand(2, 3, 14, 14, 8)
    kw = dict(num_classes=4, num_convs=2, conv_dim=8, norm="bn")
    check_layer_contract(MaskHead, kw, (x,), expected_shapes=(2, 3, 28, 28, 5),
                         non_default=tuple(kw))
    agnostic = MaskHead(num_classes=4, conv_dim=8, class_agnostic=True)
    assert agnostic(x).shape == (2, 3, 28, 28, 1)


def test_rejects_unknown_head_type():
    with pytest.raises(ValueError, match="head_type"):
        BoxHead(2, head_type="3fc")


@pytest.mark.parametrize("head_cls, kw", [
    (BoxHead, dict(num_classes=3, head_type="4conv1fc", fc_dim=16, conv_dim=8, norm="bn")),
    (MaskHead, dict(num_classes=3, num_convs=2, conv_dim=8, norm="bn")),
])
def test_padded_rois_do_not_change_the_real_rois_in_training(head_cls, kw):
    """With batch norm in training, the outputs of real RoIs (``valid``) do not depend on the
    padded rows beside them: torchvision v2's heads normalise over the sampled RoIs only."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 4, 7, 7, 8)).astype(np.float32)
    valid = np.array([[True, True, False, False], [True, True, True, False]])
    head = head_cls(**kw)
    outs = []
    for fill in (0.0, 1e3):
        padded = np.where(valid[..., None, None, None], x, fill).astype(np.float32)
        out = head(padded, training=True, valid=tf.constant(valid))
        outs.append(out if isinstance(out, dict) else {"masks": out})
    for key in outs[0]:
        np.testing.assert_allclose(outs[0][key].numpy()[valid], outs[1][key].numpy()[valid],
                                   rtol=1e-4, atol=1e-5)
    # Without ``valid`` the padding enters the statistics and changes them.
    a = head(np.where(valid[..., None, None, None], x, 0.0).astype(np.float32), training=True)
    b = head(np.where(valid[..., None, None, None], x, 1e3).astype(np.float32), training=True)
    a, b = (v if isinstance(v, dict) else {"masks": v} for v in (a, b))
    key = next(iter(a))
    real_a, real_b = a[key].numpy()[valid], b[key].numpy()[valid]
    assert np.abs(real_a - real_b).max() > 0.1 * np.abs(real_a).max()
