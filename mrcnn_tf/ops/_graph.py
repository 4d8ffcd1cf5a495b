"""Graph-building helpers shared by the ops and layers: :func:`dims` (static sizes where known),
and one dispatch for the ops whose loops are TensorFlow loops (``tf.map_fn``, ``tf.while_loop``).

Called eagerly, such a loop runs its body in Python once per element (minutes for a few
thousand RoIs), so eager calls go through a graph function. Inside a traced function (the
train step, the serving signature) the same code is plain ops: a nested ``tf.function`` there
would be traced as a function of its own, with its own AutoGraph pass, on every first trace
of the step.
"""

from __future__ import annotations

import functools

import tensorflow as tf


def graph_when_eager(fn):
    """Wraps ``fn`` so that an eager call runs it as a ``tf.function`` and a traced call runs
    it as plain ops.

    The graph function has ``autograph=False`` (the loops are already TensorFlow ops) and
    ``reduce_retracing=True``; Python arguments (sizes, flags) are part of its trace key, as
    in any ``tf.function``. ``fn`` itself stays reachable as ``wrapper.python_function``.
    """
    graph_fn = tf.function(fn, reduce_retracing=True, autograph=False)

    @functools.wraps(fn)
    def wrapper(*args):
        if tf.executing_eagerly():
            return graph_fn(*args)
        return fn(*args)

    wrapper.python_function = fn
    return wrapper


def dims(x) -> list:
    """The shape of ``x`` as a list: Python ints where the static shape has them, scalar tensors
    (``tf.shape``) elsewhere. Static sizes keep shape arithmetic out of traced graphs."""
    static = x.shape.as_list()
    if x.shape.is_fully_defined():
        return static
    dynamic = tf.unstack(tf.shape(x), len(static))
    return [s if s is not None else d for s, d in zip(static, dynamic)]
