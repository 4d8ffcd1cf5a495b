"""Balanced positive/negative sampling with a static output shape.

Same distribution as torchvision's BalancedPositiveNegativeSampler (uniform subsets: at most
``num_samples * positive_fraction`` positives, negatives fill the rest), but implemented as top-k
over random keys, so the output is always ``num_samples`` rows with a validity mask: no
``tf.where``-sized tensors, which keeps graphs static for distribution, XLA and TPUs (KerasCV's
approach).
"""

from __future__ import annotations

import tensorflow as tf


def _random_keys(shape, seed):
    if seed is None:
        return tf.random.uniform(shape, 0.0, 1.0)
    return tf.random.stateless_uniform(shape, seed=seed, minval=0.0, maxval=1.0)


def sample_balanced(labels: tf.Tensor, num_samples: int | None, positive_fraction: float,
                    seed=None) -> dict:
    """Samples up to ``num_samples`` rows per image: positives first, then negatives.

    Args:
      labels: [B, N] int; 1 (or any value >= 1) positive, 0 negative, -1 ignored (padding too).
      num_samples: S, rows per image; None: no sampling, every positive then every negative row
        in index order (S = N, ``positive_fraction`` unused).
      positive_fraction: at most ``int(S * positive_fraction)`` positives; negatives fill up to S.
      seed: optional [2] int seed for ``tf.random.stateless_uniform``; None uses the global RNG.
    Returns:
      dict with ``indices`` [B, S] int32 into N (0 where invalid), ``valid`` [B, S] bool,
      ``is_positive`` [B, S] bool, ``num_positive`` [B] int32, ``num_negative`` [B] int32.
      Valid rows come first: positions [0, num_positive) are positives, then negatives.

    Example: labels [1, 0, 0, -1, 1, 0], S = 4, fraction 0.25 -> 1 positive (of 2) and 3
    negatives (all 3): valid [T, T, T, T], is_positive [T, F, F, F].
    """
    labels = tf.convert_to_tensor(labels)
    if num_samples is None:
        return _take_all(labels)
    batch = tf.shape(labels)[0]
    n = tf.shape(labels)[1]
    pos = labels >= 1
    neg = tf.equal(labels, 0)
    max_pos = int(num_samples * positive_fraction)
    num_pos = tf.minimum(tf.reduce_sum(tf.cast(pos, tf.int32), axis=1), max_pos)
    num_neg = tf.minimum(tf.reduce_sum(tf.cast(neg, tf.int32), axis=1), num_samples - num_pos)

    keys = _random_keys(tf.shape(labels), seed)
    # Pad with S never-chosen columns so that top_k(k=S) is defined for any N.
    pad = tf.fill(tf.stack([batch, num_samples]), -1.0)
    pos_keys = tf.concat([tf.where(pos, keys, -1.0), pad], axis=1)
    neg_keys = tf.concat([tf.where(neg, keys, -1.0), pad], axis=1)
    pos_idx = tf.math.top_k(pos_keys, k=num_samples, sorted=True).indices  # [B, S]
    neg_idx = tf.math.top_k(neg_keys, k=num_samples, sorted=True).indices

    j = tf.range(num_samples)[None, :]
    take_pos = j < num_pos[:, None]
    neg_j = tf.clip_by_value(j - num_pos[:, None], 0, num_samples - 1)
    indices = tf.where(take_pos, pos_idx, tf.gather(neg_idx, neg_j, batch_dims=1))
    valid = j < (num_pos + num_neg)[:, None]
    indices = tf.where(valid & (indices < n), indices, 0)
    return {
        "indices": indices,
        "valid": valid,
        "is_positive": take_pos,
        "num_positive": num_pos,
        "num_negative": num_neg,
    }


def _take_all(labels: tf.Tensor) -> dict:
    """sample_balanced's result when nothing is sampled away: all positives, then negatives."""
    rank = tf.where(labels >= 1, 2, tf.where(tf.equal(labels, 0), 1, 0))
    indices = tf.argsort(rank, axis=1, direction="DESCENDING", stable=True)
    sorted_rank = tf.gather(rank, indices, batch_dims=1)
    return {
        "indices": tf.where(sorted_rank > 0, indices, 0),
        "valid": sorted_rank > 0,
        "is_positive": sorted_rank == 2,
        "num_positive": tf.reduce_sum(tf.cast(rank == 2, tf.int32), axis=1),
        "num_negative": tf.reduce_sum(tf.cast(rank == 1, tf.int32), axis=1),
    }


def sampled_mask(sample: dict, num_rows) -> tf.Tensor:
    """The rows chosen by :func:`sample_balanced` as a [B, N] bool mask (N = ``num_rows``)."""
    idx = sample["indices"]
    batch = tf.shape(idx)[0]
    b = tf.broadcast_to(tf.range(batch)[:, None], tf.shape(idx))
    coords = tf.stack([b, idx], axis=-1)
    hits = tf.scatter_nd(coords, tf.cast(sample["valid"], tf.int32), tf.stack([batch, num_rows]))
    return hits > 0
