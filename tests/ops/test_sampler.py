import numpy as np
import tensorflow as tf

from mrcnn_tf.ops.sampler import sample_balanced, sampled_mask


def test_docstring_example():
    labels = tf.constant([[1, 0, 0, -1, 1, 0]])
    s = sample_balanced(labels, 4, 0.25, seed=(1, 2))
    np.testing.assert_array_equal(s["valid"].numpy(), [[True] * 4])
    np.testing.assert_array_equal(s["is_positive"].numpy(), [[True, False, False, False]])
    idx = s["indices"].numpy()[0]
    assert idx[0] in (0, 4) and sorted(idx[1:]) == [1, 2, 5]


def test_counts_and_validity_with_padding():
    rng = np.random.default_rng(0)
    labels = rng.choice([-1, 0, 1], (3, 500), p=[0.3, 0.6, 0.1])
    labels[2] = -1  # an image with nothing to sample
    labels[1, :] = np.where(labels[1] == 0, -1, labels[1])  # only positives and ignored
    s = sample_balanced(tf.constant(labels), 64, 0.5, seed=(3, 4))
    npos = (labels >= 1).sum(1)
    nneg = (labels == 0).sum(1)
    exp_pos = np.minimum(npos, 32)
    exp_neg = np.minimum(nneg, 64 - exp_pos)
    np.testing.assert_array_equal(s["num_positive"].numpy(), exp_pos)
    np.testing.assert_array_equal(s["num_negative"].numpy(), exp_neg)
    idx, valid, ispos = (s[k].numpy() for k in ("indices", "valid", "is_positive"))
    for b in range(3):
        chosen = idx[b][valid[b]]
        assert len(set(chosen)) == len(chosen)  # no duplicates
        np.testing.assert_array_equal(labels[b][chosen] >= 1, ispos[b][valid[b]])
        assert (labels[b][chosen] >= 0).all()  # never an ignored row
    mask = sampled_mask(s, 500).numpy()
    np.testing.assert_array_equal(mask.sum(1), exp_pos + exp_neg)


def test_fewer_rows_than_samples_and_determinism():
    labels = tf.constant([[1, 0, 0]])
    a = sample_balanced(labels, 8, 0.5, seed=(5, 6))
    b = sample_balanced(labels, 8, 0.5, seed=(5, 6))
    assert a["indices"].shape == (1, 8)
    np.testing.assert_array_equal(a["valid"].numpy(), [[True] * 3 + [False] * 5])
    np.testing.assert_array_equal(a["indices"].numpy(), b["indices"].numpy())


def test_uniform_over_positives():
    labels = tf.constant([[1] * 10 + [0] * 10])
    counts = np.zeros(20)
    for i in range(300):
        s = sample_balanced(labels, 4, 0.25, seed=(i, 0))
        counts[s["indices"].numpy()[0, 0]] += 1
    assert counts[10:].sum() == 0
    # Each positive drawn about 30 times out of 300; a biased sampler would pile up on a few.
    assert counts[:10].min() > 10 and counts[:10].max() < 60


def _chi2_critical(df, z=3.09):
    """Upper 0.999 quantile of chi-square with ``df`` degrees of freedom (Wilson-Hilferty)."""
    return df * (1 - 2 / (9 * df) + z * np.sqrt(2 / (9 * df))) ** 3


def _chi2(counts):
    expected = counts.sum() / len(counts)
    return ((counts - expected) ** 2 / expected).sum()


def test_samples_are_uniform_among_candidates_chi_square():
    """400 independent images with the same labels (40 positives, 200 negatives, 60 ignored),
    64 samples at 25%: each positive should be drawn 400 * 16 / 40 times and each negative
    400 * 48 / 200 times. A chi-square test at p = 0.001 rejects a sampler that favours some
    candidates (shown below on a 'first k' sampler, which a top-k over unshuffled keys would be);
    sampling without replacement only lowers the statistic's variance, so the test is
    conservative."""
    rng = np.random.default_rng(0)
    labels = np.array([1] * 40 + [0] * 200 + [-1] * 60)
    rng.shuffle(labels)
    batch = np.tile(labels, (400, 1))
    s = sample_balanced(tf.constant(batch), 64, 0.25)
    idx, valid, pos = (s[k].numpy() for k in ("indices", "valid", "is_positive"))
    assert valid.all() and (pos.sum(1) == 16).all()
    counts = np.bincount(idx.ravel(), minlength=len(labels))
    assert counts[labels == -1].sum() == 0
    for kind in (1, 0):
        c = counts[labels == kind]
        stat, crit = _chi2(c), _chi2_critical(len(c) - 1)
        print(f"label {kind}: chi2 {stat:.1f} (critical {crit:.1f})")
        assert stat < crit
    # The same test rejects a biased sampler: the first 16 positives every time.
    biased = np.zeros(40)
    biased[:16] = 400
    assert _chi2(biased) > _chi2_critical(39)


def test_no_sampling_takes_every_positive_then_every_negative():
    labels = tf.constant([[0, 1, -1, 0, 1, 1], [-1, -1, 0, -1, -1, -1]])
    s = sample_balanced(labels, None, 0.25)
    np.testing.assert_array_equal(s["indices"].numpy()[0], [1, 4, 5, 0, 3, 0])
    np.testing.assert_array_equal(s["valid"].numpy(), [[1, 1, 1, 1, 1, 0], [1, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(s["is_positive"].numpy()[0], [1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(s["num_positive"].numpy(), [3, 0])
    np.testing.assert_array_equal(s["num_negative"].numpy(), [2, 1])
